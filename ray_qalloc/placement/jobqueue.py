"""The queue's index: queued jobs, one heap per backend of their plans, and what moves items in
and out of it (enqueue, removal, class changes, aging, held waiters going back).

Why apart from the pass: the index is a data structure with invariants of its own
(``placement/invariants.py`` checks them); the pass only reads its heads.
"""

from __future__ import annotations

import heapq
from typing import Iterable

from ray_qalloc.placement.entry import Entry, Item, PassResult
from ray_qalloc.placement.load import LiveView
from ray_qalloc.placement.model import JobView, Plan
from ray_qalloc.priority import CLASSES, RANK as _RANK, known as _known_class

_EMERGENCY, _BATCH = CLASSES[0], CLASSES[-1]


class JobQueue:
    """The queue half of ``Scheduler`` (a mixin: the state lives on the scheduler)."""

    def enqueue(self, job: JobView, plan: Plan, arrival: float, seq: int | None = None) -> Entry:
        """Queue a job. Its place in line is (class, deadline, arrival): re-enqueueing a
        preempted or failed-over job with its original ``arrival`` puts it back where it was."""
        if job.id in self.entries:
            self.remove(job.id)       # queued again (a new plan): the old entry's counts go
        entry = Entry(job, plan, arrival, next(self._seq) if seq is None else seq, self._class_of(job),
                      version=next(self._versions))
        self.entries[job.id] = entry
        if not any(b in self.backends for b in plan.estimates):
            self._pending_unplaceable.append(entry)
            return entry
        self._index_entry(entry)
        if entry.cls == _BATCH:
            heapq.heappush(self._aging, (arrival, entry.seq, job.id))
        elif entry.cls == _EMERGENCY:
            self._preempt.arrived(job.id)
        self._count_queued(entry, +1)
        if job.deadline_s is not None:
            # flag at once if the predicted queue already makes it late; and remember the latest
            # start that could still meet the deadline on the fastest backend
            view = LiveView(self, arrival, entry.cls == _EMERGENCY)
            self._flag(entry, self.policy.choose(entry, view, arrival), arrival, PassResult())
            fastest = min(e.runtime_s for b, e in plan.estimates.items() if b in self.backends)
            heapq.heappush(self._deadlines, (entry.deadline_at - fastest, entry.seq, job.id))
        return entry

    def _class_of(self, job: JobView) -> str:
        """The class a job is queued as: its own, raised to its tenant's floor while one is set."""
        own = _known_class(job.priority)
        floor = self.class_floor.get(job.tenant) if self.class_floor else None
        return floor if floor is not None and _RANK[floor] < _RANK[own] else own

    def set_class_floor(self, tenant: str, cls: str | None, now: float) -> list[str]:
        """Serve ``tenant``'s jobs as at least ``cls`` (None: as their own class again) — a
        threat rule or a SOAR playbook raising a tenant's priority for a time. Queued jobs move
        at once, each keeping its arrival; returns the ids of those whose class changed.
        A scan of the queue: rare (an incident), not per decision."""
        if cls is not None and cls not in _RANK:
            raise ValueError(f"unknown priority class {cls!r}; use one of {', '.join(CLASSES)}")
        if cls is None:
            self.class_floor.pop(tenant, None)
        else:
            self.class_floor[tenant] = cls
        pending = {id(e) for e in self._pending_unplaceable}
        changed = []
        for entry in list(self.entries.values()):
            if entry.job.tenant != tenant or id(entry) in pending:
                continue
            new = self._class_of(entry.job)
            if new == entry.cls or (entry.cls == CLASSES[2] and new == _BATCH
                                    and self.config.aging_s > 0 and now - entry.arrival >= self.config.aging_s):
                continue             # already there, or a batch job that aged meanwhile stays normal
            entry.cls = new
            entry.version = next(self._versions)
            self._index_entry(entry)
            if new == _BATCH:
                heapq.heappush(self._aging, (entry.arrival, entry.seq, entry.job.id))
            elif new == _EMERGENCY:
                self._preempt.arrived(entry.job.id)
            changed.append(entry.job.id)
        return changed

    def _index_entry(self, entry: Entry) -> None:
        item = (entry.key(), entry.version, entry.job.id)
        declined = self._declined if self.config.decline_ttl_s > 0.0 else None
        fresh = False
        for b in entry.plan.estimates:
            heap = self._index.get(b)
            if heap is not None:
                heapq.heappush(heap, item)
                if declined and b in declined:
                    fresh = True
        if fresh:
            self._fresh.append(item)

    def remove(self, job_id: str) -> Entry | None:
        """Drop a queued job (started, cancelled, failed); index items go stale and are dropped lazily."""
        entry = self.entries.pop(job_id, None)
        if entry is not None:
            self._count_queued(entry, -1)
            self._holds.drop(job_id)
        return entry

    def _count_queued(self, entry: Entry, sign: int) -> None:
        if sign > 0:
            best = min(entry.plan.estimates.values(), key=lambda e: e.runtime_s)
            self._preferred[entry.job.id] = (best.backend, best.runtime_s)
            if best.backend in self.backends:
                self.backends[best.backend].queued_work_s += best.runtime_s
        else:
            pref = self._preferred.pop(entry.job.id, None)
            if pref is not None and pref[0] in self.backends:
                b = self.backends[pref[0]]
                b.queued_work_s = max(b.queued_work_s - pref[1], 0.0)

    def __len__(self) -> int:
        return len(self.entries)

    def _unhold(self, items: list[tuple[str, Item]]) -> None:
        """Released waiters are weighed at the next pass; their held items wait beside it
        (``_carry``) and go back onto their indexes only if the job is not held again."""
        carry = self._carry
        for b, item in items:
            job_id = item[2]
            entry = self.entries.get(job_id)
            if b not in self._index or entry is None or entry.version != item[1]:
                continue
            mine = carry.get(job_id)
            if mine is None:
                mine = carry[job_id] = []
                self._fresh.append(item)
            mine.append((b, item))

    def _push_back(self, items: Iterable[tuple[str, Item]]) -> None:
        index = self._index
        for b, item in items:
            heap = index.get(b)
            if heap is not None:
                heapq.heappush(heap, item)

    def _age(self, now: float) -> None:
        """Promote batch jobs that waited ``aging_s``: by arrival (a re-queued job keeps its
        original one, so enqueue order is not arrival order), so only the head is checked."""
        heap = self._aging
        while heap:
            arrival, seq, job_id = heap[0]
            entry = self.entries.get(job_id)
            if entry is None or entry.cls != _BATCH or entry.seq != seq or entry.arrival != arrival:
                heapq.heappop(heap)      # gone, aged, or queued again (its newer item is in the heap)
                continue
            if self.config.aging_s <= 0 or now - arrival < self.config.aging_s:
                return
            heapq.heappop(heap)
            entry.cls = CLASSES[2]
            entry.version = next(self._versions)
            self._index_entry(entry)
