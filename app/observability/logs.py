"""Logging: human-readable lines or JSON lines, each carrying the request id of the request
being served (``-`` outside one)."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import json
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal

import orjson

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

LogFormat = Literal["text", "json"]
ACCESS_LOGGER = "app.access"
LOGS_LOGGER = "app.logs"
"""The logger name of the line that says log lines were dropped."""
PIPE_BUF = 4096
"""Writes up to this size reach a pipe whole (POSIX)."""
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
# color_message: uvicorn's copy of the message with terminal colour codes, for its own
# formatter; a JSON line carries the plain message only.
_RECORD_FIELDS = set(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "request_id",
    "color_message",
}


def printable(text: str) -> str:
    """``text`` with its unprintable characters (newline, carriage return, a terminal's escape,
    Unicode's line separators) written as escapes (``\\n``, ``\\x1b``): a line cannot hold
    text a client chose (a request path, say) that forges the next line or drives the terminal
    of whoever reads the log."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT`` lines, each record's message made :func:`printable` (an exception's
    traceback still follows it on its own lines)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = printable(record.message)
        return super().formatMessage(record)


class RequestIdFilter(logging.Filter):
    """Stamps every record with the current request id."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, request id, message, and any extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        entry |= {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class StderrWriter:
    """Writes the log's text to stderr on a thread of its own: a reader of stderr that is slow
    or stalled (a log collector behind, a pipe nobody empties) never holds up the event loop,
    which only hands the text over. Up to HELD_BYTES wait; beyond, new text is dropped, and
    once stderr takes text again a line says how many lines were lost. The text goes out in
    writes of at most PIPE_BUF bytes that end at a line's end, so that the lines of several
    worker processes sharing a pipe never interleave mid-line.

    A caller may wait a little for its text to be written (:meth:`write`'s ``wait_s``), as the
    log records do: while stderr keeps up, a record is out before the call returns (uvicorn's
    last lines before it re-raises SIGTERM, an audit line before its answer); once a wait times
    out, none waits again until stderr has taken text."""

    HELD_BYTES = 8 << 20

    def __init__(self) -> None:
        self._waiting: deque[str] = deque()
        self._held = 0
        self._dropped = 0
        self._busy = False
        self._stalled = False
        """A wait for stderr timed out, and it has taken nothing since."""
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        self.notice: Callable[[int], str] = lambda lines: f"WARNING {LOGS_LOGGER}: {_lost(lines)}"
        """The line that tells how many lines were dropped (the configured format's)."""
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        """A forked child has none of its parent's threads: its first write starts its own."""
        self._waiting.clear()
        self._held = self._dropped = 0
        self._busy = self._stalled = False
        self._ready = threading.Condition()
        self._thread = None

    def write(self, text: str, wait_s: float = 0.0) -> None:
        """Queue ``text`` (whole lines) for stderr, or drop it when too much waits already;
        then wait up to ``wait_s`` for it to be written, unless stderr has stalled."""
        with self._ready:
            if self._held + len(text) > self.HELD_BYTES:
                self._dropped += text.count("\n")
                return
            self._waiting.append(text)
            self._held += len(text)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="stderr", daemon=True)
                self._thread.start()
            self._ready.notify()
            if wait_s and not self._stalled and not self._ready.wait_for(self._written, wait_s):
                self._stalled = True

    def drain(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far is written (or ``timeout`` passes); whether it
        was."""
        with self._ready:
            return self._ready.wait_for(self._written, timeout)

    def _written(self) -> bool:
        return not self._waiting and not self._busy

    def _run(self) -> None:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: bool(self._waiting))
                text, dropped = "".join(self._waiting), self._dropped
                self._waiting.clear()
                self._busy, self._dropped = True, 0
            with contextlib.suppress(Exception):  # stderr closed: nothing else can tell it
                _write(text + (self.notice(dropped) + "\n" if dropped else ""))
            with self._ready:
                self._held -= len(text)
                self._busy = self._stalled = False
                self._ready.notify_all()


def _lost(lines: int) -> str:
    return f"{lines} log line(s) dropped: stderr was not read"


def _write(text: str) -> None:
    """``text`` (whole lines) to stderr, in writes of at most PIPE_BUF bytes ending at a line's
    end (a longer line alone)."""
    stream = sys.stderr
    start = 0
    while start < len(text):
        end = text.rfind("\n", start, start + PIPE_BUF) + 1 or text.find("\n", start) + 1
        end = end or len(text)
        stream.write(text[start:end])
        stream.flush()
        start = end


STDERR = StderrWriter()
"""This process's writer of log lines to stderr."""
atexit.register(STDERR.drain, 2.0)


RECORD_WAIT_S = 0.05
"""How long a log record waits to be written while stderr keeps up."""

WRITTEN = {"written": True}
"""``extra`` for a record that is on stderr before the logging call returns, even on the event
loop's thread (an audit line before its answer): the loop waits for it while stderr keeps up."""


class _StderrHandler(logging.Handler):
    """A logging handler that hands each formatted line to :data:`STDERR`. A record waits to be
    written (up to RECORD_WAIT_S) unless it is logged on an event loop's thread, where every
    connection would wait with it: a burst of 3,000 lines that clients caused (their requests
    refused or timed out) held a predict 0.5 s. The loop's lines are written before the process
    ends all the same (:meth:`StderrWriter.drain` at exit), except where it ends by a signal
    raised again: uvicorn's own lines (starting, shutting down, finished; a few per run) are
    the last before that, and always wait."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            waits = (
                getattr(record, "written", False)
                or record.name.startswith("uvicorn")
                or asyncio._get_running_loop() is None
            )
            STDERR.write(self.format(record) + "\n", RECORD_WAIT_S if waits else 0.0)
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        STDERR.drain()


class Tallied:
    """A warning any client can cause as often as it likes (a connection timed out, a request
    that does not parse): the first of an interval is logged as it comes, the others are
    counted and told in one line as the interval ends. Logged one line each, the 408s of 3,000
    dripped heads held a predict 0.2-0.5 s (the event loop formatting and handing over each).
    For an event loop's thread; a count still open when its loop ends is not told."""

    INTERVAL_S = 10.0

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.logger = logger
        self.what = what
        """What the count line calls the warnings it counts."""
        self._counted: int | None = None
        """The warnings counted in the interval running (None: none is)."""

    def warning(self, message: str, *args: object) -> None:
        """Log ``message % args``, or count it if an interval is running."""
        if self._counted is not None:
            self._counted += 1
            return
        self.logger.warning(message, *args)
        self._counted = 0
        asyncio.get_running_loop().call_later(self.INTERVAL_S, self._tell)

    def _tell(self) -> None:
        if self._counted:
            self.logger.warning(
                "%d more %s in the last %g s", self._counted, self.what, self.INTERVAL_S
            )
        self._counted = None


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    """Route the service's and uvicorn's loggers to stderr in the chosen format."""
    handler = _StderrHandler()
    handler.addFilter(RequestIdFilter())
    formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    handler.setFormatter(formatter)

    def notice(lines: int) -> str:
        record = logging.makeLogRecord(
            {"name": LOGS_LOGGER, "levelno": logging.WARNING, "levelname": "WARNING"}
        )
        record.msg, record.request_id = _lost(lines), "-"
        return formatter.format(record)

    STDERR.notice = notice
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    # app.http.observer writes the access lines (with latency and request id) instead.
    logging.getLogger("uvicorn.access").handlers.clear()
    logging.getLogger("uvicorn.access").propagate = False


class AccessLog:
    """One line per request, in the format of the other log lines, written in bulk.

    Through the logging module, with a write per line, the access log cost a third of a small
    model's throughput; here a line is one f-string or orjson call, and the lines reach stderr
    every ``FLUSH_S`` (or every ``FLUSH_LINES`` lines).
    """

    FLUSH_S = 0.2
    FLUSH_LINES = 512

    def __init__(self, log_format: LogFormat) -> None:
        self._json = log_format == "json"
        self._lines: list[str] = []
        self._second = -1
        self._stamp = ""

    def record(
        self, method: str, path: str, status: str, elapsed_ms: float, client: str, rid: str
    ) -> None:
        """Queue the line of one answered request."""
        message = f'{method} {printable(path)} {status} {elapsed_ms:.1f}ms "{client}"'
        now = time.time()
        if self._json:
            entry = {
                "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
                "level": "INFO",
                "logger": ACCESS_LOGGER,
                "request_id": rid,
                "message": message,
            }
            self._lines.append(orjson.dumps(entry).decode())
        else:
            self._lines.append(f"{self._time(now)} INFO {ACCESS_LOGGER} [{rid}] {message}")
        if len(self._lines) >= self.FLUSH_LINES:
            self.flush()

    def _time(self, now: float) -> str:
        """``logging``'s asctime, ``2026-11-29 06:11:57,608``, formatted once per second."""
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._stamp},{int((now - second) * 1000):03d}"

    def flush(self) -> None:
        """Hand the queued lines to stderr's writer (:class:`StderrWriter`)."""
        if self._lines:
            lines, self._lines = self._lines, []
            STDERR.write("\n".join(lines) + "\n")

    async def flush_periodically(self) -> None:
        """Flush every ``FLUSH_S`` until cancelled, then once more, and wait (on a thread) for
        the lines to be written."""
        try:
            while True:
                await asyncio.sleep(self.FLUSH_S)
                self.flush()
        finally:
            self.flush()
            await asyncio.to_thread(STDERR.drain)
