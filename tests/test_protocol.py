"""The server's HTTP protocol (app.runner.protocol) on a real loopback socket: an app with its
whole answer ready writes it at once through the scope's WHOLE_ANSWER extension, with the same
keep-alive, pipelining, ``Connection: close`` and HEAD behaviour as uvicorn's two messages; and a
connection is closed once it has been idle for the keep-alive time, not while it is in use."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from app.http.answers import WHOLE_ANSWER, send_answer
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
        await receive()
        write = scope.get("extensions", {}).get(WHOLE_ANSWER)
        self.offered.append(write is not None)

        def recording(*args: Any) -> bool:
            taken = bool(write(*args))
            self.whole.append(taken)
            return taken

        if write is not None:
            scope["extensions"] = {WHOLE_ANSWER: recording}
        body = f"ok {scope['path']}".encode()
        await send_answer(scope, send, 200, body, {"content-type": "text/plain"})


KEEP_ALIVE_S = 1.0


@pytest.fixture
def served(request: pytest.FixtureRequest) -> Iterator[tuple[Recorder, int]]:
    """The recorder behind uvicorn with the project's protocol, on a free port of 127.0.0.1,
    keeping an idle connection open for KEEP_ALIVE_S (or the seconds the test passes)."""
    keep_alive_s = getattr(request, "param", KEEP_ALIVE_S)
    app = Recorder()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    protocol = head_limited(65536, 100)
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
