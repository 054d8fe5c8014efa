"""Save the bundled ``sentiment`` weights (fixed seed, reproducible).

.venv/bin/python scripts/save_sentiment.py
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.sentiment import SentimentClassifier

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    torch.manual_seed(0)
    model = SentimentClassifier()
    torch.save(model.state_dict(), ROOT / "weights" / "sentiment.pth")
    print(f"wrote {ROOT / 'weights' / 'sentiment.pth'}")
