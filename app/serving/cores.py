"""How many intra-op threads a forward may use: every worker's share of the cores for a request
that computes alone, its own worker's share while other forwards run.

With the cores shared out between worker processes (one thread each on 2 cores and 2 workers),
a lone request on a compute-bound model used one core of two. Each worker process counts its
forwards in progress in its own slot of an array in shared memory (the launcher makes it); a
forward that takes one request with nothing queued behind it, while no other forward runs in
any worker, gets the threads of every worker, and any other its worker's share. A slot has one
writer (its worker, under a lock), so the counts need no lock across processes; a read of the
other slots that races a change only picks the smaller or larger count for one forward.
"""

from __future__ import annotations

import threading
from collections.abc import MutableSequence


class CoreShare:
    """The forwards in progress of every worker process, and the threads a new one gets."""

    def __init__(self, busy: MutableSequence[int], index: int) -> None:
        self._busy = busy
        """Forwards in progress per worker process (shared memory with several workers)."""
        self._index = index
        self._lock = threading.Lock()  # the inference threads of this process's models

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


_installed: CoreShare | None = None


def install(busy: MutableSequence[int], index: int) -> None:
    """Make this process worker ``index`` of those counting in ``busy`` (the launcher calls
    it in each worker before the app is made)."""
    global _installed
    _installed = CoreShare(busy, index)


def process_share() -> CoreShare:
    """This process's share of the cores: the launcher's, or a process alone."""
    global _installed
    if _installed is None:
        _installed = CoreShare([0], 0)
    return _installed
