"""How many intra-op threads a forward may use: all the cores for a request that computes
alone, a share of them while other forwards run.

With one worker process per core share and one thread each, a lone request on a compute-bound
model used one core of two. Each worker process counts its forwards in progress in its own slot
of an array in shared memory (the launcher makes it); a forward that takes one request with
nothing queued behind it, while no other forward runs in any worker, gets every core, and any
other gets the worker's share (the cores divided by the workers). A slot has one writer (its
worker, under a lock), so the counts need no lock across processes; a read of the other slots
that races a change only picks the smaller or larger count for one forward.
"""

from __future__ import annotations

import os
import threading
from collections.abc import MutableSequence


class CoreShare:
    """The forwards in progress of every worker process, and the threads a new one gets."""

    def __init__(self, busy: MutableSequence[int], index: int, cores: int) -> None:
        self._busy = busy
        """Forwards in progress per worker process (shared memory with several workers)."""
        self._index = index
        self.cores = cores
        self.share = max(1, cores // len(busy))
        """The threads of a forward that does not compute alone."""
        self._lock = threading.Lock()  # the inference threads of this process's models

    def begin(self, alone: bool) -> int:
        """Count a forward in; the intra-op threads it may use (every core when it is ``alone``
        in its queue and nothing else computes). Pair with :meth:`end`."""
        with self._lock:
            mine = self._busy[self._index]
            self._busy[self._index] = mine + 1
        if not alone or mine:
            return self.share
        others = any(count for i, count in enumerate(self._busy) if i != self._index)
        return self.share if others else self.cores

    def end(self) -> None:
        """Count a forward out."""
        with self._lock:
            self._busy[self._index] -= 1


_installed: CoreShare | None = None


def install(busy: MutableSequence[int], index: int) -> None:
    """Make this process worker ``index`` of those counting in ``busy`` (the launcher calls
    it in each worker before the app is made)."""
    global _installed
    _installed = CoreShare(busy, index, os.cpu_count() or 1)


def process_share() -> CoreShare:
    """This process's share of the cores: the launcher's, or a process alone with every core."""
    global _installed
    if _installed is None:
        _installed = CoreShare([0], 0, os.cpu_count() or 1)
    return _installed
