"""How many intra-op threads a forward may use: every worker's share of the cores for a request
that computes alone, its own worker's share while other forwards run.

With the cores shared out between worker processes (one thread each on 2 cores and 2 workers),
a lone request on a compute-bound model used one core of two. Each worker process counts its
forwards in progress in its own slot of an array in shared memory (the launcher makes it); a
forward that takes one request with nothing queued behind it, while no other forward runs in
any worker, gets the threads of every worker, and any other its worker's share. A slot has one
writer (its worker, under a lock), so the counts need no lock across processes; a read of the
other slots that races a change only picks the smaller or larger count for one forward.

Such a widened forward runs on the one wide thread of its process. Torch's OpenMP (libgomp)
keeps a team of threads for every thread that ever ran a parallel region, and once a process
holds more of them than there are cores, they stop spinning between regions: every region of a
forward then waits for sleeping threads to wake (a lone batch-1 cnn forward on two threads:
~90 context switches, 3.1 ms, against 1 and 2.25 ms with one team). With forwards on one
thread each, a main thread on one thread too, and widened ones on the wide thread, a worker
keeps one team. Handing a forward to that thread costs ~40 us (up to ~200), so only models
whose lone forward takes WIDE_FROM_S or more are widened.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, MutableSequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")

WIDE_FROM_S = 0.0002
"""The shortest lone forward (on its worker's share) that a second core is worth handing over."""


class CoreShare:
    """The forwards in progress of every worker process, and the threads a new one gets."""

    def __init__(self, busy: MutableSequence[int], index: int) -> None:
        self._busy = busy
        """Forwards in progress per worker process (shared memory with several workers)."""
        self._index = index
        self._lock = threading.Lock()  # the inference threads of this process's models
        self._wide: ThreadPoolExecutor | None = None

    def begin(self, share: int, alone: bool) -> int:
        """Count a forward in; the intra-op threads it may use: every worker's ``share`` when
        it is ``alone`` in its queue and nothing else computes, else its own. Pair with
        :meth:`end`."""
        with self._lock:
            mine = self._busy[self._index]
            self._busy[self._index] = mine + 1
        if not alone or mine:
            return share
        others = any(count for i, count in enumerate(self._busy) if i != self._index)
        return share if others else share * len(self._busy)

    def end(self) -> None:
        """Count a forward out."""
        with self._lock:
            self._busy[self._index] -= 1

    def widened(self, threads: int, forward: Callable[[], T]) -> T:
        """``forward()`` on ``threads`` intra-op threads, on this process's wide thread; its
        result, or what it raised."""
        with self._lock:
            if self._wide is None:
                self._wide = ThreadPoolExecutor(1, thread_name_prefix="wide")
        return self._wide.submit(on_threads, threads, forward).result()


def on_threads(threads: int, forward: Callable[[], T]) -> T:
    """``forward()`` on ``threads`` intra-op threads of the calling thread."""
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)  # per thread: this one's forwards only
    return forward()


_installed: CoreShare | None = None


def install(busy: MutableSequence[int], index: int) -> None:
    """Make this process worker ``index`` of those counting in ``busy`` (the launcher calls
    it in each worker, on its main thread, before the app is made). The main thread computes
    on one intra-op thread from then on (startup's builds and smoke tests), so that it keeps no
    OpenMP team of its own."""
    global _installed
    _installed = CoreShare(busy, index)
    torch.set_num_threads(1)


def process_share() -> CoreShare:
    """This process's share of the cores: the launcher's, or a process alone."""
    global _installed
    if _installed is None:
        _installed = CoreShare([0], 0)
    return _installed
