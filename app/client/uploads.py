"""Weights files streamed to the server in chunks, reporting progress as each chunk goes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHUNK_BYTES = 1024 * 1024

Progress = Callable[[int, int], None]
"""Called as the upload streams with (bytes sent so far, total bytes)."""


@dataclass
class Upload:
    """A weights file streamed in chunks, reporting progress as each chunk goes."""

    path: Path
    progress: Progress | None
    chunk_bytes: int = CHUNK_BYTES
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = self.path.stat().st_size

    def chunks(self) -> Iterator[bytes]:
        sent = 0
        with self.path.open("rb") as file:
            while chunk := file.read(self.chunk_bytes):
                yield chunk
                sent += len(chunk)
                if self.progress is not None:
                    self.progress(sent, self.size)

    async def async_chunks(self) -> AsyncIterator[bytes]:
        sent = 0
        with self.path.open("rb") as file:
            while chunk := await asyncio.to_thread(file.read, self.chunk_bytes):
                yield chunk
                sent += len(chunk)
                if self.progress is not None:
                    self.progress(sent, self.size)

    def request(self, activate: bool, sha256: str | None) -> dict[str, Any]:
        """The keyword arguments of the PUT, besides the content."""
        params = {"activate": str(activate).lower(), "filename": self.path.name}
        if sha256:
            params["sha256"] = sha256
        # An explicit length (instead of chunked encoding) lets the server refuse an
        # oversized file before it is sent.
        headers = {"Content-Length": str(self.size), "Content-Type": "application/octet-stream"}
        return {"params": params, "headers": headers}
