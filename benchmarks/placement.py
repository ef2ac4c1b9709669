"""Placement quality: qalloc against baseline policies on a workload trace.

    python -m benchmarks.placement --trace FILE --mode simulate --json OUT
        [--model REGISTRY_DIR] [--history DIR] [--time-cap 20] [--seed 0] [--policies a,b,...]

``--mode simulate`` (implemented here) is a discrete-event simulation of the default pool
(four Aer CPU methods and three emulated QPUs on one 2-core node), driven by the same
``Scheduler`` the allocator runs. ``--mode live`` replays the trace (keep it small) for real
through the allocator on a local Ray and reports qalloc's row with the same keys.

What is true, and what the policies see:

* **Truth, measured.** Every unique circuit of the trace (same QASM text and shots) is run
  once on every backend of ``DEFAULT_POOL`` plus ``aer_automatic`` by the measure module
  (``ray_qalloc.costmodel.measure``: a capped worker process, one thread per run), into the run
  history ``--history`` (default ``out/placement-history``); a second run reuses those
  measurements. A simulator's true runtime is its measured ``wall_s`` (transpile + run). A
  QPU's is the *modelled* QPU time of the emulated device (``qpu_s`` of its row), not the
  emulator's wall time. A run censored at the time cap took at least the cap: **we charge 3×
  the cap** (of that row). A pair with no usable row (error, not measured) is charged 3×
  ``--time-cap``. Pairs placement's filters remove (stabilizer on a non-Clifford circuit, a
  density matrix too wide) are infeasible in the simulation too (no plan has them).
* **True fidelity.** A QPU run's fidelity is the calibration estimate
  ``ray_qalloc.costmodel.prior.qpu_fidelity(job, calibration summary)`` of that QPU, the same
  number for every policy (a measured Hellinger fidelity against an ideal simulation would be
  better; not done here). Simulators: 1.0.
* **Predictions.** Policies see only plans made once per job, at arrival, by
  ``plan(job, backends, load_predictor(--model or None))`` (exploration off), with the job's
  priority, intent, deadline, fidelity floor and tenant from the trace. Jobs intake refuses
  (``make_spec`` / ``prepare_job`` typed errors) are counted as ``rejected`` and skipped.
* **The oracle** runs qalloc's own selector on plans whose runtimes, fidelities and costs are
  the TRUE ones (hindsight): earliest completion with exact runtimes, traded against fidelity
  by the same class weights as qalloc. It is therefore the bound on what better *predictions*
  could buy qalloc, not a proven optimum of the schedule.

The simulated pool: every ``DEFAULT_POOL`` backend with its spec (its slots), all on one node
with 2 cores (``node_cpus={"local": 2}``); an Aer run holds one core (1 thread), a QPU run
none (a real QPU runs elsewhere: its spec is copied with ``threads=0``). Concurrent runs on
the two cores are assumed not to slow each other down (each was measured alone).

The event loop: arrivals (at ``arrival_s``) and completions (start + true runtime) in a heap;
after the events of one instant, ``Scheduler.decide(now)``; dispatched runs complete at
``now + true runtime``; a preempted batch run is stopped (its work is lost, its elapsed time
is still paid) and re-queued with its original place in line.

Metrics per policy (``policies.<name>`` in the JSON): ``mean_jct_s`` and ``p95_jct_s``
(completion − arrival over completed jobs), ``makespan_s`` (last completion − first arrival),
``deadline_miss_rate`` (jobs with a deadline that finished after it, or never ran, over jobs
with a deadline), ``emergency_p99_wait_s`` (start − arrival of emergency jobs, p99),
``mean_fidelity_quantum`` (true fidelity of quantum-intent jobs), ``total_cost`` (each run's
``price.cost(true runtime, shots)``; a preempted run pays its elapsed time), plus counts.
``ratios`` and ``goals`` compare qalloc with fcfs, least_loaded, best_fidelity and the oracle;
goals are printed next to the measured figures and are never adjusted to pass.
"""

from __future__ import annotations

from benchmarks._common import make_console, write_json

import argparse
import hashlib
import heapq
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from benchmarks.baselines import AUTOMATIC, POLICIES, fifo_view, make_policy
from ray_qalloc.backends.base import BackendSpec, Price
from ray_qalloc.placement.model import Estimate, JobView, Plan
from ray_qalloc.placement.scheduler import Scheduler, SchedulerConfig

CENSORED_FACTOR = 3.0          # a censored run took at least the cap; we charge 3x the cap
DEFAULT_TIME_CAP_S = 20.0
DEFAULT_HISTORY = Path("out/placement-history")
NODE = "local"
NODE_CPUS = 2.0

METRICS: tuple[str, ...] = ("mean_jct_s", "p95_jct_s", "makespan_s", "deadline_miss_rate", "emergency_p99_wait_s",
                            "mean_fidelity_quantum", "total_cost")

# (name, how it is computed from policies, comparison, target)
GOALS: tuple[tuple[str, str, str, float], ...] = (
    ("qalloc_over_fcfs_mean_jct", "qalloc mean JCT / fcfs mean JCT", "<=", 0.5),
    ("qalloc_over_least_loaded_mean_jct", "qalloc mean JCT / least_loaded mean JCT", "<=", 0.5),
    ("qalloc_over_oracle_mean_jct", "qalloc mean JCT / oracle mean JCT", "<=", 1.15),
    ("qalloc_over_best_fidelity_mean_fidelity_quantum",
     "qalloc mean fidelity (quantum intent) / best_fidelity's", ">=", 0.99),
    ("qalloc_minus_oracle_deadline_miss_rate", "qalloc deadline miss rate - oracle's", "<=", 0.02),
)


# ---------------------------------------------------------------------------------------------
# The simulation core: pure, no Aer, no measuring (tests call it with hand-made truth)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SimJob:
    """One accepted job of the trace: its arrival and its view (real priority and deadline)."""

    id: str
    arrival_s: float
    view: JobView


@dataclass
class _Run:
    backend: str
    started: float
    runtime: float
    gen: int


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


def automatic_pool(pool_specs: Sequence[BackendSpec], automatic_spec: BackendSpec | None = None) -> list[BackendSpec]:
    """The ``aer_automatic`` baseline's pool: the Aer simulators replaced by ONE backend
    ``aer_automatic`` with as many slots, one thread per run; the QPUs unchanged."""
    sims = [s for s in pool_specs if s.kind == "simulator"]
    others = [s for s in pool_specs if s.kind != "simulator"]
    slots = max(sum(max(s.slots, 1) for s in sims), 1)
    if automatic_spec is None:
        automatic_spec = BackendSpec(AUTOMATIC, "simulator", "aer", max((s.num_qubits for s in sims), default=30),
                                     method="automatic", price=sims[0].price if sims else Price())
    return [automatic_spec.copy(name=AUTOMATIC, slots=slots, threads=1)] + others


def oracle_plans(plans: Mapping[str, Plan], jobs: Sequence[SimJob], truth: Mapping[str, Mapping[str, float]],
                 fidelity: Mapping[str, Mapping[str, float]], prices: Mapping[str, Any],
                 penalty_s: float) -> dict[str, Plan]:
    """Plans whose runtimes (and fidelities, costs) are the true ones: what the oracle sees."""
    by_id = {j.id: j for j in jobs}
    out = {}
    for jid, p in plans.items():
        job = by_id.get(jid)
        t_row, f_row = truth.get(jid, {}), fidelity.get(jid, {})
        est = {}
        for b, e in p.estimates.items():
            t = t_row.get(b)
            t = penalty_s if t is None or not math.isfinite(t) else t
            price = prices.get(b)
            cost = price.cost(t, job.view.shots) if (price is not None and job is not None) else e.cost
            est[b] = Estimate(b, t, f_row.get(b, e.fidelity), cost, e.memory_bytes, "truth")
        out[jid] = Plan(jid, est, dict(p.filtered))
    return out


def simulate(jobs: Sequence[SimJob], truth: Mapping[str, Mapping[str, float]], plans: Mapping[str, Plan],
             pool_specs: Sequence[BackendSpec], policy_name: str, *,
             fidelity: Mapping[str, Mapping[str, float]] | None = None, penalty_s: float = 3 * DEFAULT_TIME_CAP_S,
             seed: int = 0, node_cpus: float = NODE_CPUS, config: SchedulerConfig | None = None,
             automatic_spec: BackendSpec | None = None, policy: Any = None,
             record: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run one policy over ``jobs`` on a simulated pool; return its metrics.

    ``truth[job_id][backend]``: the true runtime in seconds (missing or non-finite: the run is
    charged ``penalty_s``); ``fidelity[job_id][backend]``: the true fidelity (missing: 1.0 on
    a simulator, the plan's estimate on a QPU); ``plans[job_id]``: the predictions the policy
    sees (a job without a plan is unplaceable). ``pool_specs``: the backends, all on one node
    of ``node_cpus`` cores (give QPUs ``threads=0``). ``policy_name`` picks the policy (see
    ``benchmarks.baselines``); ``oracle`` gets ``oracle_plans``, ``aer_automatic`` the
    ``automatic_pool``. ``record``, when a list, receives one dict per job (for inspection).
    """
    fidelity = fidelity or {}
    policy = policy or make_policy(policy_name, seed)
    pool = automatic_pool(pool_specs, automatic_spec) if policy_name == AUTOMATIC else list(pool_specs)
    specs = {s.name: s for s in pool}
    if policy_name == "oracle":
        prices = {s.name: s.price for s in pool}
        plans = oracle_plans(plans, jobs, truth, fidelity, prices, penalty_s)
    fifo = bool(getattr(policy, "fifo", False))
    cfg = config or SchedulerConfig(explain=False)
    sched = Scheduler(cfg, policy, node_cpus={NODE: float(node_cpus)})
    for spec in pool:
        sched.add_backend(spec, NODE)
    if hasattr(policy, "bind"):
        policy.bind(sched)

    by_id = {j.id: j for j in jobs}
    views: dict[str, JobView] = {}
    mine: dict[str, Plan] = {}
    seqs: dict[str, int] = {}
    outcome = {j.id: _Outcome() for j in jobs}
    running: dict[str, _Run] = {}
    unplaceable: set[str] = set()
    flagged: set[str] = set()
    cost = 0.0
    preemptions = 0
    lost_work = 0.0
    gen = 0
    passes = 0

    events: list[tuple[float, int, int, str, int]] = []   # (time, kind: 0 done / 1 arrival, tie, job, gen)
    for i, j in enumerate(jobs):
        heapq.heappush(events, (float(j.arrival_s), 1, i, j.id, 0))
    tie = len(jobs)

    def true_runtime(jid: str, backend: str) -> float:
        t = truth.get(jid, {}).get(backend)
        return penalty_s if t is None or not math.isfinite(t) else float(t)

    def on_pass(res: Any, now: float) -> None:
        nonlocal gen, tie, cost
        for d in res.dispatch:
            jid, backend = d.entry.job.id, d.choice.backend
            rt = true_runtime(jid, backend)
            gen += 1
            running[jid] = _Run(backend, now, rt, gen)
            o = outcome[jid]
            o.first_start = now if o.first_start is None else o.first_start
            o.start, o.backend = now, backend
            o.runs += 1
            tie += 1
            heapq.heappush(events, (now + rt, 0, tie, jid, gen))
        for e in res.unplaceable:
            unplaceable.add(e.job.id)
        for e in res.flagged:
            flagged.add(e.job.id)

    now = 0.0
    while events:
        now = events[0][0]
        while events and events[0][0] == now:
            _, kind, _, jid, g = heapq.heappop(events)
            if kind == 1:
                job = by_id[jid]
                p = plans.get(jid)
                if p is None:
                    unplaceable.add(jid)
                    continue
                view = fifo_view(job.view) if fifo else job.view
                p = Plan(jid, {b: e for b, e in p.estimates.items() if b in specs}, dict(p.filtered))
                views[jid], mine[jid] = view, p
                seqs[jid] = sched.enqueue(view, p, job.arrival_s).seq
            else:
                run = running.get(jid)
                if run is None or run.gen != g:
                    continue        # a preempted run's stale completion
                del running[jid]
                sched.finish(jid)
                cost += specs[run.backend].price.cost(run.runtime, by_id[jid].view.shots)
                outcome[jid].completion = now
        while True:
            res = sched.decide(now)
            passes += 1
            on_pass(res, now)
            if not res.preempt:
                break
            for victim, _for_job in res.preempt:
                run = running.pop(victim.job_id, None)
                if run is None:
                    continue
                elapsed = now - run.started
                lost_work += elapsed
                preemptions += 1
                cost += specs[run.backend].price.cost(elapsed, by_id[victim.job_id].view.shots)
                sched.requeue(victim, views[victim.job_id], mine[victim.job_id], by_id[victim.job_id].arrival_s,
                              seqs[victim.job_id])
        if not events and sched.entries:
            # nothing runs and nothing will arrive, yet jobs wait (e.g. only reserved slots left):
            # give the scheduler a few more passes, then count the rest as unplaceable
            for k in range(1, 4):
                res = sched.decide(now + k)
                on_pass(res, now + k)
                if res.dispatch:
                    break
            if not events:
                for jid in list(sched.entries):
                    sched.remove(jid)
                    unplaceable.add(jid)

    return _metrics(policy_name, jobs, outcome, unplaceable, flagged, fidelity, plans, specs, cost,
                    preemptions, lost_work, passes, record)


def _metrics(policy_name: str, jobs: Sequence[SimJob], outcome: Mapping[str, _Outcome], unplaceable: set[str],
             flagged: set[str], fidelity: Mapping[str, Mapping[str, float]], plans: Mapping[str, Plan],
             specs: Mapping[str, BackendSpec], cost: float, preemptions: int, lost_work: float, passes: int,
             record: list[dict[str, Any]] | None) -> dict[str, Any]:
    jct, ewait, fid_q, fid_all = [], [], [], []
    deadline_jobs = misses = 0
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
        if j.view.priority == "emergency":
            ewait.append(o.start - j.arrival_s)
        b = o.backend
        f = fidelity.get(j.id, {}).get(b)
        if f is None:
            est = plans.get(j.id).estimates.get(b) if plans.get(j.id) is not None else None
            f = est.fidelity if (est is not None and specs[b].kind == "qpu") else 1.0
        fid_all.append(f)
        if j.view.intent == "quantum":
            fid_q.append(f)
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
        "total_cost": cost,
        "mean_fidelity": statistics.fmean(fid_all) if fid_all else None,
        "n_jobs": len(jobs), "completed": len(jct), "unplaceable": len(unplaceable),
        "deadline_jobs": deadline_jobs, "deadline_misses": misses, "flagged": len(flagged),
        "emergency_jobs": sum(1 for j in jobs if j.view.priority == "emergency"),
        "quantum_jobs_completed": len(fid_q), "preemptions": preemptions, "lost_work_s": lost_work,
        "passes": passes,
    }


def ratios(policies: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """qalloc against fcfs, least_loaded, oracle (JCT), best_fidelity (fidelity), oracle (misses)."""
    def get(p: str, k: str) -> float | None:
        v = policies.get(p, {}).get(k)
        return None if v is None else float(v)

    def div(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    q_jct = get("qalloc", "mean_jct_s")
    miss_q, miss_o = get("qalloc", "deadline_miss_rate"), get("oracle", "deadline_miss_rate")
    return {
        "qalloc_over_fcfs_mean_jct": div(q_jct, get("fcfs", "mean_jct_s")),
        "qalloc_over_least_loaded_mean_jct": div(q_jct, get("least_loaded", "mean_jct_s")),
        "qalloc_over_oracle_mean_jct": div(q_jct, get("oracle", "mean_jct_s")),
        "qalloc_over_best_fidelity_mean_fidelity_quantum": div(get("qalloc", "mean_fidelity_quantum"),
                                                               get("best_fidelity", "mean_fidelity_quantum")),
        "qalloc_minus_oracle_deadline_miss_rate": None if miss_q is None or miss_o is None else miss_q - miss_o,
    }


def goals(r: Mapping[str, float | None]) -> list[dict[str, Any]]:
    out = []
    for key, what, op, target in GOALS:
        v = r.get(key)
        met = None if v is None else (v <= target + 1e-12 if op == "<=" else v >= target - 1e-12)
        out.append({"name": key, "what": what, "value": v, "op": op, "target": target, "met": met})
    return out


# ---------------------------------------------------------------------------------------------
# From a trace to jobs, truth and plans (intake, measure module, predictor)
# ---------------------------------------------------------------------------------------------

def case_id_of(qasm: str, shots: int) -> str:
    return "trace:" + hashlib.sha1(f"{qasm}\n{int(shots)}".encode("utf-8")).hexdigest()[:12]


@dataclass
class Workload:
    """A trace after intake: accepted jobs, their circuits (one per unique QASM + shots)."""

    jobs: list[SimJob] = field(default_factory=list)
    case_of: dict[str, str] = field(default_factory=dict)          # job id -> case id
    cases: dict[str, Any] = field(default_factory=dict)            # case id -> SweepCase
    rejected: list[dict[str, str]] = field(default_factory=list)   # {"id", "error"}


def intake(records: Sequence[Mapping[str, Any]]) -> Workload:
    """Validate every trace line as intake would, parse each unique circuit once."""
    from ray_qalloc.config import Limits
    from ray_qalloc.costmodel.measure import SweepCase
    from ray_qalloc.exceptions import QAllocError
    from ray_qalloc.jobs import check_limits, make_spec, prepare_job

    limits = Limits()
    w = Workload()
    parsed: dict[str, Any] = {}       # case id -> PreparedJob or the error text
    seen: dict[str, int] = {}
    for rec in records:
        jid = str(rec.get("id"))
        if jid in seen:               # any trace: ids may repeat; keep every job, renamed
            seen[jid] += 1
            jid = f"{jid}#{seen[jid]}"
        else:
            seen[jid] = 0
        qasm, shots = rec.get("qasm"), rec.get("shots", 1024)
        try:
            spec = make_spec(circuit=qasm, shots=shots, priority=rec.get("priority") or "normal",
                             deadline_s=rec.get("deadline_s"), intent=rec.get("intent") or "auto",
                             fidelity_min=rec.get("fidelity_min"), tenant=rec.get("tenant") or "default")
            check_limits(spec, limits)
            if not isinstance(qasm, str):
                raise TypeError("'qasm' must be OpenQASM text")
        except (QAllocError, TypeError, ValueError) as exc:
            w.rejected.append({"id": jid, "error": str(exc)})
            continue
        cid = case_id_of(qasm, spec.shots)
        if cid not in parsed:
            try:
                parsed[cid] = prepare_job(make_spec(circuit=qasm, shots=spec.shots), limits, job_id=cid)
            except QAllocError as exc:
                parsed[cid] = str(exc)
            except Exception as exc:  # noqa: BLE001 - any parser failure is a refused job, not a crash
                parsed[cid] = f"{type(exc).__name__}: {exc}"
        prepared = parsed[cid]
        if isinstance(prepared, str):
            w.rejected.append({"id": jid, "error": prepared})
            continue
        if cid not in w.cases:
            w.cases[cid] = SweepCase(cid, str(rec.get("family") or "trace"), "qasm", prepared.num_qubits,
                                     spec.shots, qasm)
        view = JobView(jid, prepared.num_qubits, prepared.ops, prepared.features, spec.shots,
                       intent=spec.intent.value, priority=spec.priority.value, fidelity_min=spec.fidelity_min,
                       deadline_s=spec.deadline_s, tenant=spec.tenant)
        w.jobs.append(SimJob(jid, float(rec.get("arrival_s") or 0.0), view))
        w.case_of[jid] = cid
    return w


def measured_truth(table: Any, case_ids: set[str], backends: Sequence[str],
                   default_cap_s: float) -> dict[str, dict[str, float]]:
    """Per case: the true runtime on each backend from the run history (see the module doc)."""
    cols = [c for c in ("case_id", "backend", "outcome", "wall_s", "qpu_s", "cap_s") if c in table.column_names]
    out: dict[str, dict[str, float]] = {cid: {} for cid in case_ids}
    wanted = set(backends)
    for r in table.select(cols).to_pylist():
        cid, b, outcome = r.get("case_id"), r.get("backend"), r.get("outcome") or ""
        if cid not in out or b not in wanted:
            continue
        cap = r.get("cap_s") or default_cap_s
        if outcome == "completed":
            t = r.get("qpu_s") if b.startswith(("qpu_", "ibm_")) else r.get("wall_s")
            if t is None or not t > 0:
                continue
        elif outcome.startswith("censored"):
            t = CENSORED_FACTOR * cap
        else:
            continue                 # error: no truth; the simulation charges the penalty
        out[cid][b] = float(t)
    return out


def backend_views(names: Sequence[str]) -> dict[str, Any]:
    from ray_qalloc.backends.registry import make_backend
    from ray_qalloc.placement.model import BackendView

    views = {}
    for name in names:
        b = make_backend(name)
        spec = b.spec()
        cal = b.calibration() if spec.kind == "qpu" else None
        views[name] = BackendView(spec, True, cal.summary() if cal is not None else None)
    return views


def make_plans(jobs: Sequence[SimJob], views: Mapping[str, Any], predictor: Any) -> dict[str, Plan]:
    from ray_qalloc.placement.pipeline import plan

    vs = list(views.values())
    return {j.id: plan(j.view, vs, predictor) for j in jobs}


def true_fidelities(jobs: Sequence[SimJob], views: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    from ray_qalloc.costmodel.prior import qpu_fidelity

    qpus = [v for v in views.values() if v.spec.kind == "qpu"]
    return {j.id: {v.name: qpu_fidelity(j.view, v.calibration) for v in qpus} for j in jobs}


def pool_specs(views: Mapping[str, Any], pool: Sequence[str]) -> list[BackendSpec]:
    """The simulated pool: specs as they are, QPUs with ``threads=0`` (they use no local core)."""
    return [views[n].spec.copy(threads=0) if views[n].spec.kind == "qpu" else views[n].spec for n in pool]


def run(trace: Path, *, model: Path | None, history: Path, time_cap_s: float, seed: int,
        policies: Sequence[str], console: Any, measure_fn: Callable[..., Any] | None = None) -> dict[str, Any]:
    from benchmarks.traces import read_trace
    from ray_qalloc.backends.registry import DEFAULT_POOL
    from ray_qalloc.costmodel.history import RunHistory
    from ray_qalloc.costmodel.registry import load_predictor

    t0 = time.perf_counter()
    work = intake(read_trace(trace))
    if not work.jobs:
        raise SystemExit(f"{trace}: no job passed intake ({len(work.rejected)} rejected)")
    measured = list(DEFAULT_POOL) + [AUTOMATIC]
    console.print(f"{len(work.jobs)} jobs ({len(work.rejected)} rejected), {len(work.cases)} unique circuits; "
                  f"measuring on {', '.join(measured)} (cap {time_cap_s:g} s, history {history})")
    hist = RunHistory(history)
    if measure_fn is None:
        from ray_qalloc.costmodel.measure import measure as measure_fn
    report = measure_fn(list(work.cases.values()), measured, hist, time_cap_s=time_cap_s, predicted_factor=None,
                        source="placement-bench")
    by_case = measured_truth(hist.read(), set(work.cases), measured, time_cap_s)
    truth = {j.id: by_case.get(work.case_of[j.id], {}) for j in work.jobs}

    predictor = load_predictor(model, exploration_rate=0.0) if model else load_predictor(None)
    if hasattr(predictor, "exploration_rate"):
        predictor.exploration_rate = 0.0
    views = backend_views(measured)
    t_plan = time.perf_counter()
    plans = make_plans(work.jobs, views, predictor)
    plan_s = time.perf_counter() - t_plan
    fidelity = true_fidelities(work.jobs, views)
    pool = pool_specs(views, DEFAULT_POOL)
    penalty = CENSORED_FACTOR * time_cap_s

    results: dict[str, Any] = {}
    for name in policies:
        t = time.perf_counter()
        results[name] = simulate(work.jobs, truth, plans, pool, name, fidelity=fidelity, penalty_s=penalty,
                                 seed=seed, automatic_spec=views[AUTOMATIC].spec)
        results[name]["sim_wall_s"] = time.perf_counter() - t
    r = ratios(results)
    return {
        "benchmark": "placement", "mode": "simulate", "trace": str(trace),
        "predictor": getattr(predictor, "source", "prior"), "time_cap_s": time_cap_s, "seed": seed,
        "jobs": len(work.jobs), "rejected": len(work.rejected), "rejected_jobs": work.rejected[:50],
        "unique_circuits": len(work.cases),
        "pool": [s.name for s in pool], "node_cpus": NODE_CPUS,
        "modelling": {
            "censored_runtime": f"a run censored at the cap took at least the cap; we charge {CENSORED_FACTOR:g}x the cap",
            "unmeasured_runtime_s": penalty,
            "qpu_runtime": "modelled QPU time (qpu_s) of the emulated device",
            "qpu_fidelity": "calibration estimate ray_qalloc.costmodel.prior.qpu_fidelity (same for all policies); "
                            "a measured Hellinger fidelity would be better",
            "simulator_fidelity": 1.0,
            "oracle": "qalloc's selector on plans of true runtimes/fidelities/costs",
            "fifo_baselines": "fcfs, least_loaded, aer_automatic, best_fidelity, random ignore priority and deadlines",
        },
        "measure": {"attempted": getattr(report, "attempted", None), "censored": getattr(report, "censored", None),
                    "skipped_existing": getattr(report, "skipped_existing", None),
                    "wall_s": getattr(report, "wall_s", None), "by_outcome": getattr(report, "by_outcome", None)},
        "plan_s": plan_s, "wall_s": time.perf_counter() - t0,
        "policies": results, "ratios": r, "goals": goals(r),
    }


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def live(trace: Path, *, console: Any, speed: float = 1.0, timeout_s: float = 900.0) -> dict[str, Any]:
    """Replay the trace for real through the allocator on a local Ray; qalloc's row only.

    Jobs are submitted at their arrival times (divided by ``speed``); times are read back from
    the store (accept, first dispatch, completion). Fidelity and cost are computed as in the
    simulation (calibration estimate of the QPU that ran it; the backend's price on its run
    time, or its modelled QPU time), so the two modes are comparable.
    """
    import tempfile

    from benchmarks.traces import read_trace
    from ray_qalloc import connect
    from ray_qalloc.backends.registry import DEFAULT_POOL
    from ray_qalloc.exceptions import QAllocError
    from ray_qalloc.store import JobStore

    import ray

    if ray.is_initialized():
        raise SystemExit("--mode live starts a local Ray of its own: run it in a fresh process")
    records = read_trace(trace)
    work = intake(records)
    by_id = {str(r["id"]): r for r in records}
    views = backend_views(list(DEFAULT_POOL))
    fidelity = true_fidelities(work.jobs, views)
    console.print(f"{len(work.jobs)} jobs ({len(work.rejected)} rejected); replaying at {speed:g}x on a local Ray")
    qa = connect(data_dir=Path(tempfile.mkdtemp(prefix="qalloc-live-")), num_cpus=int(NODE_CPUS),
                 ray_temp_dir=tempfile.mkdtemp(prefix="qp", dir="/tmp"))
    t_start = time.time()
    handles: dict[str, Any] = {}
    submitted: dict[str, float] = {}
    refused: list[dict[str, str]] = []
    try:
        for job in sorted(work.jobs, key=lambda j: j.arrival_s):
            delay = t_start + job.arrival_s / speed - time.time()
            if delay > 0:
                time.sleep(delay)
            rec = by_id.get(job.id.split("#")[0], {})
            try:
                submitted[job.id] = time.time()   # arrival: when the client starts submitting
                handles[job.id] = qa.submit(rec["qasm"], shots=job.view.shots, priority=job.view.priority,
                                            deadline_s=job.view.deadline_s, intent=job.view.intent,
                                            fidelity_min=job.view.fidelity_min, tenant=job.view.tenant)
            except QAllocError as exc:
                refused.append({"id": job.id, "error": str(exc)})
        deadline = time.time() + timeout_s
        for h in handles.values():
            try:
                h.result(timeout=max(deadline - time.time(), 1.0))
            except QAllocError:
                pass
        store = JobStore(qa.settings.resolved_store_url)
        outcome: dict[str, _Outcome] = {}
        cost = 0.0
        for job in work.jobs:
            o = _Outcome()
            h = handles.get(job.id)
            if h is not None:
                rec = store.get(h.id)
                tr = store.transitions(h.id)
                arrival = submitted[job.id]
                starts = [t["at"] for t in tr if t["name"] == "dispatch"]
                done = [t["at"] for t in tr if t["name"] == "complete"]
                if starts and done and rec.result:
                    o.backend = rec.result["backend"]
                    o.start = job.arrival_s + (starts[0] - arrival) * speed
                    o.completion = job.arrival_s + (done[0] - arrival) * speed
                    o.runs = rec.attempts
                    spec = views[o.backend].spec
                    seconds = rec.result.get("qpu_s") if spec.kind == "qpu" else rec.result.get("wall_s")
                    cost += spec.price.cost(float(seconds or 0.0), job.view.shots)
            outcome[job.id] = o
        failed = {j.id for j in work.jobs if outcome[j.id].completion is None}
    finally:
        qa.shutdown()
    specs = {name: v.spec for name, v in views.items()}
    metrics = _metrics("qalloc", work.jobs, outcome, failed, set(), fidelity, {}, specs, cost, 0, 0.0, 0, None)
    return {"benchmark": "placement", "mode": "live", "trace": str(trace), "speed": speed,
            "predictor": "the allocator's (shipped model or prior)",
            "jobs": len(work.jobs), "rejected": len(work.rejected) + len(refused),
            "rejected_jobs": (work.rejected + refused)[:50], "policies": {"qalloc": metrics},
            "ratios": {}, "goals": [], "wall_s": time.time() - t_start,
            "modelling": {"live": "the real allocator on a local Ray (2 CPUs): only qalloc's row; baselines are "
                                  "simulate-mode only",
                          "qpu_times": "emulated QPUs answer after their emulation's wall time, not the modelled "
                                       "QPU time the simulation charges, so QPU-heavy traces finish sooner live"}}


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def print_report(result: Mapping[str, Any], console: Any) -> None:
    from rich.table import Table

    mode = "simulated" if result.get("mode") == "simulate" else "live, on a local Ray"
    t = Table(title=f"placement, {mode} ({result['jobs']} jobs, predictor {result.get('predictor', 'allocator')})")
    t.add_column("policy")
    cols = METRICS + ("completed", "unplaceable", "preemptions")
    for c in cols:
        t.add_column(c, justify="right")
    for name, m in result["policies"].items():
        t.add_row(name, *(_fmt(m.get(c)) for c in cols))
    console.print(t)
    if not result["goals"]:
        return
    g = Table(title="goals (measured, not adjusted)")
    for c in ("goal", "measured", "target", "met"):
        g.add_column(c)
    for row in result["goals"]:
        met = {True: "[green]yes[/green]", False: "[red]NO[/red]", None: "n/a"}[row["met"]]
        g.add_row(row["what"], _fmt(row["value"]), f"{row['op']} {row['target']:g}", met)
    console.print(g)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, required=True, help="JSON Lines trace (format of DESIGN.md)")
    ap.add_argument("--mode", choices=("simulate", "live"), default="simulate")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--model", type=Path, help="model registry directory (default: the shipped model or the prior)")
    ap.add_argument("--history", type=Path, default=DEFAULT_HISTORY,
                    help="run history of the measurements (reused on a second run)")
    ap.add_argument("--time-cap", type=float, default=DEFAULT_TIME_CAP_S, help="seconds per measured run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--speed", type=float, default=1.0, help="live mode: replay this many times faster")
    args = ap.parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; use {', '.join(POLICIES)}")

    console = make_console()
    if args.mode == "live":
        result = live(args.trace, console=console, speed=args.speed)
    else:
        result = run(args.trace, model=args.model, history=args.history, time_cap_s=args.time_cap,
                     seed=args.seed, policies=policies, console=console)
    print_report(result, console)
    write_json(args.json, result, console)


if __name__ == "__main__":
    main()
