"""The C allocator's settings in a server process: freed batch-sized buffers go back to the system.

glibc serves an allocation over its mmap threshold (128 KiB at start) with a mapping of its own,
returned to the system on free. But each such free raises the threshold to the freed size (up to
32 MiB), so that from then on a forward's activations of a few MiB come from the heap, and a
heap only shrinks from its top: a worker kept what its largest batches had once needed (cnn at
64 connections: +70 to +90 MiB per worker). A fixed threshold turns that adjustment off.
"""

from __future__ import annotations

import ctypes
import logging

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter number (``malloc.h``). Setting it also stops the trim threshold
following the mmap threshold (at twice its value): it stays at 128 KiB, so a heap whose top is
free shrinks as before."""

MMAP_THRESHOLD_BYTES = 1024 * 1024
"""Allocations from this size on get their own mapping, unmapped on free. Smaller buffers (an
mlp's activations at batch 32: 128 KiB) stay on the heap, where reusing them costs no system
call nor page faults; the heap's holes are then at most this size each."""


def tune_allocator() -> bool:
    """Fix glibc's mmap threshold in this process (call it before the models load); False
    where the C library is not glibc, or refuses."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except AttributeError:  # not glibc (musl has no mallopt)
        logger.debug("no mallopt in this C library: the allocator keeps its settings")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
