"""The layers of app/ import one way, down: read from every module's import statements."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

APP = Path(__file__).resolve().parent.parent / "app"
WEB = ("fastapi", "starlette", "uvicorn", "grpc")
BASE = ("app.errors", "app.config")
SERVING = (*BASE, "app.codecs", "app.state", "app.observability", "app.serving")
ALLOWED: dict[str, tuple[str, ...]] = {
    "codecs": ("app.errors", "app.codecs"),
    "state": (*BASE, "app.state"),
    "observability": (*BASE, "app.observability"),
    "serving": SERVING,
    "http": (*SERVING, "app.http"),
    # the generated protocol code holds only protobuf messages and stubs, no server logic
    "client": ("app.client", "app.grpc.proto"),
}
"""What each layer may import of app/ (the runner, at the top, may import every layer)."""
FRAMEWORK_FREE = ("codecs", "state", "observability", "serving", "client")
GRPC_CLIENT = APP / "client" / "grpc_transport.py"
"""The client's gRPC transport: the one module of those layers that may import grpc. Only a
client given ``grpc=`` imports it (tests/test_client_imports.py checks that ``import
app.client`` and the CLI load no grpc)."""


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, by absolute name (this package uses no relative imports)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def layer_files(layer: str) -> list[Path]:
    return sorted((APP / layer).rglob("*.py"))


def test_the_import_reader_sees_imports_inside_functions_too(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from app.http import answers\n")
    assert imports_of(module) == {"os", "app.http"}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(layer: str) -> None:
    files = layer_files(layer)
    assert files, f"app/{layer} is empty"
    wrong = {
        f"{path.relative_to(APP)}: {name}"
        for path in files
        for name in imports_of(path)
        if (name == "app" or name.startswith("app.")) and not name.startswith(ALLOWED[layer])
    }
    assert not wrong, f"app/{layer} imports from a layer above it: {sorted(wrong)}"


@pytest.mark.parametrize("layer", FRAMEWORK_FREE)
def test_the_core_layers_never_import_a_web_framework(layer: str) -> None:
    wrong = {
        f"{path.relative_to(APP)}: {name}"
        for path in layer_files(layer)
        for name in imports_of(path)
        if name.split(".")[0] in WEB and not (path == GRPC_CLIENT and name.split(".")[0] == "grpc")
    }
    assert not wrong, f"app/{layer} imports a web framework: {sorted(wrong)}"
