"""A plain ``nn.Module`` with no modelport import: the config names it as
``my_models.nets:TinyMLP`` and gives its input shape and dtype in a ``register`` table."""

from __future__ import annotations

import torch
from torch import nn


class TinyMLP(nn.Module):
    """Four features in, three scores out."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
