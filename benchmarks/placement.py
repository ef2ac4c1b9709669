"""Placement quality: qalloc against what a user gets for free, on a workload trace.

    python -m benchmarks.placement --trace FILE --mode simulate --json OUT
        [--mix light|heavy|mixed] [--model REGISTRY_DIR] [--truth DIR] [--time-cap 20] [--seed 0]
        [--policies a,b,...] [--per-job] [--qpu-measure all|quantum|none] [--truth-clock wall|cpu]
    python -m benchmarks.placement --trace FILE --mode live --json OUT [--speed 1] [--sim-json SIM_OUT]

``--mode simulate`` is a discrete-event simulation (``benchmarks.simulation``) of the pool
design — one simulator pool ``cpu-local`` of ``POOL_CORES`` cores whose candidates are
``ray_qalloc.backends.pools.pool_candidate_specs`` (each Aer method on one thread, statevector
and density matrix also on both cores), and the three emulated QPUs — driven by the same
``Scheduler`` the allocator runs. ``--mode live`` replays the trace for real through the
allocator on a local Ray and reports qalloc's row with the same keys, and, given the simulated
JSON of the same trace (``--sim-json``), the simulate/live gap of qalloc's mean JCT.

What is true (measured), and what the policies see:

* **Runtime truth** (``benchmarks.truth``): every unique circuit measured on each candidate —
  method AND thread count — and on Aer ``automatic``, by the capped measuring worker; a run
  censored at the cap is charged 3× the cap. QPU time (``benchmarks.fidelity``): the modelled
  busy time of the emulated device for the job's shots.
* **Fidelity truth** (``benchmarks.fidelity``): the Hellinger fidelity of the emulated device's
  noisy counts against the circuit's ideal distribution (exact or sampled, recorded), for every
  quantum/auto circuit of at most 10 qubits; wider circuits get the device's ESP of the
  transpiled circuit, labelled not measured. Simulators: 1.0.
* **Predictions**: each job is planned at its arrival (``plan`` over the pool's views with the
  predictor). qalloc's predictor is the live allocator's (``benchmarks.live_learning``: model + run
  memory, online correction, hedged backups with the live settings). Baselines get the same
  plans' feasibility from the plain predictor and never learn or hedge.
* **The pools**: qalloc, ``random`` and ``hindsight`` on the candidates + QPUs; ``fcfs``,
  ``least_loaded``, ``aer_automatic`` and ``best_fidelity`` on what a user gets for free — the
  same cores running Aer ``automatic`` (``<pool>/automatic``, one thread per run) + the QPUs.
* **The lower bound**: each job's fastest true runtime over every backend it could use, no
  queueing — not a policy. ``hindsight`` is qalloc's selector fed the true runtimes (a row to
  read, not a bound, in no goal).

Metrics per policy (``policies.<name>``): ``mean_jct_s``, ``p95_jct_s``, ``makespan_s``,
``deadline_miss_rate``, ``emergency_p99_wait_s``, ``mean_fidelity_quantum`` (measured),
``total_cost``, counts, hedges. ``ratios`` and ``goals`` (``benchmarks.report``) depend on the
trace's mix (``--mix``, else the trace's ``mix`` field, else its content).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from benchmarks._common import make_console, write_json
from benchmarks.baselines import FREE_POOL_POLICIES, POLICIES
from benchmarks.report import (detect_mix, families_seen, goals, print_report, ratios, strip_paired,
                               trained_families)
from benchmarks.simulation import (METRICS, HindsightPlanner, PipelinePlanner, SimJob, lower_bound, metrics,
                                   percentile, simulate)
from benchmarks.truth import CENSORED_FACTOR, POOL, POOL_CORES, POOL_MEMORY_BYTES
from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.placement.model import JobView

DEFAULT_TIME_CAP_S = 20.0
DEFAULT_TRUTH_DIR = Path("out/placement-truth")
LIVE_GAP_TARGET = 0.25

__all__ = ["METRICS", "SimJob", "simulate", "percentile", "case_id_of", "intake", "run", "live", "main",
           "qalloc_world", "free_world", "ratios", "goals"]


def case_id_of(qasm: str, shots: int) -> str:
    return "trace:" + hashlib.sha1(f"{qasm}\n{int(shots)}".encode("utf-8")).hexdigest()[:12]


@dataclass
class Workload:
    """A trace after intake: accepted jobs, their circuits (one per unique QASM + shots)."""

    jobs: list[SimJob] = field(default_factory=list)
    case_of: dict[str, str] = field(default_factory=dict)          # job id -> case id
    cases: dict[str, Any] = field(default_factory=dict)            # case id -> SweepCase
    rejected: list[dict[str, str]] = field(default_factory=list)   # {"id", "error"}
    families: list[str | None] = field(default_factory=list)       # per accepted job
    non_clifford: dict[str, bool] = field(default_factory=dict)    # case id -> any non-Clifford op


_KEYED = "circuit_key" in getattr(JobView, "__dataclass_fields__", {})


def intake(records: Sequence[Mapping[str, Any]]) -> Workload:
    """Validate every trace line as intake would, parse each unique circuit once."""
    from ray_qalloc.config import Limits
    from ray_qalloc.costmodel.measure import SweepCase
    from ray_qalloc.exceptions import QAllocError
    from ray_qalloc.jobs import check_limits, make_spec, prepare_job

    limits = Limits()
    w = Workload()
    parsed: dict[tuple[str, bool], Any] = {}   # (case id, quantum) -> PreparedJob or the error text
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
        key = (cid, spec.intent.value == "quantum")    # intake takes a quantum job's output profile
        if key not in parsed:
            try:
                parsed[key] = prepare_job(make_spec(circuit=qasm, shots=spec.shots, intent=spec.intent.value),
                                          limits, job_id=cid)
            except QAllocError as exc:
                parsed[key] = str(exc)
            except Exception as exc:  # noqa: BLE001 - any parser failure is a refused job, not a crash
                parsed[key] = f"{type(exc).__name__}: {exc}"
        prepared = parsed[key]
        if isinstance(prepared, str):
            w.rejected.append({"id": jid, "error": prepared})
            continue
        if cid not in w.cases:
            w.cases[cid] = SweepCase(cid, str(rec.get("family") or "trace"), "qasm", prepared.num_qubits,
                                     spec.shots, qasm)
            w.non_clifford[cid] = float(prepared.features.get("clifford_fraction", 1.0) or 0.0) < 1.0
        extra = {"circuit_key": cid} if _KEYED else {}
        view = JobView(jid, prepared.num_qubits, prepared.ops, prepared.features, spec.shots,
                       intent=spec.intent.value, priority=spec.priority.value, fidelity_min=spec.fidelity_min,
                       deadline_s=spec.deadline_s, tenant=spec.tenant, **extra)
        w.jobs.append(SimJob(jid, float(rec.get("arrival_s") or 0.0), view, cid))
        w.case_of[jid] = cid
        w.families.append(rec.get("family"))
    return w


# ---------------------------------------------------------------------------------------------
# The two pool worlds
# ---------------------------------------------------------------------------------------------

def qpu_views() -> list[Any]:
    """The emulated QPUs as placement sees them: spec with ``threads=0`` (no local core), the
    calibration summary and the ranked per-qubit profile (as the allocator's fleet gives them: the
    profile carries the calibrated gate, readout and per-shot times, without which an ion's or an
    atom's QPU time would be estimated with a superconducting chip's)."""
    from ray_qalloc.backends.registry import FAKE_QPU_POOL, make_backend
    from ray_qalloc.placement.model import BackendView, QubitProfile

    out = []
    for name in FAKE_QPU_POOL:
        b = make_backend(name)
        cal = b.calibration()
        out.append(BackendView(b.spec().copy(threads=0), True, cal.summary(), None, QubitProfile.of(cal)))
    return out


def qalloc_world(qpus: Sequence[Any], cores: int = POOL_CORES, memory_bytes: int = POOL_MEMORY_BYTES) -> list[Any]:
    from benchmarks.truth import pool_specs
    from ray_qalloc.placement.model import BackendView

    return [BackendView(s) for s in pool_specs(POOL, cores, memory_bytes)] + list(qpus)


def free_world(qpus: Sequence[Any], cores: int = POOL_CORES, memory_bytes: int = POOL_MEMORY_BYTES) -> list[Any]:
    from benchmarks.truth import automatic_spec
    from ray_qalloc.placement.model import BackendView

    return [BackendView(automatic_spec(POOL, cores, memory_bytes))] + list(qpus)


# ---------------------------------------------------------------------------------------------
# Truth per job
# ---------------------------------------------------------------------------------------------

def qpu_truth(work: Workload, qpus: Sequence[str], profiles: Any) -> tuple[dict[str, dict[str, float]],
                                                                           dict[str, dict[str, float]], dict[str, Any]]:
    """Per job: modelled QPU seconds (its shots) and measured (or ESP) fidelity on each QPU;
    the info's ``unmeasured`` holds the (job, QPU) pairs whose fidelity is an ESP estimate."""
    from benchmarks.fidelity import qpu_seconds

    runtime: dict[str, dict[str, float]] = {}
    fid: dict[str, dict[str, float]] = {}
    sources: dict[str, int] = {}
    ideal: dict[str, int] = {}
    noise: dict[str, int] = {}
    unmeasured: set[tuple[str, str]] = set()
    for j in work.jobs:
        qasm = work.cases[work.case_of[j.id]].source
        for b in qpus:
            p = profiles.get(qasm, b)
            if p is None or p.get("error") or p.get("duration_s") is None:
                continue
            runtime.setdefault(j.id, {})[b] = qpu_seconds(p, j.view.shots)
            if p.get("fidelity") is not None:
                fid.setdefault(j.id, {})[b] = float(p["fidelity"])
                src = str(p.get("fidelity_source"))
                sources[src] = sources.get(src, 0) + 1
                if src != "measured":
                    unmeasured.add((j.id, b))
                ideal[str(p.get("ideal"))] = ideal.get(str(p.get("ideal")), 0) + 1
                noise[str(p.get("noise_model"))] = noise.get(str(p.get("noise_model")), 0) + 1
    return runtime, fid, {"job_qpu_pairs_by_fidelity_source": sources, "ideal_distribution": ideal,
                          "noise_model": noise, "unmeasured": unmeasured}


def qpu_circuits(work: Workload, intents: Sequence[str] = ("quantum", "auto")) -> list[tuple[str, int]]:
    """Unique circuits of jobs that could go to a QPU (intent quantum or auto), smallest first."""
    seen: dict[str, int] = {}
    for j in work.jobs:
        if j.view.intent in intents:
            c = work.cases[work.case_of[j.id]]
            seen[c.source] = c.size
    return sorted(seen.items(), key=lambda x: x[1])


QPU_MEASURE_CHOICES = ("all", "quantum", "none")


class LayeredProfiles:
    """QPU profiles read from the measured cache first, then from the ESP-only cache.

    Why two files: running a 10-qubit circuit on an emulated QPU with exact local noise takes
    80-95 s on this loaded machine, five QPUs per circuit, so a trace of 50 small ``auto``
    circuits needs hours before any policy is simulated. ``--qpu-measure quantum`` measures the
    circuits of quantum-intent jobs (the fidelity goal is about them) and gives circuits only
    ``auto`` jobs carry the device's schedule and ESP (labelled ``esp_transpiled``: not
    measured). Those live in ``qpu-esp.jsonl`` so that a later full run still measures them."""

    def __init__(self, measured: Any, esp: Any) -> None:
        self.measured, self.esp = measured, esp

    def get(self, qasm: str, backend: str) -> dict[str, Any] | None:
        return self.measured.get(qasm, backend) or self.esp.get(qasm, backend)


def esp_profiles(circuits: Sequence[tuple[str, int]], backends: Sequence[str], cache: Any, skip: Any,
                 cap_s: float = 120.0, profile: Callable[[str, str], Any] | None = None) -> dict[str, int]:
    """Schedule and ESP (no run) of every (circuit, QPU) pair in neither cache.

    ``profile(backend, qasm)`` returns the profile dict or raises (tests inject it); by default
    ``benchmarks.fidelity.qpu_profile`` without a run, in the capped measuring worker."""
    todo = [(q, n, b) for q, n in circuits for b in backends if skip.get(q, b) is None and cache.get(q, b) is None]
    stats = {"esp_only": 0, "esp_failed": 0, "esp_todo": len(todo)}
    if not todo:
        return stats
    worker = None
    if profile is None:
        from ray_qalloc.costmodel.measure import Worker

        worker = Worker(threads=1)

        def profile(backend: str, qasm: str) -> Any:
            res = worker.call(("call", "benchmarks.fidelity:qpu_profile", (backend, qasm, False, 0, 0)), cap_s)
            if res.status != "ok":
                raise RuntimeError(f"{res.status}: {res.value}")
            return res.value
    try:
        for qasm, n, b in todo:
            try:
                cache.add(qasm, profile(b, qasm))
                stats["esp_only"] += 1
            except Exception as exc:  # noqa: BLE001 - a pair that fails has no profile, as measure_profiles
                cache.add(qasm, {"backend": b, "num_qubits": n, "error": str(exc)[:500]})
                stats["esp_failed"] += 1
    finally:
        if worker is not None:
            worker.close()
    return stats


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def run(trace: Path, *, model: Path | None, truth_dir: Path, time_cap_s: float, seed: int,
        policies: Sequence[str], console: Any, mix: str | None = None, samples: int = 2,
        measure_fn: Callable[..., Any] | None = None, profile_fn: Callable[..., Any] | None = None,
        per_job: bool = False, qpu_measure: str = "all", truth_clock: str = "wall",
        esp_fn: Callable[[str, str], Any] | None = None) -> dict[str, Any]:
    """Measure (or reuse) truth, simulate every policy, and assemble the JSON.

    ``per_job``: each policy's row also lists every job (backend, start, completion), and the
    JSON holds each job's true runtimes (``truth``): what it takes to say *why* a policy lost.
    ``qpu_measure``: ``all`` (QPU fidelity measured for quantum and auto circuits), ``quantum``
    (quantum-intent circuits only) or ``none`` (cached measurements only); see ``LayeredProfiles``.
    ``truth_clock``: ``wall`` (measured wall time) or ``cpu`` (CPU time; ``truth.read_truth``)."""
    from benchmarks import fidelity as fid_mod
    from benchmarks import live_learning as learning, truth as truth_mod
    from benchmarks.traces import read_trace
    from ray_qalloc.costmodel.registry import load_predictor

    t0 = time.perf_counter()
    records = read_trace(trace)
    work = intake(records)
    if not work.jobs:
        raise SystemExit(f"{trace}: no job passed intake ({len(work.rejected)} rejected)")
    qpus = qpu_views()
    q_views, f_views = qalloc_world(qpus), free_world(qpus)
    q_specs = {v.name: v.spec for v in q_views}
    f_specs = {v.name: v.spec for v in f_views}
    sim_specs = [v.spec for v in q_views if v.spec.kind == "simulator"] + [f_views[0].spec]
    console.print(f"{len(work.jobs)} jobs ({len(work.rejected)} rejected), {len(work.cases)} unique circuits; "
                  f"truth on {', '.join(s.name for s in sim_specs)} (cap {time_cap_s:g} s) and "
                  f"{', '.join(v.name for v in qpus)}; cache {truth_dir}")

    measured = fid_mod.QpuProfiles(truth_dir / "qpu.jsonl")
    circuits = qpu_circuits(work, {"all": ("quantum", "auto"), "quantum": ("quantum",)}.get(qpu_measure, ()))
    t_q = time.perf_counter()
    q_stats = (profile_fn or fid_mod.measure_profiles)(circuits, [v.name for v in qpus], measured) if circuits else {}
    profiles: Any = measured
    if qpu_measure != "all":
        esp = fid_mod.QpuProfiles(truth_dir / "qpu-esp.jsonl")
        q_stats = {**(q_stats or {}), **esp_profiles(qpu_circuits(work), [v.name for v in qpus], esp, measured,
                                                     profile=esp_fn)}
        profiles = LayeredProfiles(measured, esp)
    q_wall = time.perf_counter() - t_q
    # simulators are measured only on circuits some job may run there: a circuit that only
    # quantum-intent jobs carry has no simulator in any policy's plan
    simulable = {work.case_of[j.id] for j in work.jobs if j.view.intent != "quantum"}
    sim_cases = {cid: c for cid, c in work.cases.items() if cid in simulable}
    t_report = truth_mod.measure_truth(sim_cases, sim_specs, truth_dir, time_cap_s=time_cap_s,
                                       measure_fn=measure_fn, progress=console.is_terminal, samples=samples)
    by_case, outcomes = truth_mod.read_truth(truth_dir, set(work.cases), sim_specs, time_cap_s, clock=truth_clock)
    q_runtime, q_fid, fid_info = qpu_truth(work, [v.name for v in qpus], profiles)
    truth = {j.id: {**by_case.get(work.case_of[j.id], {}), **q_runtime.get(j.id, {})} for j in work.jobs}
    fidelity = q_fid
    unmeasured = fid_info.pop("unmeasured")
    penalty = CENSORED_FACTOR * time_cap_s

    plain = load_predictor(model, exploration_rate=0.0) if model else load_predictor(None, exploration_rate=0.0)
    all_specs = {**q_specs, **f_specs}
    feasible = {}
    for j in work.jobs:
        p1 = PipelinePlanner(q_views + f_views[:1], plain, learn=False).plan(j, j.arrival_s)
        feasible[j.id] = list(p1.estimates) if p1 is not None else []
    bound = lower_bound(work.jobs, truth, feasible, all_specs, cores=POOL_CORES, penalty_s=penalty)

    results: dict[str, Any] = {}
    learning_info: dict[str, Any] = {}
    prices = {n: s.price for n, s in all_specs.items()}
    # the allocator's own typed settings: scheduler thresholds, class weights, hedging, probes
    settings = learning.live_settings()
    config = dataclasses.replace(settings.scheduler_config(), explain=False)
    learning_info["scheduler"] = dict(settings.scheduler)
    for name in policies:
        t = time.perf_counter()
        hedger, prober, hedge_check = None, None, 0.5
        if name == "qalloc":
            predictor, learning_info["predictor"] = learning.qalloc_predictor(model, seed)
            planner: Any = learning.LearningPlanner(q_views, predictor, q_specs, settings=settings)
            hedger, learning_info["hedging"] = learning.live_hedger(planner, settings)
            prober, learning_info["probes"] = learning.live_prober(planner, settings)
            hedge_check = settings.hedge.interval_s
            views = q_views
        elif name == "hindsight":
            planner = HindsightPlanner(PipelinePlanner(q_views, plain, learn=False, settings=settings), truth,
                                       fidelity, prices, penalty)
            views = q_views
        else:
            views = f_views if name in FREE_POOL_POLICIES else q_views
            planner = PipelinePlanner(views, plain, learn=False, settings=settings)
        pool = [v.spec for v in views]
        record: list[dict[str, Any]] | None = [] if per_job else None
        results[name] = simulate(work.jobs, truth, planner, pool, name, fidelity=fidelity, penalty_s=penalty,
                                 seed=seed, node_cpus={POOL: float(POOL_CORES)}, hedger=hedger, prober=prober,
                                 hedge_check_s=hedge_check, config=config, unmeasured=unmeasured, record=record)
        if record is not None:
            results[name]["per_job"] = record
        results[name]["pool"] = "candidates" if views is q_views else "automatic (free)"
        results[name]["sim_wall_s"] = time.perf_counter() - t
        if name == "qalloc":
            results[name]["remembered"] = getattr(planner, "remembered", None)
            results[name]["fidelity_samples"] = getattr(planner, "fidelity_samples", None)
            results[name]["explorations"] = getattr(getattr(planner.predictor, "base", planner.predictor),
                                                    "explorations", None)

    if mix is None:
        sizes = [work.cases[work.case_of[j.id]].size for j in work.jobs]
        ncl = [work.non_clifford[work.case_of[j.id]] for j in work.jobs]
        mix, mix_from = detect_mix(records, sizes, ncl)
    else:
        mix_from = "--mix"
    trained, trained_from = trained_families(model)
    r = ratios(results, bound)
    strip_paired(results)
    strip_paired({"lower_bound": bound})
    n_out = sum(1 for row in outcomes.values() for o in row.values() if o.startswith("censored"))
    return {
        "benchmark": "placement", "mode": "simulate", "trace": str(trace), "mix": mix, "mix_from": mix_from,
        "families": families_seen(work.families, trained), "trained_families_from": trained_from,
        "predictor": getattr(plain, "source", "prior"), "time_cap_s": time_cap_s, "seed": seed,
        "jobs": len(work.jobs), "rejected": len(work.rejected), "rejected_jobs": work.rejected[:50],
        "unique_circuits": len(work.cases), "pool": POOL, "pool_cores": POOL_CORES,
        "pool_memory_bytes": POOL_MEMORY_BYTES, "candidates": [v.name for v in q_views],
        "free_pool": [v.name for v in f_views], "learning": learning_info,
        "modelling": {
            "runtime_truth": (("measured wall_s" if truth_clock == "wall" else
                               "measured CPU seconds (k threads: max(cpu_k/k, cpu_1 x wall_k/wall_1))")
                              + " (transpile + run) of each method at each thread count, capped worker; "
                              f"the smallest of {samples} samples per pair, taken in separate passes"),
            "truth_clock": truth_clock,
            "automatic_truth": "automatic and the 1-thread candidate of the method it chose share the smaller of "
                               "their measurements",
            "censored_runtime": f"a run censored at the time cap took at least the cap; charged {CENSORED_FACTOR:g}x "
                                f"the cap; {n_out} censored (case, candidate) pairs",
            "unmeasured_runtime_s": penalty,
            "threads2_below_threshold": f"states of at most {truth_mod.AER_PARALLEL_THRESHOLD} qubits (a density matrix "
                                        "counts double): placement offers no 2-thread candidate; a 2-thread truth "
                                        "read for one is the 1-thread measurement (Aer does not parallelise them)",
            "qpu_runtime": "modelled QPU busy time of the emulated device for the job's shots",
            "qpu_fidelity": "Hellinger fidelity of FakeQPUBackend noisy counts vs the ideal distribution for "
                            f"circuits <= {fid_mod.QPU_RUN_MAX_QUBITS} qubits ({fid_mod.FIDELITY_SHOTS} shots, "
                            "fixed seed); wider: ESP of the transpiled circuit (not measured)",
            "fidelity_truth": fid_info, "simulator_fidelity": 1.0,
            "concurrency": "runs on the two cores assumed not to slow each other (each was measured alone)",
            "lower_bound": "each job's fastest true runtime over every backend it could use, no queueing",
            "hindsight": "qalloc's selector on plans of true runtimes/fidelities (not a bound, in no goal)",
            "fifo_baselines": "fcfs, least_loaded, aer_automatic, best_fidelity, random ignore priority and "
                              "deadlines; none learns or hedges",
        },
        "measure": {"runtime": t_report.to_dict(), "samples_per_pair": samples,
                    "truth_log": truth_mod.measure_log(truth_dir),
                    "qpu": {**(q_stats or {}), "wall_s": round(q_wall, 2), "circuits": len(circuits),
                            "qpu_measure": qpu_measure}},
        "lower_bound": bound, "wall_s": time.perf_counter() - t0,
        **({"truth": {j.id: {"case": j.case_id, "qubits": j.view.num_qubits, "family": fam,
                              "runtime_s": truth.get(j.id, {})}
                      for j, fam in zip(work.jobs, work.families)}} if per_job else {}),
        "policies": results, "ratios": r, "goals": goals(r, mix),
    }


# ---------------------------------------------------------------------------------------------
# Live mode
# ---------------------------------------------------------------------------------------------

def _spec_for(name: str, known: Mapping[str, BackendSpec]) -> BackendSpec:
    """A live result's backend: a known spec, or a candidate name of a live pool (``cpu-xxxx/mps``)."""
    if name in known:
        return known[name]
    from ray_qalloc.backends.aer import DEFAULT_PRICE
    from ray_qalloc.backends.pools import parse_candidate

    c = parse_candidate(name)
    kind = "simulator" if c is not None or name.startswith("aer_") else ("qpu" if name.startswith(("qpu_", "ibm_"))
                                                                          else "simulator")
    return BackendSpec(name, kind, "aer" if kind == "simulator" else "unknown", 0,
                       method=c.method if c is not None else None, price=DEFAULT_PRICE, pool=c.pool if c else None)


def live(trace: Path, *, console: Any, speed: float = 1.0, timeout_s: float = 900.0,
         truth_dir: Path = DEFAULT_TRUTH_DIR, sim_json: Path | None = None, per_job: bool = False) -> dict[str, Any]:
    """Replay the trace for real through the allocator on a local Ray; qalloc's row only.

    Jobs are submitted at their arrival times (divided by ``speed``); times are read back from
    the store (accept, first dispatch, completion). Backends in results are the live pool's
    candidate names (``cpu-xxxx/mps``) or QPU names. Fidelity is the measured one of the QPU
    that ran it (the same cache as the simulation; measured here when missing); cost is the
    backend's price on its run time (QPUs: modelled QPU time), as in the simulation.
    """
    import json
    import tempfile

    from benchmarks import fidelity as fid_mod
    from benchmarks.traces import read_trace
    from ray_qalloc import connect
    from ray_qalloc.exceptions import QAllocError
    from ray_qalloc.store import JobStore

    import ray

    if ray.is_initialized():
        raise SystemExit("--mode live starts a local Ray of its own: run it in a fresh process")
    records = read_trace(trace)
    work = intake(records)
    by_id = {str(r["id"]): r for r in records}
    qpus = qpu_views()
    profiles = fid_mod.QpuProfiles(truth_dir / "qpu.jsonl")
    fid_mod.measure_profiles(qpu_circuits(work), [v.name for v in qpus], profiles)
    _, fidelity, fid_info = qpu_truth(work, [v.name for v in qpus], profiles)
    unmeasured = fid_info.pop("unmeasured")
    known = {v.name: v.spec for v in qpus}
    console.print(f"{len(work.jobs)} jobs ({len(work.rejected)} rejected); replaying at {speed:g}x on a local Ray")
    qa = connect(data_dir=Path(tempfile.mkdtemp(prefix="qalloc-live-")), num_cpus=POOL_CORES,
                 ray_temp_dir=tempfile.mkdtemp(prefix="qp", dir="/tmp"))
    t_start = time.time()
    handles: dict[str, Any] = {}
    submitted: dict[str, float] = {}
    refused: list[dict[str, str]] = []
    specs: dict[str, BackendSpec] = dict(known)
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
        outcome: dict[str, Any] = {}
        cost = 0.0
        from benchmarks.simulation import _Outcome

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
                    spec = specs.setdefault(o.backend, _spec_for(o.backend, known))
                    seconds = rec.result.get("qpu_s") if spec.kind == "qpu" else rec.result.get("wall_s")
                    cost += spec.price.cost(float(seconds or 0.0), job.view.shots)
            outcome[job.id] = o
        failed = {j.id for j in work.jobs if outcome[j.id].completion is None}
    finally:
        qa.shutdown()
    record: list[dict[str, Any]] | None = [] if per_job else None
    row = metrics("qalloc", work.jobs, outcome, failed, fidelity, {}, specs, record, unmeasured)
    strip_paired({"qalloc": row})
    if record is not None:
        row["per_job"] = record
    mix, mix_from = detect_mix(records, [work.cases[work.case_of[j.id]].size for j in work.jobs],
                               [work.non_clifford[work.case_of[j.id]] for j in work.jobs])
    row["total_cost"] = cost
    row["backends_used"] = sorted({o.backend for o in outcome.values() if o.backend})
    gap: dict[str, Any] = {}
    if sim_json is not None and Path(sim_json).exists():
        sim = json.loads(Path(sim_json).read_text())
        s_jct = ((sim.get("policies") or {}).get("qalloc") or {}).get("mean_jct_s")
        l_jct = row.get("mean_jct_s")
        ratio = None if not s_jct or l_jct is None else l_jct / s_jct
        gap = {"live_over_simulated_qalloc_mean_jct": ratio, "simulated_json": str(sim_json)}
    r = {**gap}
    g = []
    if "live_over_simulated_qalloc_mean_jct" in gap:
        v = gap["live_over_simulated_qalloc_mean_jct"]
        dev = None if v is None else abs(v - 1.0)
        g.append({"name": "simulate_live_gap_mean_jct", "what": "|live / simulated qalloc mean JCT - 1|",
                  "value": dev, "op": "<=", "target": LIVE_GAP_TARGET, "met": None if dev is None else
                  dev <= LIVE_GAP_TARGET + 1e-12})
    return {"benchmark": "placement", "mode": "live", "trace": str(trace), "speed": speed, "mix": mix,
            "mix_from": mix_from,
            "predictor": "the allocator's (shipped model or prior, with its run memory and hedging)",
            "jobs": len(work.jobs), "rejected": len(work.rejected) + len(refused),
            "rejected_jobs": (work.rejected + refused)[:50], "policies": {"qalloc": row},
            "ratios": r, "goals": g, "wall_s": time.time() - t_start,
            "modelling": {"live": "the real allocator on a local Ray (2 CPUs): only qalloc's row; baselines are "
                                  "simulate-mode only",
                          "qpu_fidelity": "measured Hellinger fidelity of the QPU that ran the job (cache)",
                          "fidelity_truth": fid_info,
                          "qpu_times": "emulated QPUs answer after their emulation's wall time, not the modelled "
                                       "QPU time the simulation charges, so QPU-heavy traces finish sooner live",
                          "overheads": "live runs pay dispatch, transpile and worker overheads the simulation "
                                       "does not model; compare mean_jct_s_by_intent of the two JSONs"}}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, required=True, help="JSON Lines trace (format of DESIGN.md)")
    ap.add_argument("--mode", choices=("simulate", "live"), default="simulate")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--mix", choices=("light", "heavy", "mixed"),
                    help="the trace's mix, for the goals (default: its 'mix' field, else its content)")
    ap.add_argument("--model", type=Path, help="model registry directory (default: the shipped model or the prior)")
    ap.add_argument("--truth", "--history", dest="truth", type=Path, default=DEFAULT_TRUTH_DIR,
                    help="measured-truth cache (run histories, QPU profiles; reused on a second run)")
    ap.add_argument("--time-cap", type=float, default=DEFAULT_TIME_CAP_S, help="seconds per measured run")
    ap.add_argument("--samples", type=int, default=2, help="measurements per (circuit, candidate); truth: the smallest")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--speed", type=float, default=1.0, help="live mode: replay this many times faster")
    ap.add_argument("--sim-json", type=Path, help="live mode: the simulated JSON of the same trace (for the gap)")
    ap.add_argument("--qpu-measure", choices=QPU_MEASURE_CHOICES, default="all",
                    help="run circuits on the emulated QPUs to measure fidelity: for quantum and auto jobs (all), "
                         "quantum-intent jobs only, or none (the others get the schedule and ESP, labelled; "
                         "measured profiles already cached are used)")
    ap.add_argument("--truth-clock", choices=("wall", "cpu"), default="wall",
                    help="simulators' truth: measured wall time, or the CPU time the run used (what an unshared "
                         "core takes; a loaded machine's wall time measures its load)")
    ap.add_argument("--per-job", action="store_true",
                    help="simulate: every policy's jobs (backend, start, completion) and each job's truth in the JSON")
    args = ap.parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; use {', '.join(POLICIES)}")

    console = make_console()
    if args.mode == "live":
        result = live(args.trace, console=console, speed=args.speed, truth_dir=args.truth, sim_json=args.sim_json,
                      per_job=args.per_job)
    else:
        result = run(args.trace, model=args.model, truth_dir=args.truth, time_cap_s=args.time_cap,
                     seed=args.seed, policies=policies, console=console, mix=args.mix, samples=args.samples,
                     per_job=args.per_job, qpu_measure=args.qpu_measure, truth_clock=args.truth_clock)
    print_report(result, console)
    write_json(args.json, result, console)


if __name__ == "__main__":
    main()
