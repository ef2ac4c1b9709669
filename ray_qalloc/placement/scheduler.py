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
* **reservation** — ``reserved[backend]`` slots are kept for emergency jobs; no other class
  may take them;
* **deadlines** — a job that can no longer finish by its deadline is *flagged* (the caller
  records it); it is not silently run late;
* **congestion** — when a QPU's predicted wait passes ``qpu_wait_high_s``, ``auto`` jobs whose
  fidelity floor a simulator meets stop considering it, until the wait falls below
  ``qpu_wait_low_s`` (hysteresis);
* **preemption** — an emergency job that cannot start anywhere may take the slot of a running
  ``batch`` job on a simulator (``preempt`` in the pass result); the caller stops that run and
  re-queues the batch job, which keeps its place (arrival order).

Decision cost: each considered job costs one ``select`` over its feasible backends; a pass
looks at most ``lookahead`` jobs per class past jobs that cannot start, so a pass over a long
queue stays bounded.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.placement.model import JobView, LiveState, Plan
from ray_qalloc.placement.pipeline import Choice, select, static_objective

CLASSES: tuple[str, ...] = ("emergency", "high", "normal", "batch")
_RANK = {c: i for i, c in enumerate(CLASSES)}


@dataclass(frozen=True)
class SchedulerConfig:
    """Knobs of the queue; all have working defaults."""

    reserved: Mapping[str, int] = field(default_factory=dict)   # backend -> slots kept for emergency
    aging_s: float = 300.0            # a batch job waiting this long is served as normal
    qpu_wait_high_s: float = 600.0    # QPU congested above this predicted wait ...
    qpu_wait_low_s: float = 300.0     # ... and clear again below this one
    lookahead: int = 64               # jobs per class examined past ones that cannot start
    preempt_min_remaining_s: float = 5.0   # preempt only runs with at least this much left
    preemption: bool = True
    preempt_recheck_batch: int = 32   # waiting emergency jobs re-considered for preemption per second
    explain: bool = True              # keep every backend's scores of a dispatch (for explain)


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
    version: int = 0                  # bumped when its key changes (aging): older index items are stale

    @property
    def deadline_at(self) -> float:
        d = self.job.deadline_s
        return self.arrival + d if d is not None else math.inf

    def key(self) -> tuple[int, float, int]:
        """Class, then earliest deadline, then arrival order."""
        return (_RANK[self.cls], self.deadline_at, self.seq)


@dataclass
class Run:
    job_id: str
    backend: str
    priority: str
    started: float
    predicted_s: float

    def remaining(self, now: float) -> float:
        return max(self.started + self.predicted_s - now, 0.0)

    @property
    def ends(self) -> float:
        return self.started + self.predicted_s


@dataclass
class BackendSlotState:
    spec: BackendSpec
    node: str = "local"
    healthy: bool = True
    runs: dict[str, Run] = field(default_factory=dict)
    queued_work_s: float = 0.0        # predicted runtime of queued jobs that prefer this backend
    congested: bool = False
    # cached load, refreshed when a run starts or ends on its node (not per decision)
    free_at: float = 0.0              # when a slot (and a core) is predicted to free
    free_run_started: float = 0.0     # start of the run predicted to free it (to judge overruns)
    can_start: bool = True            # for non-emergency jobs (reserved slots held back)
    can_start_emergency: bool = True


class Policy(Protocol):
    """Where a job goes, given its plan and live load (qalloc's ``select``, or a baseline)."""

    name: str

    def choose(self, entry: Entry, live: Mapping[str, LiveState], now: float) -> Choice: ...


class QallocPolicy:
    name = "qalloc"

    def choose(self, entry: Entry, live: Mapping[str, LiveState], now: float) -> Choice:
        if not entry.excluded:
            return select(entry.job, entry.plan, live)
        return select(entry.job, entry.plan, _Without(live, entry.excluded))


class _Without(Mapping[str, LiveState]):
    def __init__(self, base: Mapping[str, LiveState], drop: frozenset[str]) -> None:
        self.base, self.drop = base, drop

    def __getitem__(self, key: str) -> LiveState:
        if key in self.drop:
            raise KeyError(key)
        return self.base[key]

    def get(self, key: str, default: Any = None) -> LiveState | None:
        return default if key in self.drop else self.base.get(key, default)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return (k for k in self.base if k not in self.drop)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class LiveView(Mapping[str, LiveState]):
    """Live load as a mapping, computed on access from the cached per-backend state: a decision
    reads only the backends of its own plan, so building all of them would waste O(backends)."""

    def __init__(self, sched: "Scheduler", now: float, emergency: bool,
                 ahead: Mapping[str, float] | None = None) -> None:
        self.sched, self.now, self.emergency = sched, now, emergency
        self.ahead = ahead if ahead is not None else {}   # shared: a pass adds to it as jobs wait

    def get(self, key: str, default: Any = None) -> LiveState | None:  # the hot path: no ABC detour
        b = self.sched.backends.get(key)
        if b is None:
            return default
        if not b.healthy:
            return LiveState(math.inf, False)
        can = b.can_start_emergency if self.emergency else b.can_start
        wait = b.free_at - self.now
        if wait < 0.0:
            # past its predicted end but still running: an overrun is not a free slot; expect
            # about half as long again as it has run so far (runtimes are heavy-tailed)
            wait = 0.0 if can else max(0.5 * (self.now - b.free_run_started), 0.0)
        if self.ahead:
            extra = self.ahead.get(key)
            if extra:
                wait += extra / max(b.spec.slots, 1)
        return LiveState(wait, can)

    def __getitem__(self, key: str) -> LiveState:
        state = self.get(key)
        if state is None:
            raise KeyError(key)
        return state

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.sched.backends)

    def __len__(self) -> int:
        return len(self.sched.backends)


@dataclass
class Decision:
    entry: Entry
    choice: Choice
    scores: dict[str, dict[str, float]] = field(default_factory=dict)   # every backend's, at decision time

    @property
    def explained(self) -> Choice:
        return Choice(self.choice.backend, self.choice.can_start, self.scores or self.choice.scores)


@dataclass
class PassResult:
    dispatch: list[Decision] = field(default_factory=list)
    flagged: list[Entry] = field(default_factory=list)          # newly flagged deadline misses
    unplaceable: list[Entry] = field(default_factory=list)      # no feasible backend at all
    preempt: list[tuple[Run, Entry]] = field(default_factory=list)   # (batch run to stop, emergency job)


_Item = tuple[tuple[int, float, int], int, str]   # (entry key, entry version, job id)


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
        self.node_cpus: dict[str, float] = dict(node_cpus or {})
        self.backends: dict[str, BackendSlotState] = {}
        self.entries: dict[str, Entry] = {}
        self.runs: dict[str, Run] = {}
        self._index: dict[str, list[_Item]] = {}
        self._nodes: dict[str, list[str]] = {}          # node -> backends on it
        self._node_busy: dict[str, float] = {}          # node -> threads in use
        self._startable: set[str] = set()               # backends an emergency job could start on now
        self._seq = itertools.count()
        self._preferred: dict[str, tuple[str, float]] = {}
        self._batch_fifo: collections.deque[str] = collections.deque()
        self._deadlines: list[tuple[float, str]] = []   # (latest start that meets the deadline, job)
        self._pending_unplaceable: list[Entry] = []
        # emergency jobs to consider for preemption at the next pass: new arrivals, and those a
        # pass saw waiting; each is checked once, so a pass never rescans the queue
        self._emergency_new: set[str] = set()
        self._emergency_waiting: dict[str, None] = {}   # insertion-ordered set
        self._emergency_recheck_at = -math.inf
        self._jitter = 12345
        self.examined = 0            # jobs a pass has weighed, in all (benchmarks divide by it)
        self._congestion_checked = -math.inf
        # Free backends whose queued jobs all preferred to wait elsewhere at the last pass: not
        # re-examined until a job is queued for them, a slot frees on their node, or 1 s passes.
        self._declined: dict[str, float] = {}

    # ---- pool -------------------------------------------------------------------------------
    def add_backend(self, spec: BackendSpec, node: str = "local", healthy: bool = True) -> None:
        self.backends[spec.name] = BackendSlotState(spec, node, healthy)
        self._index.setdefault(spec.name, [])
        self._nodes.setdefault(node, []).append(spec.name)
        self.node_cpus.setdefault(node, 1.0)
        self._refresh_node(node)

    def set_health(self, backend: str, healthy: bool) -> None:
        b = self.backends[backend]
        if b.healthy != healthy:
            b.healthy = healthy
            self._refresh_node(b.node)

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
        self._refresh_node(old)
        self._refresh_node(node)

    # ---- queue ------------------------------------------------------------------------------
    def enqueue(self, job: JobView, plan: Plan, arrival: float, seq: int | None = None) -> Entry:
        entry = Entry(job, plan, arrival, next(self._seq) if seq is None else seq,
                      job.priority if job.priority in _RANK else "normal")
        self.entries[job.id] = entry
        if not any(b in self.backends for b in plan.estimates):
            self._pending_unplaceable.append(entry)
            return entry
        self._index_entry(entry)
        if entry.cls == "batch":
            self._batch_fifo.append(job.id)
        elif entry.cls == "emergency":
            self._emergency_new.add(job.id)
        self._count_queued(entry, +1)
        if job.deadline_s is not None:
            # flag at once if the predicted queue already makes it late; and remember the latest
            # start that could still meet the deadline on the fastest backend
            view = LiveView(self, arrival, entry.cls == "emergency")
            self._flag(entry, self.policy.choose(entry, view, arrival), arrival, PassResult())
            fastest = min(e.runtime_s for b, e in plan.estimates.items() if b in self.backends)
            heapq.heappush(self._deadlines, (entry.deadline_at - fastest, job.id))
        return entry

    def _index_entry(self, entry: Entry) -> None:
        item = (entry.key(), entry.version, entry.job.id)
        for b in entry.plan.estimates:
            heap = self._index.get(b)
            if heap is not None:
                heapq.heappush(heap, item)
                self._declined.pop(b, None)

    def remove(self, job_id: str) -> Entry | None:
        """Drop a queued job (started, cancelled, failed); index items go stale and are dropped lazily."""
        entry = self.entries.pop(job_id, None)
        if entry is not None:
            self._count_queued(entry, -1)
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
        return run

    # ---- cached load ------------------------------------------------------------------------
    def _refresh_node(self, node: str, changed: str | None = None, busy_before: float | None = None) -> None:
        """Recompute free_at / can_start of the backends of one node.

        With ``changed`` (a run started or ended there) only that backend and those whose
        core budget is or was short are recomputed: the others' state did not move."""
        names = self._nodes.get(node, ())
        cores = self.node_cpus.get(node, 1.0)
        busy = self._node_busy.get(node, 0.0)
        core_free_at = None
        for name in names:
            b = self.backends[name]
            spec = b.spec
            if (changed is not None and name != changed
                    and (spec.threads <= 0 or (cores - busy >= spec.threads
                                               and cores - (busy_before or 0.0) >= spec.threads))):
                continue
            slots = max(spec.slots, 1)
            hold = max(self.config.reserved.get(name, 0)
                       - sum(1 for r in b.runs.values() if r.priority == "emergency"), 0)
            free_e = spec.slots - len(b.runs)
            can_e = b.healthy and free_e > 0
            can = can_e and free_e - hold > 0
            runs = sorted(b.runs.values(), key=lambda r: r.ends)
            free_at, free_started = 0.0, 0.0
            if not can and runs:
                r = runs[min(len(runs) - 1, max(len(runs) + hold - slots, 0))]
                free_at, free_started = r.ends, r.started
            if spec.threads > 0 and cores - busy < spec.threads:
                if core_free_at is None:
                    core_free_at = min((r.ends for n in names for r in self.backends[n].runs.values()
                                        if self.backends[n].spec.threads > 0), default=0.0)
                can = can_e = False
                if core_free_at > free_at:
                    free_at, free_started = core_free_at, 0.0
            b.free_at, b.free_run_started, b.can_start, b.can_start_emergency = free_at, free_started, can, can_e
            self._declined.pop(name, None)
            if can_e:
                self._startable.add(name)
            else:
                self._startable.discard(name)

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
        return (running_left + b.queued_work_s) / max(b.spec.slots, 1)

    # ---- the pass -----------------------------------------------------------------------------
    def _age(self, now: float) -> None:
        """Promote batch jobs that waited ``aging_s``: arrival order, so only the head is checked."""
        fifo = self._batch_fifo
        while fifo:
            entry = self.entries.get(fifo[0])
            if entry is None or entry.cls != "batch":
                fifo.popleft()
                continue
            if self.config.aging_s <= 0 or now - entry.arrival < self.config.aging_s:
                return
            fifo.popleft()
            entry.cls = "normal"
            entry.version += 1
            self._index_entry(entry)

    def _congestion(self, now: float) -> frozenset[str]:
        """QPUs whose predicted wait passed the high mark (until it falls below the low one).
        Re-evaluated at most once a second: waits move on that time scale, not per decision."""
        if now - self._congestion_checked >= 1.0:
            self._congestion_checked = now
            for name, b in self.backends.items():
                if b.spec.kind != "qpu":
                    continue
                w = self.predicted_wait(name, now)
                if b.congested and w < self.config.qpu_wait_low_s:
                    b.congested = False
                elif not b.congested and w > self.config.qpu_wait_high_s:
                    b.congested = True
        return frozenset(n for n, b in self.backends.items() if b.congested)

    def _exclusions(self, entry: Entry, congested: frozenset[str]) -> frozenset[str]:
        """Congested QPUs an ``auto`` job may skip: only if a simulator meets its floor."""
        if entry.job.intent != "auto" or not congested:
            return frozenset()
        floor = entry.job.fidelity_min or 0.0
        sims_ok = any(self.backends[b].spec.kind == "simulator" and e.fidelity >= floor
                      for b, e in entry.plan.estimates.items() if b in self.backends)
        return frozenset(b for b in entry.plan.estimates if b in congested) if sims_ok else frozenset()

    def _head(self, backend: str, skip: set[str], parked: list[tuple[str, _Item]]) -> _Item | None:
        """Best current item of a backend's index. Stale items are dropped; items of jobs that
        chose to wait in this pass are parked and pushed back after it."""
        heap = self._index[backend]
        while heap:
            key, version, job_id = heap[0]
            entry = self.entries.get(job_id)
            if entry is None or entry.version != version:
                heapq.heappop(heap)
            elif job_id in skip:
                parked.append((backend, heapq.heappop(heap)))
            else:
                return heap[0]
        return None

    def decide(self, now: float) -> PassResult:
        """One pass: which queued jobs start where, now; flags, preemptions, unplaceable jobs."""
        out = PassResult()
        congested = self._congestion(now)
        self._expire_deadlines(now, out)
        for entry in self._pending_unplaceable:
            if self.entries.pop(entry.job.id, None) is not None:
                out.unplaceable.append(entry)
        self._pending_unplaceable.clear()
        if not self.entries:
            return out
        self._age(now)
        ahead: dict[str, float] = {}      # runtime of jobs examined this pass that wait for a backend
        skip: set[str] = set()
        parked: list[tuple[str, _Item]] = []
        misses = 0
        # the heads of the startable backends' indexes, best first; a backend is re-pushed with
        # its next head after each examined job, so a pass costs O(startable + examined·log)
        declined = self._declined
        heads: list[tuple[_Item, str]] = []
        for b in self._startable:
            if self._index[b] and declined.get(b, -math.inf) <= now:
                item = self._head(b, skip, parked)
                if item is not None:
                    heads.append((item, b))
        heapq.heapify(heads)
        examined: set[str] = set()
        live_n, live_e = LiveView(self, now, False, ahead), LiveView(self, now, True, ahead)
        while heads and misses < self.config.lookahead:
            item, backend = heapq.heappop(heads)
            job_id = item[2]
            entry = self.entries.get(job_id)
            if entry is None or entry.version != item[1] or job_id in skip:
                # taken or skipped since this head was read: re-read the backend's head
                if backend in self._startable:
                    nxt = self._head(backend, skip, parked)
                    if nxt is not None:
                        heapq.heappush(heads, (nxt, backend))
                continue
            examined.add(backend)
            self.examined += 1
            emergency = entry.cls == "emergency"
            live = live_e if emergency else live_n
            entry.excluded = self._exclusions(entry, congested) if congested else frozenset()
            choice = self.policy.choose(entry, live, now)
            if choice.backend is None:
                out.unplaceable.append(entry)
                self.remove(job_id)
                continue
            if entry.flagged is None and entry.job.deadline_s is not None:
                self._flag(entry, choice, now, out)
            if choice.can_start:
                scores = select(entry.job, entry.plan, live, detailed=True).scores if self.config.explain else {}
                out.dispatch.append(Decision(entry, choice, scores))
                self.start(job_id, choice.backend, now, entry.plan.estimates[choice.backend].runtime_s)
            else:
                # it prefers to wait (for a busy backend, or a slot reserved for emergencies)
                skip.add(job_id)
                misses += 1
                if emergency:
                    self._emergency_new.add(job_id)   # may need a preemption after all
                if choice.backend in entry.plan.estimates:
                    ahead[choice.backend] = (ahead.get(choice.backend, 0.0)
                                             + entry.plan.estimates[choice.backend].runtime_s)
            if backend in self._startable:
                nxt = self._head(backend, skip, parked)
                if nxt is not None:
                    heapq.heappush(heads, (nxt, backend))
        for backend, item in parked:
            heapq.heappush(self._index[backend], item)
        # free backends whose queued jobs all chose to wait elsewhere are not re-read until
        # something changes for them; a jittered timeout (overruns make waits grow) spreads
        # their re-reading over passes instead of one pass re-reading them all
        for b in examined:
            if b in self._startable and self._index[b]:
                declined[b] = now + self._decline_ttl()
        self._preemptions(now, out)
        return out

    def _decline_ttl(self) -> float:
        self._jitter = (self._jitter * 1103515245 + 12345) & 0x7FFFFFFF
        return 1.0 + self._jitter / 0x7FFFFFFF

    def _preemptions(self, now: float, out: PassResult) -> None:
        """Emergency jobs that cannot start anywhere may take a long batch simulator run's slot."""
        if not self.config.preemption:
            return
        taken: set[str] = set()
        candidates, self._emergency_new = self._emergency_new, set()
        if now - self._emergency_recheck_at >= 1.0 and self._emergency_waiting:
            # jobs checked before that are still waiting: loads move (overruns, batch runs
            # starting), so they are looked at again — once a second, a bounded number per
            # pass, oldest first, so a pass never rescans a long emergency queue
            self._emergency_recheck_at = now
            waiting = self._emergency_waiting
            for job_id in list(itertools.islice(waiting, self.config.preempt_recheck_batch)):
                del waiting[job_id]
                candidates.add(job_id)
        for job_id in candidates:
            entry = self.entries.get(job_id)
            if entry is None:
                continue
            if any(self.backends[b].can_start_emergency for b in entry.plan.estimates if b in self.backends):
                # a backend is free for it: the pass starts it, or it chose to wait for a better one
                self._emergency_waiting[job_id] = None
                continue
            victim = self._victim(entry, now, taken)
            if victim is None:
                self._emergency_waiting[job_id] = None   # nothing worth stopping now; looked at again
            else:
                taken.add(victim.job_id)
                out.preempt.append((victim, entry))

    def _victim(self, entry: Entry, now: float, taken: set[str]) -> Run | None:
        """The batch simulator run whose slot would serve this emergency job best — and only if
        taking it beats the job's best option as things stand (waiting for a busy backend may
        be better than a slow free one: then stopping someone's work gains nothing)."""
        current = select(entry.job, entry.plan, LiveView(self, now, True))
        if current.backend is None:
            return None
        best_obj = current.scores[current.backend]["objective"]
        static = static_objective(entry.plan, entry.job.priority, entry.job.intent)
        best: Run | None = None
        for b, est in entry.plan.estimates.items():
            state = self.backends.get(b)
            if state is None or state.spec.kind != "simulator" or not state.healthy:
                continue
            obj = math.log(max(est.runtime_s, 1e-6)) + static[b]
            if obj >= best_obj:
                continue
            for run in state.runs.values():
                if (run.priority == "batch" and run.job_id not in taken
                        and run.remaining(now) >= self.config.preempt_min_remaining_s):
                    best_obj, best = obj, run
                    break
        return best

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
            latest, job_id = heapq.heappop(heap)
            entry = self.entries.get(job_id)
            if entry is not None and entry.flagged is None:
                entry.flagged = f"still queued {now - latest:.3g} s after the latest start that meets its deadline"
                out.flagged.append(entry)

    def requeue(self, run: Run, job: JobView, plan: Plan, arrival: float, seq: int | None = None) -> Entry:
        """A preempted (or failed-over) run goes back to the queue, keeping its place in line."""
        self.finish(run.job_id)
        return self.enqueue(job, plan, arrival, seq)
