"""What ray-qalloc costs on top of running a circuit yourself.

For circuits from about 1 ms to about 1 s (layered ry + cz circuits of growing width), each
repetition runs the same circuit twice, back to back, in alternating order:

* direct: ``AerSimulator(method="statevector", max_parallel_threads=1).run(circuit)``,
  the same simulator settings as the pool's one-thread statevector variant;
* ray-qalloc: ``submit(circuit, backends=["<pool>/statevector"]).result()`` on a local Ray:
  intake (validation, features, QPY), the store write, placement, dispatch to the node's pool
  actor, which runs it as a Ray task holding one CPU, completion and the reply.

Pinning the job to the statevector backend makes both sides do the same simulation, so
the difference is the overhead, not a different choice of method.

    python -m benchmarks.overhead --json OUT [--reps 7] [--small]

JSON ``summary``: ``overhead_ratio_median_large`` (median of qalloc/direct over circuits
whose direct run takes ≥ 100 ms; goal ≤ 1.05) and ``overhead_ms_median_small`` (median of
qalloc − direct, in ms, over circuits whose direct run takes < 20 ms; goal ≤ 5 ms).
``hops_ms_median_small``: where the time of a small job goes, from the result's ``timeline``
(one clock, one machine): client → allocator (the submit call and intake in the caller),
placement + the accept/dispatch commit, allocator → task start (pool actor hop and Ray task
scheduling), the run itself (decode + Aer), task → allocator (result through the pool actor),
the completion commit, and allocator → client (the reply to ``result()``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks._common import make_console, write_json
from rich.progress import Progress
from rich.table import Table

# (qubits, layers): direct statevector times from ~1 ms to ~1 s on one core.
SIZES: tuple[tuple[int, int], ...] = ((2, 1), (6, 4), (10, 8), (14, 10), (16, 12), (18, 12), (20, 10),
                                      (21, 12), (22, 10))
# The sizes whose direct run stays under SMALL_S on this machine (the small-job goal's circuits).
SMALL_SIZES: tuple[tuple[int, int], ...] = SIZES[:4]
SHOTS = 1024
LARGE_S = 0.100
SMALL_S = 0.020


def layered_circuit(n: int, layers: int, seed: int = 7):
    """ry on every qubit then a cz chain, ``layers`` times: entangling, not Clifford."""
    import numpy as np
    from qiskit import QuantumCircuit

    rng = np.random.default_rng(seed)
    qc = QuantumCircuit(n, n)
    for _ in range(layers):
        for q in range(n):
            qc.ry(float(rng.uniform(0, np.pi)), q)
        for q in range(n - 1):
            qc.cz(q, q + 1)
    qc.measure(range(n), range(n))
    return qc


def run(reps: int, sizes: tuple[tuple[int, int], ...] = SIZES, console: Console | None = None) -> dict[str, Any]:
    from qiskit_aer import AerSimulator

    from ray_qalloc import connect

    console = console or Console()
    data_dir = Path(tempfile.mkdtemp(prefix="qalloc-bench-"))
    ray_tmp = tempfile.mkdtemp(prefix="qb", dir="/tmp")
    t0 = time.perf_counter()
    qa = connect(data_dir=data_dir, num_cpus=2, ray_temp_dir=ray_tmp)
    startup_s = time.perf_counter() - t0
    sim = AerSimulator(method="statevector", max_parallel_threads=1)
    rows = []
    try:
        circuits = [(n, layers, layered_circuit(n, layers)) for n, layers in sizes]
        # warm both paths (first actor call, first Aer call per process)
        pool = next(b["pool"] for b in qa.backends() if b["pool"])
        pin = [f"{pool}/statevector"]         # one thread, like the direct run
        hops: list[dict[str, float]] = []
        for _, _, qc in circuits[:2]:
            sim.run(qc, shots=SHOTS).result()
            qa.submit(qc, shots=SHOTS, backends=pin).result(timeout=120)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("measuring", total=len(circuits) * reps)
            for n, layers, qc in circuits:
                direct, qalloc = [], []
                for r in range(reps):
                    order = ("direct", "qalloc") if r % 2 == 0 else ("qalloc", "direct")
                    for which in order:
                        t = time.perf_counter()
                        if which == "direct":
                            sim.run(qc, shots=SHOTS).result()
                            direct.append(time.perf_counter() - t)
                        else:
                            t_wall = time.time()
                            res = qa.submit(qc, shots=SHOTS, backends=pin).result(timeout=600)
                            qalloc.append(time.perf_counter() - t)
                            h = _hops(t_wall, time.time(), res)
                            if h is not None:
                                h["qubits"] = n
                                hops.append(h)
                    progress.advance(task)
                d, q = statistics.median(direct), statistics.median(qalloc)
                rows.append({"qubits": n, "layers": layers, "gates": qc.size(), "direct_s": d, "qalloc_s": q,
                             "overhead_ms": (q - d) * 1e3, "ratio": q / d,
                             "direct_all_s": direct, "qalloc_all_s": qalloc})
    finally:
        qa.shutdown()
    small_n = {r["qubits"] for r in rows if r["direct_s"] < SMALL_S}
    small_hops = [h for h in hops if h["qubits"] in small_n]
    large = [r["ratio"] for r in rows if r["direct_s"] >= LARGE_S]
    small = [r["overhead_ms"] for r in rows if r["direct_s"] < SMALL_S]
    summary = {
        "overhead_ratio_median_large": statistics.median(large) if large else None,
        "overhead_ms_median_small": statistics.median(small) if small else None,
        "overhead_ms_median_all": statistics.median(r["overhead_ms"] for r in rows),
        "n_large": len(large), "n_small": len(small), "reps": reps, "startup_s": startup_s,
        "goal_ratio_large": 1.05, "goal_ms_small": 5.0,
        "hops_ms_median_small": {k: statistics.median(h[k] for h in small_hops) for k in HOPS} if small_hops else None,
    }
    return {"benchmark": "overhead", "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "rows": rows, "summary": summary}


HOPS: tuple[str, ...] = ("client_to_allocator", "place_and_commit", "allocator_to_run", "run",
                         "run_to_allocator", "complete_commit", "allocator_to_client")


def _hops(t_submit: float, t_done: float, res: Any) -> dict[str, float] | None:
    """Milliseconds per hop of one job, from its timeline (None off the fast path)."""
    tl = res.metadata.get("timeline")
    if not tl or not tl.get("accepted_at") or not tl.get("completed_at") or not tl.get("run_started_at"):
        return None
    marks = [t_submit, tl["accepted_at"], tl["committed_at"], tl["run_started_at"], tl["run_finished_at"],
             tl["result_at_allocator"], tl["completed_at"], t_done]
    return {k: (b - a) * 1e3 for k, a, b in zip(HOPS, marks, marks[1:])}


def print_table(result: dict[str, Any], console: Console) -> None:
    t = Table(title="ray-qalloc overhead: submit→result vs direct AerSimulator.run (statevector, 1 thread)")
    for col in ("qubits", "layers", "gates", "direct ms", "qalloc ms", "overhead ms", "ratio"):
        t.add_column(col, justify="right")
    for r in result["rows"]:
        t.add_row(str(r["qubits"]), str(r["layers"]), str(r["gates"]), f"{r['direct_s'] * 1e3:.2f}",
                  f"{r['qalloc_s'] * 1e3:.2f}", f"{r['overhead_ms']:.2f}", f"{r['ratio']:.3f}")
    console.print(t)
    s = result["summary"]
    if s["overhead_ratio_median_large"] is not None:    # none with --small
        console.print(f"overhead_ratio_median_large = {s['overhead_ratio_median_large']:.3f} (goal ≤ 1.05, "
                      f"{s['n_large']} circuits ≥ {LARGE_S * 1e3:.0f} ms)")
    if s["overhead_ms_median_small"] is not None:
        console.print(f"overhead_ms_median_small   = {s['overhead_ms_median_small']:.2f} ms (goal ≤ 5 ms, "
                      f"{s['n_small']} circuits < {SMALL_S * 1e3:.0f} ms)")
    if s.get("hops_ms_median_small"):
        console.print("where a small job's time goes (median ms): " + ", ".join(
            f"{k} {v:.2f}" for k, v in s["hops_ms_median_small"].items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--reps", type=int, default=7, help="repetitions per circuit and path")
    ap.add_argument("--small", action="store_true",
                    help=f"only the circuits of the small-job goal ({', '.join(f'{n}x{l}' for n, l in SMALL_SIZES)}): "
                         "minutes less, for before/after readings of the per-job overhead")
    args = ap.parse_args()
    console = make_console()
    result = run(args.reps, SMALL_SIZES if args.small else SIZES, console=console)
    print_table(result, console)
    write_json(args.json, result, console)


if __name__ == "__main__":
    main()
