"""Learning benchmark (issue #13): the bandit against today's correction on a drifting workload.

    python -m benchmarks.learning --json OUT [--jobs 400] [--seed 13] [--policy-seeds 3]
        [--truth-dir out/learning-truth] [--time-cap-s 10] [--trace FILE]

What it does, and what is real:

* **Workload** (generated here, independently of the bandit: families, widths and shots are drawn
  from fixed tables by ``--seed``; or any trace of the DESIGN format with ``--trace``):
  classical-intent circuits of 8–18 qubits (QFT, W-state, GHZ, graph states, QAOA, VQE,
  MQT random circuits, Qiskit random circuits and quantum volume: both sides of the
  statevector / MPS line, and Clifford circuits) and quantum-intent circuits of 3–8 qubits.
* **Truth is measured**: every unique (circuit, shots) runs once per simulator arm — the pool's
  statevector at 1 and 2 threads, MPS, stabilizer (Clifford only) — in the capped measuring
  worker (``benchmarks.truth``, cache ``--truth-dir``; a run past the cap is charged 3× the cap),
  and every quantum-intent circuit on each emulated QPU (``benchmarks.fidelity``: modelled QPU
  time, Hellinger fidelity of the noisy emulation against the exact distribution). Density
  matrix arms are left out (seconds per run at 12+ qubits, never best here).
* **Drift is synthetic and stated** (``drift`` in the JSON): from the middle job on, the
  simulator arm that is best in hindsight most often in the first half runs ``--slow-factor``×
  slower (another tenant on its cores), and the QPU best most often for quantum jobs in the
  first half returns fidelity^``--degrade-power`` (its errors ×power; its calibration, which the
  estimates read, is unchanged: drift the calibration does not show).
* **Both policies on the same jobs, in the same order, with the same seeds**: the live
  allocator's stack (shipped model or prior + run memory) with ``correction`` (the model's
  per-backend EWMA and 2 % exploration) and with ``bandit`` (``costmodel.policy.wrap``).
  Jobs arrive one at a time (no queueing): each is planned by ``placement.pipeline.plan``,
  chosen by ``select`` with every arm free, charged its true runtime/fidelity, and the policy
  observes the outcome as ``RunLife.learn`` does (``observe``, ``remember``, and for the bandit
  the measured QPU fidelity). Today's correction has no use for a measured fidelity.
* **Regret** of a job = the selector's objective (its class's weights) on the chosen arm's
  true numbers − the best arm's in hindsight, over the arms its plan could use. Its unit is the
  objective's: log-seconds (0.69 = twice the best runtime).
* **Adaptation time** = post-drift jobs until the mean regret over the next ``--window`` jobs
  first falls back within ``--tolerance`` of the mean over the ``--window`` jobs before the
  drift.
* **Prediction error trend**: median |log(true / estimated runtime)| of the chosen arm per block
  of ``--block`` jobs, per policy, as history grows.

JSON ``summary``: ``regret_ratio_bandit_over_correction`` (goal ≤ 0.7), ``adapt_jobs_bandit``,
``adapt_jobs_correction``, all summed/averaged over ``--policy-seeds`` seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

GOAL_REGRET_RATIO = 0.7
CLASSICAL: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("qft", (10, 12, 14, 16, 18)), ("wstate", (10, 12, 14, 16, 18)), ("ghz", (10, 14, 18)),
    ("graphstate", (10, 14, 18)), ("qaoa", (8, 10, 12, 14)), ("vqe_real_amp", (8, 10, 12, 14)),
    ("randomcircuit", (8, 10, 12)), ("random", (10, 12, 14, 16)), ("quantumvolume", (8, 10, 12, 14)),
)
QUANTUM: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("ghz", (3, 4, 5, 6)), ("qft", (3, 4, 5)), ("bv", (4, 6, 8)), ("graphstate", (4, 6)),
)
SHOTS = (256, 1024, 4096)
QUANTUM_SHARE = 0.2
PRIORITIES = (("high", 0.15), ("normal", 0.55), ("batch", 0.3))


# ---------------------------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------------------------

def drifting_trace(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` jobs of the DESIGN trace format, one a second (arrival order = job order)."""
    from benchmarks.traces import _export, build_circuit

    rng = random.Random(seed)
    cache: dict[tuple[str, int, int], str] = {}
    out = []
    for i in range(n):
        quantum = rng.random() < QUANTUM_SHARE
        family, sizes = rng.choice(QUANTUM if quantum else CLASSICAL)
        size = rng.choice(sizes)
        variant = rng.randrange(3) if family in ("random", "quantumvolume") else 0
        key = (family, size, variant)
        if key not in cache:
            try:
                cache[key] = _export(build_circuit(family, size, seed=variant * 101))
            except Exception:  # noqa: BLE001 - MQT refuses some sizes: draw again next time
                continue
        r, acc = rng.random(), 0.0
        priority = PRIORITIES[-1][0]
        for name, p in PRIORITIES:
            acc += p
            if r < acc:
                priority = name
                break
        out.append({"id": f"d{i:05d}", "arrival_s": float(i), "qasm": cache[key],
                    "shots": 1024 if quantum else rng.choice(SHOTS), "priority": priority, "deadline_s": None,
                    "intent": "quantum" if quantum else "classical", "fidelity_min": None, "tenant": "bench",
                    "family": family})
    return out


def measure(records: Sequence[Mapping[str, Any]], truth_dir: Path, time_cap_s: float, samples: int,
            console: Any) -> dict[str, Any]:
    """Intake, views and measured truth (cached), as ``benchmarks.placement`` builds them."""
    from benchmarks import fidelity as fid_mod
    from benchmarks import truth as truth_mod
    from benchmarks.placement import intake, qalloc_world, qpu_truth, qpu_views

    work = intake(records)
    qpus = qpu_views()
    views = [v for v in qalloc_world(qpus) if v.spec.method != "density_matrix"]
    sim_specs = [v.spec for v in views if v.spec.kind == "simulator"]
    t0 = time.perf_counter()
    profiles = fid_mod.QpuProfiles(truth_dir / "qpu.jsonl")
    circuits = sorted({work.cases[work.case_of[j.id]].source: work.cases[work.case_of[j.id]].size
                       for j in work.jobs if j.view.intent == "quantum"}.items(), key=lambda x: x[1])
    q_stats = fid_mod.measure_profiles(circuits, [v.name for v in qpus], profiles)
    classical = {cid: c for cid, c in work.cases.items()
                 if any(work.case_of[j.id] == cid and j.view.intent != "quantum" for j in work.jobs)}
    report = truth_mod.measure_truth(classical, sim_specs, truth_dir, time_cap_s=time_cap_s,
                                     progress=console is not None, samples=samples)
    by_case, outcomes = truth_mod.read_truth(truth_dir, set(classical), sim_specs, time_cap_s)
    q_runtime, q_fid, fid_info = qpu_truth(work, [v.name for v in qpus], profiles)
    truth = {j.id: ({**by_case.get(work.case_of[j.id], {})} if j.view.intent != "quantum"
                    else dict(q_runtime.get(j.id, {}))) for j in work.jobs}
    unmeasured = fid_info.pop("unmeasured")
    return {"work": work, "views": views, "truth": truth, "fidelity": q_fid, "measure_s": time.perf_counter() - t0,
            "info": {"qpu_profiles": q_stats, "fidelity_sources": fid_info, "unmeasured_fidelity_pairs": len(unmeasured),
                     "sim_truth": report.to_dict(), "truth_dir": str(truth_dir), "time_cap_s": time_cap_s,
                     "samples": samples, "arms": [v.name for v in views]}}


# ---------------------------------------------------------------------------------------------
# The replay
# ---------------------------------------------------------------------------------------------

def objective(job: Any, runtime_s: float, fidelity: float, cost: float, weights: Any) -> float:
    """The selector's objective (``placement.pipeline.select``, zero wait) on given numbers."""
    w = weights.of(job.priority)
    wf = w.fidelity * (weights.quantum_fidelity_factor if job.intent == "quantum" else 1.0)
    return math.log(max(runtime_s, 1e-6)) - wf * math.log(max(fidelity, 1e-9)) + w.money * cost


def choose_drift(jobs: Sequence[Any], truth: Mapping[str, Mapping[str, float]], fidelity: Mapping[str, Mapping[str, float]],
                 specs: Mapping[str, Any], weights: Any, at: int) -> dict[str, Any]:
    """The arms to drift, from the truth of the first half alone (not from any policy)."""
    sim_best: dict[str, int] = {}
    qpu_best: dict[str, int] = {}
    for j in jobs[:at]:
        t = truth.get(j.id) or {}
        if not t:
            continue
        scores = {b: objective(j.view, s, fidelity.get(j.id, {}).get(b, 1.0), specs[b].price.cost(s, j.view.shots),
                               weights) for b, s in t.items()}
        best = min(scores, key=scores.__getitem__)
        target = qpu_best if specs[best].kind == "qpu" else sim_best
        target[best] = target.get(best, 0) + 1
    return {"slow_backend": max(sim_best, key=sim_best.__getitem__) if sim_best else None,
            "degraded_qpu": max(qpu_best, key=qpu_best.__getitem__) if qpu_best else None,
            "best_counts_first_half": {"simulators": sim_best, "qpus": qpu_best}}


def replay(policy: str, jobs: Sequence[Any], views: Sequence[Any], truth: Mapping[str, Mapping[str, float]],
           fidelity: Mapping[str, Mapping[str, float]], drift: Mapping[str, Any], *, seed: int, model: Any,
           settings: Any, memory: bool = True) -> dict[str, Any]:
    """One policy over the jobs, in order; per job: regret and the chosen arm's log error."""
    from ray_qalloc.costmodel.bandit import BanditPredictor
    from ray_qalloc.costmodel.policy import wrap
    from ray_qalloc.costmodel.registry import load_predictor
    from ray_qalloc.placement.model import LiveState
    from ray_qalloc.placement.pipeline import plan, select

    base = load_predictor(model, seed=seed, explore_factor=settings.placement.explore_factor)
    learning = settings.learning.model_copy(update={"policy": policy})
    if memory:
        predictor = wrap(base, learning=learning, explore_factor=settings.placement.explore_factor,
                         weights=settings.placement.table())
    elif policy == "bandit":
        from ray_qalloc.costmodel.bandit import ResidualBandit
        from ray_qalloc.costmodel.policy import bandit_config, switch_off_correction

        switch_off_correction(base)
        predictor = BanditPredictor(base, ResidualBandit(bandit_config(learning, settings.placement.explore_factor,
                                                                       seed)), settings.placement.table())
    else:
        predictor = base
    if isinstance(predictor, BanditPredictor):
        predictor.bandit._rng.seed(seed)
    weights = settings.placement.table()
    specs = {v.name: v.spec for v in views}
    at, slow, degraded = drift["at"], drift["slow_backend"], drift["degraded_qpu"]
    regrets, errors, chosen = [], [], []
    free = {v.name: LiveState(0.0, True) for v in views}
    for i, j in enumerate(jobs):
        t_true = dict(truth.get(j.id) or {})
        f_true = dict(fidelity.get(j.id) or {})
        if i >= at:
            if slow in t_true:
                t_true[slow] *= drift["slow_factor"]
            if degraded in f_true:
                f_true[degraded] = f_true[degraded] ** drift["degrade_power"]
        p = plan(j.view, views, predictor, weights=weights)
        arms = [b for b in p.estimates if b in t_true]
        if not arms:
            regrets.append(None)
            errors.append(None)
            chosen.append(None)
            continue
        live = {b: free[b] for b in arms}
        pick = select(j.view, p, live).backend
        true_obj = {b: objective(j.view, t_true[b], f_true.get(b, 1.0), specs[b].price.cost(t_true[b], j.view.shots),
                                 weights) for b in arms}
        regrets.append(true_obj[pick] - min(true_obj.values()))
        est = p.estimates[pick]
        actual = t_true[pick]
        errors.append(abs(math.log(actual / est.runtime_s)))
        chosen.append(pick)
        observe = getattr(predictor, "observe", None)     # the bare prior learns nothing
        if observe is not None:
            observe(pick, est.runtime_s, actual)
        if specs[pick].kind == "qpu" and pick in f_true:
            observe_fid = getattr(predictor, "observe_fidelity", None)
            if observe_fid is not None:
                observe_fid(pick, est.runtime_s, f_true[pick])
        remember = getattr(predictor, "remember", None)
        if remember is not None and specs[pick].kind == "simulator":
            remember(j.view, specs[pick], actual, censored=False, predicted_s=est.runtime_s)
    out: dict[str, Any] = {"regret": regrets, "abs_log_error": errors, "chosen": chosen}
    if isinstance(predictor, BanditPredictor):
        out["bandit"] = predictor.bandit.stats()
    else:
        out["explorations"] = getattr(predictor, "explorations", None)
    return out


def adapt_jobs(regret: Sequence[float | None], at: int, window: int, tolerance: float) -> int | None:
    """Post-drift jobs until the mean regret of the next ``window`` jobs is back within
    ``tolerance`` of the ``window`` jobs before the drift; None if it never is."""
    vals = [r for r in regret]
    before = [r for r in vals[max(at - window, 0):at] if r is not None]
    if not before:
        return None
    base = statistics.fmean(before)
    for k in range(0, len(vals) - at - window + 1):
        win = [r for r in vals[at + k:at + k + window] if r is not None]
        if win and statistics.fmean(win) <= base + tolerance:
            return k
    return None


def summarise(runs: Mapping[str, list[dict[str, Any]]], at: int, window: int, tolerance: float,
              block: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for policy, seeds in runs.items():
        totals = [sum(r for r in s["regret"] if r is not None) for s in seeds]
        post = [sum(r for r in s["regret"][at:] if r is not None) for s in seeds]
        adapts = [adapt_jobs(s["regret"], at, window, tolerance) for s in seeds]
        n = len(seeds[0]["regret"])
        curve = []
        for end in range(block, n + 1, block):
            curve.append({"jobs": end, "cumulative_regret": round(statistics.fmean(
                sum(r for r in s["regret"][:end] if r is not None) for s in seeds), 3)})
        trend = []
        for start in range(0, n, block):
            errs = [e for s in seeds for e in s["abs_log_error"][start:start + block] if e is not None]
            if errs:
                trend.append({"jobs": f"{start}-{min(start + block, n) - 1}",
                              "median_abs_log_error": round(statistics.median(errs), 4)})
        out[policy] = {"regret_total_per_seed": [round(t, 3) for t in totals],
                       "regret_total_mean": round(statistics.fmean(totals), 3),
                       "regret_post_drift_mean": round(statistics.fmean(post), 3),
                       "adapt_jobs_per_seed": adapts, "regret_curve": curve, "prediction_error_trend": trend,
                       "policy_state": [s.get("bandit") or {"explorations": s.get("explorations")} for s in seeds]}
    return out


def _mean_adapt(adapts: Sequence[int | None], cap: int) -> float:
    """Mean over seeds; a seed that never adapted counts as ``cap`` (all post-drift jobs)."""
    return round(statistics.fmean(cap if a is None else a for a in adapts), 1)


def run(args: argparse.Namespace, console: Any = None) -> dict[str, Any]:
    from benchmarks.traces import read_trace
    from ray_qalloc.config import Settings

    t0 = time.perf_counter()
    records = read_trace(args.trace) if args.trace else drifting_trace(args.jobs, args.seed)
    data = measure(records, Path(args.truth_dir), args.time_cap_s, args.samples, console)
    work, views, truth, fidelity = data["work"], data["views"], data["truth"], data["fidelity"]
    jobs = [j for j in work.jobs if truth.get(j.id)]
    settings = Settings()
    weights = settings.placement.table()
    specs = {v.name: v.spec for v in views}
    at = len(jobs) // 2
    drift = {"at": at, "slow_factor": args.slow_factor, "degrade_power": args.degrade_power,
             **choose_drift(jobs, truth, fidelity, specs, weights, at),
             "synthetic": "the slowdown multiplies the measured runtimes of one arm from job `at` on; the "
                          "degradation raises one QPU's measured fidelities to `degrade_power` from job `at` on; "
                          "estimates (calibration, model) do not see either"}
    results: dict[str, Any] = {}
    for memory in (True, False):
        runs: dict[str, list[dict[str, Any]]] = {"correction": [], "bandit": []}
        for s in range(args.policy_seeds):
            for policy in runs:
                runs[policy].append(replay(policy, jobs, views, truth, fidelity, drift, seed=s, model=args.model,
                                           settings=settings, memory=memory))
        results["live_stack" if memory else "without_run_memory"] = summarise(
            runs, at, args.window, args.tolerance, args.block)
    main_ = results["live_stack"]
    cap = len(jobs) - at
    ratio = (main_["bandit"]["regret_total_mean"] / main_["correction"]["regret_total_mean"]
             if main_["correction"]["regret_total_mean"] > 0 else None)
    alt = results["without_run_memory"]
    alt_ratio = (alt["bandit"]["regret_total_mean"] / alt["correction"]["regret_total_mean"]
                 if alt["correction"]["regret_total_mean"] > 0 else None)
    summary = {"regret_ratio_bandit_over_correction": None if ratio is None else round(ratio, 3),
               "regret_ratio_goal": GOAL_REGRET_RATIO,
               "regret_ratio_goal_met": ratio is not None and ratio <= GOAL_REGRET_RATIO,
               "adapt_jobs_bandit": _mean_adapt(main_["bandit"]["adapt_jobs_per_seed"], cap),
               "adapt_jobs_correction": _mean_adapt(main_["correction"]["adapt_jobs_per_seed"], cap),
               "regret_ratio_without_run_memory": None if alt_ratio is None else round(alt_ratio, 3),
               "jobs": len(jobs), "policy_seeds": args.policy_seeds}
    return {"benchmark": "learning", "summary": summary, "drift": drift, "results": results,
            "setup": {"trace": str(args.trace) if args.trace else {"generated": True, "seed": args.seed,
                                                                   "jobs": args.jobs},
                      "unique_circuits": len(work.cases), "rejected": len(work.rejected),
                      "model": str(args.model) if args.model else "shipped artifact (or the prior)",
                      "window": args.window, "tolerance": args.tolerance, "block": args.block,
                      "regret_unit": "the selector's objective: log-seconds - w_f*log(fidelity) + w_m*cost",
                      "queueing": "none: one job at a time, every arm free (a contextual bandit's setting)",
                      "ground_truth": {"simulators": "measured Aer wall time (capped worker)",
                                       "qpus": "modelled QPU time; Hellinger fidelity of the noisy emulation",
                                       "drift": "synthetic (see drift)"},
                      **data["info"], "load_average": _load()},
            "wall_s": round(time.perf_counter() - t0, 1)}


def _load() -> list[float] | None:
    from benchmarks.truth import load_average

    return load_average()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.learning", description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--trace", type=Path, default=None, help="a trace file instead of the generated workload")
    ap.add_argument("--jobs", type=int, default=400)
    ap.add_argument("--seed", type=int, default=13, help="workload seed")
    ap.add_argument("--policy-seeds", type=int, default=3, help="seeds of the policies' own randomness")
    ap.add_argument("--truth-dir", type=Path, default=Path("out/learning-truth"))
    ap.add_argument("--time-cap-s", type=float, default=10.0)
    ap.add_argument("--samples", type=int, default=1, help="measurements per (circuit, arm); the truth is the least")
    ap.add_argument("--model", type=Path, default=None, help="model registry (default: the shipped artifact)")
    ap.add_argument("--slow-factor", type=float, default=4.0)
    ap.add_argument("--degrade-power", type=float, default=3.0)
    ap.add_argument("--window", type=int, default=40)
    ap.add_argument("--tolerance", type=float, default=0.1, help="regret (log units) counted as recovered")
    ap.add_argument("--block", type=int, default=50)
    args = ap.parse_args(argv)
    out = run(args, console=True)
    s = out["summary"]
    print(f"{'policy':<12}{'regret (mean of seeds)':>24}{'post-drift':>12}{'adapt jobs':>12}")
    for p in ("correction", "bandit"):
        r = out["results"]["live_stack"][p]
        print(f"{p:<12}{r['regret_total_mean']:>24.3f}{r['regret_post_drift_mean']:>12.3f}"
              f"{s['adapt_jobs_' + p]:>12}")
    ratio = s["regret_ratio_bandit_over_correction"]
    print(f"regret_ratio_bandit_over_correction {ratio} (goal <= {GOAL_REGRET_RATIO}: "
          f"{'met' if s['regret_ratio_goal_met'] else 'missed'}); without run memory {s['regret_ratio_without_run_memory']}")
    print(f"drift at job {out['drift']['at']}: {out['drift']['slow_backend']} x{out['drift']['slow_factor']}, "
          f"{out['drift']['degraded_qpu']} fidelity^{out['drift']['degrade_power']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
