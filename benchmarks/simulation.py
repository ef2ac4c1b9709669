"""The placement benchmark's simulation core: pure, no Aer, no measuring (tests feed it hand-made truth).

A discrete-event simulation of one pool world, driven by the same ``Scheduler`` the allocator
runs. What happens, and why it mirrors the live allocator:

* **Planning at arrival.** Each job is planned when it arrives, through a ``Planner`` (the
  pipeline's filters and the predictor, as the allocator does at enqueue), so that what the
  predictor learned from earlier completions shapes later plans.
* **Learning on completion.** A completed QPU run whose fidelity was measured calls
  ``planner.observe_fidelity(backend, measured, job)`` where the planner has it (live: the
  fidelity meter). A completed run calls ``planner.observe(backend, predicted_s,
  actual_s, job)``; a run stopped before its end (preempted, or the loser of a hedge) calls
  ``planner.stopped(backend, predicted_s, elapsed_s, job)`` — a censored lower bound on its
  runtime. Baselines get a planner that learns nothing (what a user gets for free).
* **Hedging.** With a ``hedger``, the simulation checks every ``hedge_check_s`` of simulated
  time while some run is past its predicted end, and hands the hedger the overrunning runs; it
  answers with ``HedgeAction``s: ``backup`` (start another run of the job on another candidate,
  if that candidate can start now; the first run to finish completes the job, the others are
  stopped and their elapsed time is paid) or ``stop`` (stop one run; a job left with no run is
  re-queued with its place in line, as after a preemption).
* **Preemption.** An emergency job may take a batch run's core; the victim's work is lost, its
  elapsed time paid, and it is re-queued with its original place in line.

The pool world: each spec goes on the node ``spec.pool`` (simulator candidates of one pool
share its core budget, ``node_cpus[pool]``: a free core is free for any method), a simulator
without a pool on node ``"local"``, and a QPU on a node of its own (``threads=0``: it uses no
local core). Concurrent runs on the cores are assumed not to slow each other down (each was
measured alone).
"""

from __future__ import annotations

import heapq
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

from benchmarks.baselines import fifo_view, make_policy
from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.placement.model import Estimate, JobView, LiveState, Plan
from ray_qalloc.placement.scheduler import Scheduler, SchedulerConfig

DEFAULT_PENALTY_S = 60.0
DEFAULT_HEDGE_CHECK_S = 0.5
LOCAL_NODE = "local"

#: Key of the per-job figures a policy's metrics carry for paired ratios (``report.ratios``);
#: taken out before the JSON is written.
PAIRED = "_paired"
METRICS: tuple[str, ...] = ("mean_jct_s", "p95_jct_s", "makespan_s", "deadline_miss_rate", "emergency_p99_wait_s",
                            "mean_fidelity_quantum", "total_cost")


@dataclass(frozen=True)
class SimJob:
    """One accepted job of the trace: its arrival, its view (real priority and deadline), its case."""

    id: str
    arrival_s: float
    view: JobView
    case_id: str | None = None


class Planner(Protocol):
    """Plans a job at its arrival and learns from how runs ended."""

    def plan(self, job: SimJob, now: float) -> Plan | None: ...

    def observe(self, backend: str, predicted_s: float, actual_s: float, job: SimJob) -> None: ...

    def stopped(self, backend: str, predicted_s: float, elapsed_s: float, job: SimJob) -> None: ...


class FixedPlans:
    """Plans made beforehand (tests, hindsight); learns nothing but records what it was told."""

    def __init__(self, plans: Mapping[str, Plan]) -> None:
        self.plans = plans
        self.observed: list[tuple[str, float, float]] = []

    def plan(self, job: SimJob, now: float) -> Plan | None:
        return self.plans.get(job.id)

    def observe(self, backend: str, predicted_s: float, actual_s: float, job: SimJob) -> None:
        self.observed.append((backend, predicted_s, actual_s))

    def stopped(self, backend: str, predicted_s: float, elapsed_s: float, job: SimJob) -> None:
        pass


class PipelinePlanner:
    """The allocator's enqueue step: the pipeline's filters, then ONE batched predictor call.

    ``learn=False`` (baselines) never tells the predictor anything. With ``learn=True`` a
    completion goes to ``predictor.observe(backend, predicted_s, actual_s)`` (the online
    correction the allocator applies), and, where the predictor has them, to
    ``observe_run(job, backend, predicted_s, actual_s)`` / ``observe_censored(job, backend,
    predicted_s, elapsed_s)`` (per-circuit run memory)."""

    def __init__(self, views: Sequence[Any], predictor: Any, *, learn: bool = True, settings: Any = None) -> None:
        """``settings``: the typed settings whose filters and class weights the allocator uses
        (``ray_qalloc.config.Settings``; default: the defaults)."""
        from ray_qalloc.config import Settings
        from ray_qalloc.placement.filters import make_filters

        settings = settings or Settings()
        self.views = list(views)
        self.predictor = predictor
        self.learn = learn
        self.observations = 0
        self.filters = make_filters(settings.tenant_backends, settings.max_calibration_age_s, health=False,
                                    coherence_budget=settings.placement.coherence_budget)
        self.weights = settings.placement.table()

    def plan(self, job: SimJob, now: float) -> Plan | None:
        from ray_qalloc.placement.pipeline import plan

        return plan(job.view, self.views, self.predictor, self.filters, self.weights)

    def observe(self, backend: str, predicted_s: float, actual_s: float, job: SimJob) -> None:
        if not self.learn:
            return
        self.observations += 1
        run = getattr(self.predictor, "observe_run", None)
        if run is not None:
            run(job.view, backend, predicted_s, actual_s)
            return
        obs = getattr(self.predictor, "observe", None)
        if obs is not None:
            obs(backend, predicted_s, actual_s)

    def stopped(self, backend: str, predicted_s: float, elapsed_s: float, job: SimJob) -> None:
        censored = getattr(self.predictor, "observe_censored", None) if self.learn else None
        if censored is not None:
            censored(job.view, backend, predicted_s, elapsed_s)


class HindsightPlanner:
    """The base planner's feasible set with TRUE runtimes and fidelities: qalloc's selector fed
    truth. A policy row for reading, not a bound (the lower bound is ``lower_bound``)."""

    def __init__(self, base: Planner, truth: Mapping[str, Mapping[str, float]],
                 fidelity: Mapping[str, Mapping[str, float]], prices: Mapping[str, Any], penalty_s: float) -> None:
        self.base, self.truth, self.fidelity, self.prices, self.penalty_s = base, truth, fidelity, prices, penalty_s

    def plan(self, job: SimJob, now: float) -> Plan | None:
        p = self.base.plan(job, now)
        if p is None:
            return None
        t_row, f_row = self.truth.get(job.id, {}), self.fidelity.get(job.id, {})
        est = {}
        for b, e in p.estimates.items():
            t = t_row.get(b)
            t = self.penalty_s if t is None or not math.isfinite(t) else t
            price = self.prices.get(b)
            cost = price.cost(t, job.view.shots) if price is not None else e.cost
            est[b] = Estimate(b, t, f_row.get(b, e.fidelity), cost, e.memory_bytes, "truth")
        return Plan(job.id, est, dict(p.filtered))

    def observe(self, backend: str, predicted_s: float, actual_s: float, job: SimJob) -> None:
        pass

    def stopped(self, backend: str, predicted_s: float, elapsed_s: float, job: SimJob) -> None:
        pass


@dataclass(frozen=True)
class RunView:
    """A running run, as the hedger sees it."""

    run_id: str
    job: JobView
    backend: str
    started_s: float
    predicted_s: float
    elapsed_s: float
    plan: Plan
    backup: bool            # this run is a backup
    has_backup: bool = False   # its job has (or had) a backup: at most one per job, as live


@dataclass(frozen=True)
class HedgeAction:
    """``backup``: start ``job_id`` also on ``backend``; ``stop``: stop run ``run_id``;
    ``restart``: stop run ``run_id`` and queue its job again without that run's backend."""

    kind: str
    job_id: str = ""
    backend: str = ""
    run_id: str = ""


Hedger = Callable[[float, Sequence[RunView], Mapping[str, LiveState]], Sequence[HedgeAction]]


@dataclass
class _Run:
    run_id: str
    job_id: str
    backend: str
    started: float
    runtime: float
    predicted: float
    gen: int
    backup: bool = False


@dataclass
class _Outcome:
    first_start: float | None = None
    start: float | None = None
    completion: float | None = None
    backend: str | None = None
    runs: int = 0


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def node_of(spec: BackendSpec) -> str:
    if spec.kind == "qpu":
        return f"qpu:{spec.name}"
    return spec.pool or LOCAL_NODE


def _cores(node_cpus: Mapping[str, float] | float, pool: Sequence[BackendSpec]) -> dict[str, float]:
    if isinstance(node_cpus, Mapping):
        out = dict(node_cpus)
    else:
        out = {node_of(s): float(node_cpus) for s in pool if s.kind != "qpu"}
    for s in pool:
        if s.kind == "qpu":
            out.setdefault(node_of(s), 1.0)
    return out


class _Sim:
    """One simulation's state (``simulate`` is its only entry point)."""

    def __init__(self, jobs: Sequence[SimJob], truth: Mapping[str, Mapping[str, float]], planner: Planner,
                 pool: Sequence[BackendSpec], policy: Any, *, node_cpus: Mapping[str, float] | float,
                 penalty_s: float, config: SchedulerConfig | None, hedger: Hedger | None,
                 hedge_check_s: float, prober: Hedger | None = None,
                 fidelity: Mapping[str, Mapping[str, float]] | None = None,
                 unmeasured: set[tuple[str, str]] | None = None) -> None:
        self.jobs, self.truth, self.planner, self.penalty_s = jobs, truth, planner, penalty_s
        self.fidelity, self.unmeasured = fidelity or {}, unmeasured or set()
        self.policy, self.hedger, self.hedge_check_s = policy, hedger, hedge_check_s
        self.prober = prober
        self.probes = 0
        self.probe_runs: set[str] = set()
        self.specs = {s.name: s for s in pool}
        self.fifo = bool(getattr(policy, "fifo", False))
        self.sched = Scheduler(config or SchedulerConfig(explain=False), policy, node_cpus=_cores(node_cpus, pool))
        for spec in pool:
            self.sched.add_backend(spec, node_of(spec))
        if hasattr(policy, "bind"):
            policy.bind(self.sched)
        self.by_id = {j.id: j for j in jobs}
        self.views: dict[str, JobView] = {}
        self.plans: dict[str, Plan] = {}
        self.seqs: dict[str, int] = {}
        self.outcome = {j.id: _Outcome() for j in jobs}
        self.running: dict[str, _Run] = {}           # run id -> run
        self.job_runs: dict[str, set[str]] = {}      # job id -> its run ids
        self.unplaceable: set[str] = set()
        self.flagged: set[str] = set()
        self.cost = 0.0
        self.preemptions = 0
        self.lost_work = 0.0
        self.hedges = 0
        self.restarts = 0
        self.hedge_wasted = 0.0
        self.backed_up: set[str] = set()
        self.gen = 0
        self.passes = 0
        self.tie = 0
        self.events: list[tuple[float, int, int, str, int]] = []   # (time, kind, tie, id, gen)
        self.next_tick = math.inf
        for j in jobs:
            self._push(float(j.arrival_s), 1, j.id, 0)

    # -- events: 0 completion, 1 arrival, 2 hedge check --------------------------------------
    def _push(self, t: float, kind: int, ident: str, gen: int) -> None:
        self.tie += 1
        heapq.heappush(self.events, (t, kind, self.tie, ident, gen))

    def _want_tick(self, t: float) -> None:
        if self.hedger is not None and t < self.next_tick:
            self.next_tick = t
            self._push(t, 2, "", 0)

    def true_runtime(self, jid: str, backend: str) -> float:
        t = self.truth.get(jid, {}).get(backend)
        return self.penalty_s if t is None or not math.isfinite(t) else float(t)

    def _start(self, run_id: str, jid: str, backend: str, now: float, predicted: float, backup: bool) -> None:
        rt = self.true_runtime(jid, backend)
        self.gen += 1
        self.running[run_id] = _Run(run_id, jid, backend, now, rt, predicted, self.gen, backup)
        self.job_runs.setdefault(jid, set()).add(run_id)
        o = self.outcome[jid]
        o.first_start = now if o.first_start is None else o.first_start
        if not backup:
            o.start = now
        o.runs += 1
        self._push(now + rt, 0, run_id, self.gen)
        self._want_tick(now + max(predicted, 0.0))

    def _restart(self, run_id: str, now: float) -> None:
        """As live (``RunLife.restart``): stop an overrunning run that has no twin and queue its job
        again, keeping its place, planned afresh (run memory now holds the overrun) without the
        backend that overran."""
        run = self.running.get(run_id)
        if run is None or self.job_runs.get(run.job_id) != {run_id}:
            return
        self.restarts += 1
        self._stop(run_id, now, requeue_if_last=True, replan_without=run.backend)

    def _stop(self, run_id: str, now: float, *, requeue_if_last: bool, learn: bool = True,
              replan_without: str | None = None) -> None:
        """End a run early; the last run of an unfinished job is queued again (keeping its place)
        with its plan, or — ``replan_without`` — planned afresh without that backend."""
        run = self.running.pop(run_id, None)
        if run is None:
            return
        self.sched.finish(run_id)
        self.probe_runs.discard(run_id)
        elapsed = now - run.started
        self.cost += self.specs[run.backend].price.cost(elapsed, self.by_id[run.job_id].view.shots)
        if learn:
            self.planner.stopped(run.backend, run.predicted, elapsed, self.by_id[run.job_id])
        runs = self.job_runs.get(run.job_id, set())
        runs.discard(run_id)
        if requeue_if_last and not runs and self.outcome[run.job_id].completion is None:
            self.lost_work += elapsed
            jid = run.job_id
            job = self.by_id[jid]
            if replan_without is not None:
                p = self.planner.plan(job, now)
                estimates = {} if p is None else {b: e for b, e in p.estimates.items()
                                                  if b in self.specs and b != replan_without}
                if not estimates:
                    self.unplaceable.add(jid)
                    return
                self.plans[jid] = Plan(jid, estimates, dict(p.filtered))
            self.sched.enqueue(self.views[jid], self.plans[jid], job.arrival_s, self.seqs[jid])
        else:
            self.hedge_wasted += elapsed

    def _complete(self, run: _Run, now: float) -> None:
        del self.running[run.run_id]
        self.sched.finish(run.run_id)
        job = self.by_id[run.job_id]
        self.cost += self.specs[run.backend].price.cost(run.runtime, job.view.shots)
        o = self.outcome[run.job_id]
        o.completion, o.backend = now, run.backend
        if run.backup:
            o.start = run.started
        self.planner.observe(run.backend, run.predicted, run.runtime, job)
        self._measured(run.backend, job)
        for other in list(self.job_runs.get(run.job_id, ())):
            if other != run.run_id:
                self._stop(other, now, requeue_if_last=False)
        self.job_runs.pop(run.job_id, None)

    def _measured(self, backend: str, job: SimJob) -> None:
        """A QPU run's measured fidelity goes to a planner that learns it (live: the fidelity
        meter); an estimate standing in for one (``unmeasured``) is not a measurement."""
        note = getattr(self.planner, "observe_fidelity", None)
        spec = self.specs.get(backend)
        f = self.fidelity.get(job.id, {}).get(backend)
        if note is None or spec is None or spec.kind != "qpu" or f is None or (job.id, backend) in self.unmeasured:
            return
        note(backend, float(f), job)

    def _arrive(self, jid: str, now: float) -> None:
        job = self.by_id[jid]
        p = self.planner.plan(job, now)
        if p is None:
            self.unplaceable.add(jid)
            return
        view = fifo_view(job.view) if self.fifo else job.view
        p = Plan(jid, {b: e for b, e in p.estimates.items() if b in self.specs}, dict(p.filtered))
        self.views[jid], self.plans[jid] = view, p
        self.seqs[jid] = self.sched.enqueue(view, p, job.arrival_s).seq

    def _on_pass(self, res: Any, now: float) -> None:
        for d in res.dispatch:
            jid, backend = d.entry.job.id, d.choice.backend
            self._start(jid, jid, backend, now, d.entry.plan.estimates[backend].runtime_s, False)
        for e in res.unplaceable:
            self.unplaceable.add(e.job.id)
        for e in res.flagged:
            self.flagged.add(e.job.id)

    def _decide(self, now: float) -> None:
        while True:
            res = self.sched.decide(now)
            self.passes += 1
            self._on_pass(res, now)
            if not res.preempt:
                return
            for victim, _for_job in res.preempt:
                if victim.job_id in self.running:
                    self.preemptions += 1
                    self._stop(victim.job_id, now, requeue_if_last=True)

    def _hedge(self, now: float) -> None:
        self.next_tick = math.inf
        over = [r for r in self.running.values() if now > r.started + r.predicted + 1e-9]
        if not over or self.hedger is None:
            self._rearm(now)
            return
        live = self.sched.live(now)
        views = [RunView(r.run_id, self.by_id[r.job_id].view, r.backend, r.started, r.predicted, now - r.started,
                         self.plans[r.job_id], r.backup, r.job_id in self.backed_up) for r in over]
        for act in self.hedger(now, views, live) or ():
            if act.kind == "stop":
                self._stop(act.run_id, now, requeue_if_last=True)
            elif act.kind == "restart":
                self._restart(act.run_id, now)
            elif act.kind == "backup":
                self._backup(act.job_id, act.backend, now, live)
        self._rearm(now)

    def _probe(self, now: float) -> int:
        """As live: with a job waiting, probes give their cores back (nothing learned from a cut-short
        probe) and the number given back is returned — the caller decides again at once, as the
        allocator's ``stop_probes`` kicks a dispatch pass (else a job that arrived while a probe
        held its core would wait for the next event: seconds, in a trace of bursts); with none
        waiting, the prober may race started runs on idle cores."""
        if self.prober is None:
            return 0
        if self.sched.entries:
            stopped = len(self.probe_runs)
            for run_id in list(self.probe_runs):
                self._stop(run_id, now, requeue_if_last=False, learn=False)
            return stopped
        runs = [r for r in self.running.values() if not r.backup and r.job_id not in self.backed_up]
        if not runs:
            return 0
        live = self.sched.live(now)
        views = [RunView(r.run_id, self.by_id[r.job_id].view, r.backend, r.started, r.predicted, now - r.started,
                         self.plans[r.job_id], r.backup, False) for r in runs]
        for act in self.prober(now, views, live) or ():
            if act.kind == "backup":
                self._backup(act.job_id, act.backend, now, live, probe=True)
                live = self.sched.live(now)
        return 0

    def _rearm(self, now: float) -> None:
        """Next check: in ``hedge_check_s`` while a run overruns, else at the next predicted end."""
        ends = [r.started + r.predicted for r in self.running.values()]
        nxt = min((e for e in ends if e > now + 1e-9), default=math.inf)
        if any(e <= now + 1e-9 for e in ends):
            nxt = min(nxt, now + self.hedge_check_s)
        if math.isfinite(nxt):
            self._want_tick(nxt)

    def _backup(self, jid: str, backend: str, now: float, live: Mapping[str, LiveState], *,
                probe: bool = False) -> None:
        p = self.plans.get(jid)
        state = live.get(backend)
        if (p is None or backend not in p.estimates or state is None or not state.can_start
                or self.outcome[jid].completion is not None or jid in self.backed_up
                or not self.job_runs.get(jid)):
            return
        if probe:
            self.probes += 1
            run_id = f"{jid}~probe{self.probes}"
            self.probe_runs.add(run_id)
        else:
            self.hedges += 1
            run_id = f"{jid}~hedge{self.hedges}"
        self.backed_up.add(jid)
        self.sched.start(run_id, backend, now, p.estimates[backend].runtime_s, priority=self.by_id[jid].view.priority)
        self._start(run_id, jid, backend, now, p.estimates[backend].runtime_s, True)

    def run(self) -> None:
        while self.events:
            now = self.events[0][0]
            while self.events and self.events[0][0] == now:
                _, kind, _, ident, g = heapq.heappop(self.events)
                if kind == 1:
                    self._arrive(ident, now)
                elif kind == 0:
                    run = self.running.get(ident)
                    if run is not None and run.gen == g:
                        self._complete(run, now)
                elif kind == 2 and now >= self.next_tick - 1e-12:
                    self._hedge(now)
            self._decide(now)
            while self._probe(now):
                self._decide(now)
            if not self.running and not any(k != 2 for _, k, _, _, _ in self.events) and self.sched.entries:
                self._drain(now)

    def _drain(self, now: float) -> None:
        """Nothing runs and nothing will arrive, yet jobs wait (e.g. only reserved slots left):
        a few more passes, then the rest are unplaceable."""
        for k in range(1, 4):
            res = self.sched.decide(now + k)
            self._on_pass(res, now + k)
            if res.dispatch:
                return
        for jid in list(self.sched.entries):
            self.sched.remove(jid)
            self.unplaceable.add(jid)


def simulate(jobs: Sequence[SimJob], truth: Mapping[str, Mapping[str, float]], planner: Planner | Mapping[str, Plan],
             pool_specs: Sequence[BackendSpec], policy_name: str, *,
             fidelity: Mapping[str, Mapping[str, float]] | None = None, penalty_s: float = DEFAULT_PENALTY_S,
             seed: int = 0, node_cpus: Mapping[str, float] | float = 2.0, config: SchedulerConfig | None = None,
             policy: Any = None, hedger: Hedger | None = None, hedge_check_s: float = DEFAULT_HEDGE_CHECK_S,
             prober: Hedger | None = None, record: list[dict[str, Any]] | None = None,
             unmeasured: set[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Run one policy over ``jobs`` on a simulated pool world; return its metrics.

    ``truth[job_id][backend]``: true runtime in seconds (missing or non-finite: ``penalty_s``);
    ``fidelity[job_id][backend]``: true fidelity (missing: 1.0 on a simulator, the plan's
    estimate on a QPU, counted in ``fidelity_estimated_runs``); ``planner``: a ``Planner``, or
    a mapping of ready plans. ``node_cpus``: cores per pool node (a number: every simulator
    node). ``record``, when a list, receives one dict per job. ``unmeasured``: (job, backend)
    pairs whose ``fidelity`` entry is an estimate, counted in ``fidelity_unmeasured_runs``.
    """
    if isinstance(planner, Mapping):
        planner = FixedPlans(planner)
    policy = policy or make_policy(policy_name, seed)
    sim = _Sim(jobs, truth, planner, pool_specs, policy, node_cpus=node_cpus, penalty_s=penalty_s, config=config,
               hedger=hedger, hedge_check_s=hedge_check_s, prober=prober, fidelity=fidelity, unmeasured=unmeasured)
    sim.run()
    m = metrics(policy_name, jobs, sim.outcome, sim.unplaceable, fidelity or {}, sim.plans, sim.specs, record,
                unmeasured)
    m.update(total_cost=sim.cost, flagged=len(sim.flagged), preemptions=sim.preemptions, lost_work_s=sim.lost_work,
             passes=sim.passes, hedges=sim.hedges, restarts=sim.restarts, probes=sim.probes, hedge_wasted_s=sim.hedge_wasted,
             observations=getattr(planner, "observations", None))
    return m


def metrics(policy_name: str, jobs: Sequence[SimJob], outcome: Mapping[str, _Outcome], unplaceable: set[str],
            fidelity: Mapping[str, Mapping[str, float]], plans: Mapping[str, Plan],
            specs: Mapping[str, BackendSpec], record: list[dict[str, Any]] | None = None,
            unmeasured: set[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Per-policy figures from each job's outcome (shared by simulate and live mode)."""
    unmeasured = unmeasured or set()
    jct, ewait, fid_q, fid_all = [], [], [], []
    jct_of: dict[str, float] = {}
    fid_q_of: dict[str, float] = {}
    by_intent: dict[str, list[float]] = {}
    deadline_jobs = misses = estimated = 0
    completions = []
    for j in jobs:
        o = outcome[j.id]
        done = o.completion is not None
        if j.view.deadline_s is not None:
            deadline_jobs += 1
            if not done or o.completion - j.arrival_s > j.view.deadline_s + 1e-9:
                misses += 1
        if not done:
            continue
        completions.append(o.completion)
        jct.append(o.completion - j.arrival_s)
        jct_of[j.id] = o.completion - j.arrival_s
        by_intent.setdefault(j.view.intent, []).append(o.completion - j.arrival_s)
        if j.view.priority == "emergency":
            ewait.append(o.start - j.arrival_s)
        b = o.backend
        f = fidelity.get(j.id, {}).get(b)
        spec = specs.get(b)
        if f is None:
            is_qpu = spec is not None and spec.kind == "qpu"
            est = plans[j.id].estimates.get(b) if j.id in plans else None
            f = est.fidelity if (est is not None and is_qpu) else 1.0
            estimated += int(is_qpu)
        elif (j.id, b) in unmeasured:
            estimated += 1
        fid_all.append(f)
        if j.view.intent == "quantum":
            fid_q.append(f)
            fid_q_of[j.id] = f
        if record is not None:
            record.append({"id": j.id, "arrival_s": j.arrival_s, "start_s": o.start, "completion_s": o.completion,
                           "backend": b, "runs": o.runs, "priority": j.view.priority, "intent": j.view.intent,
                           "deadline_s": j.view.deadline_s, "fidelity": f})
    first = min((j.arrival_s for j in jobs), default=0.0)
    return {
        "policy": policy_name,
        "mean_jct_s": statistics.fmean(jct) if jct else None,
        "p95_jct_s": percentile(jct, 95),
        "makespan_s": (max(completions) - first) if completions else None,
        "deadline_miss_rate": misses / deadline_jobs if deadline_jobs else 0.0,
        "emergency_p99_wait_s": percentile(ewait, 99),
        "mean_fidelity_quantum": statistics.fmean(fid_q) if fid_q else None,
        "mean_fidelity": statistics.fmean(fid_all) if fid_all else None,
        "mean_jct_s_by_intent": {k: statistics.fmean(v) for k, v in sorted(by_intent.items())},
        "n_jobs": len(jobs), "completed": len(jct), "unplaceable": len(unplaceable),
        "deadline_jobs": deadline_jobs, "deadline_misses": misses,
        "emergency_jobs": sum(1 for j in jobs if j.view.priority == "emergency"),
        "quantum_jobs_completed": len(fid_q), "fidelity_unmeasured_runs": estimated,
        PAIRED: {"jct": jct_of, "fidelity_quantum": fid_q_of,
                 "jct_simulator_eligible": {k: v for k, v in jct_of.items() if k not in fid_q_of}},
    }


def lower_bound(jobs: Sequence[SimJob], truth: Mapping[str, Mapping[str, float]],
                feasible: Mapping[str, Sequence[str]], specs: Mapping[str, BackendSpec], *,
                cores: float, penalty_s: float = DEFAULT_PENALTY_S) -> dict[str, Any]:
    """Each job's fastest true runtime over its feasible backends, no queueing: not a policy.

    ``mean_jct_s`` / ``p95_jct_s`` / ``makespan_s`` bound every policy's from below (a job
    cannot finish sooner than its fastest run); ``deadline_miss_rate`` counts the deadlines no
    placement could meet. ``core_utilisation``: the least core-seconds the simulator-bound jobs
    need (runtime x threads of the cheapest simulator candidate) over ``cores`` x the arrival
    span: how busy the trace keeps the cores even if every job ran on its best method."""
    best, work = [], 0.0
    best_of: dict[str, float] = {}
    misses = deadline_jobs = 0
    ends = []
    for j in jobs:
        names = [b for b in feasible.get(j.id, ()) if b in specs]
        if not names:
            continue
        t_row = truth.get(j.id, {})

        def t(b: str) -> float:
            v = t_row.get(b)
            return penalty_s if v is None or not math.isfinite(v) else float(v)

        fastest = min(t(b) for b in names)
        best.append(fastest)
        best_of[j.id] = fastest
        ends.append(j.arrival_s + fastest)
        sims = [t(b) * max(specs[b].threads, 1) for b in names if specs[b].kind == "simulator"]
        if sims and j.view.intent != "quantum":
            work += min(sims)
        if j.view.deadline_s is not None:
            deadline_jobs += 1
            misses += fastest > j.view.deadline_s + 1e-9
    arrivals = [j.arrival_s for j in jobs]
    span = (max(arrivals) - min(arrivals)) if arrivals else 0.0
    return {"policy": "lower_bound", "mean_jct_s": statistics.fmean(best) if best else None,
            "p95_jct_s": percentile(best, 95), "makespan_s": (max(ends) - min(arrivals)) if ends else None,
            "deadline_miss_rate": misses / deadline_jobs if deadline_jobs else 0.0, "emergency_p99_wait_s": 0.0,
            "mean_fidelity_quantum": None, "total_cost": None, "completed": len(best), "n_jobs": len(jobs),
            "core_work_s": work, "arrival_span_s": span,
            "core_utilisation": work / (cores * span) if span > 0 else None,
            PAIRED: {"jct": best_of, "fidelity_quantum": {}}}


__all__ = ["SimJob", "Planner", "FixedPlans", "PipelinePlanner", "HindsightPlanner", "RunView", "HedgeAction",
           "Hedger", "simulate", "metrics", "lower_bound", "percentile", "node_of", "METRICS", "PAIRED"]
