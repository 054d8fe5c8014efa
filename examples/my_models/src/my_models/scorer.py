"""A class registered with ``@register``: served by its name, ``my-scorer``, once
``MODELPORT_MODEL_PACKAGES`` lists ``my_models`` (every module of the package is imported)."""

from __future__ import annotations

import torch
from torch import nn

from app.serving import register


@register("my-scorer", input_shape=(4,), output_shape=(1,), example_input=[1.0, 0.5, -0.5, 2.0])
class Scorer(nn.Module):
    """Four features in, one score out."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)
