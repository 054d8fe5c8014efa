"""Giving the memory of finished batches back to the system once a model goes idle.

glibc serves a large allocation with a mapping of its own and unmaps it on free, but each such
free raises that threshold (up to 32 MiB), so that later activations of a few MiB come from the
heap and stay there when freed: a worker kept what its largest batches had once needed (cnn at
64 connections: ~90 MiB per worker). Fixing the threshold low gave that back at once, but cost
every forward page faults on fresh mappings (a batch-1 cnn forward on two threads: 2.8 -> 3.6
to 4.1 ms). So the heap serves forwards as glibc decides, and an inference thread that has
been idle a while trims it (``malloc_trim``): the freed memory goes back, the next forward
pays its page faults once.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library this process runs on
    except AttributeError:  # not glibc (musl has none): freed memory stays where it is
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def release_free_memory() -> bool:
    """Return the free memory of every heap of this process to the system; False where the C
    library cannot (not glibc), or had nothing to return."""
    return _TRIM is not None and bool(_TRIM(0))
