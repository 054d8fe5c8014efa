"""What one request or model waits on holds up no other: the event loop stays free while an
upload waits on the disk, and a model whose lock a management call holds delays no other
model's following of the version database."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from app.serving.manager import VersionManager
from app.serving.model import ServedModel
from models.linear import MyModel
from tests.helpers import (
    ACTOR,
    AUTH,
    LINEAR,
    SAMPLE,
    TOKEN,
    make_settings,
    registry_for,
    saved,
    serve_in_process,
    wait_until_async,
)

STALL_S = 10.0
"""How long the slow disk holds an fsync at most: a blocked loop fails the test, not hangs it."""
FOLLOW_WITHIN_S = 5.0
"""Upper bound for the follow loop to notice a change; only reached when a test fails."""


def large_linear_weights() -> bytes:
    """Valid weights for ``linear``, padded to ~4 MB (several of the upload's write batches)."""
    torch.manual_seed(5)
    return save(dict(MyModel().state_dict()), metadata={"pad": "x" * 4_000_000})


async def in_pieces(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    """The body as a client streams it, a piece at a time (no Content-Length)."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.app
async def test_a_prediction_is_answered_while_an_upload_waits_on_a_slow_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk is slow: the fsync of the upload's file returns only once a prediction sent
    meanwhile has been answered. That happens first, then the upload completes, only when the
    upload's writes and fsync keep off the event loop (on it, the loop would wait STALL_S)."""
    settings = make_settings(tmp_path, LINEAR, admin_token=TOKEN)
    incoming = settings.store_dir / "linear" / "incoming"
    syncing, answered = threading.Event(), threading.Event()
    order: list[str] = []
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{fd}")).parent == incoming:
            syncing.set()
            answered.wait(STALL_S)
            order.append("upload synced")
        real_fsync(fd)

    async with serve_in_process(settings) as client:
        monkeypatch.setattr(os, "fsync", slow_fsync)
        body = in_pieces(large_linear_weights())
        upload = asyncio.create_task(
            client.put("/v1/models/linear/weights", content=body, headers=AUTH)
        )
        assert await asyncio.to_thread(syncing.wait, STALL_S)
        predicted = await client.post("/predict", json={"inputs": [SAMPLE]})
        order.append("prediction answered")
        answered.set()
        uploaded = await upload

    assert order == ["prediction answered", "upload synced"]
    assert predicted.status_code == 200
    assert uploaded.status_code == 201, uploaded.text
    assert uploaded.json()["active"] is True
    assert list(incoming.iterdir()) == []


@pytest.mark.unit
async def test_a_model_whose_lock_is_held_delays_no_other_models_following(
    tmp_path: Path,
) -> None:
    """Another replica activates new weights of two models while this one holds the first
    model's lock (a management call in progress): the second follows meanwhile, the first once
    its lock is free."""
    models = (LINEAR, {**LINEAR, "name": "second"})
    acting, following = (registry_for(tmp_path, *models, torch_threads=1) for _ in "ab")
    acting.load_all()
    following.load_all()
    held = following.get("linear")
    follower = asyncio.create_task(following.follow(0.02, lambda _: None))
    try:
        async with held.lock:
            new = [await upload(acting.get(name), tmp_path) for name in ("linear", "second")]
            await wait_until_async(
                lambda: following.get("second").serves(new[1]), "second follows", FOLLOW_WITHIN_S
            )
            assert not held.serves(new[0])
        await wait_until_async(lambda: held.serves(new[0]), "linear follows", FOLLOW_WITHIN_S)
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        for each in (acting, following):
            each.close()
            each.state.db.close()


async def upload(model: ServedModel, tmp_path: Path) -> str:
    """Upload and activate new weights; their version."""
    torch.manual_seed(7)
    data = saved(MyModel().state_dict())
    staged = await model.state.incoming.receive(model.name, in_pieces(data), len(data))
    outcome = await VersionManager(model).upload(staged, None, [], True, ACTOR)
    return outcome.record.id
