"""A served model's class: the name it was registered under, or ``module.path:ClassName``
imported from the operator's config (its ``@register`` decoration, else the entry's
``register`` table, read from TOML here); and the discovery of the packages that register."""

from __future__ import annotations

import dataclasses
import importlib
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.codecs.dtypes import BY_NAME
from app.config import ServedModelConfig
from app.errors import ConfigError
from app.serving.catalog import (
    DuplicateRegistration,
    ImageInput,
    Input,
    ModelSpec,
    Shape,
    build_spec,
    discover,
    get_spec,
    names_of,
    registered_names,
)


def discover_all(packages: Sequence[str] = ()) -> None:
    """Import every module of ``models`` and of each of ``packages`` (the setting
    ``MODELPORT_MODEL_PACKAGES``); a package that cannot be imported, or a name registered by two
    classes, is a ConfigError naming the setting (and both classes)."""
    discover()
    for package in packages:
        try:
            discover(package)
        except DuplicateRegistration as exc:
            raise ConfigError(f"MODELPORT_MODEL_PACKAGES: {exc}") from None
        except Exception as exc:  # the package's own code may raise anything: say what
            raise ConfigError(
                f"MODELPORT_MODEL_PACKAGES: cannot import {package!r}: {_import_failure(exc)}"
            ) from None


def _shape(value: Any) -> Shape:
    if not isinstance(value, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in value
    ):
        raise ValueError(f"expected a list of positive integers, e.g. [3, 32, 32]; got {value!r}")
    return tuple(value)


def _dtype(value: Any) -> torch.dtype:
    name = value.removeprefix("torch.") if isinstance(value, str) else None
    if name not in BY_NAME:
        raise ValueError(f"unknown dtype {value!r} (one of: {', '.join(BY_NAME)})")
    return BY_NAME[name].torch


def _image_input(value: Any) -> ImageInput:
    expected = "a table of max_value (a positive number) and light_on_dark (true or false)"
    known = {f.name for f in dataclasses.fields(ImageInput)}
    if not isinstance(value, dict) or not set(value) <= known:
        raise ValueError(f"expected {expected}; got {value!r}")
    maximum = value.get("max_value", 255.0)
    number = isinstance(maximum, int | float) and not isinstance(maximum, bool) and maximum > 0
    if not number or not isinstance(value.get("light_on_dark", False), bool):
        raise ValueError(f"expected {expected}; got {value!r}")
    return ImageInput(**value)


def _of(kind: type, what: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ValueError(f"expected {what}; got {value!r}")
        return value

    return check


def _inputs(value: Any) -> dict[str, Input]:
    expected = 'a table of inputs by name, each { shape = [...], dtype = "..." }'
    if not isinstance(value, dict) or not value:
        raise ValueError(f"expected {expected}; got {value!r}")
    inputs = {}
    for name, entry in value.items():
        if not isinstance(entry, dict) or sorted(entry) != ["dtype", "shape"]:
            raise ValueError(f'{name}: expected {{ shape = [...], dtype = "..." }}; got {entry!r}')
        inputs[name] = Input(_shape(entry["shape"]), _dtype(entry["dtype"]))
    return inputs


def _outputs(value: Any) -> dict[str, Shape | None]:
    if isinstance(value, list) and value and all(isinstance(n, str) for n in value):
        return dict.fromkeys(value)
    if isinstance(value, dict) and value:
        return {name: _shape(shape) for name, shape in value.items()}
    raise ValueError(
        'expected the output names, e.g. ["logits", "embedding"], or a table of their'
        f" per-sample shapes, e.g. {{ logits = [3], embedding = [4] }}; got {value!r}"
    )


FROM_TOML: dict[str, Callable[[Any], Any]] = {
    "input_shape": _shape,
    "input_dtype": _dtype,
    "output_shape": _shape,
    "inputs": _inputs,
    "outputs": _outputs,
    "kwargs": _of(dict, "a table of constructor kwargs"),
    "example_input": _of(list, "one sample as nested lists"),
    "allow_non_finite_input": _of(bool, "true or false"),
    "description": _of(str, "a string"),
    "image_input": _image_input,
}
"""How a ``register`` table's value becomes the :class:`ModelSpec` field of the same name, for
the fields TOML can state; the others take code (hooks, acceptance) and need ``@register``."""


def spec_for(config: ServedModelConfig) -> ModelSpec:
    """The spec of a served model's ``class``: the name a class was registered under, or
    ``module.path:ClassName``, imported here (the operator's own config names it: never a
    request), whose ``@register`` decoration serves when it has one, else the entry's
    ``register`` table. ConfigError with one line naming the model and the problem."""
    where = f"model {config.name!r}"
    if ":" not in config.model_class:
        spec = get_spec(config.model_class)
        if spec is None:
            known = ", ".join(registered_names()) or "none"
            raise ConfigError(
                f"{where}: unknown class {config.model_class!r} (registered: {known})"
            )
        if config.registration is not None:
            raise ConfigError(
                f"{where}: register: {config.model_class!r} is registered with @register, which"
                " gives these; a register table goes with a class named as module.path:ClassName"
            )
        return spec
    cls = _import_class(config.model_class, f"{where}: class {config.model_class!r}")
    decorated = names_of(cls)
    if len(decorated) > 1:
        raise ConfigError(
            f"{where}: class {config.model_class!r} is registered under several names"
            f" ({', '.join(decorated)}); name one of them as the class"
        )
    if decorated:
        if config.registration is not None:
            raise ConfigError(
                f"{where}: register: {config.model_class} is decorated with"
                f" @register({decorated[0]!r}), which gives these; remove the register table"
            )
        found = get_spec(decorated[0])
        assert found is not None  # (just listed)
        return found
    if config.registration is None:
        raise ConfigError(
            f"{where}: {config.model_class} is not decorated with @register: give what"
            " registration would in the entry's register table, at least"
            ' register = { input_shape = [...], input_dtype = "float32" }'
        )
    return _spec_from_table(config.model_class, cls, config.registration, where)


def _spec_from_table(
    name: str, cls: type[nn.Module], table: Mapping[str, Any], where: str
) -> ModelSpec:
    """The spec of an undecorated class from a ``register`` table: its keys are
    :class:`ModelSpec`'s fields, read as :data:`FROM_TOML` says."""
    fields = [f.name for f in dataclasses.fields(ModelSpec) if f.name not in ("name", "cls")]
    options: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(
                f"{where}: register.{key}: unknown option (register takes: {', '.join(fields)})"
            )
        if key not in FROM_TOML:
            raise ConfigError(
                f"{where}: register.{key}: takes code, which a TOML file cannot give; decorate"
                " the class with @register to give it"
            )
        try:
            options[key] = FROM_TOML[key](value)
        except ValueError as exc:
            raise ConfigError(f"{where}: register.{key}: {exc}") from None
    if "inputs" not in options:  # a config names the dtype rather than trust a default
        for key in ("input_shape", "input_dtype"):
            if key not in options:
                raise ConfigError(
                    f"{where}: register.{key}: required for a class not decorated with"
                    " @register (e.g. register = { input_shape = [3, 32, 32], input_dtype ="
                    ' "float32" }, or inputs = { name = { shape = [...], dtype = "..." }, ... }'
                    " for several inputs)"
                )
    try:
        return build_spec(name, cls, options)
    except ValueError as exc:
        raise ConfigError(f"{where}: register: {exc}") from None


def _import_class(path: str, where: str) -> type[nn.Module]:
    """``module.path:ClassName`` (the attribute may be dotted) as an ``nn.Module`` subclass."""
    module_name, _, attribute = path.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
    except Exception as exc:  # the module's own code may raise anything: say what
        raise ConfigError(
            f"{where}: cannot import module {module_name!r}: {_import_failure(exc)}"
        ) from None
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise ConfigError(f"{where}: {module_name!r} has no attribute {attribute!r}")
        found = getattr(found, part)
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        what = f"the class {found.__qualname__}" if isinstance(found, type) else repr(found)
        shown = what if len(what) <= 80 else what[:77] + "..."
        raise ConfigError(f"{where}: not an nn.Module subclass: {attribute} is {shown}")
    return found


_APP = Path(__file__).resolve().parent.parent


def _import_failure(exc: Exception) -> str:
    """An exception raised while importing a module, as one line: its type, its message, and
    where in the imported code it was raised (a SyntaxError says so itself)."""
    text = " ".join(str(exc).split()) or "(no message)"
    line = f"{type(exc).__name__}: {text}"
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if not frame.filename.startswith("<")  # importlib's frozen bootstrap
        and frame.filename != importlib.__file__
        and not Path(frame.filename).is_relative_to(_APP)
    ]
    if frames and not isinstance(exc, SyntaxError):
        line += f" (at {frames[-1].filename}:{frames[-1].lineno})"
    if isinstance(exc, ModuleNotFoundError):
        line += "; is its folder on PYTHONPATH?"
    return line
