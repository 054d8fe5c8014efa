"""Your own model package, no fork: a config names any importable class as ``module:Class``
(with a ``register`` table when it is not decorated), and ``MODELPORT_MODEL_PACKAGES`` lists
packages whose ``@register`` classes are found as ``models``' are."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from torch import nn

from app.config import Settings, load_service_config, load_settings
from app.errors import ConfigError
from app.serving.catalog import get_spec
from tests.helpers import (
    LINEAR,
    ROOT,
    clean_env,
    free_port,
    registry_for,
    run_server,
    write_config,
)

pytestmark = pytest.mark.unit

PACKAGE = "mp_user_models"
"""The package the tests write on tmp_path (a name no other test uses)."""

NETS = '''"""Plain modules: nothing of modelport imported."""
import torch
from torch import nn


class TinyMLP(nn.Module):
    """Four features in, three scores out."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class NotAModule:
    pass


def make_model() -> nn.Module:
    return TinyMLP()


class Outer:
    class Inner(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x
'''

SCORER = '''from torch import nn

from app.serving import register


@register("user-scorer", input_shape=(4,), output_shape=(1,))
class Scorer(nn.Module):
    """Four features in, one score out."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x):
        return self.linear(x)
'''

TINY_REGISTER = {"input_shape": [4], "input_dtype": "float32", "output_shape": [3]}


def write_package(root: Path, package: str, modules: dict[str, str]) -> None:
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text("", encoding="utf-8")
    for name, source in modules.items():
        (root / package / f"{name}.py").write_text(source, encoding="utf-8")


def forget(*packages: str) -> None:
    """Drop the imported modules of ``packages``, so that the next test imports its own."""
    for name in [m for m in sys.modules if m.split(".")[0] in packages]:
        del sys.modules[name]


@pytest.fixture
def packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder on sys.path holding ``mp_user_models`` (``nets``: plain classes; ``scorer``: a
    class registered as ``user-scorer``); tests may write more packages there."""
    root = tmp_path / "packages"
    write_package(root, PACKAGE, {"nets": NETS, "scorer": SCORER})
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    yield root
    forget(*(path.name for path in root.iterdir()))


@pytest.fixture
def weights(tmp_path: Path, packages: Path) -> dict[str, Path]:
    """Seeded weights of TinyMLP (hidden 8) and Scorer, as a training run would save them."""
    nets = importlib.import_module(f"{PACKAGE}.nets")
    scorer = importlib.import_module(f"{PACKAGE}.scorer")
    torch.manual_seed(7)
    paths = {"tiny": tmp_path / "tiny.pth", "scorer": tmp_path / "scorer.pth"}
    torch.save(nets.TinyMLP().state_dict(), paths["tiny"])
    torch.save(scorer.Scorer().state_dict(), paths["scorer"])
    return paths


def tiny_entry(weights: dict[str, Path], **fields: Any) -> dict[str, Any]:
    entry = {
        "name": "tiny",
        "class": f"{PACKAGE}.nets:TinyMLP",
        "weights": str(weights["tiny"]),
        "register": TINY_REGISTER,
    }
    return {**entry, **fields}


def torch_outputs(cls: type[nn.Module], path: Path, batch: list[list[float]]) -> Any:
    """What ``cls`` with the weights at ``path`` computes on ``batch``, outside any server."""
    model = cls().eval()
    model.load_state_dict(torch.load(path, weights_only=True))
    with torch.inference_mode():
        return model(torch.tensor(batch)).tolist()


def assert_same(served: Any, expected: Any) -> None:
    """Outputs a server gave (JSON) against torch's, as float32 values."""
    torch.testing.assert_close(torch.tensor(served), torch.tensor(expected))


def config_error(tmp_path: Path, *models: dict[str, Any], **overrides: Any) -> str:
    """The one-line ConfigError that checking a config serving ``models`` raises."""
    with pytest.raises(ConfigError) as info:
        registry_for(tmp_path, *models, **overrides).close()
    message = info.value.message
    assert "\n" not in message, message
    return message


# --- module:Class ------------------------------------------------------------------------------


def test_undecorated_class_named_by_module_and_class_serves_from_its_register_table(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    registry = registry_for(tmp_path, tiny_entry(weights, kwargs={"hidden": 8}))
    registry.load_all()

    model = registry.get("tiny")
    assert registry.unavailable() == {}
    spec = model.spec
    assert spec.name == f"{PACKAGE}.nets:TinyMLP"
    assert spec.qualname == f"{PACKAGE}.nets.TinyMLP"
    assert spec.signature(model.kwargs)[0].shape == (4,)
    assert spec.input_dtype == torch.float32
    assert spec.output_shapes(model.kwargs).get("output") == (3,)
    assert spec.description == "Four features in, three scores out."
    batch = [[1.0, -2.0, 0.5, 3.0], [0.0, 0.25, -1.0, 2.0]]
    assert model.runtime is not None
    served = model.runtime.forward(torch.tensor(batch).numpy()).tolist()
    expected = torch_outputs(sys.modules[f"{PACKAGE}.nets"].TinyMLP, weights["tiny"], batch)
    assert_same(served, expected)
    registry.close()


def test_register_table_reads_every_option_toml_can_state(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    table = {
        **TINY_REGISTER,
        "input_dtype": "torch.float64",
        "example_input": [1.0, 2.0, 3.0, 4.0],
        "allow_non_finite_input": True,
        "description": "Given text.",
        "kwargs": {"hidden": 5},
        "image_input": {"max_value": 16.0, "light_on_dark": True},
    }

    registry = registry_for(tmp_path, tiny_entry(weights, register=table, kwargs={"hidden": 8}))

    model = registry.get("tiny")
    spec = model.spec
    assert spec.input_dtype == torch.float64
    assert spec.example(model.kwargs) == [1.0, 2.0, 3.0, 4.0]
    assert spec.allow_non_finite_input is True
    assert spec.description == "Given text."
    assert spec.kwargs == {"hidden": 5}
    assert model.kwargs == {"hidden": 8}  # the entry's kwargs win, as over @register's
    assert spec.image_input is not None
    assert (spec.image_input.max_value, spec.image_input.light_on_dark) == (16.0, True)
    registry.close()


def test_decorated_class_named_by_module_and_class_uses_its_decoration(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    entry = {
        "name": "scorer",
        "class": f"{PACKAGE}.scorer:Scorer",
        "weights": str(weights["scorer"]),
    }

    registry = registry_for(tmp_path, entry)

    spec = registry.get("scorer").spec
    assert spec is get_spec("user-scorer")
    assert spec.name == "user-scorer"
    assert spec.output_shapes({}).get("output") == (1,)
    registry.close()


def test_nested_class_named_by_a_dotted_attribute_is_found(tmp_path: Path, packages: Path) -> None:
    path = tmp_path / "identity.pth"
    torch.save({}, path)
    entry = {
        "name": "inner",
        "class": f"{PACKAGE}.nets:Outer.Inner",
        "weights": str(path),
        "register": {"input_shape": [2], "input_dtype": "float32"},
    }

    registry = registry_for(tmp_path, entry)

    assert registry.get("inner").spec.qualname == f"{PACKAGE}.nets.Outer.Inner"
    registry.close()


def test_config_file_reads_class_paths_and_register_tables(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        {**LINEAR, "name": "a", "class": "pkg.sub.nets:Net", "register": {"input_shape": [1]}},
    )

    [entry] = load_service_config(path)

    assert entry.model_class == "pkg.sub.nets:Net"
    assert entry.registration == {"input_shape": [1]}


@pytest.mark.parametrize("reference", ["a:b:c", "pkg.:Net", ":Net", "pkg:", "pkg/nets:Net"])
def test_malformed_class_path_is_refused_naming_the_model(tmp_path: Path, reference: str) -> None:
    message = config_error(tmp_path, {**LINEAR, "class": reference})

    assert message.endswith(
        f"model 'linear': class: expected a registered name or module.path:ClassName;"
        f" got {reference!r}"
    )


# --- refusals of module:Class, each with its reason --------------------------------------------


def test_module_that_is_not_importable_is_refused_saying_the_import_error(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    message = config_error(tmp_path, tiny_entry(weights, **{"class": "mp_nowhere.nets:Net"}))

    assert message == (
        "model 'tiny': class 'mp_nowhere.nets:Net': cannot import module 'mp_nowhere.nets':"
        " ModuleNotFoundError: No module named 'mp_nowhere'; is its folder on PYTHONPATH?"
    )


def test_module_that_fails_while_importing_is_refused_saying_what_and_where(
    tmp_path: Path, packages: Path, weights: dict[str, Path]
) -> None:
    broken = packages / PACKAGE / "broken.py"
    broken.write_text("import torch\n\nraise RuntimeError('no GPU driver here')\n")

    message = config_error(tmp_path, tiny_entry(weights, **{"class": f"{PACKAGE}.broken:Net"}))

    assert message == (
        f"model 'tiny': class '{PACKAGE}.broken:Net': cannot import module '{PACKAGE}.broken':"
        f" RuntimeError: no GPU driver here (at {broken}:3)"
    )


def test_missing_attribute_is_refused_naming_module_and_attribute(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    message = config_error(tmp_path, tiny_entry(weights, **{"class": f"{PACKAGE}.nets:TinyMLp"}))

    assert message == (
        f"model 'tiny': class '{PACKAGE}.nets:TinyMLp': '{PACKAGE}.nets' has no attribute 'TinyMLp'"
    )


@pytest.mark.parametrize(
    ("attribute", "shown"),
    [
        ("NotAModule", "the class NotAModule"),
        ("make_model", "<function make_model at"),
        ("torch", "<module 'torch' from"),
    ],
)
def test_attribute_that_is_not_a_module_class_is_refused_saying_what_it_is(
    tmp_path: Path, weights: dict[str, Path], attribute: str, shown: str
) -> None:
    reference = f"{PACKAGE}.nets:{attribute}"

    message = config_error(tmp_path, tiny_entry(weights, **{"class": reference}))

    prefix = f"model 'tiny': class '{reference}': not an nn.Module subclass: {attribute} is "
    assert message.startswith(prefix + shown), message


def test_undecorated_class_without_a_register_table_is_refused_saying_what_to_add(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    entry = tiny_entry(weights)
    del entry["register"]

    message = config_error(tmp_path, entry)

    assert message.startswith(
        f"model 'tiny': {PACKAGE}.nets:TinyMLP is not decorated with @register: give what"
        " registration would in the entry's register table, at least register = {"
    )
    assert "input_shape" in message
    assert "input_dtype" in message


@pytest.mark.parametrize("missing", ["input_shape", "input_dtype"])
def test_register_table_without_shape_or_dtype_is_refused_naming_the_key(
    tmp_path: Path, weights: dict[str, Path], missing: str
) -> None:
    table = {key: value for key, value in TINY_REGISTER.items() if key != missing}

    message = config_error(tmp_path, tiny_entry(weights, register=table))

    assert message.startswith(
        f"model 'tiny': register.{missing}: required for a class not decorated with @register"
    )


@pytest.mark.parametrize("dtype", ["float33", "FP32", "", 32])
def test_unknown_dtype_name_is_refused_listing_the_known_ones(
    tmp_path: Path, weights: dict[str, Path], dtype: Any
) -> None:
    table = {**TINY_REGISTER, "input_dtype": dtype}

    message = config_error(tmp_path, tiny_entry(weights, register=table))

    assert message.startswith(f"model 'tiny': register.input_dtype: unknown dtype {dtype!r} (")
    assert "float32" in message
    assert "int64" in message
    assert "bfloat16" in message


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("input_shape", [4, 0], "expected a list of positive integers"),
        ("input_shape", "4", "expected a list of positive integers"),
        ("output_shape", [3.0], "expected a list of positive integers"),
        ("input_shape", [True], "expected a list of positive integers"),
        ("allow_non_finite_input", "yes", "expected true or false"),
        ("example_input", "1,2,3,4", "expected one sample as nested lists"),
        ("image_input", {"max_value": "255"}, "expected a table of max_value"),
        ("image_input", {"colour": True}, "expected a table of max_value"),
    ],
)
def test_bad_register_value_is_refused_naming_the_key(
    tmp_path: Path, weights: dict[str, Path], key: str, value: Any, expected: str
) -> None:
    table = {**TINY_REGISTER, key: value}

    message = config_error(tmp_path, tiny_entry(weights, register=table))

    assert message.startswith(f"model 'tiny': register.{key}: {expected}"), message
    assert repr(value) in message


def test_unknown_register_key_is_refused_listing_the_options(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    message = config_error(
        tmp_path, tiny_entry(weights, register={**TINY_REGISTER, "input_shapes": [4]})
    )

    assert message.startswith("model 'tiny': register.input_shapes: unknown option (register")
    assert "input_shape, input_dtype, output_shape" in message


@pytest.mark.parametrize("key", ["preprocess", "postprocess", "acceptance"])
def test_register_key_that_takes_code_is_refused_pointing_at_the_decorator(
    tmp_path: Path, weights: dict[str, Path], key: str
) -> None:
    table = {**TINY_REGISTER, key: f"{PACKAGE}.nets:make_model"}

    message = config_error(tmp_path, tiny_entry(weights, register=table))

    assert message == (
        f"model 'tiny': register.{key}: takes code, which a TOML file cannot give; decorate the"
        " class with @register to give it"
    )


def test_register_table_beside_a_decorated_class_is_refused(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    entry = tiny_entry(weights, **{"class": f"{PACKAGE}.scorer:Scorer"})

    message = config_error(tmp_path, entry)

    assert message == (
        f"model 'tiny': register: {PACKAGE}.scorer:Scorer is decorated with"
        " @register('user-scorer'), which gives these; remove the register table"
    )


def test_register_table_beside_a_registered_name_is_refused(tmp_path: Path) -> None:
    message = config_error(tmp_path, {**LINEAR, "register": TINY_REGISTER})

    assert message.startswith("model 'linear': register: 'linear' is registered with @register")


# --- MODELPORT_MODEL_PACKAGES ------------------------------------------------------------------


def test_registered_class_of_a_listed_package_is_served_by_its_name(
    tmp_path: Path, weights: dict[str, Path]
) -> None:
    forget(PACKAGE)  # as a fresh process: only the setting imports the package
    entry = {"name": "scorer", "class": "user-scorer", "weights": str(weights["scorer"])}

    registry = registry_for(tmp_path, entry, model_packages=[PACKAGE])
    registry.load_all()

    assert registry.unavailable() == {}
    assert registry.get("scorer").spec.qualname == f"{PACKAGE}.scorer.Scorer"
    assert f"{PACKAGE}.nets" in sys.modules  # every module of the package, as for models/
    registry.close()


def test_registered_class_of_a_package_not_listed_is_unknown(
    tmp_path: Path, packages: Path, weights: dict[str, Path]
) -> None:
    write_package(packages, "mp_unlisted", {"scorer": SCORER.replace("user-", "unlisted-")})
    entry = {"name": "scorer", "class": "unlisted-scorer", "weights": str(weights["scorer"])}

    message = config_error(tmp_path, entry)
    registry = registry_for(tmp_path, entry, model_packages=["mp_unlisted"])

    assert message.startswith("model 'scorer': unknown class 'unlisted-scorer' (registered: ")
    assert registry.get("scorer").spec.qualname == "mp_unlisted.scorer.Scorer"
    registry.close()


def test_model_packages_setting_reads_comma_separated_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODELPORT_MODEL_PACKAGES", " my_models, team.nets ,,other")

    assert Settings().model_packages == ["my_models", "team.nets", "other"]


def test_model_packages_setting_defaults_to_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODELPORT_MODEL_PACKAGES", raising=False)

    assert Settings().model_packages == []


@pytest.mark.parametrize("value", ["my-models", "my_models,../etc", "team..nets", "a b"])
def test_model_packages_setting_with_a_bad_name_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("MODELPORT_MODEL_PACKAGES", value)

    with pytest.raises(ConfigError) as info:
        load_settings()

    assert info.value.message.startswith(
        "MODELPORT_MODEL_PACKAGES: expected comma-separated package names; got "
    )


def test_same_name_registered_in_two_packages_is_refused_naming_both_classes(
    tmp_path: Path, packages: Path, weights: dict[str, Path]
) -> None:
    forget(PACKAGE)
    write_package(packages, "mp_clash", {"copy": SCORER.replace("class Scorer", "class Copy")})
    entry = {"name": "scorer", "class": "user-scorer", "weights": str(weights["scorer"])}

    message = config_error(tmp_path, entry, model_packages=[PACKAGE, "mp_clash"])

    assert message == (
        "MODELPORT_MODEL_PACKAGES: model name 'user-scorer' is already registered by"
        f" {PACKAGE}.scorer.Scorer; cannot register mp_clash.copy.Copy under the same name"
    )


def test_listed_package_that_cannot_be_imported_is_refused_saying_the_import_error(
    tmp_path: Path,
) -> None:
    message = config_error(tmp_path, LINEAR, model_packages=["mp_absent_models"])

    assert message == (
        "MODELPORT_MODEL_PACKAGES: cannot import 'mp_absent_models': ModuleNotFoundError:"
        " No module named 'mp_absent_models'; is its folder on PYTHONPATH?"
    )


def test_listed_package_whose_module_fails_is_refused_saying_where(
    tmp_path: Path, packages: Path
) -> None:
    write_package(packages, "mp_failing", {"nets": "import torch\nimport mp_missing_dependency\n"})

    message = config_error(tmp_path, LINEAR, model_packages=["mp_failing"])

    assert message == (
        "MODELPORT_MODEL_PACKAGES: cannot import 'mp_failing': ModuleNotFoundError: No module"
        f" named 'mp_missing_dependency' (at {packages / 'mp_failing' / 'nets.py'}:2); is its"
        " folder on PYTHONPATH?"
    )


# --- real server processes ---------------------------------------------------------------------


def predicted(url: str, model: str, batch: list[list[float]]) -> Any:
    response = httpx.post(f"{url}/v1/models/{model}/predict", json={"inputs": batch}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["outputs"]


@pytest.mark.process
def test_server_serves_a_package_on_pythonpath_both_ways_as_torch_computes(
    tmp_path: Path, packages: Path, weights: dict[str, Path]
) -> None:
    config = write_config(
        tmp_path,
        tiny_entry(weights),
        {"name": "scorer", "class": "user-scorer", "weights": str(weights["scorer"])},
    )
    env = {"PYTHONPATH": str(packages), "MODELPORT_MODEL_PACKAGES": PACKAGE}
    batch = [[1.0, -2.0, 0.5, 3.0], [0.0, 0.25, -1.0, 2.0]]
    nets, scorer = sys.modules[f"{PACKAGE}.nets"], sys.modules[f"{PACKAGE}.scorer"]

    with run_server(tmp_path, config, env=env) as server:
        tiny = predicted(server.url, "tiny", batch)
        scores = predicted(server.url, "scorer", batch)
        info = httpx.get(f"{server.url}/v1/models/tiny", timeout=10).json()

    assert_same(tiny, torch_outputs(nets.TinyMLP, weights["tiny"], batch))
    assert_same(scores, torch_outputs(scorer.Scorer, weights["scorer"], batch))
    assert (info["class"], info["class_path"]) == (
        f"{PACKAGE}.nets:TinyMLP",
        f"{PACKAGE}.nets.TinyMLP",
    )
    assert (info["input_shape"], info["input_dtype"], info["output_shape"]) == ([4], "float32", [3])


@pytest.mark.process
def test_launcher_with_an_unimportable_class_exits_2_with_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, {**LINEAR, "class": "mp_nowhere.nets:Net"})
    args = [sys.executable, "-m", "app", "--config", str(config), "--port", str(free_port())]

    result = subprocess.run(
        args, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "modelport: config error: model 'linear': class 'mp_nowhere.nets:Net': cannot import"
        " module 'mp_nowhere.nets': ModuleNotFoundError: No module named 'mp_nowhere'; is its"
        " folder on PYTHONPATH?\n"
    )


EXAMPLE = ROOT / "examples" / "my_models"


@pytest.mark.process
def test_example_package_serves_as_its_docker_images_run_it(tmp_path: Path) -> None:
    """examples/my_models as the mounted-folder image runs it: the package on PYTHONPATH, the
    setting listing it, the config beside the weights its script writes."""
    folder = tmp_path / "my_models"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("__pycache__", "weights"))
    subprocess.run(
        [sys.executable, str(folder / "make_weights.py")], check=True, timeout=60, env=clean_env()
    )
    env = {"PYTHONPATH": str(folder / "src"), "MODELPORT_MODEL_PACKAGES": "my_models"}
    batch = [[1.0, 0.5, -0.5, 2.0]]

    with run_server(tmp_path, folder / "modelport.toml", env=env) as server:
        tiny = predicted(server.url, "tiny-mlp", batch)
        scores = predicted(server.url, "scorer", batch)

    sys.path.insert(0, str(folder / "src"))
    try:
        nets = importlib.import_module("my_models.nets")
        scorer = importlib.import_module("my_models.scorer")
        weights = folder / "weights"
        assert_same(tiny, torch_outputs(nets.TinyMLP, weights / "tiny_mlp.pth", batch))
        assert_same(scores, torch_outputs(scorer.Scorer, weights / "scorer.pth", batch))
    finally:
        sys.path.remove(str(folder / "src"))
        forget("my_models")
