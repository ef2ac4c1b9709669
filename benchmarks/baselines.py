"""Baseline placement policies for ``benchmarks.placement``.

Each implements the Scheduler's ``Policy`` protocol (``name`` and ``choose(entry, live, now)
-> Choice``), so the very same ``Scheduler`` (queue, cores, slots, events) runs qalloc and the
baselines; only *where* a job goes, and for the FIFO baselines *in which order*, differs.

The pool world: a node's simulator pool offers candidates (pool, Aer method, threads) to
qalloc. What a user gets **for free** is the pool running Aer's own ``method="automatic"``
(one thread per run, on the same cores) and the QPUs; the free baselines run on exactly
that (``FREE_POOL_POLICIES``: one ``<pool>/automatic`` backend with the pool's cores as slots,
plus the QPUs):

* ``fcfs``          round-robin over the job's feasible backends (the pool counts as one),
                    first-come first-served;
* ``least_loaded``  the feasible backend — pool or QPU — with the most free slots, then the
                    fewest running jobs; on the pool it runs ``automatic``. FIFO;
* ``aer_automatic`` every classical/auto job on the pool with ``automatic``; quantum-intent
                    jobs FIFO on the first free QPU;
* ``best_fidelity`` quantum and auto jobs wait for the QPU with the best predicted fidelity;
                    classical jobs (and jobs no QPU can take) FCFS on the pool;
* ``random``        a uniformly random feasible backend that can start now (seeded), on
                    qalloc's candidates (a random method choice);
* ``qalloc`` and ``hindsight`` are ``QallocPolicy`` (hindsight: qalloc's selector fed the TRUE
  runtimes and fidelities, ``benchmarks.simulation.HindsightPlanner``; a row to read, not a
  bound: the bound is ``benchmarks.simulation.lower_bound``).

None of the baselines learns, hedges or remembers runs: they are what a user gets for free.

Baselines marked ``fifo = True`` see every job with priority ``normal`` and no deadline
(``fifo_view``): they have no priority classes and no EDF, so the scheduler orders them by
arrival; the metrics still use each job's real priority and deadline.

A policy that needs the pool (slot counts, backend kinds) gets the scheduler through
``bind(sched)``; ``benchmarks.simulation.simulate`` calls it once, before the first job.
"""

from __future__ import annotations

import abc

import dataclasses
import math
import random
from typing import Any, Mapping

from ray_qalloc.placement.model import Estimate, JobView, LiveState
from ray_qalloc.placement.pipeline import Choice
from ray_qalloc.placement.scheduler import Entry, Policy, QallocPolicy

POLICIES: tuple[str, ...] = ("qalloc", "fcfs", "least_loaded", "aer_automatic", "best_fidelity", "random",
                             "hindsight")
AUTOMATIC = "aer_automatic"
BASELINES: tuple[str, ...] = ("fcfs", "least_loaded", "aer_automatic", "best_fidelity", "random")
FREE_POOL_POLICIES: frozenset[str] = frozenset({"fcfs", "least_loaded", "aer_automatic", "best_fidelity"})


def fifo_view(job: JobView) -> JobView:
    """The job as a FIFO baseline's queue sees it: no class, no deadline."""
    if job.priority == "normal" and job.deadline_s is None:
        return job
    return dataclasses.replace(job, priority="normal", deadline_s=None)


def score(state: LiveState, est: Estimate) -> dict[str, float]:
    """The scores a Choice carries for its backend (the keys ``select`` writes)."""
    completion = state.wait_s + est.runtime_s
    return {"wait_s": state.wait_s, "runtime_s": est.runtime_s, "completion_s": completion,
            "fidelity": est.fidelity, "cost": est.cost,
            "objective": math.log(max(completion, 1e-6))}


class _Baseline(abc.ABC):
    """Shared plumbing: the job's options (plan ∩ live pool), in pool order."""

    name = "baseline"
    fifo = True

    def __init__(self) -> None:
        self.sched: Any = None
        self._order: dict[str, int] = {}

    def bind(self, sched: Any) -> None:
        self.sched = sched
        self._order = {name: i for i, name in enumerate(sched.backends)}

    def _is_automatic(self, backend: str) -> bool:
        b = self.sched.backends.get(backend) if self.sched is not None else None
        return b is not None and b.spec.method == "automatic"

    def _kind(self, backend: str) -> str:
        b = self.sched.backends.get(backend) if self.sched is not None else None
        return b.spec.kind if b is not None else ("qpu" if backend.startswith(("qpu_", "ibm_")) else "simulator")

    def _options(self, entry: Entry, live: Mapping[str, LiveState]) -> list[tuple[str, Estimate, LiveState]]:
        out = []
        for name, est in entry.plan.estimates.items():
            state = live.get(name)
            if state is not None:
                out.append((name, est, state))
        out.sort(key=lambda o: (self._order.get(o[0], len(self._order)), o[0]))
        return out

    @staticmethod
    def _pick(option: tuple[str, Estimate, LiveState]) -> Choice:
        name, est, state = option
        return Choice(name, state.can_start, {name: score(state, est)})

    def _first_free_or_wait(self, options: list[tuple[str, Estimate, LiveState]]) -> Choice:
        """The first option (pool order) that can start now, else wait for the soonest free."""
        if not options:
            return Choice(None, False, {})
        for opt in options:
            if opt[2].can_start:
                return self._pick(opt)
        return self._soonest(options)

    def _soonest(self, options: list[tuple[str, Estimate, LiveState]]) -> Choice:
        """Nothing can start now: wait for the backend predicted to free first (pool order on ties)."""
        return self._pick(min(options, key=lambda o: (o[2].wait_s, self._order.get(o[0], 0))))

    @abc.abstractmethod
    def choose(self, entry: Entry, live: Mapping[str, LiveState], now: float) -> Choice:
        """Each baseline's rule (the Scheduler's ``Policy`` protocol)."""


class FcfsPolicy(_Baseline):
    """Round-robin: a job takes the next backend after the last one used, among those of its
    feasible backends that can start now; when none can, it waits (arrival order, no classes)."""

    name = "fcfs"

    def __init__(self) -> None:
        super().__init__()
        self._next = 0

    def choose(self, entry: Entry, live: Mapping[str, LiveState], now: float) -> Choice:
        options = self._options(entry, live)
        if not options:
            return Choice(None, False, {})
        free = [o for o in options if o[2].can_start]
        if not free:
            return self._soonest(options)
        n = max(len(self._order), 1)
        pick = min(free, key=lambda o: (self._order.get(o[0], 0) - self._next) % n)
        self._next = (self._order.get(pick[0], 0) + 1) % n
        return self._pick(pick)


class LeastLoadedPolicy(_Baseline):
    """The feasible backend with the most free slots, then the fewest running jobs, then the
    shortest predicted wait (FIFO order). Backends that can start now come first."""

    name = "least_loaded"

    def choose(self, entry: Entry, live: Mapping[str, LiveState], now: float) -> Choice:
        options = self._options(entry, live)
        if not options:
            return Choice(None, False, {})

        def load(o: tuple[str, Estimate, LiveState]) -> tuple[Any, ...]:
            b = self.sched.backends[o[0]]
            running = len(b.runs)
            return (not o[2].can_start, -(b.spec.slots - running), running, o[2].wait_s, self._order.get(o[0], 0))

        return self._pick(min(options, key=load))


class AerAutomaticPolicy(_Baseline):
    """Aer's own ``method="automatic"`` on the pool (its cores as slots, one thread per run) for
    every classical and auto job; quantum-intent jobs FIFO on the first free QPU.

    The pool this policy runs on is built by ``benchmarks.placement``: one ``<pool>/automatic``
    backend plus the QPUs. A job whose plan has no automatic estimate (filtered out) falls back
    to the first free of its other options."""

    name = "aer_automatic"

    def choose(self, entry: Entry, live: Mapping[str, LiveState], now: float) -> Choice:
        options = self._options(entry, live)
        if entry.job.intent == "quantum":
            return self._first_free_or_wait([o for o in options if self._kind(o[0]) == "qpu"] or options)
        auto = [o for o in options if self._is_automatic(o[0])]
        if auto:
            return self._pick(auto[0])
        return self._first_free_or_wait(options)


class BestFidelityPolicy(_Baseline):
    """Quantum and auto jobs wait for the QPU of best predicted fidelity (ties: pool order);
    classical jobs, and jobs no QPU can take, run FCFS on the first free simulator."""

    name = "best_fidelity"

    def choose(self, entry: Entry, live: Mapping[str, LiveState], now: float) -> Choice:
        options = self._options(entry, live)
        if entry.job.intent in ("quantum", "auto"):
            qpus = [o for o in options if self._kind(o[0]) == "qpu"]
            if qpus:
                return self._pick(max(qpus, key=lambda o: (o[1].fidelity, -self._order.get(o[0], 0))))
        sims = [o for o in options if self._kind(o[0]) != "qpu"]
        return self._first_free_or_wait(sims or options)


class RandomPolicy(_Baseline):
    """A uniformly random feasible backend among those that can start now (seeded); when none
    can, the job waits (for the soonest free, so that the choice is made again at the next pass)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.rng = random.Random(seed)

    def choose(self, entry: Entry, live: Mapping[str, LiveState], now: float) -> Choice:
        options = self._options(entry, live)
        if not options:
            return Choice(None, False, {})
        free = [o for o in options if o[2].can_start]
        if not free:
            return self._soonest(options)
        return self._pick(self.rng.choice(free))


class HindsightPolicy(QallocPolicy):
    """qalloc's selector on plans made of the true runtimes and fidelities: what better
    predictions could buy the selector; not a bound on the schedule."""

    name = "hindsight"


def make_policy(name: str, seed: int = 0) -> Policy:
    """A fresh policy by name (each simulation needs its own: some keep state)."""
    factories: dict[str, Any] = {
        "qalloc": QallocPolicy, "hindsight": HindsightPolicy, "fcfs": FcfsPolicy,
        "least_loaded": LeastLoadedPolicy, "aer_automatic": AerAutomaticPolicy,
        "best_fidelity": BestFidelityPolicy, "random": lambda: RandomPolicy(seed),
    }
    if name not in factories:
        raise ValueError(f"unknown policy {name!r}; use one of {', '.join(POLICIES)}")
    return factories[name]()


__all__ = ["POLICIES", "AUTOMATIC", "BASELINES", "FREE_POOL_POLICIES", "fifo_view", "score", "make_policy", "FcfsPolicy", "LeastLoadedPolicy",
           "AerAutomaticPolicy", "BestFidelityPolicy", "RandomPolicy", "HindsightPolicy"]
