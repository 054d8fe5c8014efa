"""Logging: human-readable lines or JSON lines, each carrying the request id of the request
being served (``-`` outside one)."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Literal

import orjson

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

LogFormat = Literal["text", "json"]
ACCESS_LOGGER = "app.access"
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


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    """Route the service's and uvicorn's loggers to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    # app.http.observer writes the access lines (with latency and request id) instead.
    logging.getLogger("uvicorn.access").handlers.clear()
    logging.getLogger("uvicorn.access").propagate = False


def _write(lines: list[str]) -> None:
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()


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
        message = f'{method} {path} {status} {elapsed_ms:.1f}ms "{client}"'
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
        """Write the queued lines to stderr, in writes small enough for a pipe to keep whole
        (so that the lines of several worker processes never interleave mid-line)."""
        lines, self._lines = self._lines, []
        chunk: list[str] = []
        size = 0
        for line in lines:
            if chunk and size + len(line) >= PIPE_BUF:
                _write(chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += len(line) + 1
        if chunk:
            _write(chunk)

    async def flush_periodically(self) -> None:
        """Flush every ``FLUSH_S`` until cancelled, then once more."""
        try:
            while True:
                await asyncio.sleep(self.FLUSH_S)
                self.flush()
        finally:
            self.flush()
