"""Settings from ``MODELPORT_*`` environment variables and the TOML file of served models."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.errors import ConfigError, location

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "modelport.toml"
NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
DEVICE_PATTERN = re.compile(r"^(cpu|cuda|cuda:\d+|mps|auto)$")
DOTTED_NAME = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
CLASS_PATH_PATTERN = re.compile(rf"{DOTTED_NAME}:{DOTTED_NAME}")
PACKAGE_PATTERN = re.compile(DOTTED_NAME)


class Settings(BaseSettings):
    """Service settings. Every field can be set as ``MODELPORT_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="MODELPORT_", extra="ignore")

    config: Path = DEFAULT_CONFIG
    """The TOML file of served models; relative weights paths resolve against its folder."""

    host: str = "127.0.0.1"
    """Interface to bind. Loopback by default; ``0.0.0.0`` only where a network boundary exists."""

    port: int = Field(default=8000, ge=1, le=65535)
    """TCP port to listen on."""

    grpc_port: int = Field(default=8001, ge=0, le=65535)
    """TCP port of the Open Inference Protocol's gRPC service, on the same interface (every
    worker serves it, as Triton does on 8001); 0 turns it off."""

    @field_validator("grpc_port")
    @classmethod
    def _grpc_port_apart(cls, value: int, info: ValidationInfo) -> int:
        # with several workers both would bind with SO_REUSEPORT, and mix HTTP/1 and gRPC
        if value and value == info.data.get("port"):
            raise ValueError(f"must differ from MODELPORT_PORT ({value}); 0 turns gRPC off")
        return value

    workers: int = Field(default=1, ge=1, le=64)
    """Server processes; each loads every model once."""

    torch_threads: int | None = Field(default=None, ge=1, le=256)
    """Each worker's share of the cores: the intra-op threads of its forwards (unset: the
    cores divided by the workers, at least 1). A forward of one request with nothing queued
    behind it, while no other forward runs in any worker, takes every worker's share."""

    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    """Largest predict request body accepted, in bytes (413 beyond)."""

    max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    """Largest request head (request line and header fields) accepted, in bytes; beyond, 431
    and the connection is closed before the rest is read."""

    max_header_count: int = Field(default=100, ge=1)
    """Most header fields one request may carry; beyond, 431 and the connection is closed."""

    client_timeout_s: float = Field(default=30.0, gt=0)
    """Seconds a client has to send a whole request head, and the longest it may leave a
    request body it is sending without a byte; beyond, 408 and the connection is closed."""

    keep_alive_s: int = Field(default=5, ge=1)
    """Seconds a connection may wait idle for its next request (or its first) before the
    server closes it. Behind a load balancer that keeps connections to the service open, set
    it above the balancer's idle timeout (an AWS ALB's is 60 s): the balancer must be the one
    to close an idle connection, or a request it sends as the service closes fails (502)."""

    max_connections: int = Field(default=4096, ge=1)
    """Connections one worker holds (at most half its file-descriptor limit, whose soft value
    it raises to twice this where the hard one allows); past it, the tenth of them that waited
    longest for their client (idle, or a head not whole) are closed."""

    max_samples_per_request: int = Field(default=256, ge=1)
    """Most samples one predict request may carry (422 beyond)."""

    store_dir: Path = PROJECT_ROOT / "store"
    """The local folder of the service: the SQLite version database and the blobs by default,
    and uploads being received (share it between the replicas of one host); the bundled
    weights files are never modified."""

    database_url: SecretStr | None = None
    """The version database: ``postgresql://user:password@host:port/database`` for replicas on
    several hosts; unset, SQLite in ``store_dir`` (workers and replicas of one host)."""

    blob_url: str | None = None
    """Where the bytes of each version live: ``s3://bucket/prefix`` (endpoint and credentials
    from the standard AWS settings); unset, the folder ``store_dir/blobs``."""

    max_sync_age_s: float = Field(default=30.0, gt=0)
    """A replica that could not read the version database for this long reports itself not
    ready (it keeps serving what it has, and turns ready again once it can read it)."""

    admin_token: SecretStr | None = Field(default=None, min_length=32)
    """Bearer token for management endpoints (upload, activate, rollback, delete); unset
    leaves them disabled. At least 32 characters: ``python -c 'import secrets;
    print(secrets.token_urlsafe(32))'``."""

    api_token: SecretStr | None = Field(default=None, min_length=32)
    """When set, predict and model-metadata endpoints require this bearer token (or the
    admin token); health stays open for probes."""

    max_upload_bytes: int = Field(default=1024 * 1024 * 1024, ge=1)
    """Largest weights upload accepted, in bytes (413 beyond, nothing kept)."""

    keep_versions: int = Field(default=10, ge=1)
    """Uploaded versions kept per model; older ones are removed (never the active or the
    previous one)."""

    require_finite_weights: bool = True
    """Refuse weights holding NaN or infinity."""

    max_queue: int = Field(default=1024, ge=1)
    """Requests that may wait per model; beyond, 503 with Retry-After."""

    request_timeout_s: float = Field(default=30.0, gt=0)
    """A predict request not answered by then gets 504 (dropped if its forward has not begun)."""

    default_model: str | None = None
    """Model that ``POST /predict`` uses when the body names none (optional with one model)."""

    log_level: str = Field(default="info", pattern=r"^(critical|error|warning|info|debug)$")
    """Logging level of the service and uvicorn."""

    log_format: Literal["text", "json"] = "text"
    """``text``: human-readable lines; ``json``: one JSON object per line."""

    access_log: bool = True
    """One log line per request (method, path, status, latency, client), health and metrics
    excluded; an INFO line, left out at a ``log_level`` above ``info``."""

    request_ids: bool = True
    """Give each request an id (answered in ``X-Request-ID`` and shown in its log lines); off,
    only an id the client sends is used (behind a proxy or mesh that makes them)."""

    request_metrics: bool = True
    """Count each request by endpoint and status with its latency (``modelport_requests_total``,
    ``modelport_request_seconds``); off, ``/metrics`` keeps every other series."""

    shutdown_grace_s: float = Field(default=30.0, ge=0)
    """On SIGTERM, how long in-flight requests (queued ones included) may take to finish."""

    sync_interval_s: float = Field(default=2.0, ge=0)
    """How often each replica reads the version database and follows a version activated (or
    rolled back) by another replica or worker; 0 turns this off."""

    metrics_public: bool = False
    """With ``MODELPORT_API_TOKEN`` set, ``/metrics`` needs that token too (its series name the
    models, versions and sha256s) unless this is true, for scrapers that send no credentials."""

    model_packages: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Packages to import at startup, besides ``models``, for their ``@register`` classes
    (comma-separated: ``my_models,team.nets``); each must be importable (``PYTHONPATH``)."""

    @field_validator("model_packages", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [name.strip() for name in value.split(",") if name.strip()]
        for name in value if isinstance(value, list) else []:
            if not isinstance(name, str) or not PACKAGE_PATTERN.fullmatch(name):
                raise ValueError(f"expected comma-separated package names; got {name!r}")
        return value


class ServedModelConfig(BaseModel):
    """One ``[[models]]`` entry of the TOML file."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    """The name clients use in URLs."""

    model_class: str = Field(alias="class")
    """The name the class was registered under with ``@register``, or ``module.path:ClassName``
    of any importable ``nn.Module`` class (imported at startup)."""

    registration: dict[str, Any] | None = Field(default=None, alias="register")
    """The ``register`` table, for a ``module.path:ClassName`` not decorated with ``@register``:
    what registration would give, keyed as its options (``input_shape`` and ``input_dtype`` at
    least)."""

    weights: Path
    """The state_dict file: torch (``.pt``/``.pth``) or safetensors, told apart by content."""

    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Constructor keyword arguments, merged over the registered defaults."""

    device: str = "cpu"
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (cuda when available, else cpu)."""

    strict: bool = True
    """Require the keys and shapes of the file to match the class exactly."""

    checkpoint_key: str | None = None
    """Key of a training checkpoint dict that holds the state_dict (default: look for
    ``state_dict`` / ``model_state_dict``)."""

    batching: bool = True
    """Gather concurrent requests into one forward pass."""

    max_batch_size: int = Field(default=32, ge=1, le=4096)
    """Most samples in one forward pass."""

    max_batch_delay_ms: float = Field(default=2.0, ge=0, le=1000)
    """Longest a batch keeps collecting after its first request (it closes at once when no
    other request waits)."""

    @field_validator("model_class")
    @classmethod
    def _class_reference(cls, value: str) -> str:
        if ":" in value and not CLASS_PATH_PATTERN.fullmatch(value):
            raise ValueError(f"expected a registered name or module.path:ClassName; got {value!r}")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not DEVICE_PATTERN.fullmatch(value):
            raise ValueError(f"unknown device {value!r} (use cpu, cuda, cuda:N, mps or auto)")
        return value


class ServiceConfig(BaseModel):
    """The whole TOML file."""

    model_config = ConfigDict(extra="forbid")

    models: list[ServedModelConfig] = Field(min_length=1)


def load_service_config(path: Path) -> list[ServedModelConfig]:
    """Read and check the TOML file; raise ConfigError with one readable line on any problem."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"malformed TOML in {path}: {exc}") from None
    try:
        config = ServiceConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_describe(exc, raw)}") from None
    names = [m.name for m in config.models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{path}: model names must be unique; repeated: {', '.join(duplicates)}")
    return [_with_absolute_weights(m, path.parent) for m in config.models]


def _with_absolute_weights(model: ServedModelConfig, base: Path) -> ServedModelConfig:
    weights = model.weights if model.weights.is_absolute() else (base / model.weights).resolve()
    return model.model_copy(update={"weights": weights})


def _describe(exc: ValidationError, raw: dict[str, Any]) -> str:
    """The first validation error as one line, naming the model it belongs to."""
    error = exc.errors()[0]
    loc = list(error["loc"])
    where = location(loc)
    if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
        entry = raw.get("models", [])[loc[1]]
        name = entry.get("name") if isinstance(entry, dict) else None
        field = location(loc[2:]) or "entry"
        where = f"model {name!r}: {field}" if name else f"models[{loc[1]}].{field}"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}"


def settings_error_line(exc: ValidationError) -> str:
    """A Settings validation error as one line naming the environment variable."""
    error = exc.errors()[0]
    field = location(error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"MODELPORT_{field.upper()}: {message}"


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with ``overrides`` (the launcher's flags) over it;
    ConfigError with one line on a bad value."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(settings_error_line(exc)) from None
