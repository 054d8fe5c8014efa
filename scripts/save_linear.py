"""Save the bundled ``linear`` weights exactly the tutorial's way (fixed seed, reproducible).

.venv/bin/python scripts/save_linear.py
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.linear import MyModel

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    torch.manual_seed(0)
    model = MyModel()
    torch.save(model.state_dict(), ROOT / "weights" / "linear.pth")
    print(f"wrote {ROOT / 'weights' / 'linear.pth'}")
