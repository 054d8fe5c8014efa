"""The client package stands alone: the CLI, ``modelport serve`` and pictures made into inputs
included, it loads nothing of the server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT

pytestmark = pytest.mark.process

SERVER_MODULES = (
    "app.__main__",
    "app.serving",
    "app.http",
    "app.runner",
    "app.state",
    "app.config",
    "fastapi",
    "starlette",
    "uvicorn",
    "torch",
    "app.grpc",
    "grpc",
)
"""Modules of the server (and the frameworks only it needs) a client must not load: grpc and
the generated protocol code only for a client given ``grpc=``."""
DIGITS = {
    "name": "digits",
    "input_shape": [8, 8],
    "input_dtype": "float32",
    "image_input": {"max_value": 16.0, "light_on_dark": True},
}
"""What ``GET /v1/models/digits`` says of its input."""
PROBE = """
import json, os, sys
from pathlib import Path

from app.client import cli


class Launched(Exception):
    pass


def execv(path, args):
    raise Launched(args)


os.execv = execv  # what ``modelport serve`` would become
launched = None
try:
    cli.main(["serve", "--port", "8123", "--config", "absent.toml"])
except Launched as exc:
    launched = exc.args[0]
sample = cli.read_inputs(Path(sys.argv[1]), json.loads(sys.argv[2]))
print(json.dumps({"modules": sorted(sys.modules), "launched": launched, "sample": sample}))
"""


def test_serve_and_pictures_as_inputs_load_nothing_of_the_server(tmp_path: Path) -> None:
    """``serve`` becomes the launcher (``python -P -m app``, flags as given); a picture of dark
    ink on paper becomes the digits input (light ink on dark, 0-16) from the model's
    description alone; neither loads a module of the server."""
    picture = np.full((16, 16), 255, np.uint8)
    picture[4:12, 4:12] = 0  # a black square in the middle of white paper
    path = tmp_path / "square.png"
    Image.fromarray(picture, "L").save(path)

    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(path), json.dumps(DIGITS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    probed = json.loads(result.stdout)
    expected = np.zeros((8, 8))
    expected[2:6, 2:6] = 16.0
    assert probed["sample"] == [expected.tolist()]
    assert probed["launched"] == [
        *(sys.executable, "-P", "-m", "app"),
        *("--port", "8123", "--config", "absent.toml"),
    ]
    server = [
        name
        for name in probed["modules"]
        if any(name == module or name.startswith(f"{module}.") for module in SERVER_MODULES)
    ]
    assert server == []
