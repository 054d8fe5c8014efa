"""The baseline: the FastAPI server a tutorial would write, serving the benchmark's models.

A sync ``def`` endpoint, a pydantic body ``inputs: list[list[float]]``, ``torch.tensor(inputs)``,
``model(x)`` under ``no_grad``, one uvicorn worker, default settings.

    python bench/tutorial_server.py WEIGHTS_DIR PORT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from models.bench import CNN, MLP, Tiny

weights = Path(sys.argv[1])
app = FastAPI()
models = {}
for name, cls in {"tiny": Tiny, "mlp": MLP, "cnn": CNN}.items():
    model = cls()
    model.load_state_dict(torch.load(weights / f"{name}.pth"))
    model.eval()
    models[name] = model


class Vectors(BaseModel):
    inputs: list[list[float]]


class Images(BaseModel):
    inputs: list[list[list[list[float]]]]


@app.post("/predict/tiny")
def predict_tiny(body: Vectors) -> dict[str, list[list[float]]]:
    x = torch.tensor(body.inputs)
    with torch.no_grad():
        y = models["tiny"](x)
    return {"outputs": y.tolist()}


@app.post("/predict/mlp")
def predict_mlp(body: Vectors) -> dict[str, list[list[float]]]:
    x = torch.tensor(body.inputs)
    with torch.no_grad():
        y = models["mlp"](x)
    return {"outputs": y.tolist()}


@app.post("/predict/cnn")
def predict_cnn(body: Images) -> dict[str, list[list[float]]]:
    x = torch.tensor(body.inputs)
    with torch.no_grad():
        y = models["cnn"](x)
    return {"outputs": y.tolist()}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]))
