"""Write the example's weights, as your training would (``torch.save(model.state_dict(), path)``):
``weights/tiny_mlp.pth`` and ``weights/scorer.pth`` beside this file, or in the folder given.

    python make_weights.py [FOLDER]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "src"))

from my_models.nets import TinyMLP  # noqa: E402  (the package is beside this script)
from my_models.scorer import Scorer  # noqa: E402


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(TinyMLP(hidden=8).state_dict(), folder / "tiny_mlp.pth")
    torch.save(Scorer().state_dict(), folder / "scorer.pth")
    print(f"wrote {folder / 'tiny_mlp.pth'} and {folder / 'scorer.pth'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "weights")
