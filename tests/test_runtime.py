"""Where and how the forward runs: off the event loop, under inference_mode, with the thread
count the settings ask for, outputs on the CPU."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn

from app.serving.catalog import register
from tests.helpers import make_settings, serve_in_process

pytestmark = pytest.mark.app


@register("test-probe", input_shape=(2,), output_shape=(2,))
class Probe(nn.Module):
    """Records the conditions of each forward."""

    seen: ClassVar[list[dict[str, object]]] = []

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Probe.seen.append(
            {
                "thread": threading.current_thread().name,
                "inference_mode": torch.is_inference_mode_enabled(),
                "threads": torch.get_num_threads(),
            }
        )
        return x * self.scale


async def test_forward_runs_on_the_model_thread_in_inference_mode_with_set_threads(
    tmp_path: Path,
) -> None:
    torch.save(Probe().state_dict(), tmp_path / "probe.pth")
    entry = {"name": "probe", "class": "test-probe", "weights": "probe.pth"}
    Probe.seen.clear()
    async with serve_in_process(make_settings(tmp_path, entry, torch_threads=1)) as client:
        response = await client.post("/predict", json={"inputs": [[1.0, 2.0], [3.0, 4.0]]})
    assert response.json()["outputs"] == [[1.0, 2.0], [3.0, 4.0]]
    request_forward = Probe.seen[-1]  # the first forward is the startup smoke test
    assert request_forward["thread"] != threading.main_thread().name
    assert str(request_forward["thread"]).startswith("infer-probe")
    assert request_forward["inference_mode"] is True
    assert request_forward["threads"] == 1
