"""uvicorn's httptools protocol, writing each small answer to the socket once.

uvicorn writes a response's head as soon as the app sends ``http.response.start`` and its body
with the next message: two writes, and on a small answer two TCP segments, each paying the whole
loopback or network path and waking the client twice. Here the head waits for the first body
message and goes out with it, which served a trivial app 20% faster on one worker. An app with
its whole answer ready (the lean inference path) can skip the two messages and their checks:
the scope's ``extensions`` offer :meth:`OneWriteCycle.answer` under WHOLE_ANSWER.

It bounds the requests a client may pipeline: past ``MAX_PIPELINED`` waiting behind the one
being answered, nothing more of the connection is read, the waiting ones are answered and the
connection closed (each held its head and cycle; uvicorn took every request of a 256 KiB
read at once, ~30 MB of server memory for 4 MB of requests whose answers were never read).
It also bounds a request's head (uvicorn and httptools buffer one whole, however long): a head
over ``max_header_bytes`` or with more than ``max_header_count`` fields is answered 431 and the
connection closed, without parsing the rest. And it bounds the time a client holds a
connection without finishing a request, or without taking its answers (uvicorn waits for
either forever): a connection that sends nothing is closed after the keep-alive time, a head
not whole within ``client_timeout_s`` is answered 408 and closed, a body left that long without
a byte is closed, and answers left that long unread are dropped with the connection. A
connection refused mid-request (431, 408) lingers before it closes, so that the client gets its
answer (:meth:`OneWriteHttpToolsProtocol._answer_and_close`). Everything else is uvicorn's own
code.
"""

from __future__ import annotations

import asyncio
import logging
import math
import urllib.parse
from typing import Any, ClassVar, cast

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from app.errors import ClientTimeout, HeadTooLarge, ModelportError
from app.http.answers import WHOLE_ANSWER, error_answer, raw_headers
from app.http.endpoint import InferenceEndpoint
from app.observability.logs import Tallied
from app.runner.lane import LaneCycle, answer_head

logger = logging.getLogger(__name__)


class _HeadHolder:
    """A transport that keeps the response head and writes it in front of the next write."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.head: bytes | None = None

    def write(self, data: bytes) -> None:
        if self.head is None:
            self.head = bytes(data)
            return
        self.transport.writelines((self.head, data))  # one writev, the body not copied
        self.head = b""

    def release(self) -> asyncio.Transport:
        """Write a head still held (an answer with no body write) and return the transport."""
        if self.head:
            self.transport.write(self.head)
        self.head = b""
        return self.transport

    def close(self) -> None:
        self.release().close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class OneWriteCycle(RequestResponseCycle):
    """A request/response cycle whose head goes out with the first body chunk; and which can
    write a whole answer at once (:meth:`answer`) for an app that has it ready."""

    def answer(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
        """Write a whole answer (``headers`` lower-case and valid, with no content-length or
        connection field) as one write, as ``send`` would in two messages; False, having
        written nothing, where ``send`` must do it (a HEAD request, a paused transport, an
        answer already started or a client gone)."""
        paused = self.flow.write_paused or self.disconnected or self.response_started
        if paused or self.scope["method"] == "HEAD":
            return False
        self.response_started = self.response_complete = True
        self.waiting_for_100_continue = False
        head = answer_head(status, [*self.default_headers, *headers], len(body), self.keep_alive)
        self.transport.writelines((head, body))  # one writev, the body not copied
        self.message_event.set()
        if not self.keep_alive:
            self.transport.close()
        self.on_response()
        return True

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            self.transport = _HeadHolder(self.transport)  # type: ignore[assignment]
            await super().send(message)
            return
        await super().send(message)
        if isinstance(self.transport, _HeadHolder):
            self.transport = self.transport.release()


class _StopParsing(Exception):
    """Raised from a parser callback to stop parsing: a head over the limits, or one request
    more than the pipeline holds."""


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with :class:`OneWriteCycle` as its cycle, and a request head
    bounded in bytes and in fields (:func:`head_limited` sets the limits from the settings).

    Two counts bound a head. httptools keeps a header line that has not ended to itself, so
    the raw bytes fed since the parser last made progress (a head ended, body bytes came, a
    message ended) are counted, fed at most up to the limit at a time (one socket read can be
    256 KiB): a head, or a chunked body's trailer, cannot grow past the limit unseen. A whole
    head that arrived after a body in the same read is measured exactly by the callbacks (the
    URL and each field as it completes).
    """

    max_header_bytes: int = 64 * 1024
    MAX_PIPELINED = 32
    """Requests that may wait behind the one being answered on a connection."""
    max_header_count: int = 100
    lane: InferenceEndpoint | None = None
    """The endpoint of the requests taken on the lane, if any."""

    _raw_head_bytes = 0
    """Bytes fed since a head, body bytes or a message last ended: a head (or trailer) so far."""
    _head_bytes = 0
    _header_count = 0
    _refused: str | None = None
    """Why the head was refused, once it is."""
    _pipeline_full = False
    """Whether a request came past MAX_PIPELINED: nothing more is read, the connection closes
    once the waiting requests are answered."""
    client_timeout_s: float = 30.0
    max_connections: int = 4096
    shed: ClassVar[set[OneWriteHttpToolsProtocol]] = set()
    """The connections closed to make way and not yet lost (one set per server's class)."""
    tallies: ClassVar[dict[str, Tallied]] = {}
    """The warnings clients caused, by kind (one set per server's class)."""
    _idle_since: float | None = None
    """When the connection was opened or last fell idle after an answer (None: busy)."""
    _heard = 0.0
    """When bytes last came."""
    _head_since: float | None = None
    """When the head being received began (None: no head in progress)."""
    _body_open = False
    """Whether a request's head is whole and its body not yet."""
    _write_paused_since: float | None = None
    """Since when the client has taken its answers slower than they come (None: it keeps up)."""
    _closing_since: float | None = None
    """When the timer first found the connection closing but not yet lost (answers buffered)."""
    LINGER_S = 5.0
    """How long a connection refused mid-request is still read (and dropped) after its answer."""
    _lingering_until: float | None = None
    """Until when the connection, its answer written and its side shut, is still read: a close
    with unread bytes makes the kernel reset it, and the client may lose the answer unread."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """As uvicorn's, and the connection's timer armed: it sees to the client's turns (see
        :meth:`timeout_keep_alive_handler`) until the connection is lost."""
        super().connection_made(transport)
        self._idle_since = self.loop.time()
        self._keep_alive_for(self.timeout_keep_alive)
        if len(self.connections) - len(self.shed) > self.max_connections:
            self._shed()

    def _shed(self) -> None:
        """Past ``max_connections``, close the oldest tenth of the connections that wait for
        their client (idle, or a head not yet whole): a flood of connections that send nothing
        (or never end a head) cannot keep the next client out, nor use up the process's file
        descriptors. The new connection is among them: when the others are all being served,
        it is the one closed."""
        waiting = [
            (since, connection)
            for connection in self.connections
            if isinstance(connection, OneWriteHttpToolsProtocol)
            and connection not in self.shed
            and (since := connection._waiting_since()) is not None
        ]
        waiting.sort(key=lambda pair: pair[0])
        closing = max(1, len(waiting) // 10)
        self._warn(
            "sheds of waiting connections",
            "%d connections, over %d: closing the %d that waited longest for their client",
            len(self.connections),
            self.max_connections,
            closing,
        )
        for _, connection in waiting[:closing]:
            self.shed.add(connection)  # counted out at once: the next ones need no new scan
            connection.transport.close()

    def _waiting_since(self) -> float | None:
        """Since when the connection has waited for its client to send a request (None: a
        request is being read past its head or answered)."""
        return self._idle_since if self._idle_since is not None else self._head_since

    def data_received(self, data: bytes) -> None:
        if self._pipeline_full or self._lingering_until is not None:
            # requests past the ones waiting are not read (an app's receive resumes); what
            # comes after a refusal's answer is dropped
            return
        rest = memoryview(data)
        while rest and self._refused is None and not self._pipeline_full:
            if self.transport.is_closing():
                return
            protocol = self.transport.get_protocol()
            if protocol is not self:  # upgraded to a WebSocket: the rest is its
                cast(asyncio.Protocol, protocol).data_received(bytes(rest))
                return
            size = self.max_header_bytes - self._raw_head_bytes
            piece, rest = rest[:size], rest[size:]
            self._raw_head_bytes += len(piece)
            self._feed(piece)  # as one socket read could have brought it
            if self._raw_head_bytes >= self.max_header_bytes:
                self._refuse(f"request head over {self.max_header_bytes} bytes")
        if self._pipeline_full:  # the rest is dropped; the last request waiting ends it
            self.flow.pause_reading()
            self.pipeline[0][0].keep_alive = False
        elif self._refused is not None and not self.transport.is_closing():
            self._send_431()

    def _feed(self, piece: memoryview) -> None:
        """uvicorn's ``data_received``, its warnings tallied (:meth:`_warn`); a parser a callback
        stopped on purpose (:class:`_StopParsing`) is the caller's to answer."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(piece)  # httptools reads any buffer: no copy to bytes
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._warn("upgrades refused", "unsupported upgrade request from %s", self.client)
        except httptools.HttpParserError:
            if self._refused is None and not self._pipeline_full:
                self._warn("requests that do not parse", "invalid request from %s", self.client)
                self.send_400_response("Invalid HTTP request received.")

    def _warn(self, what: str, message: str, *args: object) -> None:
        """Log a warning a client caused, tallied with the others of its kind (``what``) on
        this server (:class:`Tallied`)."""
        tally = self.tallies.get(what)
        if tally is None:
            tally = self.tallies[what] = Tallied(logger, what)
        tally.warning(message, *args)

    def _unset_keepalive_if_required(self) -> None:
        """Bytes came (:meth:`_feed` calls this first): the connection is busy, the timer finds
        it so when it fires, and a head begins with the first bytes after an idle spell (unless
        they are the rest of a body answered before it ended)."""
        self._heard = self.loop.time()
        if self._idle_since is not None:
            self._idle_since = None
            if not self._body_open:
                self._head_since = self._heard

    def connection_lost(self, exc: Exception | None) -> None:
        """As uvicorn's, and the keep-alive timer cancelled, which uvicorn's does through
        ``_unset_keepalive_if_required``: armed still, it held the closed connection's protocol
        for the keep-alive time (a client opening and closing connections fast held thousands,
        ~10 KiB each)."""
        super().connection_lost(exc)
        self.shed.discard(self)
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None

    def on_response_complete(self) -> None:
        """As uvicorn's, but the keep-alive timer is armed once per idle spell, not once per
        answer (armed and cancelled per request, it cost a small model's request 2 µs): it
        closes the connection when it finds it idle for ``timeout_keep_alive``, and else
        waits for the rest of that time."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self._keep_alive_for(self.timeout_keep_alive)

    def pause_writing(self) -> None:
        """As uvicorn's: the client takes answers slower than they come; and its clock runs."""
        super().pause_writing()
        self._write_paused_since = self.loop.time()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._write_paused_since = None

    def timeout_keep_alive_handler(self) -> None:
        """The connection's one timer, until the connection is lost. It closes the connection
        idle for the keep-alive time; times out a head not whole within ``client_timeout_s``
        of its first byte, or a body the server is reading that got no byte for as long; and
        drops, answers buffered and all, a connection whose client took none of its answers
        for as long (the transport's buffer past its high-water mark, or a close waiting for a
        buffer to be read). Otherwise it fires again when the next of those could be due."""
        self.timeout_keep_alive_task = None
        if self.transport.get_protocol() is not self:
            return  # upgraded to a WebSocket: the connection is its protocol's now
        now = self.loop.time()
        if self._lingering_until is not None and not self.transport.is_closing():
            if now < self._lingering_until:
                self._keep_alive_for(self._lingering_until - now)
                return
            self.transport.close()  # then watched as any closing connection
        if self.transport.is_closing():
            if self._closing_since is None:
                self._closing_since = now
            elif now - self._closing_since >= self.client_timeout_s:
                self._drop("closed, its last answers not taken")
                return
            self._keep_alive_for(self._closing_since + self.client_timeout_s - now)
            return
        taking = math.inf  # how long the client has left to take a buffered answer
        if self._write_paused_since is not None:
            taking = self._write_paused_since + self.client_timeout_s - now
            if taking <= 0:
                self._drop("answers not taken")
                return
        if self._idle_since is not None:
            left = self._idle_since + self.timeout_keep_alive - now
            if left <= 0:
                self.transport.close()
                return
        elif self._head_since is not None:
            left = self._head_since + self.client_timeout_s - now
            if left <= 0:
                self._time_out("request head not whole")
                return
        elif self._body_open and not self.flow.read_paused:
            left = self._heard + self.client_timeout_s - now
            if left <= 0:
                self._time_out("request body stalled, not a byte")
                return
        else:
            left = self.client_timeout_s
        self._keep_alive_for(min(left, taking))

    def _drop(self, what: str) -> None:
        """Abort the connection: what it has buffered goes, unsent."""
        self._warn(
            "connections dropped, answers not taken",
            "%s within %g s by %s: dropped",
            what,
            self.client_timeout_s,
            self.client,
        )
        self.transport.abort()

    def _time_out(self, what: str) -> None:
        """Answer 408 (unless an answer on the connection is under way) and close."""
        reason = f"{what} within {self.client_timeout_s:g} s"
        self._warn("connections timed out", "%s from %s: closed", reason, self.client)
        if self.cycle is None or self.cycle.response_complete:
            self._answer_and_close(ClientTimeout(reason))
        else:
            self.transport.close()

    def _keep_alive_for(self, seconds: float) -> None:
        handler = self.timeout_keep_alive_handler
        self.timeout_keep_alive_task = self.loop.call_later(seconds, handler)

    def on_message_begin(self) -> None:
        """As uvicorn's, less the ASGI scope: it is built once the head is whole, and only for
        a request the lane does not take (:meth:`_open_scope`)."""
        self._head_bytes = self._header_count = 0
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        if self._head_since is None:  # a request after one in the same read: its head begins
            self._head_since = self._heard

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        """Count the field, then keep it as uvicorn's does (name lower-case, the value's
        trailing whitespace dropped), in one call."""
        self._header_count += 1
        if self._header_count > self.max_header_count:
            self._refuse(f"request head with over {self.max_header_count} header fields")
            raise _StopParsing
        self._count(len(name) + len(value) + 4)  # ": " and CRLF
        name = name.lower()
        value = value.rstrip(b" \t")
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._raw_head_bytes = 0
        self._head_since = None
        if len(self.pipeline) >= self.MAX_PIPELINED:
            self._pipeline_full = True
            raise _StopParsing
        self._body_open = True
        if self.lane is not None and self._on_lane(self.lane):
            return
        self._open_scope()
        super().on_headers_complete()
        if type(self.cycle) is RequestResponseCycle:
            # uvicorn builds the cycle itself; its task has not run yet, so the subclass's
            # send is the one the app gets, and the scope can still offer its whole answers
            self.cycle.__class__ = OneWriteCycle
            extensions: dict[str, Any] = {WHOLE_ANSWER: cast(OneWriteCycle, self.cycle).answer}
            self.scope["extensions"] = extensions

    def on_body(self, body: bytes) -> None:
        self._raw_head_bytes = 0
        cycle = self.cycle
        if isinstance(cycle, LaneCycle):
            cycle.feed(body)
            self._start_when_ready(cycle)
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._raw_head_bytes = 0
        self._body_open = False
        cycle = self.cycle
        if cycle is not None and cycle.response_complete and not self.pipeline:
            self._idle_since = self._heard  # answered before its body ended: idle from here
        if isinstance(cycle, LaneCycle):
            cycle.end()
            self._start_when_ready(cycle)
        else:
            super().on_message_complete()

    def _on_lane(self, endpoint: InferenceEndpoint) -> bool:
        """Take a POST to an inference path on the lane (:mod:`app.runner.lane`); False for
        any other request, and for one the lane leaves to uvicorn: an upgrade, a client
        waiting for ``100 Continue``, a server limiting its concurrency."""
        parser = self.parser
        if parser.get_method() != b"POST" or parser.should_upgrade():
            return False
        if self.expect_100_continue or self.limit_concurrency is not None:
            return False
        url = httptools.parse_url(self.url)
        path = url.path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        path = self.root_path + path
        route = endpoint.route(path)
        if route is None:
            return False
        keep_alive = parser.get_http_version() != "1.0" and parser.should_keep_alive()
        cycle = LaneCycle(self, endpoint, route, path, url.query or b"", keep_alive)
        existing = self.cycle
        self.cycle = cycle  # type: ignore[assignment]
        if existing is not None and not existing.response_complete:
            # pipelined: it starts once the answers before it are out, as uvicorn's do
            cycle.started = True
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, self.app))  # type: ignore[arg-type]
        else:
            self._start_when_ready(cycle)
        return True

    def _open_scope(self) -> None:
        """The ASGI scope uvicorn's ``on_message_begin`` builds, around the head read since."""
        url, headers, expect = self.url, self.headers, self.expect_100_continue
        super().on_message_begin()
        self.url, self.expect_100_continue = url, expect
        self.headers.extend(headers)  # the scope's list

    def _start_when_ready(self, cycle: LaneCycle) -> None:
        if not cycle.started and cycle.ready:
            cycle.started = True
            self._start_asgi_task(cycle, self.app)  # type: ignore[arg-type]

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_header_bytes:
            self._refuse(f"request head over {self.max_header_bytes} bytes")
            raise _StopParsing  # stops the parser: nothing more of this connection is read

    def _refuse(self, reason: str) -> None:
        if self._refused is None:
            self._refused = reason

    def _send_431(self) -> None:
        reason = self._refused or ""
        self._warn("heads over the limits", "%s from %s: answered 431", reason, self.client)
        self._answer_and_close(HeadTooLarge(reason))

    def _answer_and_close(self, error: ModelportError) -> None:
        """Write ``error``'s answer (no request's path: its head is unread or not whole) and
        close the connection as nginx's lingering close does: this side is shut once the answer
        is out, and whatever the client still sends is read and dropped until it closes its side
        or LINGER_S passes. Closed at once, with bytes of the client's unread (the rest of a
        long head, a drip that crossed the 408), the kernel resets the connection, and a client
        that had not yet read its answer loses it."""
        status, body, headers = error_answer(error, "")
        all_headers = [*self.server_state.default_headers, *raw_headers(headers)]
        self.transport.writelines((answer_head(status, all_headers, len(body), False), body))
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self._lingering_until = self.loop.time() + self.LINGER_S
        self.flow.resume_reading()
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
        self._keep_alive_for(self.LINGER_S)


def head_limited(
    max_header_bytes: int,
    max_header_count: int,
    lane: InferenceEndpoint | None = None,
    client_timeout_s: float = OneWriteHttpToolsProtocol.client_timeout_s,
    max_connections: int = OneWriteHttpToolsProtocol.max_connections,
) -> type[OneWriteHttpToolsProtocol]:
    """The protocol class with these head limits and client timeout, and the requests to
    ``lane``'s inference paths taken on the lane, for ``uvicorn.Config(http=...)``."""

    class HeadLimitedProtocol(OneWriteHttpToolsProtocol):
        pass

    HeadLimitedProtocol.max_header_bytes = max_header_bytes
    HeadLimitedProtocol.max_header_count = max_header_count
    HeadLimitedProtocol.lane = lane
    HeadLimitedProtocol.client_timeout_s = client_timeout_s
    HeadLimitedProtocol.max_connections = max_connections
    HeadLimitedProtocol.shed = set()
    HeadLimitedProtocol.tallies = {}
    return HeadLimitedProtocol
