"""The GPU pool's methods against the CPU on the same machine, each as a ratio, in one run.

    python -m benchmarks.gpu --json OUT [--sv-qubits 24,26,28,30] [--tn-qubits 64] [--tn-depth 8]
                             [--shots 1024] [--budget-s 420]

On a machine with an NVIDIA GPU (NVML reports one) and the ``gpu`` extra installed:

1. **correctness first**: a 12-qubit random circuit on every GPU engine here (cuStateVec
   through cuquantum-python, Aer's CUDA build if installed, cuTensorNet) against Aer's CPU
   statevector: total-variation distance of the counts (must be within shot noise);
2. **statevector, 24–32 qubits**: the same layered circuit (ry on every qubit, then cz on
   alternate pairs; depth 20) on Aer's CPU statevector with all the machine's cores, on
   cuStateVec through the bindings, and on Aer's CUDA build with cuStateVec turned on; the
   ratio CPU/GPU per width, and which GPU engine was faster (``statevector_engine_faster``);
3. **tensor network, 50–100 qubits, depth ≤ 10**: a brickwork circuit no statevector holds,
   sampled on cuTensorNet, against Aer's CPU matrix-product-state method (the CPU's way to
   simulate it) on the same machine: the ratio.

A size whose projected time would overrun ``--budget-s`` is skipped and listed as such, so the
whole run stays inside the device check's 10 minutes. Without a GPU it says so and exits 3
(``--json`` still writes ``{"gpu": false, "reason": ...}``): nothing here is simulated on a CPU
alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

NO_GPU_EXIT = 3


def layered(n: int, depth: int, seed: int = 0) -> Any:
    """ry on every qubit then cz on alternating neighbour pairs, ``depth`` times, all measured."""
    import numpy as np
    from qiskit import QuantumCircuit

    rng = np.random.default_rng(seed)
    qc = QuantumCircuit(n)
    for layer in range(depth):
        for q in range(n):
            qc.ry(float(rng.uniform(0, np.pi)), q)
        for q in range(layer % 2, n - 1, 2):
            qc.cz(q, q + 1)
    qc.measure_all()
    return qc


def tvd(a: dict[str, int], b: dict[str, int]) -> float:
    na, nb = max(sum(a.values()), 1), max(sum(b.values()), 1)
    return 0.5 * sum(abs(a.get(k, 0) / na - b.get(k, 0) / nb) for k in set(a) | set(b))


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _aer_cpu(method: str, circuit: Any, shots: int, seed: int = 1) -> dict[str, int]:
    from qiskit_aer import AerSimulator

    sim = AerSimulator(method=method, max_parallel_threads=os.cpu_count() or 1)
    return dict(sim.run(circuit, shots=shots, seed_simulator=seed).result().get_counts())


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ray_qalloc.backends.gpu import GpuBackend, run_custatevec, run_cutensornet
    from ray_qalloc.backends.gpu_probe import default_probe, per_gpu_budget_bytes

    probe = default_probe()
    devices = probe.devices()
    engines = probe.engines()
    deadline = time.perf_counter() + args.budget_s
    result: dict[str, Any] = {"gpu": True, "devices": [d.to_dict() for d in devices], "engines": sorted(engines),
                              "cpu_cores": os.cpu_count(), "checks": [], "statevector": [], "tensornet": [],
                              "skipped": []}
    budget = per_gpu_budget_bytes(devices[:1])

    # 1. correctness
    small = layered(12, 6, seed=7)
    ref = _aer_cpu("statevector", small, args.shots)
    gpu_runs: dict[str, Callable[[], dict[str, int]]] = {}
    if "custatevec" in engines:
        gpu_runs["custatevec"] = lambda: run_custatevec(small, args.shots, 3)
    if "aer_gpu" in engines:
        aer_gpu = GpuBackend("statevector", memory_bytes=budget, name="bench/statevector", engines=frozenset({"aer_gpu"}))
        gpu_runs["aer_gpu"] = lambda: aer_gpu.run(small, args.shots, seed=3).counts
    if "cutensornet" in engines:
        gpu_runs["cutensornet"] = lambda: run_cutensornet(small, args.shots, 3)
    for name, fn in gpu_runs.items():
        try:
            counts = fn()
            d = tvd(counts, ref)
            result["checks"].append({"engine": name, "qubits": 12, "tvd_vs_aer_cpu": d, "ok": d < 0.12})
        except Exception as exc:  # noqa: BLE001 - a broken engine is a finding, not a crash
            result["checks"].append({"engine": name, "qubits": 12, "error": f"{type(exc).__name__}: {exc}", "ok": False})

    # 2. statevector: CPU vs each GPU engine, per width
    faster: dict[str, int] = {}
    cpu_prev: tuple[int, float] | None = None
    for n in args.sv_qubits:
        if 16 * 2**n > budget:
            result["skipped"].append({"what": f"statevector {n}", "why": "exceeds one GPU's memory budget"})
            continue
        qc = layered(n, 20, seed=n)
        row: dict[str, Any] = {"qubits": n, "gates": qc.size()}
        remaining = deadline - time.perf_counter()
        projected = cpu_prev[1] * 4 ** ((n - cpu_prev[0]) / 2) if cpu_prev else 0.0
        if projected < 0.4 * remaining:
            row["cpu_s"], _ = _timed(lambda: _aer_cpu("statevector", qc, args.shots))
            cpu_prev = (n, row["cpu_s"])
        else:
            row["cpu_s"] = None
            result["skipped"].append({"what": f"CPU statevector {n}", "why": f"projected {projected:.0f} s"})
        for name in ("custatevec", "aer_gpu"):
            if name not in engines or deadline - time.perf_counter() < 10:
                continue
            backend = GpuBackend("statevector", memory_bytes=budget, name=f"bench/{name}", engines=frozenset({name}))
            try:
                if n == args.sv_qubits[0]:
                    backend.warm_up()
                row[f"{name}_s"], _ = _timed(lambda: backend.run(qc, args.shots, seed=1))
            except Exception as exc:  # noqa: BLE001
                row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
                continue
            if row["cpu_s"]:
                row[f"cpu_over_{name}"] = row["cpu_s"] / row[f"{name}_s"]
        gpu_times = {k.removesuffix("_s"): v for k, v in row.items() if k in ("custatevec_s", "aer_gpu_s")}
        if gpu_times:
            best = min(gpu_times, key=gpu_times.get)
            faster[best] = faster.get(best, 0) + 1
            row["faster_gpu_engine"] = best
        result["statevector"].append(row)
    result["statevector_engine_faster"] = max(faster, key=faster.get) if faster else None

    # 3. tensor network: wide and shallow
    if "cutensornet" in engines:
        qc = layered(args.tn_qubits, args.tn_depth, seed=11)
        row = {"qubits": args.tn_qubits, "depth": args.tn_depth, "shots": args.shots}
        try:
            run_cutensornet(layered(8, 2), 16, 1)          # context, handles
            row["cutensornet_s"], _ = _timed(lambda: run_cutensornet(qc, args.shots, 5))
        except Exception as exc:  # noqa: BLE001
            row["cutensornet_error"] = f"{type(exc).__name__}: {exc}"
        if deadline - time.perf_counter() > 30:
            row["cpu_mps_s"], _ = _timed(lambda: _aer_cpu("matrix_product_state", qc, args.shots))
            if row.get("cutensornet_s"):
                row["cpu_mps_over_cutensornet"] = row["cpu_mps_s"] / row["cutensornet_s"]
        result["tensornet"].append(row)
    else:
        result["skipped"].append({"what": "tensor network", "why": "cuTensorNet not importable"})
    result["ok"] = all(c.get("ok") for c in result["checks"]) and bool(result["checks"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--sv-qubits", type=lambda s: [int(x) for x in s.split(",")], default=[24, 26, 28, 30, 32])
    parser.add_argument("--tn-qubits", type=int, default=64)
    parser.add_argument("--tn-depth", type=int, default=8)
    parser.add_argument("--shots", type=int, default=1024)
    parser.add_argument("--budget-s", type=float, default=420.0)
    args = parser.parse_args(argv)
    from benchmarks._common import make_console, write_json
    from ray_qalloc.backends.gpu_probe import default_probe

    console = make_console()
    if not default_probe().devices():
        reason = ("no NVIDIA GPU present: NVML reports none (no driver, no device, or nvidia-ml-py not "
                  "installed). Nothing is measured. To fix: run it on a GPU node with the gpu extra "
                  "installed (bash benchmarks/gpu_check.sh does both).")
        print(reason, file=sys.stderr)
        write_json(args.json, {"gpu": False, "reason": reason}, console)
        return NO_GPU_EXIT
    result = run(args)
    from rich.table import Table

    table = Table(title="GPU vs CPU on this machine (ratios > 1: the GPU is faster)")
    for col in ("what", "qubits", "CPU s", "cuStateVec s", "Aer GPU s", "cuTensorNet s", "ratio"):
        table.add_column(col)
    for r in result["statevector"]:
        ratios = [f"{k}={v:.1f}" for k, v in r.items() if k.startswith("cpu_over_")]
        table.add_row("statevector", str(r["qubits"]), _s(r.get("cpu_s")), _s(r.get("custatevec_s")),
                      _s(r.get("aer_gpu_s")), "", " ".join(ratios))
    for r in result["tensornet"]:
        table.add_row(f"tensornet depth {r['depth']}", str(r["qubits"]), _s(r.get("cpu_mps_s")), "", "",
                      _s(r.get("cutensornet_s")), _s(r.get("cpu_mps_over_cutensornet")))
    console.print(table)
    for c in result["checks"]:
        console.print(f"check {c['engine']}: {'ok' if c.get('ok') else 'FAILED'} {c.get('tvd_vs_aer_cpu', c.get('error'))}")
    console.print(f"faster GPU statevector engine: {result['statevector_engine_faster']}")
    write_json(args.json, result, console)
    return 0 if result["ok"] else 1


def _s(v: Any) -> str:
    return "" if v is None else f"{v:.3g}"


if __name__ == "__main__":
    sys.exit(main())
