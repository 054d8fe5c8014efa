"""The server's HTTP protocol (app.runner.protocol) on a real loopback socket: an app with its
whole answer ready writes it at once through the scope's WHOLE_ANSWER extension, with the same
keep-alive, pipelining, ``Connection: close`` and HEAD behaviour as uvicorn's two messages; a
connection is closed once it has been idle for the keep-alive time, not while it is in use; and
a client that does not finish its request head within the client timeout, or lets its body
stall that long, is answered 408 and let go."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from app.http.answers import WHOLE_ANSWER, send_answer
from app.observability.logs import Tallied
from app.runner.protocol import OneWriteHttpToolsProtocol, head_limited
from tests.helpers import wait_until

pytestmark = pytest.mark.process


class Recorder:
    """An ASGI app answering ``ok <path>`` through send_answer, recording whether each request
    was offered the whole-answer extension and whether the server took the answer at once."""

    def __init__(self) -> None:
        self.offered: list[bool] = []
        self.whole: list[bool] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/slow":
            await asyncio.sleep(CLIENT_TIMEOUT_S * 2.5)  # the server's turn, however long
        if scope["path"] != "/early":  # answered before its body is read
            while (await receive()).get("more_body"):
                pass
        write = scope.get("extensions", {}).get(WHOLE_ANSWER)
        self.offered.append(write is not None)

        def recording(*args: Any) -> bool:
            taken = bool(write(*args))
            self.whole.append(taken)
            return taken

        if write is not None:
            scope["extensions"] = {WHOLE_ANSWER: recording}
        body = BIG if scope["path"] == "/big" else f"ok {scope['path']}".encode()
        await send_answer(scope, send, 200, body, {"content-type": "text/plain"})


KEEP_ALIVE_S = 1.0
CLIENT_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 20
BIG = b"x" * (16 * 1024 * 1024)
"""An answer larger than the kernel's buffers of a loopback connection hold."""


@pytest.fixture
def served(request: pytest.FixtureRequest) -> Iterator[tuple[Recorder, int]]:
    """The recorder behind uvicorn with the project's protocol, on a free port of 127.0.0.1,
    keeping an idle connection open for KEEP_ALIVE_S (or the seconds the test passes)."""
    keep_alive_s = getattr(request, "param", KEEP_ALIVE_S)
    app = Recorder()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    protocol = head_limited(
        65536, 100, client_timeout_s=CLIENT_TIMEOUT_S, max_connections=MAX_CONNECTIONS
    )
    config = uvicorn.Config(
        app,
        http=protocol,
        log_level="warning",
        lifespan="off",
        timeout_keep_alive=int(keep_alive_s),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])))
    thread.start()
    try:
        while not server.started:
            thread.join(0.01)
        yield app, port
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def settled(app: Recorder, answers: int) -> None:
    """Wait until the server thread has recorded ``answers`` answers: it records one after
    writing it, so the client may read it first."""
    wait_until(lambda: len(app.whole) >= answers, 5, f"{answers} answers recorded")


def exchange(port: int, request: bytes, answers: int) -> bytes:
    """Send ``request`` on one connection and read until ``answers`` whole answers came (or
    the server closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(request)
        received = b""
        while not _complete(received, answers):
            chunk = client.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


def until_closed(port: int, request: bytes) -> bytes:
    """Send ``request`` on one connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(request)
        received = b""
        while chunk := client.recv(65536):
            received += chunk
        return received


def _complete(received: bytes, answers: int) -> bool:
    """Whether ``received`` holds ``answers`` answers, the last with its whole body."""
    if received.count(b"HTTP/1.1 ") < answers or b"\r\n\r\n" not in received:
        return False
    head, _, body = received.rpartition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[-1].split(b"\r\n")[0])
    return len(body) >= length


def test_pipelined_requests_get_whole_answers_in_order_on_one_connection(
    served: tuple[Recorder, int],
) -> None:
    app, port = served
    request = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx"
    request += b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\ny"
    received = exchange(port, request, 2)
    first, second = received.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200 OK\r\n")
    assert first.endswith(b"\r\n\r\nok /a")
    assert second.startswith(b"200 OK\r\n")
    assert second.endswith(b"\r\n\r\nok /b")
    for answer in (first, second):
        assert b"content-length: 5\r\n" in answer
        assert b"connection" not in answer
        assert b"transfer-encoding" not in answer
        assert b"date: " in answer
        assert b"server: uvicorn" in answer
    assert app.offered == [True, True]
    settled(app, 2)
    assert app.whole == [True, True]


def test_connection_close_is_answered_with_close_and_the_connection_ends(
    served: tuple[Recorder, int],
) -> None:
    app, port = served
    request = b"POST /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    received = until_closed(port, request)
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"connection: close\r\n" in received
    assert received.endswith(b"\r\n\r\nok /c")
    settled(app, 1)
    assert app.whole == [True]


def test_a_head_request_goes_through_the_two_messages_and_gets_no_body(
    served: tuple[Recorder, int],
) -> None:
    app, port = served
    received = until_closed(port, b"HEAD /d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-length: 5\r\n" in received
    assert received.endswith(b"\r\n\r\n")  # the head only
    assert app.whole == [False]


def test_a_connection_in_use_stays_open_and_one_idle_for_the_keep_alive_time_is_closed(
    served: tuple[Recorder, int],
) -> None:
    _, port = served
    request = b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        for _ in range(9):  # across several keep-alive times
            time.sleep(KEEP_ALIVE_S / 3)
            client.sendall(request)
            assert client.recv(65536).endswith(b"ok /e")
        idle = time.monotonic()
        assert client.recv(65536) == b""  # the server closed it
        assert KEEP_ALIVE_S * 0.9 <= time.monotonic() - idle < KEEP_ALIVE_S * 4


@pytest.mark.parametrize("served", [60.0], indirect=True)
def test_a_connection_the_client_closed_is_let_go_before_its_keep_alive_time(
    served: tuple[Recorder, int],
) -> None:
    """Its keep-alive timer, armed after its answer, held the protocol (and what it holds) for
    the keep-alive time: a client opening and closing connections fast grew the server."""
    app, port = served
    for _ in range(20):
        exchange(port, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n", 1)
    settled(app, 20)

    def protocols_alive() -> int:
        gc.collect()
        return sum(issubclass(type(thing), OneWriteHttpToolsProtocol) for thing in gc.get_objects())

    wait_until(lambda: protocols_alive() == 0, 10, "the closed connections let go")


def read_until_closed(client: socket.socket, dripping: bytes = b"") -> tuple[bytes, float]:
    """What the server sends until it closes ``client``, and when it closed (monotonic); while
    the server says nothing, ``dripping`` (if any) is sent every tenth of a second."""
    client.settimeout(0.1)
    received = b""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            chunk = client.recv(65536)
        except TimeoutError:
            if dripping:
                client.sendall(dripping)
            continue
        if not chunk:
            return received, time.monotonic()
        received += chunk
    raise AssertionError(f"still open after 20 s, having sent {received[:200]!r}")


def test_a_connection_that_sends_nothing_is_closed_after_the_keep_alive_time(
    served: tuple[Recorder, int],
) -> None:
    _, port = served
    opened = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        received, closed = read_until_closed(client)
    assert received == b""
    assert KEEP_ALIVE_S * 0.9 <= closed - opened < KEEP_ALIVE_S * 4


def test_a_head_dripped_a_field_at_a_time_is_answered_408_once_the_client_timeout_passes(
    served: tuple[Recorder, int],
) -> None:
    """Bytes keep coming, so the connection is not idle; the head's own clock runs out."""
    app, port = served
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        began = time.monotonic()
        client.sendall(b"POST /h HTTP/1.1\r\nHost: x\r\n")
        received, closed = read_until_closed(client, dripping=b"X-Drip: 1\r\n")
    assert received.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), received[:300]
    assert b"connection: close\r\n" in received.lower()
    assert b'"code":"request_timeout"' in received.replace(b" ", b"")
    assert CLIENT_TIMEOUT_S * 0.9 <= closed - began < (CLIENT_TIMEOUT_S + KEEP_ALIVE_S) * 3
    assert app.offered == []  # the app never saw it


def test_a_head_refused_while_the_client_still_sends_it_gets_its_answer_not_a_reset(
    served: tuple[Recorder, int],
) -> None:
    """A 1 MiB head sent in one go: the server answers 431 at 64 KiB. Closed with the rest
    unread, the kernel would reset the connection and the client lose the answer unread; the
    server reads (and drops) the rest, and its answer ends with its side closed."""
    _, port = served
    head = b"GET / HTTP/1.1\r\nX-Big: " + b"x" * (1 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        sender = threading.Thread(target=client.sendall, args=(head,))
        sender.start()
        sender.join(5)
        assert not sender.is_alive()  # the server read it all
        time.sleep(0.2)  # (the last bytes reach the server's buffer before the client reads)
        received, _ = read_until_closed(client)
    assert received.startswith(b"HTTP/1.1 431 "), received[:300]
    assert received.endswith(b"}")


def test_a_client_that_sends_on_after_its_refusal_is_let_go_after_the_linger_time(
    served: tuple[Recorder, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What comes after a refusal's answer is read and dropped for LINGER_S, no longer: then
    the connection is closed, and the client's next bytes are refused by its kernel."""
    monkeypatch.setattr(OneWriteHttpToolsProtocol, "LINGER_S", 0.5)
    _, port = served
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(b"GET / HTTP/1.1\r\nX-Big: " + b"x" * 70_000)
        received, finished = read_until_closed(client)  # the answer, and this side shut
        assert received.startswith(b"HTTP/1.1 431 ")
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            send_until_refused(client, seconds=10)
    assert time.monotonic() - finished < 0.5 + 3  # the linger time, and the timer's lag


def send_until_refused(client: socket.socket, seconds: float) -> None:
    """Send a header line every tenth of a second, for ``seconds`` at most."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        client.sendall(b"X-More: 1\r\n")
        time.sleep(0.1)


def test_the_408s_of_many_connections_at_once_are_one_log_line_and_a_count(
    served: tuple[Recorder, int],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A line each, a burst of them held the event loop (each formatted and handed over) and
    every request with it: 3,000 timed-out heads held a predict 0.2-0.5 s."""
    monkeypatch.setattr(Tallied, "INTERVAL_S", 2.0)
    _, port = served
    with caplog.at_level(logging.WARNING, "app.runner.protocol"), contextlib.ExitStack() as open_:
        clients = [
            open_.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5))
            for _ in range(20)
        ]
        for client in clients:
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never ended
        answers = [read_until_closed(client)[0] for client in clients]
        time.sleep(2.5)  # the interval ends: the count is told
    assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in answers)
    lines = [message for message in caplog.messages if "request head not whole" in message]
    counts = [message for message in caplog.messages if "connections timed out" in message]
    assert len(lines) == 1
    assert counts == ["19 more connections timed out in the last 2 s"]


def test_a_body_left_without_a_byte_for_the_client_timeout_is_let_go(
    served: tuple[Recorder, int],
) -> None:
    app, port = served
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        stalled = time.monotonic()
        received, closed = read_until_closed(client)
    assert b"200 OK" not in received
    assert CLIENT_TIMEOUT_S * 0.9 <= closed - stalled < CLIENT_TIMEOUT_S * 4
    assert True not in app.whole  # the app was told the client left; its answer went nowhere


def test_a_body_that_trickles_for_longer_than_the_client_timeout_is_read_and_answered(
    served: tuple[Recorder, int],
) -> None:
    _, port = served
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(b"POST /t HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n")
        for byte in b"trickled":  # 2.4 s in all, a byte every 0.3 s
            time.sleep(CLIENT_TIMEOUT_S * 0.3)
            client.sendall(bytes([byte]))
        assert client.recv(65536).endswith(b"\r\n\r\nok /t")


def test_an_answer_the_server_takes_longer_than_the_client_timeout_to_make_is_not_cut(
    served: tuple[Recorder, int],
) -> None:
    _, port = served
    received = exchange(port, b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 1)
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert received.endswith(b"ok /slow")


def test_a_connection_answered_before_its_body_ended_is_idle_once_the_body_ends(
    served: tuple[Recorder, int],
) -> None:
    """The rest of the body is read (and dropped) as it comes; then the keep-alive time runs."""
    _, port = served
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nab")
        assert client.recv(65536).endswith(b"ok /early")
        time.sleep(KEEP_ALIVE_S * 0.5)
        client.sendall(b"cdef")  # the rest of the body
        ended = time.monotonic()
        received, closed = read_until_closed(client)
    assert received == b""
    assert KEEP_ALIVE_S * 0.9 <= closed - ended < KEEP_ALIVE_S * 4


def test_empty_lines_dripped_before_any_request_do_not_hold_the_connection(
    served: tuple[Recorder, int],
) -> None:
    """HTTP lets a client send empty lines before a request: they begin none, but its clock."""
    _, port = served
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        began = time.monotonic()
        _, closed = read_until_closed(client, dripping=b"\r\n")
    assert CLIENT_TIMEOUT_S * 0.9 <= closed - began < (CLIENT_TIMEOUT_S + KEEP_ALIVE_S) * 3


def test_requests_pipelined_past_the_bound_are_not_read_and_the_waiting_ones_are_answered(
    served: tuple[Recorder, int],
) -> None:
    """uvicorn took every request of a read at once, each holding its head and cycle until
    its turn; a client that never reads its answers made the server hold ~30 MB for 4 MB."""
    _, port = served
    waiting = OneWriteHttpToolsProtocol.MAX_PIPELINED
    requests = b"".join(b"GET /p%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(waiting + 50))
    received = until_closed(port, requests)
    answers = received.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == 1 + waiting  # the one being answered and those waiting behind it
    for index, answer in enumerate(answers):
        assert answer.startswith(b"200 OK\r\n")
        assert answer.endswith(b"ok /p%d" % index)
    assert b"connection: close\r\n" in answers[-1]
    assert all(b"connection: close" not in answer for answer in answers[:-1])


@pytest.mark.parametrize("closing", [b"", b"Connection: close\r\n"], ids=["open", "closing"])
def test_a_client_that_does_not_take_its_answer_is_dropped_with_what_was_buffered_for_it(
    served: tuple[Recorder, int], closing: bytes
) -> None:
    """An answer the client does not read stays in the server's buffer: kept for as long as
    the client liked (also once the server had closed its side), a few such clients held any
    amount of the server's memory."""
    _, port = served
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with client:
        client.connect(("127.0.0.1", port))
        client.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n" + closing + b"\r\n")
        time.sleep(CLIENT_TIMEOUT_S * 4)  # not reading: the server's clock runs meanwhile
        client.settimeout(5)
        received = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := client.recv(1024 * 1024):
                received += len(chunk)
    assert 0 < received < len(BIG)


def test_a_connection_upgraded_to_a_websocket_is_left_to_its_protocol(
    served: tuple[Recorder, int], caplog: pytest.LogCaptureFixture
) -> None:
    """The app takes no WebSocket (uvicorn refuses it) and the connection closes through the
    WebSocket protocol; the HTTP protocol's timer, still running, took it for a client that had not
    read its last answer and logged it dropped."""
    _, port = served
    upgrade = (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(upgrade)
        assert client.recv(65536).startswith(b"HTTP/1.1 5")  # the app did not accept it
        time.sleep(KEEP_ALIVE_S + CLIENT_TIMEOUT_S * 2.5)  # the timer's fires, had it kept on
    assert not [r for r in caplog.records if r.name == "app.runner.protocol"]


def test_past_the_connection_cap_those_that_waited_longest_for_their_client_are_closed(
    served: tuple[Recorder, int],
) -> None:
    """A flood of silent connections used up the process's file descriptors, and the next
    client got none; past the cap, the oldest of them make way for it."""
    _, port = served
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS)]
    try:
        answer = exchange(port, b"POST /n HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 1)
        assert answer.endswith(b"ok /n")
        silent[0].settimeout(KEEP_ALIVE_S / 2)  # closed now, not by the keep-alive time
        assert silent[0].recv(1) == b""
        silent[-1].setblocking(False)
        with pytest.raises(BlockingIOError):  # the youngest are left open
            silent[-1].recv(1)
    finally:
        for connection in silent:
            connection.close()


def test_past_the_connection_cap_with_every_connection_served_the_new_one_is_closed(
    served: tuple[Recorder, int],
) -> None:
    _, port = served
    slow = b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    busy = [
        socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(MAX_CONNECTIONS)
    ]
    try:
        for connection in busy:
            connection.sendall(slow)
        time.sleep(0.2)  # every one read: the server's turn on all of them
        with socket.create_connection(("127.0.0.1", port)) as late:
            late.settimeout(KEEP_ALIVE_S / 2)  # closed now, not by the keep-alive time
            assert late.recv(1) == b""
        for connection in busy:  # those being served are answered
            assert connection.recv(65536).endswith(b"ok /slow")
    finally:
        for connection in busy:
            connection.close()
