"""The scheduler's invariants, checked against a from-scratch recomputation.

Why: the scheduler keeps caches (per-backend load, per-node busy threads, queued work per
backend, one index heap per backend, the startable set) so that a decision costs the same
with ten or ten thousand queued jobs. A cache that drifts from the truth does not crash; it
makes quietly wrong decisions. ``check`` recomputes each of them from the runs and entries
alone and names the first that differs. It is for tests (``SchedulerConfig(check_invariants=True)``
or ``RAY_QALLOC_CHECK_INVARIANTS=1``): it costs O(state) per call.

Capacity (slots, a node's cores, reserved slots and cores) is checked on every node except
those a caller over-committed from outside (``Scheduler._forced``: a run started without
room, a backend moved between nodes, a node that lost cores): the scheduler does not
decide those, it only has to stop adding to them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ray_qalloc.priority import CLASSES, RANK

if TYPE_CHECKING:  # pragma: no cover
    from ray_qalloc.placement.scheduler import Scheduler

_EMERGENCY, _BATCH = CLASSES[0], CLASSES[-1]


class InvariantViolation(AssertionError):
    """A cached or derived structure of the scheduler differs from its recomputation."""


def _fail(what: str) -> None:
    raise InvariantViolation(f"scheduler invariant broken: {what}")


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)


def check(s: "Scheduler") -> None:
    """Raise ``InvariantViolation`` naming the first structure that differs from a recomputation."""
    _check_nodes(s)
    _check_runs(s)
    _check_capacity(s)
    _check_load(s)
    _check_queue(s)


def _check_nodes(s: "Scheduler") -> None:
    for node, names in s._nodes.items():
        if len(set(names)) != len(names):
            _fail(f"node {node!r} lists a backend twice: {names}")
        for name in names:
            if name not in s.backends or s.backends[name].node != node:
                _fail(f"node {node!r} lists {name!r}, which is not on it")
    for name, b in s.backends.items():
        if name not in s._nodes.get(b.node, ()):
            _fail(f"backend {name!r} is missing from its node {b.node!r}")
        if name not in s._index:
            _fail(f"backend {name!r} has no index heap")
    for node, names in s._nodes.items():
        busy = sum(len(s.backends[n].runs) * s.backends[n].spec.threads for n in names)
        if not _close(s._node_busy.get(node, 0.0), busy):
            _fail(f"node {node!r} busy threads {s._node_busy.get(node, 0.0)} != {busy} held by its runs")


def _check_runs(s: "Scheduler") -> None:
    seen: dict[str, str] = {}
    for name, b in s.backends.items():
        for job_id, run in b.runs.items():
            if job_id in seen:
                _fail(f"job {job_id!r} runs on both {seen[job_id]!r} and {name!r}")
            seen[job_id] = name
            if run.job_id != job_id or run.backend != name:
                _fail(f"run {job_id!r} on {name!r} says job {run.job_id!r} on {run.backend!r}")
            if s.runs.get(job_id) is not run:
                _fail(f"run {job_id!r} on {name!r} is not the scheduler's run of that job")
    extra = set(s.runs) - set(seen)
    if extra:
        _fail(f"runs {sorted(extra)} are on no backend")
    both = set(s.runs) & set(s.entries)
    if both:
        _fail(f"jobs {sorted(both)} are both queued and running")


def _check_capacity(s: "Scheduler") -> None:
    reserved = s.config.reserved
    for node, names in s._nodes.items():
        if node in s._forced:
            continue
        backends = [s.backends[n] for n in names]
        cores = s.node_cpus.get(node, 1.0)
        threads = [(b.spec.threads, r.priority) for b in backends if b.spec.threads > 0 for r in b.runs.values()]
        busy = sum(t for t, _ in threads)
        if busy > cores + 1e-9:
            _fail(f"node {node!r}: runs hold {busy} threads of its {cores} cores")
        other = sum(t for t, p in threads if p != _EMERGENCY)
        if reserved.get(node) and other > max(cores - reserved[node], 0) + 1e-9:
            _fail(f"pool {node!r}: non-emergency runs hold {other} threads, but {reserved[node]} "
                  f"of its {cores} cores are reserved for emergency jobs")
        for b in backends:
            name, n = b.spec.name, len(b.runs)
            if n > b.spec.slots:
                _fail(f"backend {name!r} runs {n} jobs on {b.spec.slots} slots")
            other_runs = sum(1 for r in b.runs.values() if r.priority != _EMERGENCY)
            if reserved.get(name) and other_runs > max(b.spec.slots - reserved[name], 0):
                _fail(f"backend {name!r}: {other_runs} non-emergency runs, but {reserved[name]} "
                      f"of its {b.spec.slots} slots are reserved for emergency jobs")


def _check_load(s: "Scheduler") -> None:
    from ray_qalloc.placement.load import backend_load, emergency_threads, first_core_run

    reserved = s.config.reserved
    for node, names in s._nodes.items():
        backends = [s.backends[n] for n in names]
        cores = s.node_cpus.get(node, 1.0)
        busy = float(sum(len(b.runs) * b.spec.threads for b in backends))
        pool_hold = max(reserved.get(node, 0) - emergency_threads(backends), 0) if reserved.get(node) else 0
        first = first_core_run(backends)
        for b in backends:
            t = b.spec.threads
            short_e = t > 0 and cores - busy < t
            short = t > 0 and cores - busy - pool_hold < t
            want = backend_load(b.spec, b.healthy, b.runs.values(), reserved.get(b.spec.name, 0), short, short_e,
                                first if short else None, never=t > 0 and cores - reserved.get(node, 0) < t)
            have = (b.free_at, b.free_run_started, b.can_start,
                    b.free_at_emergency, b.free_run_started_emergency, b.can_start_emergency)
            if have != want:
                fields = ("free_at", "free_run_started", "can_start", "free_at_emergency",
                          "free_run_started_emergency", "can_start_emergency")
                diff = {f: (h, w) for f, h, w in zip(fields, have, want) if h != w}
                _fail(f"backend {b.spec.name!r}: cached load differs from recomputation (cached, recomputed): {diff}")
    startable = {n for n, b in s.backends.items() if b.can_start_emergency}
    if set(s._startable) != startable:
        _fail(f"startable set {sorted(s._startable)} != {sorted(startable)}")


def _check_index_shape(s: "Scheduler") -> None:
    """Every heap's items are (key, version, job id), none twice; every backend has a live
    count and a birth version; and, with compaction on, no heap holds more than
    ``2 * live + INDEX_SLACK`` items (the bound that keeps rarely walked heaps from growing
    with every job that ever listed them), nor the aging queue or the deadline heap more than
    ``2 * len(entries) + INDEX_SLACK``. The live counts themselves are checked in
    ``_check_queue``, against the queued entries."""
    from ray_qalloc.placement.jobqueue import INDEX_SLACK

    if set(s._live) != set(s._index) or set(s._born) != set(s._index):
        _fail(f"live counts {sorted(s._live)} / birth versions {sorted(s._born)} are not kept for "
              f"exactly the indexed backends {sorted(s._index)}")
    for name, heap in s._index.items():
        for item in heap:
            if not (type(item) is tuple and len(item) == 3 and type(item[0]) is tuple
                    and type(item[1]) is int and type(item[2]) is str):
                _fail(f"index of {name!r} holds {item!r}, not a (key, version, job id) item")
        if len(set(heap)) != len(heap):
            _fail(f"index of {name!r} holds an item twice")
        if s._compact_index and len(heap) > 2 * s._live[name] + INDEX_SLACK:
            _fail(f"index of {name!r} holds {len(heap)} items, past the bound 2 * {s._live[name]} live "
                  f"+ {INDEX_SLACK}")
    for what, heap in (("aging queue", s._aging), ("deadline heap", s._deadlines)):
        if s._compact_index and len(heap) > 2 * len(s.entries) + INDEX_SLACK:
            _fail(f"{what} holds {len(heap)} items, past the bound 2 * {len(s.entries)} queued + {INDEX_SLACK}")


def _check_queue(s: "Scheduler") -> None:
    _check_index_shape(s)
    pending = {id(e) for e in s._pending_unplaceable}
    work: dict[str, float] = {}
    live = dict.fromkeys(s._index, 0)
    index = {name: set(heap) for name, heap in s._index.items()}
    held = list(s._holds.parked_items()) + [pi for items in s._carry.values() for pi in items]
    for b, item in held:     # held out of a free index while its job waits or is weighed again
        if b in index:
            index[b].add(item)
    aging = set(s._aging)
    deadlines = {(seq, job_id): latest for latest, seq, job_id in s._deadlines}
    for job_id, e in s.entries.items():
        if e.job.id != job_id:
            _fail(f"entry under {job_id!r} is job {e.job.id!r}")
        floor = s.class_floor.get(e.job.tenant)
        if e.cls not in RANK or (e.cls == _EMERGENCY) != (_EMERGENCY in (e.job.priority, floor)):
            _fail(f"job {job_id!r} of priority {e.job.priority!r} (tenant floor {floor!r}) is served as {e.cls!r}")
        if floor is not None and RANK[e.cls] > RANK[floor]:
            _fail(f"job {job_id!r} is served as {e.cls!r}, below its tenant's floor {floor!r}")
        if id(e) in pending:
            if job_id in s._preferred:
                _fail(f"unplaceable job {job_id!r} counts as queued work")
            continue
        best = min(e.plan.estimates.values(), key=lambda est: est.runtime_s)
        if s._preferred.get(job_id) != (best.backend, best.runtime_s):
            _fail(f"job {job_id!r} prefers {s._preferred.get(job_id)}, its plan's fastest is "
                  f"{(best.backend, best.runtime_s)}")
        if best.backend in s.backends:
            work[best.backend] = work.get(best.backend, 0.0) + best.runtime_s
        item = (e.key(), e.version, job_id)
        for b in e.plan.estimates:
            # a heap made after this version (its backend added since) never got an item
            if b in index and s._born[b] < e.version:
                live[b] += 1
                if item not in index[b]:
                    _fail(f"queued job {job_id!r} (key {e.key()}, version {e.version}) is not in the index of {b!r}")
        if e.cls == _BATCH and (e.arrival, e.seq, job_id) not in aging:
            _fail(f"batch job {job_id!r} is not in the aging queue")
        if e.job.deadline_s is not None and e.flagged is None:
            fastest = min(est.runtime_s for b, est in e.plan.estimates.items() if b in s.backends)
            latest = deadlines.get((e.seq, job_id))
            if latest is None or not _close(latest, e.deadline_at - fastest):
                _fail(f"job {job_id!r}: latest start {latest} in the deadline heap, "
                      f"expected {e.deadline_at - fastest}")
    if live != s._live:
        diff = {b: (s._live.get(b), n) for b, n in live.items() if s._live.get(b) != n}
        _fail(f"live index items per backend differ from the queued jobs' (counted, recomputed): {diff}")
    extra = set(s._preferred) - set(s.entries)
    if extra:
        _fail(f"jobs {sorted(extra)} count as queued work but are not queued")
    for name, b in s.backends.items():
        if not _close(b.queued_work_s, work.get(name, 0.0)):
            _fail(f"backend {name!r}: queued work {b.queued_work_s} != {work.get(name, 0.0)} "
                  f"of the queued jobs that prefer it")
    holds = s._holds
    gone = set(holds.holding) - set(s.entries)
    if gone:
        _fail(f"jobs {sorted(gone)} hold for a backend but are not queued")
    for b, g in holds.groups.items():
        if any(holds.holding.get(j) != b for j in g.jobs):
            _fail(f"backend {b!r}: its waiters {sorted(g.jobs)} do not all hold for it")
        if not _close(holds.work.get(b, 0.0), sum(w.runtime_s for w in g.jobs.values())):
            _fail(f"backend {b!r}: work held ahead {holds.work.get(b, 0.0)} != its waiters' runtimes")
    unknown = set(s._declined) - set(s.backends)
    if unknown:
        _fail(f"declined backends {sorted(unknown)} do not exist")
