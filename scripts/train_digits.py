"""Train the bundled ``digits`` CNN on scikit-learn's 8x8 digits; reproducible (fixed seed).

Writes ``weights/digits.pth`` (a plain state_dict) and ``models/data/digits_heldout.npz`` (the
held-out split the tests and the acceptance check use), then prints the held-out accuracy.

    .venv/bin/pip install -e '.[train]' && .venv/bin/python scripts/train_digits.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from models.digits import DigitsCNN, to_network_input

ROOT = Path(__file__).resolve().parent.parent
SEED = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--weights", type=Path, default=ROOT / "weights" / "digits.pth")
    parser.add_argument("--heldout", type=Path, default=ROOT / "models/data/digits_heldout.npz")
    args = parser.parse_args()

    torch.manual_seed(SEED)
    torch.set_num_threads(1)  # bit-for-bit reproducible on the CPU
    digits = load_digits()
    images = digits.images.astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.2, random_state=SEED, stratify=digits.target
    )
    model = DigitsCNN()
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = nn.CrossEntropyLoss()
    inputs = to_network_input(torch.tensor(x_train, dtype=torch.float32))
    targets = torch.tensor(y_train)
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(args.epochs):
        model.train()
        for batch in torch.randperm(len(inputs), generator=generator).split(64):
            optimiser.zero_grad()
            loss_fn(model(inputs[batch]), targets[batch]).backward()
            optimiser.step()

    model.eval()
    with torch.inference_mode():
        test_inputs = to_network_input(torch.tensor(x_test, dtype=torch.float32))
        predicted = model(test_inputs).argmax(dim=1).numpy()
    accuracy = float((predicted == y_test).mean())

    args.weights.parent.mkdir(parents=True, exist_ok=True)
    args.heldout.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.weights)
    np.savez_compressed(args.heldout, images=x_test, labels=y_test.astype(np.uint8))
    print(f"held-out accuracy: {accuracy:.4f} on {len(y_test)} samples")
    print(f"wrote {args.weights} and {args.heldout}")


if __name__ == "__main__":
    main()
