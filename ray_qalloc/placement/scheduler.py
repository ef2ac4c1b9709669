"""The queue and dispatch state machine, shared by the live allocator and the simulator.

Pure Python over value objects: the allocator feeds it arrivals, starts and finishes and
carries out its decisions on Ray; the placement benchmark feeds it a trace on a simulated
clock. Both therefore run exactly the same decisions.

What it decides, per pass (``decide(now)``):

* **order** — priority classes in order (emergency, high, normal, batch); within a class,
  earliest deadline first, then arrival order. A ``batch`` job that waited ``aging_s`` is
  served as ``normal`` (aging: batch never starves);
* **where** — the policy (``select`` for qalloc, or a baseline) weighs each job's
  precomputed estimates against live load: arithmetic only, no model call;
* **reservation** — ``reserved[backend]`` slots, and ``reserved[pool]`` cores of a pool (a
  scheduler node), are kept for emergency jobs; no other class may take them, and emergency
  runs there count against the hold;
* **deadlines** — a job that can no longer finish by its deadline is *flagged* (the caller
  records it); it is not silently run late;
* **congestion** — when a QPU's predicted wait passes ``qpu_wait_high_s``, ``auto`` jobs whose
  fidelity floor a simulator meets stop considering it, until the wait falls below
  ``qpu_wait_low_s`` (hysteresis);
* **preemption** (``placement/preemption.py``) — an emergency job that cannot start anywhere may take the slot of a running
  ``batch`` job on a simulator (``preempt`` in the pass result); the caller stops that run and
  re-queues the batch job, which keeps its place: order within a class is (deadline, arrival),
  so re-enqueueing with the original arrival puts it back where it was.

Decision cost: each considered job costs one ``select`` over its feasible backends; a pass
looks at most ``lookahead`` jobs past jobs that cannot start, so a pass over a long queue
stays bounded. A job is looked at only when one of its backends has room now.

Checks: ``validate_state()`` recomputes every cached structure from scratch
(``placement/invariants.py``); ``SchedulerConfig(check_invariants=True)``, or the environment
variable ``RAY_QALLOC_CHECK_INVARIANTS=1`` (read once, at import), runs it after every
mutating call. Not ``QALLOC_*``: that prefix belongs to the settings tree, which refuses names
it does not know.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol, TypeVar

from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.placement.holds import Holds
from ray_qalloc.placement.load import (BackendSlotState, LiveView, Run, _Without, backend_load, emergency_threads,
                                       first_core_run)
from ray_qalloc.placement.preemption import Preemption
from ray_qalloc.placement.model import JobView, LiveState, Plan
from ray_qalloc.placement.pipeline import Choice, objective_rows, score_row, select
from ray_qalloc.priority import CLASSES, RANK as _RANK, known as _known_class

__all__ = ["CLASSES", "CHECK_INVARIANTS_ENV", "Decision", "Entry", "LiveView", "PassResult", "Policy",
           "QallocPolicy", "Run", "Scheduler", "SchedulerConfig"]

CHECK_INVARIANTS_ENV = "RAY_QALLOC_CHECK_INVARIANTS"
_EMERGENCY, _BATCH = CLASSES[0], CLASSES[-1]
_CHECK_FROM_ENV = os.environ.get(CHECK_INVARIANTS_ENV, "").strip().lower() not in ("", "0", "false", "no")


@dataclass(frozen=True)
class SchedulerConfig:
    """Knobs of the queue; all have working defaults."""

    # backend -> slots, or pool (scheduler node) -> cores, kept for emergency jobs
    reserved: Mapping[str, int] = field(default_factory=dict)
    aging_s: float = 300.0            # a batch job waiting this long is served as normal
    qpu_wait_high_s: float = 600.0    # QPU congested above this predicted wait ...
    qpu_wait_low_s: float = 300.0     # ... and clear again below this one
    lookahead: int = 64               # jobs per class examined past ones that cannot start
    preempt_min_remaining_s: float = 5.0   # preempt only runs with at least this much left
    preemption: bool = True
    preempt_recheck_batch: int = 32   # waiting emergency jobs re-considered for preemption per second
    explain: bool = True              # keep every backend's scores of a dispatch (for explain)
    # Pure optimisations, each with its production default; 0 turns it off (every pass sees
    # everything), which the reference-scheduler test needs for an exact comparison.
    decline_ttl_s: float = 1.0        # a free backend whose jobs all chose to wait is skipped this long (x1-2)
    congestion_interval_s: float = 1.0    # QPU congestion re-evaluated at most this often
    preempt_recheck_s: float = 1.0    # waiting emergency jobs re-considered for preemption this often
    check_invariants: bool = False    # validate_state() after every mutating call (tests)


@dataclass
class Entry:
    """A queued job with its plan, made once at enqueue."""

    job: JobView
    plan: Plan
    arrival: float                    # when the job was accepted (its place in line)
    seq: int = 0
    cls: str = "normal"               # current class (batch may age to normal)
    flagged: str | None = None        # why it will miss its deadline, once flagged
    excluded: frozenset[str] = frozenset()   # backends dropped by congestion, for explain
    # unique among all entries, renewed when its key changes (aging): index items of an older
    # entry of the same job (queued, started, queued again) or of an older key are stale
    version: int = 0

    @property
    def deadline_at(self) -> float:
        d = self.job.deadline_s
        return self.arrival + d if d is not None else math.inf

    def key(self) -> tuple[int, float, float, int]:
        """Class, then earliest deadline, then arrival (a re-queued job keeps its place without
        its old ``seq``), then ``seq`` among equal arrivals."""
        return (_RANK[self.cls], self.deadline_at, self.arrival, self.seq)


class Policy(Protocol):
    """Where a job goes, given its plan and live load (qalloc's ``select``, or a baseline)."""

    name: str

    def choose(self, entry: Entry, live: Mapping[str, LiveState], now: float) -> Choice: ...


class QallocPolicy:
    name = "qalloc"

    def choose(self, entry: Entry, live: Mapping[str, LiveState], now: float) -> Choice:
        if type(live) is LiveView:
            return live.weigh(entry)
        if not entry.excluded:
            return select(entry.job, entry.plan, live)
        return select(entry.job, entry.plan, _Without(live, entry.excluded))


@dataclass
class Decision:
    entry: Entry
    choice: Choice
    scores: dict[str, dict[str, float]] = field(default_factory=dict)   # every backend's, at decision time
    # (backend, wait, can start) as the decision weighed them: every backend's scores are
    # rebuilt from these when explain asks, not on the hot path
    seen: tuple[tuple[str, float, bool], ...] = ()

    @property
    def explained(self) -> Choice:
        if not self.scores and self.seen:
            job, p = self.entry.job, self.entry.plan
            rows = {name: (run, base) for name, run, base in objective_rows(p, job.priority, job.intent)}
            for name, wait, can in self.seen:
                run, base = rows[name]
                completion = wait + run
                objective = math.log(completion if completion > 1e-6 else 1e-6) + base
                self.scores[name] = score_row(wait, can, p.estimates[name], run, objective)
        return Choice(self.choice.backend, self.choice.can_start, self.scores or self.choice.scores)


@dataclass
class PassResult:
    dispatch: list[Decision] = field(default_factory=list)
    flagged: list[Entry] = field(default_factory=list)          # newly flagged deadline misses
    unplaceable: list[Entry] = field(default_factory=list)      # no feasible backend at all
    preempt: list[tuple[Run, Entry]] = field(default_factory=list)   # (batch run to stop, emergency job)


_NONE: frozenset[str] = frozenset()
_Item = tuple[tuple[int, float, float, int], int, str]   # (entry key, entry version, job id)
_MUTATORS = ("add_backend", "set_health", "set_external_wait", "set_class_floor", "set_reserved", "set_windows", "set_node", "enqueue", "remove", "start", "finish", "decide", "requeue")
_F = TypeVar("_F", bound=Callable[..., Any])


class _Cores(dict[str, float]):
    """node -> cores. A plain dict to its readers (callers write it directly), but a changed
    count refreshes that node's cached load at once, so a write cannot leave the cache stale."""

    def __init__(self, data: Mapping[str, float], on_change: Callable[[str, float | None], None]) -> None:
        super().__init__(data)
        self._on_change = on_change

    def __setitem__(self, node: str, cpus: float) -> None:
        old = self.get(node)
        super().__setitem__(node, cpus)
        if old != cpus:
            self._on_change(node, old)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for node, cpus in dict(*args, **kwargs).items():
            self[node] = cpus


def _checked(sched: "Scheduler", method: _F) -> _F:
    """``method`` followed by ``validate_state()`` once the outermost mutating call returns
    (a pass calls ``start``; the state is only whole again when the pass is done)."""

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        sched._depth += 1
        try:
            result = method(*args, **kwargs)
        finally:
            sched._depth -= 1
        if sched._depth == 0:
            sched.validate_state()
        return result

    return call  # type: ignore[return-value]


class Scheduler:
    """Queue + per-backend load + the pass that turns them into decisions.

    Indexes: every queued job sits in one heap per backend of its plan, ordered by (class,
    deadline, arrival); a pass looks only at the heads of the heaps of backends that can
    start something now. Load (when a slot frees, whether one is free) is cached per backend
    and refreshed only for the node where a run started or ended, so a decision costs the
    same with 10 or 10,000 queued jobs, and grows with the backends of one node, not all.
    """

    def __init__(self, config: SchedulerConfig | None = None, policy: Policy | None = None,
                 node_cpus: Mapping[str, float] | None = None) -> None:
        self.config = config or SchedulerConfig()
        self.policy: Policy = policy or QallocPolicy()
        self.node_cpus: dict[str, float] = _Cores(node_cpus or {}, self._cores_changed)
        self.backends: dict[str, BackendSlotState] = {}
        self.entries: dict[str, Entry] = {}
        self.runs: dict[str, Run] = {}
        self._index: dict[str, list[_Item]] = {}
        self._nodes: dict[str, list[str]] = {}          # node -> backends on it
        self._node_busy: dict[str, float] = {}          # node -> threads in use
        self._startable: set[str] = set()               # backends an emergency job could start on now
        self._seq = itertools.count()
        self._versions = itertools.count(1)
        self._preferred: dict[str, tuple[str, float]] = {}
        self._aging: list[tuple[float, int, str]] = []  # batch jobs by (arrival, seq, id): oldest first
        self._deadlines: list[tuple[float, int, str]] = []   # (latest start that meets the deadline, seq, job)
        self._pending_unplaceable: list[Entry] = []
        self._preempt = Preemption(self)   # emergency jobs that may stop a batch run
        self._jitter = 12345
        self.examined = 0            # jobs a pass has weighed, in all (benchmarks divide by it)
        self._congestion_checked = -math.inf
        self._congested: frozenset[str] = frozenset()
        self.windows: dict[str, tuple[tuple[float, float], ...]] = {}   # maintenance, per backend
        # Free backends whose queued jobs all preferred to wait elsewhere at the last pass: their
        # indexes are not re-walked until a slot frees or a wait grows on their node, or the TTL
        # passes. A job queued for one meanwhile is weighed alone (``_fresh``): the jobs that
        # declined it saw nothing change.
        self._declined: dict[str, float] = {}
        self._fresh: list[_Item] = []
        self._carry: dict[str, list[tuple[str, _Item]]] = {}   # released waiters' items, for their next weighing
        self._holds = Holds()        # jobs waiting for a busy backend, out of the free indexes
        # nodes whose limits a caller broke from outside (a start without room, a moved backend,
        # fewer cores): validate_state does not hold their capacity against the scheduler
        self._forced: set[str] = set()
        self._depth = 0
        self.class_floor: dict[str, str] = {}   # tenant -> the least urgent class its jobs are served as
        if self.config.check_invariants or _CHECK_FROM_ENV:
            for name in _MUTATORS:
                setattr(self, name, _checked(self, getattr(self, name)))

    def validate_state(self) -> None:
        """Recompute every cached structure from scratch and raise ``InvariantViolation`` naming
        the first that differs (tests; see ``placement/invariants.py``)."""
        from ray_qalloc.placement.invariants import check

        check(self)

    # ---- pool -------------------------------------------------------------------------------
    def add_backend(self, spec: BackendSpec, node: str = "local", healthy: bool = True) -> None:
        """Add a backend; adding one the scheduler already has only updates its health (a pool
        that came back on its node), so no node lists a backend twice."""
        if spec.name in self.backends:
            self.set_health(spec.name, healthy)
            return
        self.backends[spec.name] = BackendSlotState(spec, node, healthy)
        self._index.setdefault(spec.name, [])
        self._nodes.setdefault(node, []).append(spec.name)
        self.node_cpus.setdefault(node, 1.0)
        self._refresh_node(node)

    def remove_backend(self, name: str) -> None:
        """Forget a backend with no runs (its node is gone for good). Queued jobs keep the stale
        index items, dropped lazily; their plans should be made again by the caller."""
        b = self.backends.get(name)
        if b is None:
            return
        if b.runs:
            raise ValueError(f"backend {name} still has runs: {sorted(b.runs)}")
        del self.backends[name]
        self._index.pop(name, None)
        self._nodes[b.node].remove(name)
        if not self._nodes[b.node]:
            del self._nodes[b.node]
        self._startable.discard(name)
        self._declined.pop(name, None)
        self._unhold(self._holds.release(name))
        self._congested = self._congested - {name}
        self.windows.pop(name, None)

    def set_health(self, backend: str, healthy: bool) -> None:
        b = self.backends[backend]
        if b.healthy != healthy:
            b.healthy = healthy
            self._refresh_node(b.node)

    def set_external_wait(self, backend: str, seconds: float) -> None:
        """Wait a new run on ``backend`` has before it, beyond our own runs: the provider's
        queue of other users' jobs (``ProviderStatus.pending_jobs``). Added to every wait
        placement sees there; it does not hold a slot, so the job still starts (is submitted)
        when a slot of ours is free."""
        if not seconds >= 0.0 or seconds == math.inf:
            raise ValueError(f"external wait of {backend} must be a finite number of seconds ≥ 0, got {seconds!r}")
        b = self.backends[backend]
        if b.external_wait_s == seconds:
            return
        b.external_wait_s = float(seconds)
        # jobs that chose to wait for it, or declined it, weighed a wait that moved
        self._declined.pop(backend, None)
        self._unhold(self._holds.release(backend))

    def set_node(self, backend: str, node: str) -> None:
        b = self.backends[backend]
        if b.node == node:
            return
        self._nodes[b.node].remove(backend)
        self._node_busy[b.node] = self._node_busy.get(b.node, 0.0) - len(b.runs) * b.spec.threads
        old, b.node = b.node, node
        self._nodes.setdefault(node, []).append(backend)
        self.node_cpus.setdefault(node, self.node_cpus.get(old, 1.0))
        self._node_busy[node] = self._node_busy.get(node, 0.0) + len(b.runs) * b.spec.threads
        if b.runs:
            self._forced.add(node)
        self._refresh_node(old)
        self._refresh_node(node)

    def busy_threads(self, node: str) -> float:
        """Threads our runs use on ``node`` now (what its measured CPU should mostly be)."""
        return max(self._node_busy.get(node, 0.0), 0.0)

    def _cores_changed(self, node: str, old: float | None) -> None:
        if old is not None and self.node_cpus[node] < old and self._node_busy.get(node, 0.0) > 0:
            self._forced.add(node)
        self._refresh_node(node)

    # ---- queue ------------------------------------------------------------------------------
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

    def set_reserved(self, reserved: Mapping[str, int]) -> None:
        """Slots (of a backend) or cores (of a pool) kept for emergency jobs, now: every node's
        load is recomputed, since what a non-emergency job may start on moved."""
        clean = {k: int(v) for k, v in reserved.items() if int(v) > 0}
        if dict(self.config.reserved) != clean:
            self.config = dataclasses.replace(self.config, reserved=clean)
        # always: a caller that replaced ``config`` whole (live configuration) left the cache behind
        for node in list(self._nodes):
            self._refresh_node(node)

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

    # ---- runs -------------------------------------------------------------------------------
    def start(self, job_id: str, backend: str, now: float, predicted_s: float, priority: str = "normal") -> Run:
        entry = self.remove(job_id)
        prio = entry.job.priority if entry is not None else priority
        run = Run(job_id, backend, prio, now, predicted_s)
        self.runs[job_id] = run
        b = self.backends[backend]
        if not (b.can_start_emergency if prio == _EMERGENCY else b.can_start):
            self._forced.add(b.node)      # the caller started it without room (e.g. re-attached)
        b.runs[job_id] = run
        before = self._node_busy.get(b.node, 0.0)
        self._node_busy[b.node] = before + b.spec.threads
        self._refresh_node(b.node, backend, before)
        return run

    def finish(self, job_id: str) -> Run | None:
        run = self.runs.pop(job_id, None)
        if run is not None and run.backend in self.backends:
            b = self.backends[run.backend]
            if b.runs.pop(job_id, None) is not None:
                before = self._node_busy.get(b.node, 0.0)
                self._node_busy[b.node] = before - b.spec.threads
                self._refresh_node(b.node, run.backend, before)
                if b.node in self._forced and not any(self.backends[n].runs for n in self._nodes[b.node]):
                    self._forced.discard(b.node)
        return run

    # ---- cached load ------------------------------------------------------------------------
    def _refresh_node(self, node: str, changed: str | None = None, busy_before: float | None = None) -> None:
        """Recompute free_at / can_start of the backends of one node.

        With ``changed`` (a run started or ended there) only that backend and those whose
        core budget is or was short are recomputed: the others' state did not move. A pool
        with reserved cores is recomputed whole (its hold moves with its emergency runs).
        A backend with a free slot and none reserved (every pool variant) is computed inline,
        as ``backend_load`` would (the invariant check compares it with that formula): it runs
        twice per dispatch, for every backend of the node."""
        backends = self.backends
        names = self._nodes.get(node, ())
        cores = self.node_cpus.get(node, 1.0)
        busy = self._node_busy.get(node, 0.0)
        reserved = self.config.reserved
        node_hold = reserved.get(node, 0) if reserved else 0
        pool_hold = node_hold
        if pool_hold:
            pool_hold = max(pool_hold - emergency_threads(backends[n] for n in names), 0)
        partial = changed is not None and not node_hold
        before = busy_before or 0.0
        free_cores, free_before = cores - busy, cores - before
        groups = self._holds.groups
        startable = self._startable
        inf = math.inf
        first: Run | None = None
        first_known = False
        moved = False     # a slot freed here: jobs that declined its node may decide otherwise
        for name in names:
            b = backends[name]
            spec = b.spec
            threads = spec.threads
            if (partial and name != changed
                    and (threads <= 0 or (free_cores >= threads and free_before >= threads))):
                continue
            short_e = threads > 0 and free_cores < threads
            short = threads > 0 and free_cores - pool_hold < threads
            if short and not first_known:
                first, first_known = first_core_run(backends[n] for n in names), True
            was_can, was_at, was_can_e, was_at_e = b.can_start, b.free_at, b.can_start_emergency, b.free_at_emergency
            never = threads > 0 and cores - node_hold < threads
            hold = reserved.get(name, 0) if reserved else 0
            if not hold and spec.slots > len(b.runs):
                # backend_load with a free slot and nothing reserved: only the node's cores count
                at = inf if never and short else 0.0
                started = at_e = started_e = 0.0
                if first is not None:
                    if short and first.ends > at:
                        at, started = first.ends, first.started
                    if short_e and first.ends > at_e:
                        at_e, started_e = first.ends, first.started
                can_e = b.healthy and not short_e
                can = can_e and not short
                b.free_at, b.free_run_started, b.can_start = at, started, can
                b.free_at_emergency, b.free_run_started_emergency, b.can_start_emergency = at_e, started_e, can_e
            else:
                (b.free_at, b.free_run_started, b.can_start,
                 b.free_at_emergency, b.free_run_started_emergency, b.can_start_emergency) = backend_load(
                    spec, b.healthy, b.runs.values(), hold, short, short_e, first, never=never)
                can, can_e = b.can_start, b.can_start_emergency
            if name in groups:
                if ((not can and (was_can or b.free_at > was_at))
                        or (not can_e and (was_can_e or b.free_at_emergency > was_at_e))):
                    # its waiters chose it at a shorter wait: those past their threshold decide again
                    self._unhold(self._holds.outgrown(name, b.free_at if not can else inf,
                                                      b.free_at_emergency if not can_e else inf))
                if ((can and not was_can) or (can_e and not was_can_e)) and name in groups:
                    # its waiters are in its index, read by this pass in their places: their work
                    # must not count ahead of jobs before them in line
                    self._unhold(self._holds.release(name))
            if (can and not was_can) or (can_e and not was_can_e):
                moved = True
            if can_e:
                startable.add(name)
            else:
                startable.discard(name)
        if moved or not partial:
            declined = self._declined
            for name in names:
                if declined:
                    declined.pop(name, None)
                if not partial and name in groups:
                    self._unhold(self._holds.release(name))

    def _unhold(self, items: list[tuple[str, _Item]]) -> None:
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

    def _push_back(self, items: Iterable[tuple[str, _Item]]) -> None:
        index = self._index
        for b, item in items:
            heap = index.get(b)
            if heap is not None:
                heapq.heappush(heap, item)

    def live(self, now: float, *, emergency: bool = False) -> dict[str, LiveState]:
        """Predicted wait and can-start per backend, as seen by a job of that class."""
        view = LiveView(self, now, emergency)
        return {name: view[name] for name in self.backends}

    def predicted_wait(self, name: str, now: float) -> float:
        """Queue-wait prediction for a new job on ``name``: remaining work running there plus
        the work queued that prefers it, spread over its slots."""
        b = self.backends[name]
        if not b.healthy:
            return math.inf
        running_left = sum(r.remaining(now) for r in b.runs.values())
        return (running_left + b.queued_work_s) / max(b.spec.slots, 1) + b.external_wait_s

    # ---- the pass -----------------------------------------------------------------------------
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

    def _congestion(self, now: float) -> frozenset[str]:
        """QPUs whose predicted wait passed the high mark (until it falls below the low one).
        Re-evaluated at most once per ``congestion_interval_s``: waits move on that time scale,
        not per decision."""
        if now - self._congestion_checked >= self.config.congestion_interval_s:
            self._congestion_checked = now
            for name, b in self.backends.items():
                if b.spec.kind != "qpu":
                    continue
                w = self.predicted_wait(name, now)
                if b.congested and w < self.config.qpu_wait_low_s:
                    b.congested = False
                elif not b.congested and w > self.config.qpu_wait_high_s:
                    b.congested = True
            self._congested = frozenset(n for n, b in self.backends.items() if b.congested)
        return self._congested

    def set_windows(self, backend: str, windows: Iterable[tuple[float, float]]) -> None:
        """Maintenance windows (start, end) of a backend: no run starts there that would not
        end before a window begins, nor during one. Runs already going are not stopped."""
        ws = tuple(sorted((float(a), float(b)) for a, b in windows if b > a))
        if ws:
            self.windows[backend] = ws
        else:
            self.windows.pop(backend, None)

    def _exclusions(self, entry: Entry, congested: frozenset[str], now: float) -> frozenset[str]:
        """Backends this job skips in this pass: congested QPUs, for an ``auto`` job, only if a
        healthy simulator meets its floor (skipping them for a simulator that is down would
        leave it nothing to choose); and backends whose maintenance window a run started now
        would reach (predicted runtime), or that are in one."""
        out: frozenset[str] = frozenset()
        est = entry.plan.estimates
        if congested and entry.job.intent == "auto":
            floor = entry.job.fidelity_min or 0.0
            backends = self.backends
            sims_ok = any(backends[b].spec.kind == "simulator" and backends[b].healthy and e.fidelity >= floor
                          for b, e in est.items() if b in backends)
            if sims_ok:
                out = frozenset(b for b in est if b in congested)
        if self.windows:
            late = [b for b in est if b in self.windows
                    and any(now < end and now + est[b].runtime_s > start for start, end in self.windows[b])]
            if late:
                out = out | frozenset(late)
        return out

    def _head(self, backend: str, skip: set[str], parked: list[tuple[str, _Item]]) -> _Item | None:
        """Best current item of a backend's index. Stale items are dropped; items of jobs that
        chose to wait in this pass are parked and pushed back after it."""
        heap = self._index[backend]
        entries = self.entries
        heappop = heapq.heappop
        while heap:
            item = heap[0]
            entry = entries.get(item[2])
            if entry is None or entry.version != item[1]:
                heappop(heap)
            elif item[2] in skip:
                parked.append((backend, heappop(heap)))
            else:
                return item
        return None

    def decide(self, now: float) -> PassResult:
        """One pass: which queued jobs start where, now; flags, preemptions, unplaceable jobs."""
        out = PassResult()
        congested = self._congestion(now)
        self._expire_deadlines(now, out)
        for entry in self._pending_unplaceable:
            if self.entries.get(entry.job.id) is entry:   # not removed, nor queued again since
                del self.entries[entry.job.id]
                out.unplaceable.append(entry)
        self._pending_unplaceable.clear()
        if not self.entries:
            return out
        self._age(now)
        holds = self._holds
        if self.config.decline_ttl_s > 0.0 and holds.groups:
            self._unhold(holds.expired(now))
        # runtime of jobs examined in this pass that wait for a backend (and are not held: the
        # held ones' is in ``holds.work``, which the views read too)
        ahead: dict[str, float] = {}
        skip: set[str] = set()
        parked: list[tuple[str, _Item]] = []
        misses = 0
        heads, walk = self._heads(now, skip, parked)
        carried, self._carry = self._carry, {}
        examined: set[str] = set()
        live_n, live_e = LiveView(self, now, False, ahead, holds.work), LiveView(self, now, True, ahead, holds.work)
        fast = type(self.policy).choose is QallocPolicy.choose   # qalloc's own selector: weigh inline
        config = self.config
        lookahead, explain = config.lookahead, config.explain
        entries, startable, windows = self.entries, self._startable, self.windows
        advance = self._advance
        heappop = heapq.heappop
        while heads and misses < lookahead:
            if not startable:
                break       # the pass filled every free slot: no head left can start (nor change state)
            item, backend = heappop(heads)
            job_id = item[2]
            entry = entries.get(job_id)
            if entry is None or entry.version != item[1] or job_id in skip:
                # taken or skipped since this head was read: re-read the backend's head
                advance(backend, walk, heads, skip, parked)
                continue
            if backend not in startable and not any(b in startable for b in entry.plan.estimates):
                continue    # its backends filled up earlier in this pass: nothing to start it on
            if backend:
                examined.add(backend)
            self.examined += 1
            # items of this job held off free indexes: held again if it declines again
            kept = carried.pop(job_id, None)
            held = holds.drop(job_id)
            if held is not None:      # weighed again: its own work no longer counts ahead of it
                kept = held[2] if kept is None else kept + held[2]
            emergency = entry.cls == _EMERGENCY
            live = live_e if emergency else live_n
            entry.excluded = (self._exclusions(entry, congested, now) if congested or windows
                              else _NONE)
            seen: list[tuple[str, float, bool]] | None = [] if fast and explain else None
            # qalloc's own selector weighs inline and reads, on the same walk, the best free
            # option a waiting job's threshold needs (``_waits``); other policies are asked
            free: tuple[float, float, float] | None = None
            if fast:
                choice, *rest = live.weigh_free(entry, seen)
                free = tuple(rest)  # type: ignore[assignment]
            else:
                choice = self.policy.choose(entry, live, now)
            if choice.backend is None:
                if not any(b in self.backends for b in entry.plan.estimates):
                    out.unplaceable.append(entry)
                    self.remove(job_id)
                    continue
                # every backend of its plan is out of reach for now (down, or held for
                # emergency jobs): it waits, it is not given up
                choice = Choice(None, False, {})
            if entry.flagged is None and entry.job.deadline_s is not None:
                self._flag(entry, choice, now, out)
            if choice.can_start:
                if seen is not None:
                    out.dispatch.append(Decision(entry, choice, {}, tuple(seen)))
                else:
                    scores = select(entry.job, entry.plan, live, detailed=True).scores if explain else {}
                    out.dispatch.append(Decision(entry, choice, scores))
                self.start(job_id, choice.backend, now, entry.plan.estimates[choice.backend].runtime_s)
            else:
                # it prefers to wait (for a busy backend, or a slot reserved for emergencies)
                skip.add(job_id)
                misses += 1
                self._waits(entry, choice, live, now, ahead, kept or [], free)
            advance(backend, walk, heads, skip, parked)
        self._end_pass(now, parked, carried, examined)
        if self.config.preemption:
            self._preempt.run(now, out)
        return out

    def _end_pass(self, now: float, parked: list[tuple[str, _Item]],
                  carried: dict[str, list[tuple[str, _Item]]], examined: set[str]) -> None:
        """Items read past go back (or stay held while their job waits); released waiters the
        pass did not reach go back in line; free backends whose jobs all chose to wait are
        not re-read until something changes for them or a jittered timeout passes (overruns
        make waits grow; the jitter spreads their re-reading over passes)."""
        memo = self.config.decline_ttl_s > 0.0
        for backend, item in parked:
            if not (memo and self._holds.park(backend, item)):
                heapq.heappush(self._index[backend], item)
        for job_id, kept in carried.items():
            entry = self.entries.get(job_id)
            if entry is not None:
                self._push_back(it for it in kept if it[1][1] == entry.version)
        for b in examined:
            if b in self._startable and self._index[b]:
                self._declined[b] = now + self._decline_ttl()

    def _heads(self, now: float, skip: set[str], parked: list[tuple[str, _Item]]
               ) -> tuple[list[tuple[_Item, str]], set[str]]:
        """The heads of the startable, not declined backends' indexes (which this pass walks,
        head after head), and the jobs queued since their free backends were declined (weighed
        alone: backend "" reads no index), best first as a heap; a pass costs
        O(startable + examined·log)."""
        declined = self._declined
        heads: list[tuple[_Item, str]] = []
        walk: set[str] = set()
        for b in self._startable:
            if self._index[b] and declined.get(b, -math.inf) <= now:
                walk.add(b)
                item = self._head(b, skip, parked)
                if item is not None:
                    heads.append((item, b))
        heads.extend((item, "") for item in self._fresh)
        self._fresh.clear()
        heapq.heapify(heads)
        return heads, walk

    def _advance(self, backend: str, walk: set[str], heads: list[tuple[_Item, str]], skip: set[str],
                 parked: list[tuple[str, _Item]]) -> None:
        """Push the next head of a walked backend that can still start a run."""
        if backend in walk and backend in self._startable:
            nxt = self._head(backend, skip, parked)
            if nxt is not None:
                heapq.heappush(heads, (nxt, backend))

    def _waits(self, entry: Entry, choice: Choice, live: LiveView, now: float, ahead: dict[str, float],
               kept: list[tuple[str, _Item]], free: tuple[float, float, float] | None = None) -> None:
        """A job chose to wait: its work counts ahead on the backend it waits for — held (with
        the items ``kept`` off free indexes) while that memo is on, else for this pass only.
        ``free``: (best free objective, chosen backend's runtime and base) as ``weigh_free`` read
        them while weighing this job, so its threshold needs no second walk of its plan."""
        job_id = entry.job.id
        emergency = live.emergency
        if emergency:
            self._preempt.declined(job_id)
        holds = self._holds
        if choice.backend in entry.plan.estimates:
            run_s = entry.plan.estimates[choice.backend].runtime_s
            if self.config.decline_ttl_s > 0.0:
                latest = (self._latest_end(entry, choice.backend, live, now) if free is None
                          else self._latest_end_from(*free, choice.backend, live, now))
                holds.hold(job_id, choice.backend, run_s, latest, emergency, now + self._decline_ttl())
            else:
                ahead[choice.backend] = ahead.get(choice.backend, 0.0) + run_s
        if kept:
            self._push_back(holds.adopt(job_id, kept) if job_id in holds.holding else kept)

    def _latest_end(self, entry: Entry, waits_for: str, live: LiveView, now: float) -> float:
        """The latest predicted end of ``waits_for``'s runs at which this job still prefers
        waiting for it to its best free backend: past it, the job should be weighed again."""
        backends = self.backends
        emergency = live.emergency
        best_free, run_y, base_y = math.inf, 0.0, 0.0
        for name, run, base in objective_rows(entry.plan, entry.job.priority, entry.job.intent):
            if name == waits_for:
                run_y, base_y = run, base
                continue
            b = backends.get(name)
            if b is None or not b.healthy or name in entry.excluded:
                continue
            if b.can_start_emergency if emergency else b.can_start:
                # a free backend's wait is the work held or weighed ahead of this job there
                wait = live.extra(name) / max(b.spec.slots, 1) + b.external_wait_s
                obj = math.log(max(wait + run, 1e-6)) + base
                if obj < best_free:
                    best_free = obj
        if best_free == math.inf:
            return math.inf
        # log(wait + run_y) + base_y <= best_free  <=>  wait <= exp(best_free - base_y) - run_y;
        # the wait it saw includes the work ahead of it in this pass
        y = backends[waits_for]
        ahead_y = live.extra(waits_for) / max(y.spec.slots, 1) + y.external_wait_s
        return now + math.exp(min(best_free - base_y, 700.0)) - run_y - ahead_y

    def _latest_end_from(self, best_free: float, run_y: float, base_y: float, waits_for: str, live: LiveView,
                         now: float) -> float:
        """``_latest_end`` given the best free objective and ``waits_for``'s risk-adjusted runtime
        and base part, as the weighing read them (the same formula: the tests compare the two)."""
        if best_free == math.inf:
            return math.inf
        y = self.backends[waits_for]
        ahead_y = live.extra(waits_for) / max(y.spec.slots, 1) + y.external_wait_s
        return now + math.exp(min(best_free - base_y, 700.0)) - run_y - ahead_y

    def _decline_ttl(self) -> float:
        ttl = self.config.decline_ttl_s
        if ttl <= 0.0:
            return 0.0
        self._jitter = (self._jitter * 1103515245 + 12345) & 0x7FFFFFFF
        return ttl * (1.0 + self._jitter / 0x7FFFFFFF)

    def _flag(self, entry: Entry, choice: Choice, now: float, out: PassResult) -> None:
        if entry.flagged is not None or math.isinf(entry.deadline_at):
            return
        s = choice.scores.get(choice.backend or "", {})
        finish = now + s.get("completion_s", 0.0)
        if finish > entry.deadline_at:
            entry.flagged = (f"predicted to finish {finish - entry.deadline_at:.3g} s after its deadline "
                             f"(best option {choice.backend}: completion {s.get('completion_s', 0.0):.3g} s)")
            out.flagged.append(entry)

    def _expire_deadlines(self, now: float, out: PassResult) -> None:
        """Flag queued jobs that can no longer meet their deadline even on the fastest backend."""
        heap = self._deadlines
        while heap and heap[0][0] < now:
            latest, seq, job_id = heapq.heappop(heap)
            entry = self.entries.get(job_id)
            if entry is not None and entry.flagged is None and entry.seq == seq:
                entry.flagged = f"still queued {now - latest:.3g} s after the latest start that meets its deadline"
                out.flagged.append(entry)

    def requeue(self, run: Run, job: JobView, plan: Plan, arrival: float, seq: int | None = None) -> Entry:
        """A preempted (or failed-over) run goes back to the queue, keeping its place in line."""
        self.finish(run.job_id)
        return self.enqueue(job, plan, arrival, seq)
