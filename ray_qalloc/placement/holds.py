"""Jobs that chose to wait for a busy backend, held out of the free backends' indexes.

Why: with a long queue, the jobs at the head of a free backend's index are the ones that keep
declining it (they wait for a faster busy backend or a QPU). Without a memo every freed slot
re-weighs the same few dozen decliners before reaching a job that takes it — ~60 weighings,
~1 ms a pass. A job that declined its free backends for ``Y`` decides the same way

* until ``Y``'s predicted end moves past the job's *threshold* — the latest end of ``Y`` at
  which ``Y`` still beat the best free option (waiting gets no worse as time passes, so an
  absolute time is a safe bound);
* until a backend of its plan that was busy frees (its items there were never held: that
  backend's walk reads it);
* or until a TTL passes (an overrun makes ``Y``'s wait grow with time, with no event).

Until then its items are held here instead of being pushed back onto the free indexes, and
its runtime on ``Y`` stays counted as work ahead of later jobs, as a full walk would count it.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

Item = tuple[tuple, int, str]     # an index item: (key, version, job id)


@dataclass
class _Waiter:
    runtime_s: float
    latest_end: float             # Y's predicted end after which the job would rather start now
    emergency: bool
    expires: float                # weighed again then at the latest (each its own: no herd)
    items: list[tuple[str, Item]] = field(default_factory=list)   # (index backend, item)


@dataclass
class _Group:
    jobs: dict[str, _Waiter] = field(default_factory=dict)
    by_end: list[tuple[float, str]] = field(default_factory=list)    # normal jobs' thresholds
    by_end_e: list[tuple[float, str]] = field(default_factory=list)  # emergency jobs'


class Holds:
    """Per busy backend, the jobs waiting for it and their items taken off free indexes."""

    def __init__(self) -> None:
        self.groups: dict[str, _Group] = {}
        self.holding: dict[str, str] = {}       # job id -> the backend it waits for
        self.work: dict[str, float] = {}        # backend -> runtime of the jobs holding for it
        self._expiry: list[tuple[float, str, str]] = []    # (expires, job id, backend)

    def hold(self, job_id: str, backend: str, runtime_s: float, latest_end: float,
             emergency: bool, expires: float) -> None:
        """``job_id`` chose to wait for ``backend``; its runtime there is work ahead of others."""
        self.drop(job_id)
        g = self.groups.get(backend)
        if g is None:
            g = self.groups[backend] = _Group()
        g.jobs[job_id] = _Waiter(runtime_s, latest_end, emergency, expires)
        heapq.heappush(self._expiry, (expires, job_id, backend))
        if latest_end != float("inf"):
            heapq.heappush(g.by_end_e if emergency else g.by_end, (latest_end, job_id))
        self.holding[job_id] = backend
        self.work[backend] = self.work.get(backend, 0.0) + runtime_s

    def park(self, index_backend: str, item: Item) -> bool:
        """Keep an item popped from a free index if its job holds; False: push it back."""
        waits_for = self.holding.get(item[2])
        if waits_for is None or waits_for == index_backend:
            return False       # the index of the backend it waits for must read it when that frees
        self.groups[waits_for].jobs[item[2]].items.append((index_backend, item))
        return True

    def adopt(self, job_id: str, items: list[tuple[str, Item]]) -> list[tuple[str, Item]]:
        """Items held for this job before it was weighed again stay held with its new wait,
        except its item in the index of the backend it now waits for: returned, to go back."""
        waits_for = self.holding[job_id]
        mine = self.groups[waits_for].jobs[job_id].items
        back = []
        for pi in items:
            (back if pi[0] == waits_for else mine).append(pi)
        return back

    def drop(self, job_id: str) -> tuple[str, float, list[tuple[str, Item]]] | None:
        """The job leaves the queue or is weighed again: its work no longer counts ahead.
        Returns the backend it waited for, its runtime there and its held items."""
        backend = self.holding.pop(job_id, None)
        if backend is None:
            return None
        g = self.groups[backend]
        w = g.jobs.pop(job_id)
        if g.jobs:
            self.work[backend] = max(self.work[backend] - w.runtime_s, 0.0)
        else:
            del self.groups[backend]
            self.work.pop(backend, None)
        return backend, w.runtime_s, w.items

    def release(self, backend: str) -> list[tuple[str, Item]]:
        """All of ``backend``'s waiters decide again (it went, or its node changed whole)."""
        g = self.groups.get(backend)
        out: list[tuple[str, Item]] = []
        for job_id in list(g.jobs) if g is not None else ():
            out += self.drop(job_id)[2]  # type: ignore[index]
        return out

    def outgrown(self, backend: str, end: float, end_emergency: float) -> list[tuple[str, Item]]:
        """``backend``'s predicted end moved later: the waiters whose threshold it passed."""
        g = self.groups.get(backend)
        if g is None:
            return []
        out: list[tuple[str, Item]] = []
        for heap, limit in ((g.by_end, end), (g.by_end_e, end_emergency)):
            while heap and heap[0][0] < limit:
                latest, job_id = heapq.heappop(heap)
                w = g.jobs.get(job_id)
                if w is not None and w.latest_end == latest and self.holding.get(job_id) == backend:
                    out += self.drop(job_id)[2]  # type: ignore[index]
                    if backend not in self.groups:
                        return out
        return out

    def expired(self, now: float) -> list[tuple[str, Item]]:
        out: list[tuple[str, Item]] = []
        heap = self._expiry
        while heap and heap[0][0] <= now:
            expires, job_id, backend = heapq.heappop(heap)
            g = self.groups.get(backend)
            w = g.jobs.get(job_id) if g is not None else None
            if w is not None and w.expires == expires and self.holding.get(job_id) == backend:
                out += self.drop(job_id)[2]  # type: ignore[index]
        return out

    def parked_items(self) -> set[tuple[str, Item]]:
        return {pi for g in self.groups.values() for w in g.jobs.values() for pi in w.items}
