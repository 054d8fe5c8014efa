"""The lane: requests to the inference paths, answered with no ASGI cycle.

uvicorn runs every request as an ASGI cycle: a scope, a task started as the head ends, an event
the app's ``receive`` waits on, and answer messages checked on the way out. On a small model that
machinery cost more than the rest of the request: a bare app behind uvicorn's protocol took 44 µs
of CPU per request, the same app on the HTTP parser alone 13 µs. The server's protocol
(:mod:`app.runner.protocol`) hands a request to an inference path to a :class:`LaneCycle`
instead: the body is gathered as it arrives, and once it is whole (or larger than
GATHERED_BYTES: it then streams) the inference endpoint serves it
(:meth:`InferenceEndpoint.serve`, the same code as over ASGI) and writes its whole answer at
once. The connection stays the protocol's: keep-alive, pipelining, flow control and shutdown
treat a lane request as any cycle.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from starlette.types import Message
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from app.http.answers import raw_headers
from app.http.endpoint import HttpCall, InferenceEndpoint, Route, text_headers

if TYPE_CHECKING:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)

GATHERED_BYTES = 64 * 1024
"""The most of a body the lane holds before the endpoint runs (or while it has not read it):
a larger body streams to it, with reading paused in between, so that a request it refuses
unread (no token, over the limit, no such model) costs the server no more than this, as over
ASGI (uvicorn's own bound)."""
_SERVER_ERROR = b"Internal Server Error"


def answer_head(
    status: int,
    headers: list[tuple[bytes, bytes]],
    length: int,
    keep_alive: bool,
) -> bytes:
    """The head of a whole answer: status line, ``headers`` (lower-case and valid, the
    server's defaults first), its content-length, and ``connection: close`` when the
    connection ends with it."""
    content = [STATUS_LINE[status]]
    for name, value in headers:
        content += (name, b": ", value, b"\r\n")
    content.append(b"content-length: %d\r\n" % length)
    if not keep_alive:
        content.append(b"connection: close\r\n")
    content.append(b"\r\n")
    return b"".join(content)


class LaneCycle:
    """One request on the lane. The protocol feeds it the body and starts it once it is
    :attr:`ready`; it reads the attributes uvicorn's protocol reads of any cycle
    (``response_complete``, ``disconnected``, ``keep_alive``, ``message_event``) and starts a
    pipelined one with ``run_asgi``.

    It holds no reference to itself (no bound method of its own in an attribute): a request
    freed by reference counting never waits for the garbage collector, whose collections of
    such cycles had cost 7% of a worker's time.
    """

    def __init__(
        self,
        protocol: HttpToolsProtocol,
        endpoint: InferenceEndpoint,
        route: Route,
        path: str,
        query_string: bytes,
        keep_alive: bool,
    ) -> None:
        self.transport = protocol.transport
        self.flow = protocol.flow
        self.default_headers: list[tuple[bytes, bytes]] = protocol.server_state.default_headers
        self.on_response = protocol.on_response_complete
        self.endpoint = endpoint
        self.route = route
        self.method = protocol.parser.get_method().decode("ascii")
        self.client = _client(protocol)
        self.path = path
        self.query_string = query_string
        self.headers = text_headers(protocol.headers)
        self.keep_alive = keep_alive
        self.disconnected = False
        self.response_started = False
        self.response_complete = False
        self.started = False
        """The endpoint runs it (or will: it is the next of the connection's pipeline)."""
        self.more_body = True
        self._parts: list[bytes] = []
        self._gathered = 0
        """Bytes of the body held, not yet read by the endpoint."""
        self._delivered = False
        self._waiter: asyncio.Future[None] | None = None
        declared = self.headers.get("content-length", "")
        self._large = declared.isdigit() and int(declared) > GATHERED_BYTES

    @property
    def message_event(self) -> LaneCycle:
        """What the protocol sets on a disconnect: this cycle (:meth:`set`)."""
        return self

    def set(self) -> None:
        """Wake a ``receive`` waiting for the body (the client left)."""
        self._wake()

    @property
    def ready(self) -> bool:
        """Whether the endpoint should run it now: its body is whole, or large (declared or
        gathered over GATHERED_BYTES: it streams)."""
        return not self.more_body or self._large or self._gathered > GATHERED_BYTES

    def feed(self, body: bytes) -> None:
        """A piece of the body arrived (dropped once the answer is out); reading pauses while
        more than GATHERED_BYTES wait for the endpoint."""
        if self.response_complete:
            return
        self._parts.append(body)
        self._gathered += len(body)
        if self._gathered > GATHERED_BYTES:
            self.flow.pause_reading()
        self._wake()

    def end(self) -> None:
        """The body is whole."""
        self.more_body = False
        self._wake()

    async def receive(self) -> Message:
        """The ASGI ``receive`` of the endpoint's :class:`HttpCall`: the body gathered so far,
        waiting (reading resumed) when none has come since the last call."""
        while not (self.disconnected or self.response_complete) and (
            self._delivered or (not self._parts and self.more_body)
        ):
            self.flow.resume_reading()
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        if self.disconnected or self.response_complete:
            return {"type": "http.disconnect"}
        body = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts, self._gathered = [], 0
        self._delivered = not self.more_body
        if self.more_body:
            self.flow.resume_reading()
        return {"type": "http.request", "body": body, "more_body": self.more_body}

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        """Write the whole answer at once (the endpoint's ``write``); RuntimeError once an
        answer has started."""
        if self.response_started:
            raise RuntimeError("the answer has started already")
        self.response_started = True
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        all_headers = [*self.default_headers, *raw_headers(headers)]
        head = answer_head(status, all_headers, len(body), self.keep_alive)
        self.transport.writelines((head, body))  # one writev, the body not copied
        self.response_complete = True
        if not self.keep_alive:
            self.transport.close()
        self.on_response()

    async def run_asgi(self, app: object = None) -> None:
        """Serve the request (``app`` is the protocol's, not needed here), as uvicorn runs an
        ASGI app: an error before the answer is a 500 and the connection closes."""
        route, query = self.route, self.query_string
        limit = self.endpoint.settings.max_body_bytes
        call = HttpCall(self.path, route.params, self.headers, query, self.receive, limit)
        try:
            await self.endpoint.serve(self.method, call, route, self.client, self.answer)
        except BaseException as exc:
            logger.error("Exception in ASGI application", exc_info=exc)
            if self.response_started:
                self.transport.close()
                return
            self.keep_alive = False
            headers = [(b"content-type", b"text/plain; charset=utf-8")]
            head = answer_head(500, [*self.default_headers, *headers], len(_SERVER_ERROR), False)
            self.response_started = self.response_complete = True
            self.transport.writelines((head, _SERVER_ERROR))
            self.transport.close()
            return
        if not self.response_complete and not self.disconnected:
            self.transport.close()


def _client(protocol: HttpToolsProtocol) -> str:
    """The client's address as the access log shows it: the connection's peer, or the client
    a trusted proxy names in X-Forwarded-For (as uvicorn's ProxyHeadersMiddleware sets it for
    the ASGI app)."""
    host = protocol.client[0] if protocol.client else None
    app = protocol.app
    if isinstance(app, ProxyHeadersMiddleware) and host in app.trusted_hosts:
        forwarded = [value for name, value in protocol.headers if name == b"x-forwarded-for"]
        if forwarded:
            chain = b", ".join(forwarded).decode("latin1")
            host = app.trusted_hosts.get_trusted_client_address(chain)[0] or host
    return str(host) if host else "-"
