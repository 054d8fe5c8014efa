"""The C heap of a worker: forwards reuse their freed buffers while busy, and give them back to
the system once a model goes idle.

glibc serves a large allocation with a mapping of its own, and each such free raises that
threshold (up to 32 MiB) and the one beyond which a free trims the heap's top (twice it). Left
to that, a worker kept what its largest batches had once needed (cnn at 64 connections: ~90
MiB per worker), and its heaps were trimmed after most batches, which the next one paid in page
faults again (~250 per cnn request at 64 connections: 1.2 million in 4 s). Fixing the mapping
threshold low gave memory back at once, but cost every forward page faults on fresh mappings
(a batch-1 cnn forward: 2.8 -> 3.6-4.1 ms). So a worker fixes the mapping threshold at glibc's
maximum, and the trim threshold far above it (:func:`tune_heap`): forwards reuse the heap (cnn
at 64 connections: 30 times fewer page faults, +25% requests/s; a batch of 64 cnn images needs
~65 MiB of it), and an inference thread that has been idle a while trims it (``malloc_trim``):
the freed memory goes back, the next forward pays its page faults once.

``malloc_trim`` returns the free top of the main heap only, not that of a thread's own heap
(glibc makes one per thread that allocates while others do, up to 8 per core): widened forwards
on a thread of their own kept ~20 MiB per worker after the trim. So every thread of a worker
allocates from the main heap.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable


def _glibc_function(name: str, *argtypes: type) -> Callable[..., int] | None:
    """The C library's function ``name`` (returning an int), or None where the library this
    process runs on has none (not glibc: musl has no malloc_trim, so freed memory stays)."""
    try:
        function = ctypes.CDLL(None)[name]
    except AttributeError:
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function


_TRIM = _glibc_function("malloc_trim", ctypes.c_size_t)
_MALLOPT = _glibc_function("mallopt", ctypes.c_int, ctypes.c_int)
_HEAP_SETTINGS = (  # mallopt's parameters (malloc.h) and the values a worker sets
    (-8, 1),  # M_ARENA_MAX: one heap for every thread
    (-3, 32 << 20),  # M_MMAP_THRESHOLD: buffers up to 32 MiB from the heap
    (-1, 256 << 20),  # M_TRIM_THRESHOLD: a free trims the heap's top only beyond 256 MiB
)


def tune_heap() -> bool:
    """Serve every thread this process starts from now on from one heap, buffers up to 32 MiB
    from it, and keep up to 256 MiB free at its top between idle trims; False where the C
    library cannot (not glibc). Call it before other threads allocate: a thread that already
    has a heap of its own keeps it."""
    mallopt = _MALLOPT
    return mallopt is not None and all(mallopt(option, value) for option, value in _HEAP_SETTINGS)


def release_free_memory() -> bool:
    """Return the free memory of every heap of this process to the system; False where the C
    library cannot (not glibc), or had nothing to return."""
    return _TRIM is not None and bool(_TRIM(0))
