"""Measured runtime truth for the placement benchmark: per circuit, per pool candidate.

Why per candidate: placement chooses (pool, Aer method, threads) per job
(``ray_qalloc.backends.pools``), so the truth the simulation charges is the measured runtime of
*that method with that thread count*:

* every unique circuit of a trace (same QASM and shots) is run by the capped measuring worker
  (``ray_qalloc.costmodel.measure``) on each Aer method with one thread, and on ``automatic``
  with one thread (what the ``aer_automatic`` baseline runs);
* ``statevector`` and ``density_matrix`` — the methods Aer parallelises — are measured again
  with ``threads=2`` (a worker built with two threads) where Aer uses the threads
  (``placement.filters.aer_parallelises``: a state wider than its
  ``statevector_parallel_threshold``, 14 qubits; a density matrix counts double). Narrower,
  placement offers no many-thread candidate, and a 2-thread truth read for one **is** its
  1-thread truth (``modelling.threads2_below_threshold`` says so in the JSON);
* ``automatic`` and the 1-thread candidate of the method it chose (Aer reports it) share one
  truth, the smaller of their two measurements (two samples of one simulation), so measuring
  noise favours neither side (see ``_pair_automatic``);
* a simulator's true runtime is the measured ``wall_s`` (transpile + run). A run censored at
  the time cap took at least the cap: **it is charged 3× the cap** (``CENSORED_FACTOR``); a
  run censored by memory, or an error, has no truth and is charged the penalty (3× the cap)
  if a policy sends a job there. Pairs placement's filters remove (stabilizer on non-Clifford,
  a density matrix wider than the pool's memory) have no row and no plan has them.

Each pair is measured ``DEFAULT_SAMPLES`` (2) times, in separate passes minutes apart, and its
truth is the **smallest** sample: other work on the two shared cores only ever slows a run
down (a load spike tripled some runs, and censored a 2-thread run that takes 1.6 s on a quiet
machine), so the least disturbed run is the best estimate of the run's own time. The same rule
for every pair, whatever it shows. A censored sample counts as 3× the cap, so a pair
censored in every sample stays censored.

The histories (``<dir>/threads1``, ``<dir>/threads2``, ``<dir>/sampleK/threads*``) are run
histories like any other and are resumed on a rerun: only pairs not yet measured are run. The
machine's 1-minute load average is sampled per measured case and logged per measuring call
(``<dir>/measure-log.jsonl``, copied into the benchmark's JSON), since the truth is only as
clean as the machine was quiet.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.placement.filters import AER_PARALLEL_THRESHOLD, aer_parallelises

CENSORED_FACTOR = 3.0
DEFAULT_SAMPLES = 2        # measurements per pair, minutes apart; the truth is the smallest
MAX_SAMPLES = 8
POOL = "cpu-local"
POOL_CORES = 2
POOL_MEMORY_BYTES = 4 * 2**30           # the measuring memory cap: what one run may use
AUTOMATIC = "automatic"

_MEASURE_NAME = {"statevector": "aer_statevector", "matrix_product_state": "aer_mps",
                 "stabilizer": "aer_stabilizer", "density_matrix": "aer_density_matrix",
                 "automatic": "aer_automatic"}
_MEASURED_METHOD = {v: k for k, v in _MEASURE_NAME.items()}


def pool_specs(pool: str = POOL, cores: int = POOL_CORES, memory_bytes: int = POOL_MEMORY_BYTES) -> list[BackendSpec]:
    """qalloc's simulator candidates of one pool (the pool design)."""
    from ray_qalloc.backends.pools import pool_candidate_specs

    return pool_candidate_specs(pool, cores=cores, memory_bytes=memory_bytes)


def automatic_spec(pool: str = POOL, cores: int = POOL_CORES, memory_bytes: int = POOL_MEMORY_BYTES) -> BackendSpec:
    """Aer ``method="automatic"`` on the same pool, one thread per run (``<pool>/automatic``)."""
    from ray_qalloc.backends.pools import candidate_spec

    return candidate_spec(pool, AUTOMATIC, 1, cores=cores, memory_bytes=memory_bytes)


def measured_as(spec: BackendSpec) -> tuple[str, int]:
    """The measure module's backend name and thread count that stand for a candidate."""
    return _MEASURE_NAME[spec.method or "statevector"], max(spec.threads, 1)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


@dataclass
class TruthReport:
    """What measuring did, for the JSON (noisy machine: the load averages matter)."""

    calls: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "cpu_count": os.cpu_count()}


def history_dir(directory: Path, threads: int, sample: int = 0) -> Path:
    """Where sample ``sample`` (0, 1, ...) of the ``threads``-thread runs is kept."""
    base = Path(directory) if sample == 0 else Path(directory) / f"sample{sample}"
    return base / f"threads{threads}"


def measure_truth(cases: Mapping[str, Any], specs: Sequence[BackendSpec], directory: Path, *, time_cap_s: float,
                  memory_cap_bytes: int = POOL_MEMORY_BYTES, measure_fn: Callable[..., Any] | None = None,
                  progress: bool = True, samples: int = DEFAULT_SAMPLES) -> TruthReport:
    """Measure every (case, candidate) pair not yet in ``directory``, ``samples`` times (see the
    module doc).

    Each sample is a full pass over the cases, smallest first, so that the samples of a pair are
    taken minutes apart (under different load). Within a pass, per case, each thread count right
    after the other (one persistent worker per thread count): the 1- and 2-thread runs of a
    circuit see about the same load from whatever else runs on the machine, which matters more
    for 2-thread runs (a parallel region waits for its slowest thread)."""
    from ray_qalloc.costmodel.history import RunHistory

    real = measure_fn is None
    if measure_fn is None:
        from ray_qalloc.costmodel.measure import measure as measure_fn
    report = TruthReport()
    by_threads: dict[int, set[str]] = {}
    for s in specs:
        name, threads = measured_as(s)
        by_threads.setdefault(threads, set()).add(name)
    hists = {(k, t): RunHistory(history_dir(directory, t, k)) for t in by_threads for k in range(samples)}
    workers: dict[int, Any] = {}
    if real:
        from ray_qalloc.costmodel.measure import Worker

        workers = {t: Worker(threads=t, memory_cap_bytes=memory_cap_bytes) for t in by_threads}
    totals: dict[tuple[int, int], dict[str, Any]] = {
        (k, t): {"sample": k, "threads": t, "backends": sorted(n), "cases": 0, "attempted": 0, "censored": 0,
                 "skipped_existing": 0, "by_outcome": {}, "wall_s": 0.0, "loadavg_1min": []}
        for t, n in by_threads.items() for k in range(samples)}
    t_start = time.time()
    ordered = sorted(cases.values(), key=lambda c: (c.size, c.case_id))
    try:
        for k, i, case in ((k, i, c) for k in range(samples) for i, c in enumerate(ordered)):
            for threads in sorted(by_threads):
                names = sorted(by_threads[threads])
                if threads > 1:
                    names = [n for n in names if aer_parallelises(_MEASURED_METHOD.get(n), case.size)]
                    if not names:
                        continue
                tot = totals[(k, threads)]
                load, t0 = load_average(), time.time()
                rep = measure_fn([case], names, hists[(k, threads)], time_cap_s=time_cap_s,
                                 memory_cap_bytes=memory_cap_bytes, predicted_factor=None, threads=threads,
                                 source="placement-truth", progress=False, worker=workers.get(threads))
                tot["cases"] += 1
                for field_ in ("attempted", "censored", "skipped_existing"):
                    tot[field_] += int(getattr(rep, field_, 0) or 0)
                for outcome, v in (getattr(rep, "by_outcome", None) or {}).items():
                    tot["by_outcome"][outcome] = tot["by_outcome"].get(outcome, 0) + v
                tot["wall_s"] += time.time() - t0
                if load and getattr(rep, "attempted", 0):
                    tot["loadavg_1min"].append(load[0])
            if progress and (i + 1) % 5 == 0:
                print(f"sample {k}: measured {i + 1}/{len(cases)} circuits ({time.time() - t_start:.0f} s)",
                      flush=True)
    finally:
        for w in workers.values():
            w.close()
    for tot in totals.values():
        loads = tot.pop("loadavg_1min")
        tot["wall_s"] = round(tot["wall_s"], 2)
        tot["loadavg_1min_while_measuring"] = ({"min": min(loads), "mean": round(sum(loads) / len(loads), 2),
                                                 "max": max(loads)} if loads else None)
        tot["at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        report.calls.append(tot)
        if tot["attempted"]:
            _log(directory, tot)
    return report


def _log(directory: Path, entry: Mapping[str, Any]) -> None:
    """Every measuring call that ran something, with its load, kept beside the truth: a rerun
    that measures nothing still reports under what load its truth was measured."""
    import json

    Path(directory).mkdir(parents=True, exist_ok=True)
    with (Path(directory) / "measure-log.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")


def measure_log(directory: Path) -> list[dict[str, Any]]:
    import json

    path = Path(directory) / "measure-log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


CLOCKS: tuple[str, ...] = ("wall", "cpu")


def runtime_of(row: Mapping[str, Any], default_cap_s: float, clock: str = "wall") -> float | None:
    """A history row's truth: measured wall time (``clock="cpu"``: the CPU seconds the run used,
    its wall time where none was recorded), 3x the cap when censored by time, else None."""
    outcome = row.get("outcome") or ""
    if outcome == "completed":
        t = row.get("cpu_s") if clock == "cpu" else None
        t = row.get("wall_s") if t is None or not t > 0 else t
        return float(t) if t is not None and t > 0 else None
    if outcome in ("censored_time", "censored_monotone"):
        return CENSORED_FACTOR * float(row.get("cap_s") or default_cap_s)
    return None


def read_truth(directory: Path, case_ids: set[str], specs: Sequence[BackendSpec],
               default_cap_s: float, clock: str = "wall") -> tuple[dict[str, dict[str, float]],
                                                                   dict[str, dict[str, str]]]:
    """Per case: the true runtime of each candidate (the smallest of its samples), and each
    pair's outcome (for the JSON).

    ``clock="cpu"``: a one-thread run's truth is the CPU time it used — what it takes on a core
    nobody else uses, which is what a pool's reserved core gives it. Why: on this shared machine
    wall time measures the other work as much as the run (at load 15-30 a 10-qubit statevector
    run took 0.03-0.19 s of wall for 0.007-0.02 s of CPU; an 18-qubit one 2.7 s for 0.17 s), and
    candidates of one circuit are measured at different moments, so wall-time truth hands
    whichever was measured in a quiet second a random edge. A ``k``-thread run's CPU time counts
    all its threads, so its truth is ``max(cpu_k / k, cpu_1 x wall_k / wall_1)``: no better than
    perfect use of the CPU it burnt, and no better than the speedup its wall time showed against
    the one-thread run of the same method measured right before it (the conservative of two
    estimates; both are lower bounds of a sort)."""
    from ray_qalloc.costmodel.history import RunHistory

    rows: dict[int, dict[tuple[str, str], list[Mapping[str, Any]]]] = {}
    for threads in sorted({measured_as(s)[1] for s in specs}):
        got: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
        for k in range(MAX_SAMPLES):
            path = history_dir(directory, threads, k)
            if k > 0 and not path.exists():
                break
            table = RunHistory(path).read()
            if not table.num_rows or "case_id" not in table.column_names:
                continue
            cols = [c for c in ("case_id", "backend", "outcome", "wall_s", "cpu_s", "cap_s", "num_qubits", "method")
                    if c in table.column_names]
            last: dict[tuple[str, str], Mapping[str, Any]] = {}
            for r in table.select(cols).to_pylist():
                if r.get("case_id") in case_ids:
                    last[(r["case_id"], r["backend"])] = r      # within a sample, the last row of a pair wins
            for key, r in last.items():
                got.setdefault(key, []).append(r)
        rows[threads] = got
    truth: dict[str, dict[str, float]] = {c: {} for c in case_ids}
    outcomes: dict[str, dict[str, str]] = {c: {} for c in case_ids}
    for cid in case_ids:
        for s in specs:
            name, threads = measured_as(s)
            rs = rows.get(threads, {}).get((cid, name))
            if rs is None and threads > 1:
                rs = rows.get(1, {}).get((cid, name))       # below the parallel threshold: 1-thread truth
            if not rs:
                continue
            times = [t for t in (runtime_of(r, default_cap_s, clock) for r in rs) if t is not None]
            done = [r for r in rs if (r.get("outcome") or "") == "completed"]
            outcomes[cid][s.name] = "completed" if done else (rs[-1].get("outcome") or "")
            if len(rs) > 1:
                outcomes[cid][s.name] += f" (min of {len(rs)} samples)"
            if times:
                truth[cid][s.name] = min(times)
            if clock == "cpu" and threads > 1 and done and rows.get(threads, {}).get((cid, name)):
                _threads_from_cpu(cid, s, name, threads, rs, rows.get(1, {}).get((cid, name), []), truth,
                                  default_cap_s)
        for s in specs:
            if s.method == AUTOMATIC:
                _pair_automatic(cid, s, specs, rows.get(1, {}), truth, outcomes, default_cap_s, clock)
    return truth, outcomes


def _threads_from_cpu(cid: str, spec: BackendSpec, name: str, threads: int, rows_k: Sequence[Mapping[str, Any]],
                      rows_1: Sequence[Mapping[str, Any]], truth: dict[str, dict[str, float]],
                      default_cap_s: float) -> None:
    """CPU-clock truth of a ``threads``-thread run (see ``read_truth``): max(cpu_k / k, cpu_1 x
    wall_k / wall_1), each the smallest over samples; the one-thread run censored or missing:
    cpu_k / k alone."""
    def least(rs: Sequence[Mapping[str, Any]], clock: str) -> float | None:
        ts = [runtime_of(r, default_cap_s, clock) for r in rs if (r.get("outcome") or "") == "completed"]
        ts = [t for t in ts if t is not None]
        return min(ts) if ts else None

    cpu_k, wall_k = least(rows_k, "cpu"), least(rows_k, "wall")
    cpu_1, wall_1 = least(rows_1, "cpu"), least(rows_1, "wall")
    if cpu_k is None:
        return
    est = cpu_k / threads
    if cpu_1 is not None and wall_1 and wall_k is not None:
        est = max(est, cpu_1 * wall_k / wall_1)
    truth[cid][spec.name] = est


def _pair_automatic(cid: str, auto: BackendSpec, specs: Sequence[BackendSpec],
                    rows: Mapping[tuple[str, str], list[Mapping[str, Any]]], truth: dict[str, dict[str, float]],
                    outcomes: dict[str, dict[str, str]], default_cap_s: float, clock: str = "wall") -> None:
    """``automatic`` runs the method it picks: it and that method's 1-thread candidate share one truth.

    Why: two runs of the same simulation on a loaded machine differ by tens of percent (a load
    spike tripled some), which would hand either side of the comparison a random edge. Aer
    reports the method ``automatic`` chose (the row's ``method``); where that method was measured
    too, both runs are samples of one simulation's time and both get the smaller (the run less
    disturbed by other work: the usual estimator of a runtime under noise). Otherwise
    ``automatic``'s own measurement stands."""
    done = [r for r in rows.get((cid, _MEASURE_NAME[AUTOMATIC]), []) if (r.get("outcome") or "") == "completed"]
    chosen = {r.get("method") for r in done}
    if len(chosen) != 1:
        return          # not run, or automatic chose differently across samples: its own truth stands
    method = chosen.pop()
    same = next((s for s in specs if s.method == method and s.threads == 1 and s.method != AUTOMATIC), None)
    if same is None:
        return
    times = [t for t in (runtime_of(r, default_cap_s, clock)
                         for r in rows.get((cid, _MEASURE_NAME[method]), []) + done) if t is not None]
    if times and same.name in truth[cid]:
        truth[cid][auto.name] = truth[cid][same.name] = min(times)
        outcomes[cid][auto.name] = f"completed (paired with {same.name})"


__all__ = ["CENSORED_FACTOR", "CLOCKS", "DEFAULT_SAMPLES", "POOL", "POOL_CORES", "POOL_MEMORY_BYTES",
           "pool_specs", "history_dir", "measure_log",
           "automatic_spec", "measured_as", "measure_truth", "read_truth", "runtime_of", "load_average",
           "TruthReport"]
