"""The catalogue of model classes: those registered with ``@register`` in the ``models``
package (and in the packages of ``MODELPORT_MODEL_PACKAGES``), and any ``module:Class`` a served
model's entry names, with what registration would give in its ``register`` table."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import re
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from app.codecs.dtypes import BY_NAME, TensorSignature
from app.config import ServedModelConfig
from app.errors import ConfigError

Shape = tuple[int, ...]
ShapeRule = Shape | Callable[[Mapping[str, Any]], Shape]
"""A fixed per-sample shape, or a function of the constructor kwargs that gives it."""

Preprocess = Callable[[Any], Any]
"""Turns a validated input batch (on the model's device) into what ``forward`` takes: a tensor
in, a tensor out for a model of one input; a dict of tensors by input name for several."""

Postprocess = Callable[[Any], list[Any]]
"""Turns a CPU output batch (a tensor, or a dict of tensors by output name for a model of
several outputs) into one JSON-ready value per sample."""

INPUT_NAME = "input"
"""The name of a model's one input when its registration names none (the Open Inference
Protocol names every tensor)."""
OUTPUT_NAME = "output"
"""The name of a model's one output when its registration names none."""

ModuleT = TypeVar("ModuleT", bound=type[nn.Module])


class DuplicateRegistration(ValueError):
    """Two model classes were registered under one name."""


@dataclass(frozen=True)
class Acceptance:
    """The score of candidate weights on a model's acceptance check, and the bar they must meet."""

    metric: str
    score: float
    threshold: float

    @property
    def passed(self) -> bool:
        """Whether the score meets the threshold."""
        return self.score >= self.threshold


@dataclass(frozen=True)
class ImageInput:
    """How a client turns a picture into one input sample of the model, stated in its
    description so that clients (``modelport predict --input photo.png``) need no model code:
    transparency onto white; grey for an input shape (H, W) or (1, H, W), RGB channels first
    for (3, H, W); resized to H x W by area averaging; pixel values 0-255 scaled to
    0-``max_value``."""

    max_value: float = 255.0
    """The value of a white pixel."""
    light_on_dark: bool = False
    """The model was trained on light ink on a dark ground: a mostly light picture (dark ink
    on paper) is inverted first."""


Forward = Callable[[Any], Any]
"""A candidate model's forward: a checked input batch in (an array; a dict of arrays by name
for a model of several inputs), the raw output batch (CPU) out (a tensor; a dict of tensors by
name for a model of several outputs)."""


@dataclass(frozen=True)
class Input:
    """One named input of a model of several: its per-sample shape (or a function of the
    constructor kwargs that gives it) and dtype."""

    shape: ShapeRule
    dtype: torch.dtype = torch.float32


AcceptanceCheck = Callable[[Forward], Acceptance]
"""Scores candidate weights before they may serve (e.g. accuracy on a held-out split)."""


@dataclass(frozen=True)
class ModelSpec:
    """What the service needs to know to build, feed and smoke-test one registered class."""

    name: str
    cls: type[nn.Module]
    input_shape: ShapeRule | None = None
    input_dtype: torch.dtype = torch.float32
    output_shape: ShapeRule | None = None
    inputs: Mapping[str, Input] | None = None
    """Several named inputs instead of ``input_shape``/``input_dtype``, given to ``forward`` by
    keyword in this order."""
    outputs: Mapping[str, ShapeRule | None] | None = None
    """The output names (with their per-sample shapes where known) when ``forward`` returns
    a tuple (in this order) or a dict of tensors, or names its one output."""
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    example_input: Any = None
    preprocess: Preprocess | None = None
    postprocess: Postprocess | None = None
    allow_non_finite_input: bool = False
    description: str = ""
    acceptance: AcceptanceCheck | None = None
    image_input: ImageInput | None = None

    @property
    def qualname(self) -> str:
        """The import path of the class, e.g. ``models.digits.DigitsCNN``."""
        return f"{self.cls.__module__}.{self.cls.__qualname__}"

    def constructor_kwargs(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """The registered default kwargs updated with a served model's own."""
        return {**self.kwargs, **overrides}

    def signature(self, kwargs: Mapping[str, Any]) -> tuple[TensorSignature, ...]:
        """The inputs for these constructor kwargs, in ``forward``'s order."""
        if self.inputs is None:
            assert self.input_shape is not None  # (checked when the spec was made)
            shape = _resolve(self.input_shape, kwargs)
            return (TensorSignature(INPUT_NAME, shape, self.input_dtype),)
        return tuple(
            TensorSignature(name, _resolve(spec.shape, kwargs), spec.dtype)
            for name, spec in self.inputs.items()
        )

    def output_shapes(self, kwargs: Mapping[str, Any]) -> dict[str, Shape | None]:
        """The declared outputs by name, with their per-sample shapes where stated; empty when
        the registration declares none (one output, named ``output``)."""
        if self.outputs is None:
            if self.output_shape is None:
                return {}
            return {OUTPUT_NAME: _resolve(self.output_shape, kwargs)}
        return {
            name: None if rule is None else _resolve(rule, kwargs)
            for name, rule in self.outputs.items()
        }

    def example(self, kwargs: Mapping[str, Any]) -> Any:
        """One example sample in the form a request takes, as nested lists (an object of them
        by input name when the registration names its inputs): the registered one, else zeros
        of each input's shape and dtype."""
        if self.example_input is not None:
            return self.example_input
        zeros = {
            s.name: torch.zeros(s.shape, dtype=s.dtype).tolist() for s in self.signature(kwargs)
        }
        return zeros if self.inputs is not None else zeros[INPUT_NAME]


def _resolve(rule: ShapeRule, kwargs: Mapping[str, Any]) -> Shape:
    return tuple(rule(kwargs)) if callable(rule) else tuple(rule)


_CATALOG: dict[str, ModelSpec] = {}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
"""A tensor name: what every protocol (and an .npz member) can carry."""


def register(name: str, **options: Any) -> Callable[[ModuleT], ModuleT]:
    """Register an ``nn.Module`` class under ``name`` so a config can serve it.

    ``options`` are :class:`ModelSpec`'s fields: ``input_shape`` (per sample, no batch
    dimension) is required; ``acceptance``, when given, must pass before uploaded weights may
    serve; ``image_input`` tells clients how a picture becomes one sample.
    The description defaults to the first line of the class's docstring. Registering a second
    class under a name already taken raises :class:`DuplicateRegistration` at import time.
    """

    def decorator(cls: ModuleT) -> ModuleT:
        spec = _spec(name, cls, options)
        existing = _CATALOG.get(name)
        if existing is not None and existing.qualname != spec.qualname:
            raise DuplicateRegistration(
                f"model name {name!r} is already registered by {existing.qualname}; "
                f"cannot register {spec.qualname} under the same name"
            )
        _CATALOG[name] = spec
        return cls

    return decorator


def _spec(name: str, cls: type[nn.Module], options: Mapping[str, Any]) -> ModelSpec:
    """The one way a spec is made, from ``@register``'s options or a ``register`` table;
    ValueError when its inputs or outputs are declared wrongly."""
    summary = (cls.__doc__ or "").strip().split("\n")[0]
    options = dict(options)
    if isinstance(options.get("outputs"), list | tuple):  # names only, shapes unknown
        options["outputs"] = dict.fromkeys(options["outputs"])
    spec = ModelSpec(**{"description": summary, **options, "name": name, "cls": cls})
    _check_signature(spec)
    return spec


def _check_signature(spec: ModelSpec) -> None:
    """One input form (``input_shape`` or ``inputs``), names ``forward`` takes, outputs
    named once each."""
    where = f"model class {spec.qualname}"
    if (spec.input_shape is None) == (spec.inputs is None):
        raise ValueError(f"{where}: give input_shape (one input) or inputs (several), not both")
    if spec.inputs is not None:
        if not spec.inputs or not all(isinstance(i, Input) for i in spec.inputs.values()):
            raise ValueError(f"{where}: inputs must map each input's name to an Input")
        try:
            inspect.signature(spec.cls.forward).bind(None, **dict.fromkeys(spec.inputs))
        except TypeError as exc:
            raise ValueError(
                f"{where}: forward cannot take the inputs {list(spec.inputs)} by name: {exc}"
            ) from None
    if spec.outputs is not None and spec.output_shape is not None:
        raise ValueError(f"{where}: give output_shape (one output) or outputs, not both")
    for names in (spec.inputs or {}, spec.outputs or {}):
        bad = [n for n in names if not isinstance(n, str) or not _NAME.fullmatch(n)]
        if bad:
            raise ValueError(f"{where}: tensor names must match {_NAME.pattern}; got {bad}")


def discover(package: str = "models") -> None:
    """Import every module of ``package`` so that their ``@register`` decorators run."""
    root = importlib.import_module(package)
    # a plain module (no __path__) is imported, and that is all
    for info in pkgutil.iter_modules(getattr(root, "__path__", []), prefix=f"{package}."):
        importlib.import_module(info.name)


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


def get_spec(name: str) -> ModelSpec | None:
    """The registration for ``name``, or None."""
    return _CATALOG.get(name)


def registered_names() -> list[str]:
    """All registered model class names, sorted."""
    return sorted(_CATALOG)


# --- a served model's class: a registered name, or module:Class ---------------------------------


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
    decorated = sorted(s.name for s in _CATALOG.values() if s.cls is cls)
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
        return _CATALOG[decorated[0]]
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
        return _spec(name, cls, options)
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
