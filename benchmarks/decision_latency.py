"""How long placement decisions take.

    python -m benchmarks.decision_latency --json OUT [--queued 10000] [--backends 16]

Measured on the same Scheduler the allocator runs:

* **dispatch**: with 16 placement candidates (two 8-core simulator pools' method variants and
  four QPUs) and 10,000 queued jobs, one slot frees and the scheduler
  decides who takes it — ``finish`` + ``decide`` timed together, ``summary.p50_us`` /
  ``summary.p99_us`` (goals ≤ 20 / ≤ 100 µs). A pass may weigh several jobs before one takes
  the slot (the head job may rather wait for a busy, faster backend); ``per_job_p50_us`` is
  the pass time divided by the jobs it weighed;
* the same with 1,000 backends, ``summary.p99_us_1000_backends`` (goal ≤ 1,000 µs);
* **enqueue scoring**: the filters plus the predictor's one batched call for a job over the
  pool (``summary.enqueue_p50_us``), with the heuristic prior and, when a model artifact is
  available, the learned model (``summary.enqueue_model_p50_us``).

The in-Ray figures (allocator throughput and resident memory with 100,000 queued jobs) are
measured by ``benchmarks.allocator_load``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path
from typing import Any


from benchmarks._common import make_console, write_json
from rich.table import Table

from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.costmodel.prior import HeuristicPrior
from ray_qalloc.placement import BackendView, JobView, plan
from ray_qalloc.placement.model import Estimate, Plan
from ray_qalloc.placement.scheduler import Scheduler, SchedulerConfig

PRIORITIES = ("emergency", "high", "normal", "batch")


POOL_CORES = 8


def pool(n: int) -> list[BackendSpec]:
    """``n`` placement candidates shaped like a cluster's: a quarter QPUs, the rest the method
    variants of 8-core simulator pools (6 per pool: four methods on one thread, statevector and
    density matrix on all cores)."""
    from ray_qalloc.backends.pools import pool_candidate_specs

    qpus = [BackendSpec(f"qpu_{i}", "qpu", "fake_qpu", 127, device=f"dev{i}", noisy=True, threads=0)
            for i in range(n // 4)]
    sims: list[BackendSpec] = []
    k = 0
    while len(sims) < n - len(qpus):
        sims += pool_candidate_specs(f"cpu-p{k:04d}", cores=POOL_CORES, memory_bytes=2**34)
        k += 1
    return sims[:n - len(qpus)] + qpus


def synthetic_plan(job: JobView, specs: list[BackendSpec], rng: random.Random, feasible: int = 6) -> Plan:
    chosen = rng.sample(specs, min(feasible, len(specs)))
    return Plan(job.id, {s.name: Estimate(s.name, 10 ** rng.uniform(-2, 1.5),
                                          rng.uniform(0.6, 0.95) if s.kind == "qpu" else 1.0,
                                          rng.uniform(0, 1)) for s in chosen})


def build(n_backends: int, queued: int, seed: int) -> tuple[Scheduler, random.Random, list[BackendSpec]]:
    rng = random.Random(seed)
    specs = pool(n_backends)
    s = Scheduler(SchedulerConfig(aging_s=1e9),
                  node_cpus={sp.pool: POOL_CORES for sp in specs if sp.pool is not None})
    for spec in specs:   # a pool's candidates share its cores; a QPU is a budget of its own
        s.add_backend(spec, node=spec.pool or f"qpu:{spec.name}")
    # fill every core and QPU slot, then queue the rest
    capacity = POOL_CORES * len({sp.pool for sp in specs if sp.pool}) + sum(sp.slots for sp in specs if not sp.pool)
    for i in range(queued + capacity):
        job = JobView(f"j{i}", 10, frozenset({"h", "cx"}), {}, 1000, priority=rng.choice(PRIORITIES),
                      deadline_s=rng.choice((None, None, 60.0, 600.0)))
        s.enqueue(job, synthetic_plan(job, specs, rng), arrival=i * 1e-3)
    s.decide(0.0)
    return s, rng, specs


def time_dispatch(n_backends: int, queued: int, samples: int, seed: int = 0,
                  warmup: int = 3000) -> tuple[list[float], list[float], list[int]]:
    """Per pass: µs from a slot freeing to the decision, µs per job the pass weighed, and the
    jobs it weighed (a pass's cost is mostly that count: it says which lever a change moved).

    The first ``warmup`` passes (3 simulated seconds) are not timed: right after the build
    every backend is free at once, a state the live allocator never sits in."""
    s, rng, specs = build(n_backends, queued, seed)
    per_pass, per_job, weighed = [], [], []
    now = 1.0
    i = 10**7
    for k in range(warmup + samples):
        run = rng.choice(list(s.runs.values()))
        # keep the queue at its size: one arrival per completion (not timed)
        job = JobView(f"j{i}", 10, frozenset({"h", "cx"}), {}, 1000, priority=rng.choice(PRIORITIES))
        s.enqueue(job, synthetic_plan(job, specs, rng), arrival=now)
        i += 1
        examined = s.examined
        t0 = time.perf_counter()
        s.finish(run.job_id)
        s.decide(now)
        dt = (time.perf_counter() - t0) * 1e6
        if k >= warmup:
            per_pass.append(dt)
            per_job.append(dt / max(s.examined - examined, 1))
            weighed.append(s.examined - examined)
        now += 1e-3
    return per_pass, per_job, weighed


def time_enqueue(samples: int, predictor: Any) -> list[float]:
    from ray_qalloc.backends.pools import pool_candidate_specs
    from ray_qalloc.backends.registry import FAKE_QPU_POOL, make_backend
    from ray_qalloc.config import Limits
    from ray_qalloc.jobs import make_spec, prepare_job
    from ray_qalloc.workloads import mqt_circuit

    views = [BackendView(sp) for sp in pool_candidate_specs("cpu-local", cores=2, memory_bytes=2**33)]
    for name in FAKE_QPU_POOL:
        b = make_backend(name)
        cal = b.calibration()
        views.append(BackendView(b.spec(), True, cal.summary() if cal is not None else None))
    jobs = []
    for fam, n in (("qft", 12), ("ghz", 20), ("qaoa", 10), ("wstate", 8)):
        pj = prepare_job(make_spec(circuit=mqt_circuit(fam, n)), Limits())
        jobs.append(JobView(pj.id, pj.num_qubits, pj.ops, pj.features, pj.shots))
    out = []
    for k in range(samples):
        job = jobs[k % len(jobs)]
        t0 = time.perf_counter()
        plan(job, views, predictor)
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) >= 100 else max(values)


def run(queued: int, backends: int, samples: int) -> dict[str, Any]:
    from ray_qalloc.costmodel.registry import load_predictor

    d16, j16, w16 = time_dispatch(backends, queued, samples)
    d1000, j1000, _ = time_dispatch(1000, queued, max(samples // 2, 500), seed=1)
    prior = time_enqueue(samples, HeuristicPrior())
    model = load_predictor(None)
    learned = time_enqueue(samples, model) if getattr(model, "source", "prior") != "prior" else None
    summary = {
        "p50_us": statistics.median(d16), "p99_us": pct(d16, 99),
        "p50_us_1000_backends": statistics.median(d1000), "p99_us_1000_backends": pct(d1000, 99),
        "per_job_p50_us": statistics.median(j16), "per_job_p99_us": pct(j16, 99),
        "per_job_p50_us_1000_backends": statistics.median(j1000),
        "jobs_weighed_mean": statistics.fmean(w16), "jobs_weighed_p99": pct([float(w) for w in w16], 99),
        "enqueue_p50_us": statistics.median(prior), "enqueue_p99_us": pct(prior, 99),
        "enqueue_model_p50_us": statistics.median(learned) if learned else None,
        "enqueue_model_p99_us": pct(learned, 99) if learned else None,
        "queued": queued, "backends": backends, "samples": samples,
        "goal_p50_us": 20, "goal_p99_us": 100, "goal_p99_us_1000_backends": 1000,
    }
    return {"benchmark": "decision_latency", "summary": summary,
            "model": getattr(model, "source", "prior")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--queued", type=int, default=10_000)
    ap.add_argument("--backends", type=int, default=16)
    ap.add_argument("--samples", type=int, default=2000)
    args = ap.parse_args()
    console = make_console()
    result = run(args.queued, args.backends, args.samples)
    s = result["summary"]
    t = Table(title=f"placement decision latency ({args.queued} queued)")
    for col in ("what", "p50 µs", "p99 µs", "goal"):
        t.add_column(col)
    t.add_row(f"dispatch, {args.backends} backends", f"{s['p50_us']:.1f}", f"{s['p99_us']:.1f}", "≤ 20 / ≤ 100")
    t.add_row(f"  per job weighed, {args.backends} backends", f"{s['per_job_p50_us']:.1f}",
              f"{s['per_job_p99_us']:.1f}", "")
    t.add_row("dispatch, 1000 backends", f"{s['p50_us_1000_backends']:.1f}", f"{s['p99_us_1000_backends']:.1f}",
              "p99 ≤ 1000")
    t.add_row("enqueue scoring, prior (one 2-core pool: 6 variants, 3 QPUs)", f"{s['enqueue_p50_us']:.1f}", f"{s['enqueue_p99_us']:.1f}", "")
    if s["enqueue_model_p50_us"] is not None:
        t.add_row(f"enqueue scoring, {result['model']}", f"{s['enqueue_model_p50_us']:.1f}",
                  f"{s['enqueue_model_p99_us']:.1f}", "")
    console.print(t)
    write_json(args.json, result, console)


if __name__ == "__main__":
    main()
