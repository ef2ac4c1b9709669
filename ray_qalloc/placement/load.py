"""Per-backend load as placement sees it: runs, when a slot frees, and the waits a decision reads.

Why a module of its own: the scheduler caches each backend's load and refreshes it only where a
run started or ended; ``backend_load`` is the one formula for that cache, for
``validate_state`` and for every view, and ``LiveView`` is the one place a decision reads a
wait from. Pure Python over value objects, like the rest of placement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.placement.hedging import REMAINING_PER_ELAPSED
from ray_qalloc.placement.model import LiveState
from ray_qalloc.placement.pipeline import Choice, objective_rows, score_row
from ray_qalloc.priority import CLASSES

if TYPE_CHECKING:  # pragma: no cover
    from ray_qalloc.placement.scheduler import Entry, Scheduler

__all__ = ["BackendSlotState", "Load", "LiveView", "Run", "backend_load", "backend_load_full", "emergency_threads",
           "first_core_run"]

_EMERGENCY = CLASSES[0]
_SIZED = (list, tuple, type({}.values()))   # what a refresh passes: len() without a copy


@dataclass(frozen=True)
class Run:
    job_id: str
    backend: str
    priority: str
    started: float
    predicted_s: float
    ends: float = field(init=False)   # predicted end: read on every load refresh, so stored once

    def __post_init__(self) -> None:
        object.__setattr__(self, "ends", self.started + self.predicted_s)

    def remaining(self, now: float) -> float:
        return max(self.ends - now, 0.0)


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
    free_at_emergency: float = 0.0    # the same for an emergency job: reserved slots are its own
    free_run_started_emergency: float = 0.0
    # wait that is not ours to see run: jobs of other users ahead in a QPU provider's queue
    external_wait_s: float = 0.0


Load = tuple[float, float, bool, float, float, bool]   # free_at, its run's start, can_start; the same for emergency


def backend_load(spec: BackendSpec, healthy: bool, runs: Iterable[Run], reserved: int,
                 short: bool, short_emergency: bool, core_first: Run | None, never: bool = False) -> Load:
    """When a backend can next take a job, for other jobs and for emergency ones.

    ``reserved``: its slots kept for emergency jobs (emergency runs count against them, so
    the hold grows again as they end: the wait walks the runs in order of their predicted
    end); ``short`` / ``short_emergency``: its node's free cores (less the pool's emergency
    hold, for other jobs) are fewer than its threads; ``never``: the pool's reserved cores
    leave too few for it whatever ends; ``core_first``: the thread-holding run on the node
    predicted to end first (the wait for a core is taken as the wait for that run). The one
    formula, so that the cache, ``validate_state`` and every view agree. A slot that never
    frees for other jobs (all reserved) is infinitely far: they must not wait for it.

    A free slot with nothing reserved and cores enough (most backends on every refresh) needs
    neither the runs' order nor their classes, so it is answered without them;
    ``backend_load_full`` is the same formula without that shortcut (the tests' oracle)."""
    if not reserved and not short and not short_emergency and isinstance(runs, _SIZED) and spec.slots > len(runs):
        return 0.0, 0.0, healthy, 0.0, 0.0, healthy
    return backend_load_full(spec, healthy, runs, reserved, short, short_emergency, core_first, never)


def backend_load_full(spec: BackendSpec, healthy: bool, runs: Iterable[Run], reserved: int,
                      short: bool, short_emergency: bool, core_first: Run | None, never: bool = False) -> Load:
    """``backend_load`` without its free-slot shortcut: the reference the tests compare it to."""
    runs = runs if isinstance(runs, (list, tuple)) else list(runs)
    free = spec.slots - len(runs)
    emergency = sum(1 for r in runs if r.priority == _EMERGENCY) if reserved else 0
    hold = max(reserved - emergency, 0)
    at, started = 0.0, 0.0
    at_e, started_e = 0.0, 0.0
    if (free - hold <= 0 or free <= 0) and runs:   # only then does the order of ends matter
        ends = sorted(runs, key=_end_order)
        if free - hold <= 0:
            at = math.inf
            if not reserved:     # no hold: the (1 - free)-th run to end frees a slot
                if -free < len(ends):
                    r = ends[-free]
                    at, started = r.ends, r.started
            else:
                for k, r in enumerate(ends, 1):
                    emergency -= r.priority == _EMERGENCY
                    if free + k - max(reserved - emergency, 0) > 0:
                        at, started = r.ends, r.started
                        break
        if free <= 0:            # the (1 - free)-th run to end frees a slot for an emergency job
            r = ends[min(-free, len(ends) - 1)]
            at_e, started_e = r.ends, r.started
    elif free - hold <= 0:
        at = math.inf
    if never and short:
        at = math.inf
    if core_first is not None:
        if short and core_first.ends > at:
            at, started = core_first.ends, core_first.started
        if short_emergency and core_first.ends > at_e:
            at_e, started_e = core_first.ends, core_first.started
    can_e = healthy and free > 0 and not short_emergency
    can = can_e and free - hold > 0 and not short
    return at, started, can, at_e, started_e, can_e


def _end_order(r: Run) -> tuple[float, float]:
    return (r.ends, r.started)


def emergency_threads(backends: Iterable[BackendSlotState]) -> float:
    """Threads emergency runs hold on these backends: what a pool's reserved cores count against."""
    return sum(b.spec.threads for b in backends for r in b.runs.values() if r.priority == _EMERGENCY)


def first_core_run(backends: Iterable[BackendSlotState]) -> Run | None:
    """The thread-holding run predicted to end first (ties: the one started first, then the
    first met: what ``min`` by ``_end_order`` returns). A plain loop: it runs on every start and
    finish of a simulator run, and the key function cost more than the comparisons."""
    best: Run | None = None
    for b in backends:
        if b.spec.threads > 0:
            for r in b.runs.values():
                if best is None or r.ends < best.ends or (r.ends == best.ends and r.started < best.started):
                    best = r
    return best


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
                 ahead: Mapping[str, float] | None = None, held: Mapping[str, float] | None = None) -> None:
        self.sched, self.now, self.emergency = sched, now, emergency
        self.ahead = ahead if ahead is not None else {}   # shared: a pass adds to it as jobs wait
        self.held = held if held is not None else {}      # work of jobs held waiting (``Holds.work``)

    def extra(self, key: str) -> float:
        """Work of waiting jobs counted ahead on ``key`` (not yet spread over its slots)."""
        return self.ahead.get(key, 0.0) + self.held.get(key, 0.0)

    def get(self, key: str, default: Any = None) -> LiveState | None:  # no ABC detour
        b = self.sched.backends.get(key)
        if b is None:
            return default
        return LiveState(*self.wait_of(key, b))

    def wait_of(self, key: str, b: BackendSlotState) -> tuple[float, bool]:
        """(predicted wait, can start now) of backend ``key`` for a job of this view's class:
        the one formula every decision reads. ``weigh_free`` inlines it (the pass's hot loop);
        ``tests/test_scheduler_fastpath.py`` holds the two to the same decisions."""
        if not b.healthy:
            return math.inf, False
        if self.emergency:
            can, free_at, started = b.can_start_emergency, b.free_at_emergency, b.free_run_started_emergency
        else:
            can, free_at, started = b.can_start, b.free_at, b.free_run_started
        wait = 0.0 if can else free_at - self.now
        if wait < 0.0:
            # past its predicted end but still running: an overrun is not a free slot; expect it
            # to run as long again as it has so far (heavy tails) — the estimate hedging uses too
            wait = max(REMAINING_PER_ELAPSED * (self.now - started), 0.0)
        if self.ahead or self.held:
            extra = self.ahead.get(key, 0.0) + self.held.get(key, 0.0)
            if extra:
                wait += extra / max(b.spec.slots, 1)
        if b.external_wait_s:
            wait += b.external_wait_s   # a free slot of ours still queues behind the provider's line
        return wait, can

    def weigh(self, entry: Entry, seen: list[tuple[str, float, bool]] | None = None, *,
              all_backends: bool = False) -> Choice:
        """``select`` over this view for a queued job, without building a ``LiveState`` per
        backend (the dispatch hot path): the same objective and tie-break — the scheduler tests
        compare the two. ``seen`` collects (backend, wait, can start) as weighed, from which
        ``Decision.explained`` rebuilds every backend's scores only when someone asks.
        ``all_backends``: ignore the pass's exclusions (congestion, maintenance)."""
        return self.weigh_free(entry, seen, all_backends=all_backends)[0]

    def weigh_free(self, entry: Entry, seen: list[tuple[str, float, bool]] | None = None, *,
                   all_backends: bool = False) -> tuple[Choice, float, float, float]:
        """``weigh``, plus what a job that chooses to wait needs next (``Scheduler._latest_end``),
        read on the same walk instead of a second one over its plan: the lowest objective among
        the backends that can start it now (inf: none), and the chosen backend's risk-adjusted
        runtime and fidelity-and-money part of the objective. ``wait_of`` is inlined: this loop
        is most of a pass."""
        job, p = entry.job, entry.plan
        backends = self.sched.backends
        excluded = None if all_backends else entry.excluded
        log = math.log
        now, emergency = self.now, self.emergency
        ahead, held = self.ahead, self.held
        extras = bool(ahead or held)
        best_obj, best_name, best_wait, best_can, best_run, best_base = math.inf, None, 0.0, False, 0.0, 0.0
        best_free = math.inf
        for name, run, base in objective_rows(p, job.priority, job.intent):
            b = backends.get(name)
            if b is None or (excluded and name in excluded):
                continue
            # wait_of(name, b), inline
            if not b.healthy:
                wait, can = math.inf, False
            else:
                if emergency:
                    can = b.can_start_emergency
                    wait = 0.0 if can else b.free_at_emergency - now
                    if wait < 0.0:   # max(x, 0.0) without the call
                        wait = REMAINING_PER_ELAPSED * (now - b.free_run_started_emergency)
                        if wait < 0.0:
                            wait = 0.0
                else:
                    can = b.can_start
                    wait = 0.0 if can else b.free_at - now
                    if wait < 0.0:   # max(x, 0.0) without the call
                        wait = REMAINING_PER_ELAPSED * (now - b.free_run_started)
                        if wait < 0.0:
                            wait = 0.0
                if extras:
                    extra = ahead.get(name, 0.0) + held.get(name, 0.0)
                    if extra:
                        wait += extra / max(b.spec.slots, 1)
                if b.external_wait_s:
                    wait += b.external_wait_s
            completion = wait + run
            objective = log(completion if completion > 1e-6 else 1e-6) + base
            if seen is not None:
                seen.append((name, wait, can))
            if can and objective < best_free and completion == completion:
                best_free = objective
            if objective < best_obj or (objective == best_obj and best_name is not None and name < best_name):
                best_obj, best_name, best_wait, best_can, best_run, best_base = objective, name, wait, can, run, base
        if best_name is None:
            return Choice(None, False, {}), best_free, 0.0, 0.0
        return (Choice(best_name, best_can,
                       {best_name: score_row(best_wait, best_can, p.estimates[best_name], best_run, best_obj)}),
                best_free, best_run, best_base)

    def __getitem__(self, key: str) -> LiveState:
        state = self.get(key)
        if state is None:
            raise KeyError(key)
        return state

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.sched.backends)

    def __len__(self) -> int:
        return len(self.sched.backends)
