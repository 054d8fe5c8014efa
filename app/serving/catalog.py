"""The catalogue of model classes registered with ``@register`` (in the ``models`` package and
the packages of ``MODELPORT_MODEL_PACKAGES``): what the service needs to know of each, its
inputs and outputs by name included. :mod:`app.serving.classes` finds the class a served
model's entry names."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from app.codecs.dtypes import TensorSignature

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
        spec = build_spec(name, cls, options)
        existing = _CATALOG.get(name)
        if existing is not None and existing.qualname != spec.qualname:
            raise DuplicateRegistration(
                f"model name {name!r} is already registered by {existing.qualname}; "
                f"cannot register {spec.qualname} under the same name"
            )
        _CATALOG[name] = spec
        return cls

    return decorator


def build_spec(name: str, cls: type[nn.Module], options: Mapping[str, Any]) -> ModelSpec:
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


def get_spec(name: str) -> ModelSpec | None:
    """The registration for ``name``, or None."""
    return _CATALOG.get(name)


def registered_names() -> list[str]:
    """All registered model class names, sorted."""
    return sorted(_CATALOG)


def names_of(cls: type[nn.Module]) -> list[str]:
    """The names ``cls`` is registered under, sorted."""
    return sorted(spec.name for spec in _CATALOG.values() if spec.cls is cls)
