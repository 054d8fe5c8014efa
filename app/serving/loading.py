"""Giving a candidate module the file's values without a second copy of them: the module is
built on the meta device (no random initialisation, no memory), each tensor of the file is
copied into memory of its own in bounded chunks, and the file's pages behind each chunk are
released as soon as it is copied."""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.serving.weights import all_finite, refuse_non_finite

logger = logging.getLogger(__name__)
META = torch.device("meta")
CHUNK_BYTES = 8 << 20
"""Bytes of a tensor copied (and of the file released) at a time."""
PAGE = mmap.PAGESIZE
_MADV_DONTNEED: int | None = getattr(mmap, "MADV_DONTNEED", None)


def on_meta(cls: Callable[..., nn.Module], kwargs: Mapping[str, Any]) -> nn.Module | None:
    """``cls(**kwargs)`` with every tensor on the meta device, or None when the constructor
    cannot run there (it reads values: ``.item()``, numpy, a file...)."""
    try:
        with META:
            return cls(**kwargs)
    except Exception as exc:  # any failure of user code on meta: the ordinary build decides
        logger.debug("%s cannot be built on the meta device: %s", cls.__name__, exc)
        return None


def takes_everything_from(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether loading ``state_dict`` leaves nothing of the module on the meta device: every
    parameter and buffer (non-persistent ones too) has an entry, and no plain tensor attribute
    was made on meta."""
    names = [name for name, _ in _tensors(module)]
    return all(name in state_dict for name in names) and not _plain_on_meta(module)


def meta_attributes(module: nn.Module) -> list[str]:
    """Parameters, buffers and plain tensor attributes (or lists, tuples and dicts of them)
    still on the meta device."""
    return [name for name, tensor in _tensors(module) if tensor.is_meta] + _plain_on_meta(module)


def _plain_on_meta(module: nn.Module) -> list[str]:
    found = []
    for prefix, sub in module.named_modules(remove_duplicate=False):
        internal = (sub._parameters, sub._buffers, sub._modules)
        for attr, value in vars(sub).items():
            if any(value is own for own in internal):
                continue
            if any(isinstance(item, torch.Tensor) and item.is_meta for item in _held(value)):
                found.append(f"{prefix}.{attr}" if prefix else attr)
    return found


def _held(value: object) -> list[object]:
    """An attribute's value, or the items of the list, tuple or dict it is."""
    if isinstance(value, dict):
        return list(value.values())
    return list(value) if isinstance(value, list | tuple) else [value]


def _tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def owned_copies(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    device: torch.device,
    source: Path,
    require_finite: bool,
) -> dict[str, torch.Tensor]:
    """The entries of ``state_dict`` copied into new tensors of the module's dtypes (cast as
    ``load_state_dict`` casts), on ``device``, ready for ``load_state_dict(assign=True)``.

    Copied CHUNK_BYTES at a time; the pages of ``source`` mapped behind each chunk are
    released once it is copied, so a model read from a mapped file never holds more than its
    own size and a chunk. Tied tensors stay tied (one copy, the last entry's values, as
    copying into them would leave). With ``require_finite``, NonFiniteWeights names the
    entries holding NaN or infinity, each read once, chunk by chunk, before its copy.
    """
    pages = MappedPages.of(source)
    objects = dict(_tensors(module))
    by_object: dict[int, list[str]] = {}
    for name in module.state_dict():
        if name in state_dict:
            by_object.setdefault(id(objects.get(name, name)), []).append(name)
    owned: dict[str, torch.Tensor] = {}
    bad: list[str] = []
    for names in by_object.values():
        key = names[-1]
        expected = objects.get(key)
        dtype = state_dict[key].dtype if expected is None else expected.dtype
        place = device if expected is None or expected.is_meta else expected.device
        copy, finite = _copy_in_chunks(state_dict[key], dtype, place, pages, require_finite)
        if not finite:
            bad.append(key)
        if isinstance(expected, nn.Parameter):
            copy = nn.Parameter(copy, requires_grad=expected.requires_grad)
        owned.update(dict.fromkeys(names, copy))
    if bad:
        order = list(state_dict)
        refuse_non_finite(sorted(bad, key=order.index))
    return owned


def _copy_in_chunks(
    source: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
    pages: MappedPages,
    check_finite: bool,
) -> tuple[torch.Tensor, bool]:
    """A new contiguous tensor of ``dtype`` on ``device`` holding ``source``'s values, and
    whether they are all finite (True when not checked or not floating)."""
    target = torch.empty(source.shape, dtype=dtype, device=device)
    check = check_finite and (source.is_floating_point() or source.is_complex())
    finite = True
    if not source.is_contiguous():  # a view saved as it was: copied whole
        finite = not check or all_finite(source)
        target.copy_(source)
        pages.release(source)
        return target, finite
    flat, into = source.reshape(-1), target.view(-1)
    step = max(1, CHUNK_BYTES // max(1, source.element_size()))
    for start in range(0, flat.numel(), step):
        piece = flat[start : start + step]
        if check and finite:
            finite = all_finite(piece)
        into[start : start + step].copy_(piece)
        pages.release(piece)
    return target, finite


class MappedPages:
    """Where this process maps a file (its inode, from ``/proc/self/maps``), to hand back the
    pages of ranges already read. The mappings torch and safetensors make are private and
    never written, so a released page is simply dropped (read again from the file, should it
    be read again); memory that is not such a mapping is never touched."""

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        self.ranges = ranges

    @classmethod
    def of(cls, path: Path) -> MappedPages:
        """The mappings of ``path`` now (none where /proc or madvise is not available)."""
        if _MADV_DONTNEED is None:
            return cls([])
        try:
            stat = os.stat(path)
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return cls([])
        device = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}"
        ranges = []
        for line in maps.splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) >= 5 and fields[3] == device and fields[4] == str(stat.st_ino):
                start, end = (int(address, 16) for address in fields[0].split("-"))
                ranges.append((start, end))
        return cls(ranges)

    def release(self, tensor: torch.Tensor) -> None:
        """Drop the whole pages that ``tensor``'s bytes cover, where they lie in the file's
        mappings (a CPU tensor's contiguous bytes; anything else is left alone)."""
        if not self.ranges or tensor.device.type != "cpu" or not tensor.is_contiguous():
            return
        first = tensor.data_ptr()
        last = first + tensor.numel() * tensor.element_size()
        for start, end in self.ranges:
            low = -(-max(first, start) // PAGE) * PAGE
            high = min(last, end) // PAGE * PAGE
            if high > low:
                _madvise(low, high - low)


def _madvise(address: int, length: int) -> None:
    result = _libc().madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), _MADV_DONTNEED)
    if result != 0:  # the pages stay: more memory, never a wrong value
        logger.debug("madvise failed: %s", os.strerror(ctypes.get_errno()))


@functools.cache
def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)  # this process's own symbols: libc's among them
