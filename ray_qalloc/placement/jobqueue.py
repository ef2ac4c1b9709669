"""The queue's index: queued jobs, one heap per backend of their plans, and what moves items in
and out of it (enqueue, removal, class changes, aging, held waiters going back).

Why apart from the pass: the index is a data structure with invariants of its own
(``placement/invariants.py`` checks them); the pass only reads its heads.

Stale items (a job started, removed, or re-keyed) are dropped lazily, when they reach the
head of a heap a pass walks. A heap that is rarely walked (a backend that is seldom free: a
pool's all-core variant, a busy QPU) would keep every job that ever listed it, so each heap
also counts its *live* items (``_live``: queued jobs whose current item belongs to it, in it
or held out of it) and is rebuilt from those (``_compact``) once it holds more than
``2 * live + INDEX_SLACK`` items. Why that bound: a rebuild costs O(len), and after one the heap
holds at most ``live`` items, so the next needs at least ``live + INDEX_SLACK`` pushes or
removals first (each removal adds one stale item and takes one live one away), which pay for
it: amortised O(1) per push or removal, and memory stays within twice the queue plus a
constant per backend. The slack keeps small heaps from being rebuilt every few calls.
Compaction drops only stale items, which no decision reads (the pass skips them), so it
cannot change a decision; ``tests/test_scheduler_compaction.py`` compares against it off.

The aging queue and the deadline heap (``_aging``, ``_deadlines``) are time-ordered and drop
stale items when time reaches them, which may be never (``aging_s`` = 1e9, a deadline days
away): they are compacted the same way against the queue's length, past
``2 * len(entries) + INDEX_SLACK`` items (``_bound_queues``).
"""

from __future__ import annotations

import heapq
from typing import Iterable

from ray_qalloc.placement.entry import Entry, Item, PassResult
from ray_qalloc.placement.load import LiveView
from ray_qalloc.placement.model import JobView, Plan
from ray_qalloc.priority import CLASSES, RANK as _RANK, known as _known_class

_EMERGENCY, _BATCH = CLASSES[0], CLASSES[-1]
INDEX_SLACK = 16      # stale items a heap may hold beyond its live count (see the module's docstring)


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
        self._bound_queues()
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
            self._reindex(entry)
            if new == _BATCH:
                heapq.heappush(self._aging, (entry.arrival, entry.seq, entry.job.id))
            elif new == _EMERGENCY:
                self._preempt.arrived(entry.job.id)
            changed.append(entry.job.id)
        self._bound_queues()
        return changed

    def _index_entry(self, entry: Entry) -> None:
        """Push the entry's current item onto the heap of every backend of its plan that exists
        (each heap's live count grows by one: the item is live until the entry changes)."""
        item = (entry.key(), entry.version, entry.job.id)
        declined = self._declined if self.config.decline_ttl_s > 0.0 else None
        fresh = False
        index, live = self._index, self._live
        for b in entry.plan.estimates:
            heap = index.get(b)
            if heap is not None:
                heapq.heappush(heap, item)
                live[b] += 1
                if declined and b in declined:
                    fresh = True
        if fresh:
            self._fresh.append(item)

    def _reindex(self, entry: Entry) -> None:
        """The entry's key changed (class floor, aging): its items so far go stale, a new
        version's go in."""
        old, entry.version = entry.version, next(self._versions)
        self._unindex(entry, old)
        self._index_entry(entry)

    def _unindex(self, entry: Entry, version: int) -> None:
        """The entry's items of ``version`` went stale (removed, or re-keyed): they stay where
        they are (dropped lazily), but each heap that got one counts one live item fewer, and
        is compacted if its stale items now outnumber the bound. Heaps made after that version
        (a backend added since) never got one."""
        index, live, born = self._index, self._live, self._born
        for b in entry.plan.estimates:
            heap = index.get(b)
            if heap is not None and born[b] < version:
                n = live[b] = live[b] - 1
                if len(heap) > 2 * n + INDEX_SLACK and self._compact_index:
                    self._compact(b, heap)

    def _compact(self, backend: str, heap: list[Item]) -> None:
        """Rebuild ``backend``'s heap from its live items, in place (the pass may hold it).
        Decisions read only live items, in (key, version, job) order, which a rebuild keeps."""
        entries = self.entries
        heap[:] = [it for it in heap if (e := entries.get(it[2])) is not None and e.version == it[1]]
        heapq.heapify(heap)
        self.compactions += 1

    def remove(self, job_id: str) -> Entry | None:
        """Drop a queued job (started, cancelled, failed); index items go stale and are dropped lazily."""
        entry = self.entries.pop(job_id, None)
        if entry is not None:
            self._count_queued(entry, -1)
            self._holds.drop(job_id)
            self._unindex(entry, entry.version)
            self._bound_queues()
        return entry

    def _bound_queues(self) -> None:
        """Compact the aging queue and the deadline heap past ``2 * len(entries) + INDEX_SLACK``
        items (amortised O(1), as for the index: after a rebuild each holds at most one item per
        queued job). Kept: the items ``_age`` and ``_expire_deadlines`` would act on, each once
        (a second copy of an item finds its job already aged or flagged)."""
        cap = 2 * len(self.entries) + INDEX_SLACK
        if len(self._aging) > cap and self._compact_index:
            entries = self.entries
            self._aging[:] = dict.fromkeys(
                it for it in self._aging if (e := entries.get(it[2])) is not None and e.cls == _BATCH
                and e.seq == it[1] and e.arrival == it[0])
            heapq.heapify(self._aging)
            self.compactions += 1
        if len(self._deadlines) > cap and self._compact_index:
            entries = self.entries
            self._deadlines[:] = dict.fromkeys(
                it for it in self._deadlines if (e := entries.get(it[2])) is not None and e.flagged is None
                and e.seq == it[1])
            heapq.heapify(self._deadlines)
            self.compactions += 1

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
        """Items taken off their heaps (held, carried, parked) go back. They were counted live
        all along, so a heap that shed stale items meanwhile may pass its bound again here."""
        index, live = self._index, self._live
        for b, item in items:
            heap = index.get(b)
            if heap is not None:
                heapq.heappush(heap, item)
                if len(heap) > 2 * live[b] + INDEX_SLACK and self._compact_index:
                    self._compact(b, heap)

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
            self._reindex(entry)
