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

import functools
import itertools
import math
import os
from typing import Any, Callable, Mapping, TypeVar

from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.placement.deadlines import TimeRules
from ray_qalloc.placement.dispatch_pass import DispatchPass
# the queue's value objects, re-exported: importers use ``placement.scheduler`` for all of them
from ray_qalloc.placement.entry import (Decision, Entry, Item as _Item, PassResult, Policy, QallocPolicy,
                                        SchedulerConfig)
from ray_qalloc.placement.holds import Holds
from ray_qalloc.placement.jobqueue import JobQueue
from ray_qalloc.placement.load import BackendSlotState, LiveView, Run
from ray_qalloc.placement.loadcache import LoadCache, _Cores
from ray_qalloc.placement.model import JobView, Plan
from ray_qalloc.placement.preemption import Preemption
from ray_qalloc.priority import CLASSES

__all__ = ["CLASSES", "CHECK_INVARIANTS_ENV", "Decision", "Entry", "LiveView", "PassResult", "Policy",
           "QallocPolicy", "Run", "Scheduler", "SchedulerConfig"]

CHECK_INVARIANTS_ENV = "RAY_QALLOC_CHECK_INVARIANTS"
_EMERGENCY = CLASSES[0]
_CHECK_FROM_ENV = os.environ.get(CHECK_INVARIANTS_ENV, "").strip().lower() not in ("", "0", "false", "no")


_MUTATORS = ("add_backend", "set_health", "set_external_wait", "set_class_floor", "set_reserved", "set_windows", "set_node", "enqueue", "remove", "start", "finish", "decide", "requeue")
_F = TypeVar("_F", bound=Callable[..., Any])


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


class Scheduler(JobQueue, LoadCache, DispatchPass, TimeRules):
    """Queue + per-backend load + the pass that turns them into decisions.

    Split by concern, one module each, over the state this class owns: the queue's index
    (``jobqueue.py``), the cached load (``loadcache.py``), the pass (``dispatch_pass.py``),
    deadlines and exclusions (``deadlines.py``), preemption (``preemption.py``); here, the
    pool and the runs (what the caller reports) and the state itself.

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
        # per backend: live items of its heap (held out of it or not) and the version counter's
        # value when the heap was made (an entry older than it has no item there); a heap is
        # compacted past 2 * live + INDEX_SLACK items (``placement/jobqueue.py``)
        self._live: dict[str, int] = {}
        self._born: dict[str, int] = {}
        self._compact_index = True     # tests turn it off to compare decisions without it
        self.compactions = 0           # heap rebuilds, in all (tests and benchmarks read it)
        self._nodes: dict[str, list[str]] = {}          # node -> backends on it
        self._node_rows: dict[str, tuple[Any, ...]] = {}   # node -> what a refresh reads (LoadCache._rows_of)
        self._node_busy: dict[str, float] = {}          # node -> threads in use
        # backends an emergency job could start on now; insertion-ordered (a dict, not a set):
        # a pass reads their heads in this order, which must not follow the string-hash seed
        self._startable: dict[str, None] = {}
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

    def add_backend(self, spec: BackendSpec, node: str = "local", healthy: bool = True) -> None:
        """Add a backend; adding one the scheduler already has only updates its health (a pool
        that came back on its node), so no node lists a backend twice."""
        if spec.name in self.backends:
            self.set_health(spec.name, healthy)
            return
        self.backends[spec.name] = BackendSlotState(spec, node, healthy)
        self._index[spec.name] = []
        self._live[spec.name] = 0
        self._born[spec.name] = next(self._versions)
        self._nodes.setdefault(node, []).append(spec.name)
        self._node_rows.pop(node, None)
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
        self._live.pop(name, None)
        self._born.pop(name, None)
        self._nodes[b.node].remove(name)
        self._node_rows.pop(b.node, None)
        if not self._nodes[b.node]:
            del self._nodes[b.node]
        self._startable.pop(name, None)
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
        self._node_rows.pop(b.node, None)
        self._node_rows.pop(node, None)
        self._node_busy[b.node] = self._node_busy.get(b.node, 0.0) - len(b.runs) * b.spec.threads
        old, b.node = b.node, node
        self._nodes.setdefault(node, []).append(backend)
        self.node_cpus.setdefault(node, self.node_cpus.get(old, 1.0))
        self._node_busy[node] = self._node_busy.get(node, 0.0) + len(b.runs) * b.spec.threads
        if b.runs:
            self._forced.add(node)
        self._refresh_node(old)
        self._refresh_node(node)

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

    def requeue(self, run: Run, job: JobView, plan: Plan, arrival: float, seq: int | None = None) -> Entry:
        """A preempted (or failed-over) run goes back to the queue, keeping its place in line."""
        self.finish(run.job_id)
        return self.enqueue(job, plan, arrival, seq)
