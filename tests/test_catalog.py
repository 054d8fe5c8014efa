"""The catalogue of registered model classes: registration, discovery and what a spec carries."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from app.codecs.arrays import to_batch
from app.serving.catalog import (
    DuplicateRegistration,
    discover,
    get_spec,
    register,
    registered_names,
)
from app.serving.runtime import build_runtime
from models.digits import EXAMPLE_ZERO, DigitsCNN
from models.linear import MyModel
from tests.helpers import CPU, SAMPLE, WEIGHTS, spec_named

pytestmark = pytest.mark.unit


class Tiny(nn.Module):
    """A tiny model for catalogue tests.

    More lines the description leaves out.
    """

    def __init__(self, features: int = 3) -> None:
        super().__init__()
        self.linear = nn.Linear(features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_discover_finds_the_bundled_models() -> None:
    discover()

    names = registered_names()
    assert {"linear", "digits"} <= set(names)
    assert names == sorted(names)
    assert spec_named("linear").cls is MyModel
    assert spec_named("digits").cls is DigitsCNN
    assert spec_named("digits").qualname == "models.digits.DigitsCNN"


def test_discover_twice_keeps_the_same_registrations() -> None:
    discover()
    before = {name: get_spec(name) for name in registered_names()}

    discover()

    assert {name: get_spec(name) for name in registered_names()} == before


def test_unknown_name_has_no_spec() -> None:
    discover()

    assert get_spec("no-such-model") is None


def test_second_class_under_a_taken_name_is_refused_at_decoration_naming_both_classes() -> None:
    @register("test-catalog-duplicate", input_shape=(3,))
    class First(nn.Module):
        pass

    with pytest.raises(DuplicateRegistration) as info:

        @register("test-catalog-duplicate", input_shape=(3,))
        class Second(nn.Module):
            pass

    message = str(info.value)
    assert "'test-catalog-duplicate'" in message
    assert "tests.test_catalog.test_second_class_under_a_taken_name" in message
    assert "<locals>.First" in message
    assert "<locals>.Second" in message
    assert spec_named("test-catalog-duplicate").cls is First


def test_registering_the_same_class_again_is_allowed() -> None:
    register("test-catalog-same-class", input_shape=(3,))(Tiny)

    register("test-catalog-same-class", input_shape=(3,))(Tiny)

    assert spec_named("test-catalog-same-class").cls is Tiny


@pytest.fixture
def impostor_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A package on sys.path whose one module registers a new class under the name "linear"."""
    package = "test_catalog_impostors"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("", encoding="utf-8")
    (tmp_path / package / "fake_linear.py").write_text(
        "from torch import nn\n"
        "from app.serving.catalog import register\n\n\n"
        '@register("linear", input_shape=(10,))\n'
        "class Impostor(nn.Module):\n"
        "    pass\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield package
    for name in [m for m in sys.modules if m.split(".")[0] == package]:
        del sys.modules[name]


def test_module_registering_a_taken_name_fails_when_imported(impostor_package: str) -> None:
    discover()

    with pytest.raises(DuplicateRegistration) as info:
        discover(impostor_package)

    message = str(info.value)
    assert "models.linear.MyModel" in message
    assert f"{impostor_package}.fake_linear.Impostor" in message
    assert spec_named("linear").cls is MyModel


def test_linear_spec_carries_its_shapes_dtype_and_example() -> None:
    spec = spec_named("linear")

    assert spec.kwargs == {}
    assert spec.signature({})[0].shape == (10,)
    assert spec.input_dtype == torch.float32
    assert spec.output_shapes({}).get("output") == (2,)
    assert spec.example({}) == SAMPLE
    assert spec.preprocess is None
    assert spec.postprocess is None
    assert spec.description == "Ten features in, two scores out."


def test_digits_spec_carries_its_kwargs_shapes_example_and_hooks() -> None:
    spec = spec_named("digits")

    assert spec.kwargs == {"num_classes": 10}
    assert spec.signature(spec.kwargs)[0].shape == (8, 8)
    assert spec.input_dtype == torch.float32
    assert spec.example(spec.kwargs) == EXAMPLE_ZERO
    assert spec.preprocess is not None
    assert spec.postprocess is not None


def test_digits_num_classes_kwarg_changes_the_output_shape() -> None:
    spec = spec_named("digits")

    assert spec.output_shapes(spec.constructor_kwargs({})).get("output") == (10,)
    assert spec.output_shapes(spec.constructor_kwargs({"num_classes": 3})).get("output") == (3,)


def test_served_kwargs_override_the_registered_defaults() -> None:
    spec = spec_named("digits")

    assert spec.constructor_kwargs({}) == {"num_classes": 10}
    assert spec.constructor_kwargs({"num_classes": 4}) == {"num_classes": 4}
    assert spec.kwargs == {"num_classes": 10}


def test_digits_with_three_classes_builds_and_gives_three_scores(tmp_path: Path) -> None:
    spec = spec_named("digits")
    kwargs = spec.constructor_kwargs({"num_classes": 3})
    path = tmp_path / "three.pth"
    torch.save(DigitsCNN(**kwargs).state_dict(), path)

    runtime = build_runtime(spec, kwargs, path, CPU)

    batch = to_batch([EXAMPLE_ZERO, EXAMPLE_ZERO], (8, 8), torch.float32)
    assert tuple(runtime.forward(batch).shape) == (2, 3)
    outputs = runtime.predict(batch)
    assert [len(o["probabilities"]) for o in outputs] == [3, 3]


def test_digits_preprocess_scales_pixels_and_adds_a_channel() -> None:
    spec = spec_named("digits")
    assert spec.preprocess is not None
    pixels = torch.full((2, 8, 8), 16.0)
    pixels[1] = 8.0

    x = spec.preprocess(pixels)

    assert tuple(x.shape) == (2, 1, 8, 8)
    assert torch.equal(x[0], torch.ones(1, 8, 8))
    assert torch.equal(x[1], torch.full((1, 8, 8), 0.5))


def test_digits_postprocess_gives_a_label_and_probabilities_summing_to_one() -> None:
    spec = spec_named("digits")
    assert spec.postprocess is not None
    logits = torch.tensor([[0.1, 2.0, -1.0] + [0.0] * 7, [5.0] * 10])

    outputs = spec.postprocess(logits)

    assert len(outputs) == 2
    for output in outputs:
        assert set(output) == {"label", "probabilities"}
        assert len(output["probabilities"]) == 10
        assert sum(output["probabilities"]) == pytest.approx(1.0, abs=1e-4)
    assert outputs[0]["label"] == 1
    assert outputs[1]["probabilities"][0] == pytest.approx(0.1, abs=1e-6)


def test_bundled_digits_model_reads_its_example_as_a_zero() -> None:
    spec = spec_named("digits")
    runtime = build_runtime(spec, spec.kwargs, WEIGHTS / "digits.pth", CPU)

    [output] = runtime.predict(to_batch([EXAMPLE_ZERO], (8, 8), torch.float32))

    assert output["label"] == 0
    assert sum(output["probabilities"]) == pytest.approx(1.0, abs=1e-4)


def test_example_falls_back_to_zeros_of_the_input_shape() -> None:
    register("test-catalog-no-example", input_shape=(2, 3))(Tiny)
    spec = spec_named("test-catalog-no-example")

    assert spec.example_input is None
    assert spec.example({}) == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]


def test_zeros_example_follows_an_input_shape_rule_and_the_input_dtype() -> None:
    @register(
        "test-catalog-shape-rule",
        input_shape=lambda kwargs: (kwargs["features"],),
        input_dtype=torch.int64,
        kwargs={"features": 3},
    )
    class Counts(Tiny):
        pass

    spec = spec_named("test-catalog-shape-rule")

    assert spec.example(spec.kwargs) == [0, 0, 0]
    assert spec.example({"features": 5}) == [0, 0, 0, 0, 0]
    assert spec.signature({"features": 5})[0].shape == (5,)
    assert spec.output_shapes(spec.kwargs).get("output") is None


def test_description_defaults_to_the_first_docstring_line() -> None:
    register("test-catalog-description", input_shape=(3,))(Tiny)
    register("test-catalog-described", input_shape=(3,), description="Given text.")(
        type("Described", (Tiny,), {})
    )

    assert spec_named("test-catalog-description").description == "A tiny model for catalogue tests."
    assert spec_named("test-catalog-described").description == "Given text."
