"""Settings and the TOML file of served models: every problem stops startup with one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import app.__main__ as launcher
from app.config import DEFAULT_CONFIG, Settings, load_service_config, load_settings
from app.errors import ConfigError
from app.http.app import create_app
from app.observability.metrics import Metrics
from app.runner import supervisor
from app.serving.registry import ModelRegistry
from tests.helpers import (
    DIGITS,
    LINEAR,
    ROOT,
    WEIGHTS,
    clean_env,
    free_port,
    make_settings,
    uvicorn_factory,
    write_config,
)


@pytest.fixture(autouse=True)
def no_modelport_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees only the MODELPORT_* variables it sets itself."""
    for name in list(os.environ):
        if name.startswith("MODELPORT_"):
            monkeypatch.delenv(name)


def check_config(settings: Settings) -> ModelRegistry:
    """What startup does before loading weights: read the file, check every entry."""
    configs = load_service_config(settings.config)
    registry = ModelRegistry.from_settings(
        settings, configs, Metrics(list, [c.name for c in configs])
    )
    registry.close()
    return registry


def config_error(tmp_path: Path, *models: dict[str, Any]) -> str:
    """The ConfigError message for a config serving ``models``; it must be one line."""
    settings = make_settings(tmp_path, *models)
    with pytest.raises(ConfigError) as info:
        check_config(settings)
    message = info.value.message
    assert "\n" not in message, message
    assert str(info.value) == message
    return message


def config_error_for_text(tmp_path: Path, text: str) -> str:
    path = tmp_path / "modelport.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        check_config(Settings(config=path))
    message = info.value.message
    assert "\n" not in message, message
    return message


# --- the TOML file -----------------------------------------------------------------------------


def test_bundled_config_serves_linear_digits_and_sentiment_from_the_bundled_weights() -> None:
    configs = load_service_config(DEFAULT_CONFIG)

    assert [(c.name, c.model_class, c.weights) for c in configs] == [
        ("linear", "linear", WEIGHTS / "linear.pth"),
        ("digits", "digits", WEIGHTS / "digits.pth"),
        ("sentiment", "sentiment", WEIGHTS / "sentiment.pth"),
    ]
    assert configs[1].kwargs == {"num_classes": 10}
    check_config(Settings(config=DEFAULT_CONFIG))


def test_malformed_toml_is_one_line_naming_the_file_and_position(tmp_path: Path) -> None:
    message = config_error_for_text(
        tmp_path, '[[models]]\nname = "linear"\nclass = linear\nweights = "w.pth"\n'
    )

    assert message.startswith("malformed TOML in ")
    assert "modelport.toml" in message
    assert "line 3" in message


def test_missing_config_file_is_one_line_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*absent\.toml$"):
        check_config(Settings(config=tmp_path / "absent.toml"))


def test_unknown_class_lists_the_registered_names(tmp_path: Path) -> None:
    message = config_error(tmp_path, LINEAR, {**DIGITS, "name": "mystery", "class": "resnet9000"})

    assert message.startswith("model 'mystery': unknown class 'resnet9000'")
    assert "registered: " in message
    assert "digits" in message
    assert "linear" in message


def test_missing_weights_file_names_the_model_and_the_path(tmp_path: Path) -> None:
    absent = tmp_path / "nowhere" / "linear.pth"

    message = config_error(tmp_path, {**LINEAR, "weights": str(absent)})

    assert message == f"model 'linear': weights file not found: '{absent}'"


def test_unknown_device_names_the_model_and_the_accepted_devices(tmp_path: Path) -> None:
    message = config_error(tmp_path, LINEAR, {**DIGITS, "device": "tpu"})

    assert "model 'digits': device: unknown device 'tpu'" in message
    assert "cpu, cuda, cuda:N, mps or auto" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_device_without_cuda_names_the_model(tmp_path: Path, device: str) -> None:
    message = config_error(tmp_path, {**LINEAR, "device": device})

    assert message == (
        f"model 'linear': device '{device}' requested but CUDA is not available here"
    )


def test_auto_device_falls_back_to_what_is_available(tmp_path: Path) -> None:
    registry = check_config(make_settings(tmp_path, {**LINEAR, "device": "auto"}))

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert registry.get("linear").device.type == expected


def test_misspelt_constructor_kwarg_names_the_model_and_the_kwarg(tmp_path: Path) -> None:
    message = config_error(tmp_path, LINEAR, {**DIGITS, "kwargs": {"num_clases": 3}})

    assert message.startswith("model 'digits': bad kwargs: DigitsCNN(")
    assert "num_clases" in message


def test_kwargs_for_a_class_taking_none_are_refused(tmp_path: Path) -> None:
    message = config_error(tmp_path, {**LINEAR, "kwargs": {"hidden": 4}})

    assert message.startswith("model 'linear': bad kwargs: MyModel(hidden)")


def test_duplicate_model_names_are_refused_naming_the_name(tmp_path: Path) -> None:
    message = config_error(tmp_path, LINEAR, DIGITS, {**DIGITS, "class": "digits"})

    assert "model names must be unique; repeated: digits" in message


def test_config_without_models_is_refused(tmp_path: Path) -> None:
    message = config_error_for_text(tmp_path, "models = []\n")

    assert "models: " in message
    assert "at least 1" in message


def test_empty_config_file_is_refused_naming_the_missing_models(tmp_path: Path) -> None:
    message = config_error_for_text(tmp_path, "# nothing served\n")

    assert message.endswith("models: Field required")


@pytest.mark.parametrize("name", ["../etc", "Linear", "", "a b", "x" * 65])
def test_invalid_model_name_is_refused(tmp_path: Path, name: str) -> None:
    message = config_error(tmp_path, {**LINEAR, "name": name})

    assert "name: String should match pattern" in message


def test_invalid_model_name_is_named_in_the_message(tmp_path: Path) -> None:
    message = config_error(tmp_path, {**LINEAR, "name": "../etc"})

    assert "model '../etc': name: String should match pattern" in message


def test_unknown_field_in_an_entry_names_the_model_and_the_field(tmp_path: Path) -> None:
    message = config_error(tmp_path, LINEAR, {**DIGITS, "wieghts": "digits.pth"})

    assert "model 'digits': wieghts: Extra inputs are not permitted" in message


def test_unknown_top_level_table_is_refused(tmp_path: Path) -> None:
    text = write_config(tmp_path, LINEAR).read_text(encoding="utf-8")

    message = config_error_for_text(tmp_path, text + "\n[server]\nport = 1\n")

    assert "server: Extra inputs are not permitted" in message


def test_entry_without_a_name_is_located_by_its_index(tmp_path: Path) -> None:
    entry = {key: value for key, value in DIGITS.items() if key != "name"}

    message = config_error(tmp_path, LINEAR, entry)

    assert "models[1].name: Field required" in message


def test_relative_weights_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "deploy"
    (folder / "weights").mkdir(parents=True)
    (tmp_path / "shared").mkdir()
    shutil.copy(WEIGHTS / "linear.pth", folder / "weights" / "linear.pth")
    shutil.copy(WEIGHTS / "digits.pth", tmp_path / "shared" / "digits.pth")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = make_settings(
        folder,
        {**LINEAR, "weights": "weights/linear.pth"},
        {**DIGITS, "weights": "../shared/digits.pth"},
    )

    configs = load_service_config(settings.config)

    assert [c.weights for c in configs] == [
        folder / "weights" / "linear.pth",
        tmp_path / "shared" / "digits.pth",
    ]
    assert all(c.weights.is_absolute() for c in configs)
    registry = check_config(settings)
    registry.load_all()
    assert registry.unavailable() == {}


def test_entry_options_are_read_with_their_defaults(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, LINEAR, {**DIGITS, "strict": False, "checkpoint_key": "ema", "device": "cpu"}
    )

    linear, digits = load_service_config(path)

    assert (linear.device, linear.strict, linear.checkpoint_key, linear.kwargs) == (
        "cpu",
        True,
        None,
        {},
    )
    assert (digits.device, digits.strict, digits.checkpoint_key) == ("cpu", False, "ema")


# --- settings from the environment -------------------------------------------------------------


def test_modelport_environment_variables_set_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path, LINEAR)
    monkeypatch.setenv("MODELPORT_CONFIG", str(config))
    monkeypatch.setenv("MODELPORT_HOST", "0.0.0.0")
    monkeypatch.setenv("MODELPORT_PORT", "9123")
    monkeypatch.setenv("MODELPORT_WORKERS", "3")
    monkeypatch.setenv("MODELPORT_TORCH_THREADS", "2")
    monkeypatch.setenv("MODELPORT_MAX_BODY_BYTES", "4096")
    monkeypatch.setenv("MODELPORT_MAX_SAMPLES_PER_REQUEST", "8")
    monkeypatch.setenv("MODELPORT_DEFAULT_MODEL", "linear")
    monkeypatch.setenv("MODELPORT_LOG_LEVEL", "debug")

    settings = load_settings()

    assert settings.config == config
    assert settings.host == "0.0.0.0"
    assert settings.port == 9123
    assert settings.workers == 3
    assert settings.torch_threads == 2
    assert settings.max_body_bytes == 4096
    assert settings.max_samples_per_request == 8
    assert settings.default_model == "linear"
    assert settings.log_level == "debug"


def test_settings_default_to_loopback_and_the_bundled_config() -> None:
    settings = load_settings()

    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.config == DEFAULT_CONFIG
    assert settings.default_model is None


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MODELPORT_PORT", "abc"),
        ("MODELPORT_PORT", "70000"),
        ("MODELPORT_WORKERS", "0"),
        ("MODELPORT_LOG_LEVEL", "loud"),
    ],
)
def test_bad_environment_value_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)

    with pytest.raises(ConfigError) as info:
        load_settings()

    message = info.value.message
    assert message.startswith(f"{variable}: ")
    assert "\n" not in message


def test_default_model_that_is_not_served_is_refused(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, LINEAR, default_model="digits")

    with pytest.raises(ConfigError, match="MODELPORT_DEFAULT_MODEL names 'digits'"):
        check_config(settings)


def test_app_factory_without_settings_exits_2_with_one_line_on_a_bad_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MODELPORT_PORT", "abc")

    with pytest.raises(SystemExit) as info:
        create_app()

    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("modelport: config error: MODELPORT_PORT: ")
    assert err.count("\n") == 1


# --- real processes ----------------------------------------------------------------------------


def bad_config(tmp_path: Path) -> Path:
    return write_config(tmp_path, LINEAR, {**DIGITS, "kwargs": {"num_clases": 3}})


def run_process(
    args: list[str], env: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=False
    )
    return result, time.monotonic() - started


@pytest.mark.process
def test_launcher_with_a_bad_config_exits_2_with_one_line_on_stderr(tmp_path: Path) -> None:
    config = bad_config(tmp_path)
    args = [sys.executable, "-m", "app", "--config", str(config), "--port", str(free_port())]

    result, elapsed = run_process(args, clean_env())

    assert result.returncode == 2, result.stderr
    assert elapsed < 15
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("modelport: config error: model 'digits': bad kwargs: ")
    assert "num_clases" in lines[0]
    assert result.stdout == ""


@pytest.mark.process
def test_uvicorn_factory_with_a_bad_config_exits_with_one_line_and_no_traceback(
    tmp_path: Path,
) -> None:
    config = bad_config(tmp_path)
    args = uvicorn_factory("--host", "127.0.0.1", "--port", str(free_port()))

    result, elapsed = run_process(args, clean_env(MODELPORT_CONFIG=str(config)))

    assert result.returncode != 0, result.stderr
    assert elapsed < 15
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "config error" in line]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("modelport: config error: model 'digits': bad kwargs: ")
    assert "num_clases" in lines[0]


@pytest.mark.unit
def test_launcher_flags_reach_the_server_as_settings_and_leave_the_environment_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workers get the checked Settings themselves: no flag travels through os.environ
    (only libgomp's spin count does, for torch to read as it loads), and the environment still
    sets what no flag does."""
    config = write_config(tmp_path, LINEAR)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setenv("MODELPORT_STORE_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("MODELPORT_PORT", "8001")
    served: list[tuple[Settings, Any]] = []
    monkeypatch.setattr(supervisor, "run", lambda settings, app: served.append((settings, app)))
    monkeypatch.setattr(launcher, "configure_logging", lambda *_: None)
    environment = dict(os.environ)

    launcher.main(["--port", "8123", "--workers", "3", "--config", str(config)])

    (settings, app), *_ = served
    assert app is None  # several workers: each makes its own, the launcher none
    assert dict(os.environ) == environment | {"GOMP_SPINCOUNT": launcher.OPENMP_SPIN}
    assert (settings.port, settings.workers, settings.config) == (8123, 3, config)
    assert settings.store_dir == tmp_path / "store"
