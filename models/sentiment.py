"""``sentiment``: a model of two inputs and two outputs, the shape of a small text classifier:
token ids and an attention mask in (``forward(input_ids, attention_mask)``), class logits and
a sentence embedding out (a dict of tensors)."""

from __future__ import annotations

import torch
from torch import nn

from app.serving import Input, register

TOKENS = 8
"""Tokens per sample (padded; the attention mask says which are real)."""
VOCABULARY = 100
WIDTH = 4
CLASSES = 3


@register(
    "sentiment",
    inputs={
        "input_ids": Input((TOKENS,), torch.int64),
        "attention_mask": Input((TOKENS,), torch.int64),
    },
    outputs={"logits": (CLASSES,), "embedding": (WIDTH,)},
    example_input={
        "input_ids": [5, 17, 42, 8, 0, 0, 0, 0],
        "attention_mask": [1, 1, 1, 1, 0, 0, 0, 0],
    },
)
class SentimentClassifier(nn.Module):
    """Token ids and a mask in; three class logits and a sentence embedding out."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCABULARY, WIDTH)
        self.classify = nn.Linear(WIDTH, CLASSES)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        summed = (self.embed(input_ids) * mask).sum(dim=1)
        embedding = summed / mask.sum(dim=1).clamp(min=1.0)  # the mean of the real tokens
        return {"logits": self.classify(embedding), "embedding": embedding}
