"""Pydantic request and response models of the HTTP API (not to be confused with models/)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.codecs.dtypes import TensorSignature, name_of
from app.serving.model import ServedModel
from app.state.database import Pointers
from app.state.records import VersionRecord


class ErrorResponse(BaseModel):
    """The one error body of the whole API."""

    error: str = Field(description="What went wrong: what was expected and what was received.")
    code: str = Field(description="A stable machine-readable error kind, e.g. invalid_input.")
    detail: dict[str, Any] | None = Field(default=None, description="Structured specifics.")

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "error": "wrong sample shape: expected 1 sample(s) of shape [10] (float32); "
                "received shape [1, 3]",
                "code": "invalid_input",
            }
        }
    )


class Liveness(BaseModel):
    """The process is up."""

    live: Literal[True] = True


class Readiness(BaseModel):
    """Whether every configured model can serve."""

    ready: bool
    draining: bool = Field(default=False, description="Shutting down: no new work accepted.")
    models: dict[str, Literal["ready", "unavailable"]]
    unavailable: dict[str, str] = Field(
        default_factory=dict, description="Models that cannot serve, with the reason."
    )


class WeightsInfo(BaseModel):
    """The weights file a model serves."""

    file: str
    sha256: str | None = None
    size: int | None = Field(default=None, description="Bytes.")
    format: Literal["torch", "safetensors"] | None = None


class MismatchInfo(BaseModel):
    """A key whose tensor does not fit the model."""

    key: str
    expected_shape: list[int]
    found_shape: list[int]
    expected_dtype: str
    found_dtype: str


class LoadReportInfo(BaseModel):
    """How the file's keys matched the class; skipped keys appear only for non-strict loads."""

    strict: bool
    loaded_keys: int
    missing_keys: list[str]
    unexpected_keys: list[str]
    mismatched: list[MismatchInfo]


class ImageInputInfo(BaseModel):
    """How a picture becomes one input sample: transparency onto white; grey for an input
    shape (H, W) or (1, H, W), RGB channels first for (3, H, W); resized to H x W by area
    averaging; inverted first when ``light_on_dark`` and mostly light; pixel values 0-255
    scaled to 0-``max_value``."""

    max_value: float = Field(description="The value of a white pixel.")
    light_on_dark: bool = Field(
        description="The model takes light ink on a dark ground: invert a mostly light picture."
    )


class TensorInfo(BaseModel):
    """One input or output of a model: its name, per-sample shape and dtype."""

    name: str
    shape: list[int] | None = Field(description="Per sample (no batch dimension); null: unknown.")
    dtype: str | None = Field(default=None, description="null: not known until the model loads.")

    @classmethod
    def of(cls, tensor: TensorSignature) -> TensorInfo:
        """Describe a served tensor."""
        return cls(name=tensor.name, shape=list(tensor.shape), dtype=name_of(tensor.dtype))


class ModelInfo(BaseModel):
    """Everything a client needs to call a served model."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    name: str
    model_class: str = Field(alias="class", description="The registered class name.")
    class_path: str = Field(description="Import path of the nn.Module class.")
    description: str
    status: Literal["ready", "unavailable"]
    error: str | None = Field(default=None, description="Why the model cannot serve.")
    device: str
    inputs: list[TensorInfo] = Field(description="The inputs, in the order forward takes them.")
    outputs: list[TensorInfo] = Field(
        description="The outputs (as the loaded model gives them; else as registered)."
    )
    input_shape: list[int] | None = Field(
        description="The one input's per-sample shape (no batch dimension); null for a model"
        " of several inputs."
    )
    input_dtype: str | None = Field(description="The one input's dtype; null for several.")
    output_shape: list[int] | None = Field(
        default=None, description="The one output's per-sample shape, when known."
    )
    constructor_kwargs: dict[str, Any] = Field(
        alias="kwargs", description="Constructor keyword arguments."
    )
    example_input: Any = Field(
        description="One valid sample (an object of them by name for several inputs)."
    )
    image_input: ImageInputInfo | None = Field(
        default=None, description="How a picture becomes a sample; null: the model takes none."
    )
    parameter_count: int | None = None
    version: str | None = Field(default=None, description="Identity of the served weights.")
    weights: WeightsInfo
    loaded_at: datetime | None = None
    load_report: LoadReportInfo | None = None
    previous_version: str | None = Field(
        default=None, description="The rollback target, kept loaded."
    )
    active_version: str | None = Field(
        default=None,
        description="The version the version database records as active, which every replica "
        "converges to (`version` is what this replica serves); null when it cannot be read.",
    )
    fallback: str | None = Field(
        default=None,
        description="Why this replica serves another version than the recorded active one.",
    )

    @classmethod
    def of(cls, model: ServedModel, pointers: Pointers | None) -> ModelInfo:
        """Describe a served model as it is now, with the database's ``pointers`` (None: they
        could not be read)."""
        runtime, spec, init_kwargs = model.runtime, model.spec, model.kwargs
        inputs = [TensorInfo.of(tensor) for tensor in model.inputs]
        if runtime is not None:
            outputs = [TensorInfo.of(tensor) for tensor in runtime.outputs]
        else:
            declared = spec.output_shapes(init_kwargs).items()
            outputs = [
                TensorInfo(name=n, shape=None if s is None else list(s)) for n, s in declared
            ]
        single = len(inputs) == 1
        info = cls(
            name=model.name,
            model_class=spec.name,
            class_path=spec.qualname,
            description=spec.description,
            status="unavailable" if runtime is None else "ready",
            error=model.error,
            device=str(model.device),
            inputs=inputs,
            outputs=outputs,
            input_shape=inputs[0].shape if single else None,
            input_dtype=inputs[0].dtype if single else None,
            output_shape=outputs[0].shape if len(outputs) == 1 else None,
            constructor_kwargs=init_kwargs,
            example_input=spec.example(init_kwargs),
            image_input=None
            if spec.image_input is None
            else ImageInputInfo.model_validate(spec.image_input, from_attributes=True),
            weights=WeightsInfo(file=model.config.weights.name),
            fallback=model.fallback,
            active_version=None if pointers is None else pointers.active or model.bundled_id(),
        )
        if runtime is None:
            return info
        report = runtime.report
        return info.model_copy(
            update={
                "parameter_count": runtime.parameter_count,
                "version": runtime.version,
                "weights": WeightsInfo(
                    file=runtime.weights.path.name,
                    sha256=runtime.weights.sha256,
                    size=runtime.weights.size,
                    format=runtime.weights.format,
                ),
                "loaded_at": runtime.loaded_at,
                "previous_version": model.previous.version if model.previous else None,
                "load_report": LoadReportInfo.model_validate(report, from_attributes=True),
            }
        )


class ModelList(BaseModel):
    """All served models."""

    models: list[ModelInfo]


class ModelPredictRequest(BaseModel):
    """A predict body. Documents the endpoint; the body itself is decoded by a faster path."""

    inputs: list[Any] | dict[str, list[Any]] = Field(
        description="One or more samples, each of the model's per-sample input shape; for a"
        " model of several inputs, an object of such sample lists by input name.",
    )


class PredictRequest(ModelPredictRequest):
    """A ``POST /predict`` body: the inputs and, optionally, the model."""

    model: str | None = Field(
        default=None,
        description="Model to use; optional when one model is served or a default is configured.",
    )


class PredictResponse(BaseModel):
    """Outputs in input order, and the version that computed them."""

    model: str
    version: str = Field(description="Identity of the weights that served this request.")
    outputs: list[Any]

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "model": "digits",
                "version": "3f9a1c0b7d2e",
                "outputs": [
                    {
                        "label": 0,
                        "probabilities": [0.99, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.01],
                    }
                ],
            }
        }
    )


class VersionInfo(BaseModel):
    """One weights version of a model."""

    version: str = Field(description="The id: the first 12 hex digits of the sha256.")
    sha256: str
    size: int = Field(description="Bytes.")
    format: str = Field(description="torch or safetensors, as read from the content.")
    created_at: str
    filename: str | None = Field(description="The name the file was uploaded under.")
    source: Literal["upload", "bundled"]
    active: bool = Field(description="Serving now.")
    previous: bool = Field(description="The rollback target, kept loaded.")
    report: dict[str, Any] = Field(description="What was checked before it could serve.")

    @classmethod
    def of(
        cls, record: VersionRecord, pointers: Pointers, active: str | None = None
    ) -> VersionInfo:
        """Describe a version, active or previous as the version database records it
        (``active``: what serves while no activation was ever recorded, the bundled one)."""
        active = pointers.active or active
        return cls(
            version=record.id,
            sha256=record.sha256,
            size=record.size,
            format=record.format,
            created_at=record.created_at,
            filename=record.filename,
            source="bundled" if record.source == "bundled" else "upload",
            active=record.id == active,
            previous=record.id == pointers.previous,
            report=record.report,
        )


class VersionList(BaseModel):
    """The versions of one model, oldest first."""

    model: str
    active: str | None
    previous: str | None
    versions: list[VersionInfo]


class HistoryItem(BaseModel):
    """One recorded management action."""

    seq: int = Field(description="Its place in the order of every action; pages go by it.")
    at: str = Field(description="When it was committed (UTC).")
    action: str = Field(description="upload, activate, rollback, delete, retention or import.")
    from_version: str | None = Field(description="The version it moved away from or removed.")
    to_version: str | None = Field(description="The version it moved to or added.")
    request_id: str | None
    client: str | None = Field(description="The client address that asked.")


class HistoryPage(BaseModel):
    """A page of a model's history, newest first."""

    model: str
    entries: list[HistoryItem]
    next_before: int | None = Field(
        description="Pass as `before` for the next page; null at the end."
    )


class UploadResponse(VersionInfo):
    """An accepted upload: the version it became and whether it serves."""

    model: str
    created: bool = Field(description="False when identical bytes were already a version.")


class InferenceErrorResponse(BaseModel):
    """The Open Inference Protocol's error body (every error under ``/v2``)."""

    error: str
