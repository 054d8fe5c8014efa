"""``digits``: a small CNN for scikit-learn's 8x8 handwritten digits (pixel values 0-16)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from app.serving import Acceptance, Forward, ImageInput, register

PIXEL_MAX = 16.0
HELDOUT = Path(__file__).resolve().parent / "data" / "digits_heldout.npz"
ACCEPTANCE_THRESHOLD = 0.9
# The first sample of scikit-learn's digits data set, a "0".
EXAMPLE_ZERO = [
    [0, 0, 5, 13, 9, 1, 0, 0],
    [0, 0, 13, 15, 10, 15, 5, 0],
    [0, 3, 15, 2, 0, 11, 8, 0],
    [0, 4, 12, 0, 0, 8, 8, 0],
    [0, 5, 8, 0, 0, 9, 8, 0],
    [0, 4, 11, 0, 1, 12, 7, 0],
    [0, 2, 14, 5, 10, 12, 0, 0],
    [0, 0, 6, 13, 10, 0, 0, 0],
]


def to_network_input(pixels: torch.Tensor) -> torch.Tensor:
    """(N, 8, 8) pixel values 0-16 -> (N, 1, 8, 8) in [0, 1]."""
    return (pixels / PIXEL_MAX).unsqueeze(1)


def to_label_and_probabilities(logits: torch.Tensor) -> list[dict[str, Any]]:
    """(N, classes) logits -> one ``{"label", "probabilities"}`` per sample."""
    probabilities = torch.softmax(logits.float(), dim=1)
    labels = probabilities.argmax(dim=1).tolist()
    return [
        {"label": label, "probabilities": [round(p, 6) for p in row]}
        for label, row in zip(labels, probabilities.tolist(), strict=True)
    ]


def _classes(kwargs: Mapping[str, Any]) -> tuple[int, ...]:
    return (int(kwargs["num_classes"]),)


def heldout_accuracy(forward: Forward) -> Acceptance:
    """Accuracy on the committed held-out split; uploads must reach 0.9 to serve."""
    with np.load(HELDOUT, allow_pickle=False) as data:
        images, labels = data["images"].astype(np.float32), data["labels"]
    predicted = forward(images).argmax(dim=1).numpy()
    score = float((predicted == labels).mean())
    return Acceptance("held-out accuracy", round(score, 4), ACCEPTANCE_THRESHOLD)


@register(
    "digits",
    input_shape=(8, 8),
    output_shape=_classes,
    kwargs={"num_classes": 10},
    example_input=EXAMPLE_ZERO,
    preprocess=to_network_input,
    postprocess=to_label_and_probabilities,
    acceptance=heldout_accuracy,
    # Any picture of one digit: 8x8 grey values 0-16, bright ink on a dark ground as in the
    # training data (dark ink on a light ground is inverted).
    image_input=ImageInput(max_value=PIXEL_MAX, light_on_dark=True),
)
class DigitsCNN(nn.Module):
    """Two 3x3 convolutions and two linear layers: 8x8 digit images to class logits."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
