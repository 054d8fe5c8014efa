"""Version identity and records: a version is named by the sha256 of its bytes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

VERSION_PATTERN = re.compile(r"^[0-9a-f]{12}$")


def version_id(sha256: str) -> str:
    """A version id is the first 12 hex digits of the sha256 of its bytes."""
    return sha256[:12]


@dataclass(frozen=True)
class VersionRecord:
    """One immutable weights version."""

    id: str
    sha256: str
    size: int
    format: str
    created_at: str
    filename: str | None
    source: str  # "upload" or "bundled"
    report: dict[str, Any] = field(default_factory=dict)
