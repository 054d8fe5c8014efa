"""Reading request text strictly: counts in ASCII digits, and JSON documents."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from app.errors import BadRequest

_DECIMAL = re.compile(r"[0-9]{1,19}")


def decimal(text: str | None) -> int | None:
    """The value of a count written in ASCII digits (surrounding spaces allowed), else None.
    ``str.isdigit`` and ``int`` also take other scripts' digits, superscripts and ``1_000``."""
    if text is None:
        return None
    text = text.strip()
    return int(text) if _DECIMAL.fullmatch(text) else None


def parse_json(data: bytes, what: str) -> Any:
    """A JSON document; NaN and Infinity (as Python's ``json.dumps`` writes them) are read too,
    so that such values reach the finite check and get a precise answer. BadRequest naming
    ``what`` when it is malformed or nested too deep to read."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as error:
        if b"NaN" not in data and b"Infinity" not in data:
            raise BadRequest(f"malformed JSON in {what}: {error}") from None
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise BadRequest(f"malformed JSON in {what}: {error}") from None
