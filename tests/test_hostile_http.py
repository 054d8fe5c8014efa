"""Hostile input against real server processes on 127.0.0.1: request heads without end are
refused with 431 before they cost memory, connections that never finish a request are let go,
and a worker killed while serving (the kernel's OOM killer, say) is replaced however often it
happens."""

from __future__ import annotations

import contextlib
import os
import resource
import select
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from app.runner.supervisor import MAX_FAILED_STARTS
from tests.helpers import (
    LINEAR,
    PeakRss,
    ServerProcess,
    clean_env,
    free_port,
    run_server,
    socket_inodes,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.process

ATTACK_BYTES = 64 * 1024 * 1024
"""How much of a head the attacks stream at most (the server is expected to stop far sooner)."""
MAX_GROWTH_MIB = 32
"""Bound on the server's peak resident-memory growth while a head streams past the cap."""
READY = b"GET /health/ready HTTP/1.1\r\nHost: x\r\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server with the default limits (64 KiB, 100 fields) for the head tests."""
    directory = tmp_path_factory.mktemp("heads")
    with run_server(directory, write_config(directory, LINEAR)) as process:
        yield process


def stream_head(port: int, start: bytes, chunk: bytes) -> tuple[bytes, float]:
    """Send ``start``, then ``chunk`` again and again until the server answers or closes (at
    most ATTACK_BYTES); returns what it answered and the seconds until the answer came."""
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        sent = 0
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            raw.sendall(start)
            while sent < ATTACK_BYTES and not select.select([raw], [], [], 0)[0]:
                raw.sendall(chunk)
                sent += len(chunk)
        select.select([raw], [], [], 10)
        answered_after = time.monotonic() - began
        return read_to_close(raw), answered_after


def read_to_close(raw: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset after its answer included)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := raw.recv(65536):
            data += chunk
            assert len(data) < 1024 * 1024, data[:200]
    return data


def assert_refused_with_431(answer: bytes) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), answer[:300]
    assert b"\r\nconnection: close" in head.lower()
    assert b"\r\ncontent-type: application/json" in head.lower()
    error = orjson.loads(body)
    assert error["code"] == "request_header_fields_too_large"
    assert error["error"]


def test_a_head_streamed_past_the_cap_gets_431_and_close_and_costs_no_memory(
    server: ServerProcess,
) -> None:
    line = b"X-Padding: " + b"a" * 1000 + b"\r\n"
    with PeakRss(server.process.pid) as peak:
        answer, seconds = stream_head(server.port, READY, line * 64)
    print(f"431 after {seconds * 1000:.1f} ms; peak RSS growth {peak.growth_mib:.1f} MiB")
    assert_refused_with_431(answer)
    assert seconds < 5
    assert peak.growth_mib < MAX_GROWTH_MIB
    assert httpx.get(f"{server.url}/health/ready").status_code == 200


def test_one_header_line_without_end_gets_431_and_costs_no_memory(server: ServerProcess) -> None:
    with PeakRss(server.process.pid) as peak:
        answer, seconds = stream_head(server.port, READY + b"X-Endless: ", b"a" * 65536)
    print(f"431 after {seconds * 1000:.1f} ms; peak RSS growth {peak.growth_mib:.1f} MiB")
    assert_refused_with_431(answer)
    assert peak.growth_mib < MAX_GROWTH_MIB
    assert httpx.get(f"{server.url}/health/ready").status_code == 200


def test_an_endless_trailer_after_a_chunked_body_gets_431(server: ServerProcess) -> None:
    start = (
        b"POST /v1/models/linear/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        b"\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-Trailer: "
    )
    with PeakRss(server.process.pid) as peak:
        answer, _ = stream_head(server.port, start, b"a" * 65536)
    assert_refused_with_431(answer)
    assert peak.growth_mib < MAX_GROWTH_MIB


def test_a_url_without_end_gets_431(server: ServerProcess) -> None:
    answer, _ = stream_head(server.port, b"GET /", b"a" * 65536)
    assert_refused_with_431(answer)


def test_more_than_100_header_fields_get_431(server: ServerProcess) -> None:
    fields = b"".join(b"X-Field-%d: 1\r\n" % i for i in range(101))
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(READY + fields + b"\r\n")
        assert_refused_with_431(read_to_close(raw))


def test_a_whole_over_cap_head_after_a_request_in_the_same_write_gets_431(
    server: ServerProcess,
) -> None:
    """The head arrives complete with the request before it: the fields are counted exactly as
    they are parsed (the raw count starts afresh after the first request's end)."""
    fields = b"".join(b"X-Padding-%d: %s\r\n" % (i, b"a" * 1000) for i in range(80))
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(READY + b"\r\n" + READY + fields + b"\r\n")
        answer = read_to_close(raw)
    last = answer.rfind(b"HTTP/1.1 ")
    assert_refused_with_431(answer[last:])


def test_heads_just_under_the_cap_and_100_fields_are_served_with_keep_alive(
    server: ServerProcess,
) -> None:
    end = b"\r\n\r\n"
    padding = b"X-Padding: " + b"a" * (64 * 1024 - len(READY) - len(b"X-Padding: ") - len(end))
    big = READY + padding + end
    assert len(big) == 64 * 1024  # the cap exactly, in one write
    fields = READY + b"".join(b"X-Field-%d: 1\r\n" % i for i in range(99)) + b"\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        for request, whole in (
            (big, True),
            (fields, True),
            (big[:40000], False),
            (big[40000:], True),
        ):
            raw.sendall(request)
            if not whole:
                # what is tested is a head that arrives in two parts: this pause is the gap
                # between them (the server reads the first part on its own), it waits for nothing
                time.sleep(0.1)
                continue
            answer = raw.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
            assert b"connection: close" not in answer.lower()


def test_a_configured_header_cap_is_honoured(tmp_path: Path) -> None:
    config = write_config(tmp_path, LINEAR)
    env = {"MODELPORT_MAX_HEADER_BYTES": "8192", "MODELPORT_MAX_HEADER_COUNT": "10"}
    padding = b"X-Padding: " + b"a" * 8200 + b"\r\n"
    with run_server(tmp_path, config, env=env) as custom:
        for head in (READY + padding, READY + b"".join(b"X-F%d: 1\r\n" % i for i in range(10))):
            with socket.create_connection(("127.0.0.1", custom.port), timeout=10) as raw:
                raw.sendall(head + b"\r\n")
                assert_refused_with_431(read_to_close(raw))
        small = httpx.get(f"{custom.url}/health/ready", headers={"X-Padding": "a" * 7000})
    assert small.status_code == 200


def test_requests_pipelined_and_never_read_cost_no_memory(server: ServerProcess) -> None:
    """Clients that write requests back to back and never read an answer: the server reads
    no further than a bounded few per connection, whatever they send (uvicorn's took every
    request of each read: 20 such clients grew it by ~590 MiB)."""
    requests = b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n" * 100_000  # 3.8 MB
    clients = []
    with PeakRss(server.process.pid) as peak:
        try:
            for _ in range(20):
                raw = socket.socket()
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # answers pile up
                raw.connect(("127.0.0.1", server.port))
                raw.setblocking(False)
                with contextlib.suppress(BlockingIOError):  # until the server reads no more
                    raw.sendall(requests)
                clients.append(raw)
            time.sleep(1)  # the server answers what it took, then nothing
        finally:
            for raw in clients:
                raw.close()
    print(f"peak RSS growth {peak.growth_mib:.1f} MiB")
    assert peak.growth_mib < MAX_GROWTH_MIB
    assert httpx.get(f"{server.url}/health/ready").status_code == 200


def until_all_closed(
    clients: list[socket.socket], dripping: list[socket.socket], within: float
) -> list[bytes]:
    """What the server sent each of ``clients`` until it closed them all (``dripping`` ones
    sending a header line every 0.2 s meanwhile); fails if one is still open after ``within``
    seconds."""
    received = {raw: b"" for raw in clients}
    open_ = set(clients)
    deadline = time.monotonic() + within
    while open_:
        assert time.monotonic() < deadline, f"{len(open_)} connections still held"
        for raw in select.select(list(open_), [], [], 0.2)[0]:
            try:
                chunk = raw.recv(65536)
            except ConnectionResetError:
                chunk = b""
            received[raw] += chunk
            if not chunk:
                open_.discard(raw)
        for raw in open_.intersection(dripping):
            with contextlib.suppress(OSError):
                raw.sendall(b"X-Drip: 1\r\n")
    return [received[raw] for raw in clients]


def test_connections_that_never_finish_a_request_are_let_go(tmp_path: Path) -> None:
    """Slowloris: silent connections, heads dripped a field at a time, bodies stalled. Each
    would have held a socket (and a file descriptor: enough of them and no client gets in)
    for as long as the attacker liked; the server lets every one go and keeps serving."""
    config = write_config(tmp_path, LINEAR)
    with run_server(tmp_path, config, env={"MODELPORT_CLIENT_TIMEOUT_S": "1"}) as custom:
        address = ("127.0.0.1", custom.port)
        pid = custom.process.pid
        before = len(socket_inodes(pid))
        attackers = []
        for index in range(150):
            raw = socket.create_connection(address, timeout=10)
            if index % 3 == 1:
                raw.sendall(READY)  # a head, never ended
            elif index % 3 == 2:
                raw.sendall(b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nab")
            attackers.append(raw)
        began = time.monotonic()
        try:
            answers = until_all_closed(attackers, dripping=attackers[1::3], within=30)
            let_go = time.monotonic() - began
        finally:
            for raw in attackers:
                raw.close()
        wait_until(lambda: len(socket_inodes(pid)) <= before, 10, "the server's side let go")
        body = {"inputs": [[0.0] * 10]}
        predict = httpx.post(f"{custom.url}/v1/models/linear/predict", json=body)
    assert predict.status_code == 200
    assert let_go < 15  # the keep-alive time (5 s) of the silent ones, and the checks' lag
    assert all(answer == b"" for answer in answers[0::3])  # silent: closed
    # a dripped head is answered 408, or 431 once its drips (one per pass over the sockets)
    # pass 100 fields; the client drips on after the answer, unaware, and the server reads
    # them (a close with them unread would reset the connection, the answer lost unread)
    refused = (b"HTTP/1.1 408 ", b"HTTP/1.1 431 ")
    assert all(answer.startswith(refused) for answer in answers[1::3])
    assert all(b"HTTP/1.1 200" not in answer for answer in answers)


def test_a_flood_of_silent_connections_never_keeps_the_next_client_out(tmp_path: Path) -> None:
    """Past MODELPORT_MAX_CONNECTIONS the server closes the connections that waited longest
    for their client; it never holds many more, and a client arriving mid-flood is served."""
    config = write_config(tmp_path, LINEAR)
    with run_server(tmp_path, config, env={"MODELPORT_MAX_CONNECTIONS": "50"}) as custom:
        pid = custom.process.pid
        flood = [socket.create_connection(("127.0.0.1", custom.port)) for _ in range(300)]
        try:
            # the connections, the listening socket and a few of the service's own
            # within 3 s: sooner than the keep-alive time (5 s) would close them anyway
            wait_until(lambda: len(socket_inodes(pid)) <= 50 + 10, 3, "no more than the cap held")
            body = {"inputs": [[0.0] * 10]}
            predict = httpx.post(f"{custom.url}/v1/models/linear/predict", json=body)
        finally:
            for raw in flood:
                raw.close()
    assert predict.status_code == 200


def test_an_idle_connection_is_kept_for_the_keep_alive_time_configured(tmp_path: Path) -> None:
    """Behind a load balancer that keeps idle connections for 60 s, the service must keep them
    longer: closed first by the service, a request the balancer sends meanwhile fails (502).
    Kept past the default 5 s here, the connection serves its next request."""
    config = write_config(tmp_path, LINEAR)
    request = b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    with (
        run_server(tmp_path, config, env={"MODELPORT_KEEP_ALIVE_S": "9"}) as custom,
        socket.create_connection(("127.0.0.1", custom.port), timeout=5) as raw,
    ):
        raw.sendall(request)
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(6.5)  # idle past the default keep-alive time
        raw.sendall(request)
        assert raw.recv(4096).startswith(b"HTTP/1.1 200")


def test_a_low_descriptor_limit_is_raised_as_far_as_the_connection_cap_needs(
    tmp_path: Path,
) -> None:
    """Started at a soft limit of 1,024 file descriptors (a container's common default), a
    worker would hold 512 connections at most; it raises its soft limit to twice the cap (as
    far as the hard limit allows)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip("the hard limit leaves nothing to raise")
    config = write_config(tmp_path, LINEAR)
    port = free_port()
    env = clean_env(MODELPORT_STORE_DIR=str(tmp_path / "store"), MODELPORT_MAX_CONNECTIONS="3000")
    app = [sys.executable, "-m", "app", "--port", str(port), "--config", str(config)]
    args = ["prlimit", "--nofile=1024:", *app, "--workers", "2"]
    expected = 6000 if hard == resource.RLIM_INFINITY else min(6000, hard)
    server = ServerProcess(args, env, port, tmp_path / "server.log")

    def limits() -> list[int]:
        return [soft_descriptor_limit(pid) for pid in launcher_workers(server.process.pid)]

    try:
        server.wait_ready()  # one worker serves; the other may not have made its server yet
        wait_until(lambda: limits() == [expected] * 2, 30, "both workers' limits raised")
    finally:
        server.stop()


def soft_descriptor_limit(pid: int) -> int:
    """Process ``pid``'s soft limit of open files."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError(f"no open files limit for {pid}")


def launcher_workers(pid: int) -> dict[int, int]:
    """The live worker processes of a launcher (not multiprocessing's resource tracker), each
    with its start time in clock ticks since boot."""
    workers = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
            if int(fields[1]) == pid and fields[0] != "Z" and b"spawn_main" in cmdline:
                workers[int(stat.parent.name)] = int(fields[19])
    return workers


def listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a socket listening on ``port`` (a worker binds its socket
    at its start, and listens on it once its app has started: then it sets its ready flag)."""
    inodes = set(socket_inodes(pid))
    with contextlib.suppress(OSError):  # the process went away
        for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
            local, state, inode = line.split()[1], line.split()[3], int(line.split()[9])
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port and inode in inodes:
                return True
    return False


def test_workers_killed_while_serving_are_replaced_however_fast(tmp_path: Path) -> None:
    """A worker is killed right after it became ready, again and again (the old rule counted
    any exit within 5 s of the start, and gave up on the third); the service answers
    throughout."""
    config = write_config(tmp_path, LINEAR)
    with run_server(tmp_path, config, "--workers", "2") as server:
        started = "Application startup complete."
        wait_until(lambda: server.output().count(started) == 2, 30, "two workers", server=server)
        for kill in range(MAX_FAILED_STARTS + 1):
            workers = launcher_workers(server.process.pid)
            assert len(workers) == 2, workers
            victim = max(workers, key=workers.__getitem__)  # the youngest
            wait_until(lambda pid=victim: listens(pid, server.port), 30, "the youngest serving")
            os.kill(victim, signal.SIGKILL)
            wait_until(
                lambda pid=victim: pid not in launcher_workers(server.process.pid),
                10,
                "exit",
                server=server,
            )
            assert httpx.get(f"{server.url}/health/ready").status_code == 200
            wait_until(
                lambda n=3 + kill: server.output().count(started) == n,
                30,
                "a new worker",
                server=server,
            )
        assert httpx.get(f"{server.url}/health/ready").status_code == 200
        assert server.process.poll() is None
        assert "keep exiting at start" not in server.output()
        assert server.stop() == 0


def test_workers_that_never_become_ready_make_the_launcher_give_up(tmp_path: Path) -> None:
    """The port is held by another program, so no worker can bind it: after three workers in a
    row exited before they served, the launcher stops with a non-zero status."""
    with socket.create_server(("127.0.0.1", 0)) as holder:  # no SO_REUSEPORT: workers can't bind
        port = holder.getsockname()[1]
        config = write_config(tmp_path, LINEAR)
        args = [sys.executable, "-m", "app", "--workers", "2", "--port", str(port)]
        env = clean_env(MODELPORT_STORE_DIR=str(tmp_path / "store"))
        launcher = ServerProcess([*args, "--config", str(config)], env, port, tmp_path / "x.log")
        try:
            status = launcher.process.wait(30)
        finally:
            launcher.stop()
    assert status == 1, launcher.output()
    assert "workers keep exiting at start" in launcher.output()
