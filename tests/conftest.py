"""Fixtures: Settings on tmp_path and a client of the real app with its lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from tests.helpers import make_settings, serve_in_process


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings serving the two bundled models."""
    return make_settings(tmp_path)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the real app serving the bundled models."""
    async with serve_in_process(settings) as client:
        yield client
