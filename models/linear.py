"""``linear``: the PyTorch tutorial's ``MyModel``, a single ``nn.Linear(10, 2)``."""

from __future__ import annotations

import torch
from torch import nn

from app.serving import register


@register(
    "linear",
    input_shape=(10,),
    output_shape=(2,),
    example_input=[0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 0.25, 3.0, -2.0, 1.0],
)
class MyModel(nn.Module):
    """Ten features in, two scores out."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)
