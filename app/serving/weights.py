"""Reading a weights file safely (weights_only / safetensors), normalising keys, checking fit."""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from torch import nn

from app.errors import (
    NonFiniteWeights,
    NotAStateDict,
    PickledObjectRefused,
    UnsafeTensor,
    WeightsIncompatible,
    WeightsUnreadable,
)

WeightsFormat = Literal["torch", "safetensors"]
CHECKPOINT_KEYS = ("state_dict", "model_state_dict")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
ZIP_MAGIC = b"PK\x03\x04"
# torch's legacy (pre-1.6) format opens with a pickled magic number at protocol 2.
LEGACY_MAGIC = b"\x80\x02\x8a\x0a"
_CHUNK = 1024 * 1024
MESSAGE_KEYS = 20
"""Most keys of each kind an error message names."""


@dataclass(frozen=True)
class WeightsFile:
    """The identity of a weights file on disk."""

    path: Path
    sha256: str
    size: int
    format: WeightsFormat


@dataclass(frozen=True)
class ShapeMismatch:
    """A key present in both the file and the model whose tensor does not fit."""

    key: str
    expected_shape: list[int]
    found_shape: list[int]
    expected_dtype: str
    found_dtype: str


@dataclass(frozen=True)
class LoadReport:
    """How the keys of a file matched the registered class."""

    strict: bool
    loaded_keys: int
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched: list[ShapeMismatch] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every key matched exactly."""
        return not (self.missing_keys or self.unexpected_keys or self.mismatched)


def inspect_file(path: Path, sha256: str | None = None) -> WeightsFile:
    """Hash the file and detect its format from its first bytes (never from its name).

    Given ``sha256``, the caller hashed these very bytes itself (a staged upload it wrote, a
    blob the store verified as it was fetched): only the first bytes and the size are read.
    """
    digest = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as stream:
            head = stream.read(16)
            if sha256 is not None:
                size = os.fstat(stream.fileno()).st_size
                return WeightsFile(path, sha256, size, _detect_format(head, size))
            digest.update(head)
            size = len(head)
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise WeightsUnreadable(f"cannot read weights file {path.name}: {exc.strerror}") from None
    return WeightsFile(path, digest.hexdigest(), size, _detect_format(head, size))


def _detect_format(head: bytes, size: int) -> WeightsFormat:
    if size == 0:
        raise WeightsUnreadable("the weights file is empty")
    if head.startswith((ZIP_MAGIC, LEGACY_MAGIC)):
        return "torch"
    if len(head) >= 9:
        header_len = int.from_bytes(head[:8], "little")
        if head[8:9] == b"{" and header_len <= size - 8:
            return "safetensors"
    raise WeightsUnreadable(
        "not a torch.save or safetensors file "
        f"(it starts with {head[:8].hex(' ')}); save weights with torch.save(model.state_dict(), "
        "path) or safetensors.torch.save_file"
    )


def read_state_dict(
    file: WeightsFile,
    device: torch.device,
    checkpoint_key: str | None = None,
    model_keys: Collection[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Load the file without executing code, unwrap a checkpoint, strip wrapper prefixes."""
    if file.format == "safetensors":
        loaded: object = _load_safetensors(file.path, device)
    else:
        loaded = _load_torch(file.path, device, mapped=_is_stored_zip(file.path))
    state_dict = _unwrap(loaded, checkpoint_key)
    return strip_wrapper_prefixes(state_dict, model_keys)


def _load_safetensors(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(path, device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightsUnreadable(f"corrupt safetensors file: {exc}") from None


def _is_stored_zip(path: Path) -> bool:
    """Whether the file is a zip archive (torch's format since 1.6), refusing compressed
    entries: torch.save writes stored (uncompressed) ones; compressed ones can only be a zip
    bomb."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            compressed = [i.filename for i in archive.infolist() if i.compress_type]
    except (zipfile.BadZipFile, OSError) as exc:
        raise WeightsUnreadable(f"corrupt torch file: {exc}") from None
    if compressed:
        raise WeightsUnreadable(
            f"the archive has compressed entries ({compressed[0]}, ...), which torch.save never "
            "writes; refusing a possible zip bomb"
        )
    return True


def _load_torch(path: Path, device: torch.device, mapped: bool) -> object:
    """Memory-mapped when it can be: the tensors then read the file's pages as they are used,
    instead of a copy of the whole file held in memory beside the model being built."""
    # Only a zip archive can be mapped, and only by its path; a stream otherwise, and for a
    # *.safetensors name, for which torch picks its safetensors reader: only the content may
    # decide the format.
    mapped = mapped and not path.name.endswith(".safetensors")
    try:
        if mapped:
            return torch.load(path, map_location=device, weights_only=True, mmap=True)
        with path.open("rb") as stream:
            return torch.load(stream, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise _pickled_object_error(path) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, IndexError... on bad bytes
        reason = str(exc).split(". ")[0] or type(exc).__name__
        raise WeightsUnreadable(f"truncated or corrupt torch file: {reason}") from None


def _pickled_object_error(path: Path) -> PickledObjectRefused:
    """Name the globals the pickle asked for, read without running any of them."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # the scan itself may fail on a malformed pickle; the refusal stands
        names = []
    listed = ", ".join(names[:5]) or "objects outside weights_only's allow-list"
    if any(n.startswith("torch.nn.modules.") or n.startswith("__main__.") for n in names):
        message = (
            f"this file holds a whole pickled model ({listed}), not a state_dict; modelport never "
            "unpickles code. Save the weights with torch.save(model.state_dict(), path) instead"
        )
    else:
        message = (
            f"this file needs {listed} to load, which weights_only loading refuses; nothing in it "
            "was executed. Save the weights with torch.save(model.state_dict(), path)"
        )
    return PickledObjectRefused(message, {"globals": names})


def _unwrap(loaded: object, checkpoint_key: str | None) -> Mapping[str, torch.Tensor]:
    if not isinstance(loaded, Mapping):
        raise NotAStateDict(
            "expected a state_dict (a mapping of names to tensors), "
            f"found a {type(loaded).__name__}"
        )
    if checkpoint_key is not None:
        if checkpoint_key not in loaded:
            raise NotAStateDict(
                f"checkpoint key {checkpoint_key!r} not found; the file has keys {_preview(loaded)}"
            )
        inner = loaded[checkpoint_key]
        if not isinstance(inner, Mapping):
            raise NotAStateDict(f"checkpoint key {checkpoint_key!r} does not hold a mapping")
        return _check_flat_tensors(inner)
    if not _all_tensors(loaded):
        for key in CHECKPOINT_KEYS:
            inner = loaded.get(key)
            if isinstance(inner, Mapping):
                return _check_flat_tensors(inner)
    return _check_flat_tensors(loaded)


def _all_tensors(mapping: Mapping[Any, Any]) -> bool:
    return all(isinstance(value, torch.Tensor) for value in mapping.values())


def _check_flat_tensors(mapping: Mapping[Any, Any]) -> Mapping[str, torch.Tensor]:
    if not mapping:
        raise NotAStateDict("the state_dict is empty")
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise NotAStateDict(f"state_dict keys must be strings, found {key!r}")
        if not isinstance(value, torch.Tensor):
            raise NotAStateDict(
                f"{key!r} holds a {type(value).__name__}, not a tensor; if this is a training "
                f"checkpoint, set checkpoint_key to the entry holding the state_dict "
                f"(keys: {_preview(mapping)})"
            )
        if value.layout != torch.strided:
            raise NotAStateDict(f"{key!r} is a {value.layout} tensor; only dense tensors load")
    return mapping


def _preview(mapping: Mapping[Any, Any], limit: int = 8) -> str:
    keys = [repr(k) for k in list(mapping)[:limit]]
    return "[" + ", ".join(keys) + (", ...]" if len(mapping) > limit else "]")


def strip_wrapper_prefixes(
    state_dict: Mapping[str, torch.Tensor], model_keys: Collection[str] | None = None
) -> dict[str, torch.Tensor]:
    """Remove ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) prefixes that
    every key carries, repeatedly, so a compiled DDP model's keys come out plain.

    Given the model's own keys, the stripping stops where most keys fit (ties: stripped
    further), so a model whose own submodule is called ``module`` keeps its keys.
    """
    candidates = [dict(state_dict)]
    while prefix := _common_wrapper_prefix(candidates[-1]):
        candidates.append({k.removeprefix(prefix): v for k, v in candidates[-1].items()})
    if model_keys is None:
        return candidates[-1]
    expected = set(model_keys)
    return max(reversed(candidates), key=lambda keys: len(expected.intersection(keys)))


def _common_wrapper_prefix(keys: Collection[str]) -> str | None:
    return next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in keys)), None)


def check_tensors(state_dict: Mapping[str, torch.Tensor], device: torch.device) -> None:
    """Refuse, naming the key, a tensor not on ``device`` (e.g. ``meta``: no data at all) or
    one that reads more elements than its storage holds once materialised: views saved with
    stride 0 (``expand``) or overlapping strides, or a storage smaller than the shape implies.
    Only shapes, strides and storage sizes are read; nothing is computed on the values."""
    for key, value in state_dict.items():
        if value.is_meta or value.device.type != device.type:
            raise UnsafeTensor(
                f"{key!r} is on the {value.device} device; weights must hold their values",
                {"key": key},
            )
        if not _covered_by_storage(value):
            raise UnsafeTensor(
                f"{key!r} is an expanded or overlapping view (shape {list(value.shape)}, "
                f"strides {list(value.stride())}) or its storage is smaller than its shape; "
                "save tensors with .contiguous() (or .clone())",
                {"key": key},
            )


def _covered_by_storage(tensor: torch.Tensor) -> bool:
    """No two elements share memory, and the storage holds every element the strides reach."""
    dims = sorted(
        (stride, size)
        for stride, size in zip(tensor.stride(), tensor.shape, strict=True)
        if size > 1
    )
    span = 1  # elements reached by the dimensions of smaller strides
    for stride, size in dims:
        if stride < span:
            return False
        span += stride * (size - 1)
    if tensor.numel() == 0:
        return True
    needed = (tensor.storage_offset() + span) * tensor.element_size()
    return needed <= tensor.untyped_storage().nbytes()


def check_finite(state_dict: Mapping[str, torch.Tensor]) -> None:
    """Refuse tensors holding NaN or infinity, naming them."""
    bad = [
        key
        for key, value in state_dict.items()
        if (value.is_floating_point() or value.is_complex()) and not all_finite(value)
    ]
    if bad:
        refuse_non_finite(bad)


def refuse_non_finite(keys: list[str]) -> NoReturn:
    """Raise NonFiniteWeights naming ``keys``, the entries found holding NaN or infinity."""
    raise NonFiniteWeights(
        f"{len(keys)} tensor(s) hold NaN or infinity: {', '.join(keys[:10])}", {"keys": keys}
    )


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, from the smallest and largest (NaN propagates through
    both): ``torch.isfinite`` of a whole tensor allocates temporaries several times its size,
    this allocates nothing and reads the values once."""
    if tensor.numel() == 0:
        return True
    values = torch.view_as_real(tensor) if tensor.is_complex() else tensor
    try:
        low, high = torch.aminmax(values)
    except (RuntimeError, NotImplementedError):  # a dtype without min/max kernels (float8)
        return bool(torch.isfinite(values).all())
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def _castable(found: torch.dtype, expected: torch.dtype) -> bool:
    if found == expected:
        return True
    if expected.is_floating_point:
        return found.is_floating_point
    integers = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    return expected in integers and found in integers


def match_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Compare the file's keys, shapes and dtypes with the model's.

    Returns the entries that fit and the report. With ``strict`` any difference raises
    WeightsIncompatible naming the missing, unexpected and mismatched keys; without it the
    entries that fit load and the rest are reported, unless none fit at all.
    """
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        ShapeMismatch(
            key,
            list(expected[key].shape),
            list(value.shape),
            str(expected[key].dtype).removeprefix("torch."),
            str(value.dtype).removeprefix("torch."),
        )
        for key, value in state_dict.items()
        if key in expected
        and (value.shape != expected[key].shape or not _castable(value.dtype, expected[key].dtype))
    ]
    bad = {m.key for m in mismatched}
    fitting = {k: v for k, v in state_dict.items() if k in expected and k not in bad}
    report = LoadReport(strict, len(fitting), missing, unexpected, mismatched)
    if (strict and not report.complete) or not fitting:
        raise WeightsIncompatible(_describe_mismatch(report), _report_detail(report))
    return fitting, report


def _describe_mismatch(report: LoadReport) -> str:
    """One line, naming at most MESSAGE_KEYS keys of each kind (the detail lists them all)."""
    parts = []
    if report.missing_keys:
        parts.append(f"missing keys: {_listed(report.missing_keys)}")
    if report.unexpected_keys:
        parts.append(f"unexpected keys: {_listed(report.unexpected_keys)}")
    for m in report.mismatched[:MESSAGE_KEYS]:
        parts.append(
            f"{m.key}: expected {m.expected_dtype}{m.expected_shape}, "
            f"found {m.found_dtype}{m.found_shape}"
        )
    if not report.loaded_keys:
        parts.insert(0, "no key of the file fits the model")
    return "weights do not fit the model: " + "; ".join(parts)


def _listed(keys: list[str]) -> str:
    more = len(keys) - MESSAGE_KEYS
    return ", ".join(keys[:MESSAGE_KEYS]) + (f", ... ({more} more)" if more > 0 else "")


def _report_detail(report: LoadReport) -> dict[str, Any]:
    return {
        "missing_keys": report.missing_keys,
        "unexpected_keys": report.unexpected_keys,
        "mismatched": [asdict(m) for m in report.mismatched],
    }
