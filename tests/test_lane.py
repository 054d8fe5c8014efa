"""The lane (app.runner.lane) on real sockets: the protocol takes a POST to an inference path
on the lane and leaves every other request to the ASGI app; and a request that ``python -m app``
answers on the lane gets the answer the ASGI path gives (a server run by ``uvicorn --factory``,
which has no lane), byte for byte but for the date and request id: over keep-alive, pipelined
behind other requests, with its body in pieces or chunks, over the body limit, over HTTP/1.0 or
with ``Connection: close``; a client gone mid-body costs nothing, and a request on the lane
leaves nothing for the garbage collector."""

from __future__ import annotations

import asyncio
import gc
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import uvicorn

from app.http.answers import send_answer
from app.http.app import ModelportAPI, create_app
from app.http.endpoint import ROUTE_HELD_CHARS, ROUTES_HELD, HttpCall, Route
from app.runner.lane import GATHERED_BYTES, LaneCycle
from app.runner.protocol import head_limited
from tests.helpers import (
    LINEAR,
    SAMPLE,
    ServerProcess,
    clean_env,
    free_port,
    make_settings,
    run_server,
    uvicorn_factory,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.process

MAX_BODY_BYTES = 4096
BODY = b'{"inputs": [[%s]]}' % ", ".join(map(str, SAMPLE)).encode()
V2_BODY = b'{"inputs": [{"name": "input", "shape": [1, 10], "datatype": "FP32", "data": %s}]}' % (
    str(SAMPLE).encode()
)
V2_INFER = b"POST /v2/models/linear/infer HTTP/1.1\r\nHost: x\r\n"
PREDICT = b"POST /v1/models/linear/predict HTTP/1.1\r\nHost: x\r\n"
_VARYING = re.compile(rb"\r\n(date|x-request-id): [^\r]*", re.IGNORECASE)


def post(body: bytes = BODY, *extra: bytes, path: bytes = PREDICT) -> bytes:
    """A whole predict request with ``extra`` header lines."""
    head = path + b"".join(line + b"\r\n" for line in extra)
    return head + b"content-length: %d\r\n\r\n" % len(body) + body


def exchange(port: int, *pieces: bytes, answers: int = 1) -> list[bytes]:
    """Send ``pieces`` one write each on one connection; the first ``answers`` answers, each
    as status line, headers (date and request id left out) and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        for piece in pieces:
            raw.sendall(piece)
        stream = raw.makefile("rb")
        return [_read_answer(stream) for _ in range(answers)]


def _read_answer(stream: BinaryIO) -> bytes:
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = stream.readline()
        assert line, f"closed mid-answer after {head!r}"
        head += line
    length = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
    assert length is not None, head
    return _VARYING.sub(b"", head) + stream.read(int(length[1]))


def closed_after(port: int, request: bytes) -> tuple[bytes, bool]:
    """The answer to ``request`` and whether the server closed the connection after it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(request)
        stream = raw.makefile("rb")
        answer = _read_answer(stream)
        return answer, stream.read(1) == b""


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    """The ports of ``python -m app`` (with the lane) and ``uvicorn --factory`` (without),
    serving ``linear`` with a 4 KiB body limit."""
    directory = tmp_path_factory.mktemp("lane")
    config = write_config(directory, LINEAR)
    limit = {"MODELPORT_MAX_BODY_BYTES": str(MAX_BODY_BYTES)}
    port = free_port()
    env = clean_env(
        MODELPORT_CONFIG=str(config), MODELPORT_STORE_DIR=str(directory / "plain"), **limit
    )
    plain = ServerProcess(uvicorn_factory("--port", str(port)), env, port, directory / "u.log")
    try:
        plain.wait_ready()
        with run_server(directory, config, env=limit) as lane:
            yield lane.port, plain.port
    finally:
        plain.stop()


CASES = {
    "a JSON body": (post(),),
    "a binary body": (
        post(
            b"\x00\x00\x80\x3f" * 10,
            b"content-type: application/octet-stream",
            b"x-tensor-shape: 1,10",
            b"accept: application/octet-stream",
        ),
    ),
    "a refused body": (post(b'{"inputs": [[1, 2]]}'),),
    "an unknown model": (post(path=b"POST /v1/models/nope/predict HTTP/1.1\r\nHost: x\r\n"),),
    "a V2 request": (post(V2_BODY, path=V2_INFER),),
    "the head and the body in two writes": (post()[:40], post()[40:]),
    "a body in three writes": (post()[:-20], post()[-20:-7], post()[-7:]),
    "a chunked body": (
        PREDICT + b"transfer-encoding: chunked\r\n\r\n"
        b"%x\r\n%s\r\n" % (10, BODY[:10]) + b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY) - 10, BODY[10:]),
    ),
    "a body declared over the limit": (post(b"x" * (MAX_BODY_BYTES + 1)),),
    "a chunked body over the limit": (
        PREDICT + b"transfer-encoding: chunked\r\n\r\n"
        b"%x\r\n%s\r\n0\r\n\r\n" % (MAX_BODY_BYTES + 1, b"x" * (MAX_BODY_BYTES + 1)),
    ),
    "a GET on a predict path": (b"GET /v1/models/linear/predict HTTP/1.1\r\nHost: x\r\n\r\n",),
}


@pytest.mark.parametrize("pieces", CASES.values(), ids=CASES.keys())
def test_an_inference_request_gets_the_answer_the_asgi_path_gives(
    servers: tuple[int, int], pieces: tuple[bytes, ...]
) -> None:
    lane, plain = servers
    assert exchange(lane, *pieces) == exchange(plain, *pieces)


def test_requests_pipelined_in_one_write_are_answered_in_order(servers: tuple[int, int]) -> None:
    lane, plain = servers
    live = b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    refused = post(b'{"inputs": [[1]]}')
    pipelined = post() + live + refused + post() + live
    answers = exchange(lane, pipelined, answers=5)
    assert answers == exchange(plain, pipelined, answers=5)
    assert [answer.split(b" ")[1] for answer in answers] == [b"200", b"200", b"422", b"200", b"200"]


def test_a_pipelined_request_whose_body_comes_later_is_answered_once_it_has_come(
    servers: tuple[int, int],
) -> None:
    lane, plain = servers
    pieces = (post() + post()[:-10], post()[-10:])
    answers = exchange(lane, *pieces, answers=2)
    assert answers == exchange(plain, *pieces, answers=2)
    assert [answer.split(b" ")[1] for answer in answers] == [b"200", b"200"]


def test_a_body_over_the_limit_is_refused_and_the_connection_serves_on(
    servers: tuple[int, int],
) -> None:
    lane, _ = servers
    over = b'{"inputs": [[%s]]}' % b"1, " * MAX_BODY_BYTES
    refused, served = exchange(lane, post(over) + post(), answers=2)
    assert refused.startswith(b"HTTP/1.1 413 ")
    assert served.startswith(b"HTTP/1.1 200 OK")


@pytest.mark.parametrize(
    ("request_line", "header"),
    [(b"POST /v1/models/linear/predict HTTP/1.0\r\n", b""), (PREDICT, b"connection: close")],
    ids=["HTTP/1.0", "Connection: close"],
)
def test_a_connection_the_client_ends_with_its_request_is_closed_after_the_answer(
    servers: tuple[int, int], request_line: bytes, header: bytes
) -> None:
    lane, plain = servers
    request = post(BODY, *([header] if header else []), path=request_line)
    answer, closed = closed_after(lane, request)
    assert (answer, closed) == closed_after(plain, request)
    assert closed
    assert b"\r\nconnection: close" in answer


def test_a_request_without_the_token_is_refused_before_its_large_body_is_read(
    tmp_path: Path,
) -> None:
    """The lane holds at most GATHERED_BYTES of a body the endpoint has not read: an
    unauthenticated client cannot make it buffer megabytes (here it never sends them)."""
    env = {"MODELPORT_API_TOKEN": "t" * 32}
    with run_server(tmp_path, write_config(tmp_path, LINEAR), env=env) as server:
        for head in (
            PREDICT + b"content-length: %d\r\n\r\n" % (8 * 1024 * 1024),
            PREDICT + b"transfer-encoding: chunked\r\n\r\n",
        ):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
                raw.sendall(head)
                piece = b"x" * (2 * GATHERED_BYTES)
                raw.sendall(
                    piece if b"content-length" in head else b"%x\r\n%s\r\n" % (len(piece), piece)
                )
                answer = _read_answer(raw.makefile("rb"))  # the rest of the body never comes
            assert answer.startswith((b"HTTP/1.1 401 ", b"HTTP/1.1 403 ")), answer


def test_a_client_gone_mid_body_leaves_the_server_serving(servers: tuple[int, int]) -> None:
    lane, _ = servers
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", lane), timeout=10) as raw:
            raw.sendall(post()[:-5])
    [answer] = exchange(lane, post())
    assert answer.startswith(b"HTTP/1.1 200 OK")


def test_the_access_log_names_the_client_a_trusted_proxy_forwards(tmp_path: Path) -> None:
    with run_server(tmp_path, write_config(tmp_path, LINEAR)) as server:
        forwarded = post(BODY, b"x-forwarded-for: 203.0.113.7", b"x-request-id: via-proxy")
        exchange(server.port, forwarded, post(BODY, b"x-request-id: direct"), answers=2)

        def logged() -> bool:
            return "[direct]" in server.output()

        wait_until(logged, 5.0, "the access lines")
        lines = server.output().splitlines()
        [proxied] = [line for line in lines if "[via-proxy]" in line]
        [direct] = [line for line in lines if "[direct]" in line]
        assert proxied.endswith('"203.0.113.7"')
        assert direct.endswith('"127.0.0.1"')


@pytest.fixture
def lane_before_a_teapot(tmp_path: Path) -> Iterator[int]:
    """The port of uvicorn with the project's protocol, its lane on the app's inference
    endpoint, in front of an ASGI app that answers 418 to every request (and runs the app's
    lifespan, which loads the models)."""
    app = create_app(make_settings(tmp_path, LINEAR))
    assert isinstance(app, ModelportAPI)

    async def teapot(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await app(scope, receive, send)
        else:
            await send_answer(scope, send, 418, b"", {})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    protocol = head_limited(65536, 100, app.front)
    server = uvicorn.Server(uvicorn.Config(teapot, http=protocol, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])))
    thread.start()
    try:
        wait_until(lambda: server.started, 30, "the server started")
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_the_protocol_takes_posts_to_inference_paths_and_leaves_the_rest_to_the_app(
    lane_before_a_teapot: int,
) -> None:
    port = lane_before_a_teapot
    on_lane = [
        post(),
        post(path=b"POST /predict HTTP/1.1\r\nHost: x\r\n"),
        post(V2_BODY, path=V2_INFER),
    ]
    left = [
        b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/models/linear/predict HTTP/1.1\r\nHost: x\r\n\r\n",
        post(path=b"POST /v1/models/linear/versions HTTP/1.1\r\nHost: x\r\n"),
        post(BODY, b"expect: 100-continue"),
    ]
    for request in on_lane:
        [answer] = exchange(port, request)
        assert answer.startswith(b"HTTP/1.1 200 OK"), answer
    for request in left:
        [answer] = exchange(port, request)
        assert answer.startswith(b"HTTP/1.1 418 "), answer


def test_a_request_on_the_lane_leaves_nothing_for_the_garbage_collector(
    lane_before_a_teapot: int,
) -> None:
    """Reference cycles made per request had the collector run every ~40 requests (7% of a
    worker): what the lane makes is freed by reference counting alone. The connection stays
    open meanwhile: a closed one's transport is asyncio's own cycle, and takes what its
    protocol still holds (the last request's cycle) with it, to the collector."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        with socket.create_connection(("127.0.0.1", lane_before_a_teapot), timeout=10) as raw:
            raw.sendall(post() * 20)
            stream = raw.makefile("rb")
            assert all(_read_answer(stream).startswith(b"HTTP/1.1 200") for _ in range(20))
            gc.collect()
            kinds = {type(thing) for thing in gc.garbage}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert not kinds & {LaneCycle, HttpCall, Route}


def test_the_routes_the_endpoint_remembers_stay_few_whatever_paths_come(tmp_path: Path) -> None:
    """Matching a path costs a small model's request ~3 µs, so routes are remembered; a stream
    of new paths (any name matches a predict path) cannot grow what is held."""
    endpoint = create_app(make_settings(tmp_path, LINEAR)).front
    for i in range(3 * ROUTES_HELD):
        route = endpoint.route(f"/v1/models/m{i}/predict")
        assert route is not None
        assert route.params == {"name": f"m{i}"}
    long_name = "x" * ROUTE_HELD_CHARS
    assert endpoint.route(f"/v1/models/{long_name}/predict") is not None
    assert endpoint.route("/health/ready") is None
    assert endpoint.route("/health/ready") is None  # remembered as no route
    held = endpoint._known
    assert 0 < len(held) <= ROUTES_HELD
    assert all(len(path) <= ROUTE_HELD_CHARS for path in held)
    versioned = endpoint.route("/v2/models/linear/versions/3/infer")
    assert versioned is not None
    assert versioned.template == "/v2/models/{name}/versions/{version}/infer"
    assert versioned.params == {"name": "linear", "version": "3"}
    assert endpoint.route("/v2/models/linear/versions/3/infer") is versioned
