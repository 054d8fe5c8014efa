"""The catalogue of model classes registered with ``@register`` in the ``models`` package."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

Shape = tuple[int, ...]
ShapeRule = Shape | Callable[[Mapping[str, Any]], Shape]
"""A fixed per-sample shape, or a function of the constructor kwargs that gives it."""

Preprocess = Callable[[torch.Tensor], torch.Tensor]
"""Turns a validated input batch (on the model's device) into what ``forward`` takes."""

Postprocess = Callable[[torch.Tensor], list[Any]]
"""Turns a CPU output batch into one JSON-ready value per sample."""

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


Forward = Callable[[np.ndarray], torch.Tensor]
"""A candidate model's forward: a checked input batch in, the raw output batch (CPU) out."""

AcceptanceCheck = Callable[[Forward], Acceptance]
"""Scores candidate weights before they may serve (e.g. accuracy on a held-out split)."""


@dataclass(frozen=True)
class ModelSpec:
    """What the service needs to know to build, feed and smoke-test one registered class."""

    name: str
    cls: type[nn.Module]
    input_shape: ShapeRule
    input_dtype: torch.dtype = torch.float32
    output_shape: ShapeRule | None = None
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

    def sample_shape(self, kwargs: Mapping[str, Any]) -> Shape:
        """The per-sample input shape for these constructor kwargs."""
        return _resolve(self.input_shape, kwargs)

    def output_sample_shape(self, kwargs: Mapping[str, Any]) -> Shape | None:
        """The per-sample output shape for these kwargs, when the registration states it."""
        return None if self.output_shape is None else _resolve(self.output_shape, kwargs)

    def example(self, kwargs: Mapping[str, Any]) -> Any:
        """One example sample as nested lists: the registered one, else zeros of the input shape."""
        if self.example_input is not None:
            return self.example_input
        return torch.zeros(self.sample_shape(kwargs), dtype=self.input_dtype).tolist()


def _resolve(rule: ShapeRule, kwargs: Mapping[str, Any]) -> Shape:
    return tuple(rule(kwargs)) if callable(rule) else tuple(rule)


_CATALOG: dict[str, ModelSpec] = {}


def register(name: str, **options: Any) -> Callable[[ModuleT], ModuleT]:
    """Register an ``nn.Module`` class under ``name`` so a config can serve it.

    ``options`` are :class:`ModelSpec`'s fields: ``input_shape`` (per sample, no batch
    dimension) is required; ``acceptance``, when given, must pass before uploaded weights may
    serve; ``image_input`` tells clients how a picture becomes one sample.
    The description defaults to the first line of the class's docstring. Registering a second
    class under a name already taken raises :class:`DuplicateRegistration` at import time.
    """

    def decorator(cls: ModuleT) -> ModuleT:
        summary = (cls.__doc__ or "").strip().split("\n")[0]
        spec = ModelSpec(**{"description": summary, **options, "name": name, "cls": cls})
        existing = _CATALOG.get(name)
        if existing is not None and existing.qualname != spec.qualname:
            raise DuplicateRegistration(
                f"model name {name!r} is already registered by {existing.qualname}; "
                f"cannot register {spec.qualname} under the same name"
            )
        _CATALOG[name] = spec
        return cls

    return decorator


def discover(package: str = "models") -> None:
    """Import every module of ``package`` so that their ``@register`` decorators run."""
    root = importlib.import_module(package)
    for info in pkgutil.iter_modules(root.__path__, prefix=f"{package}."):
        importlib.import_module(info.name)


def get_spec(name: str) -> ModelSpec | None:
    """The registration for ``name``, or None."""
    return _CATALOG.get(name)


def registered_names() -> list[str]:
    """All registered model class names, sorted."""
    return sorted(_CATALOG)
