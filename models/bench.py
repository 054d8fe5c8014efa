"""The benchmark's models (``bench/``): overhead-bound ``tiny``, small-compute ``mlp`` and
compute-bound ``cnn``. Registered like any model; served only when a config names them."""

from __future__ import annotations

import torch
from torch import nn

from app.serving import register


@register("bench-tiny", input_shape=(10,), output_shape=(2,))
class Tiny(nn.Module):
    """``nn.Linear(10, 2)``: the HTTP path is the whole cost."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


@register("bench-mlp", input_shape=(784,), output_shape=(10,))
class MLP(nn.Module):
    """784 -> 1024 -> 1024 -> 10 with ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Block(nn.Module):
    """A ResNet basic block."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


@register("bench-cnn", input_shape=(3, 64, 64), output_shape=(10,))
class CNN(nn.Module):
    """A small ResNet-style net on 3x64x64 images (compute-bound)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            _down(3, 32),
            _Block(32),
            _Block(32),
            _down(32, 64),
            _Block(64),
            _Block(64),
            _down(64, 128),
            _Block(128),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
