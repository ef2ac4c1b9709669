"""Measured QPU truth for the placement benchmark: fidelity and modelled QPU time per circuit.

Why measured: a benchmark whose "true" QPU fidelity is the predictor's own formula can only
agree with the predictor. Here the truth is what the emulated device gives back:

* **fidelity** — the Hellinger fidelity (``ray_qalloc.costmodel.fidelity.hellinger``: the one
  formula the live allocator's measured fidelity uses too) of the
  emulated device's noisy counts (``FakeQPUBackend.run``: the real backend class the allocator
  runs, ``FIDELITY_SHOTS`` shots, a fixed seed per circuit) against the circuit's ideal output
  distribution over its measured bits. The ideal distribution is **exact** (Statevector
  probabilities) when every measurement is final and the circuit has at most
  ``EXACT_IDEAL_MAX_QUBITS`` qubits, and **sampled** (an ideal Aer run of ``IDEAL_SHOTS`` shots)
  otherwise; each record says which (``ideal``), and which noise path the emulator took
  (``noise_model``: ``exact_local`` noisy simulation up to 10 active qubits, else
  ``global_depolarizing``). Finite shots bias a Hellinger fidelity slightly downwards on
  circuits whose output is spread over many outcomes; the bias is the same for every policy.
  Only circuits of at most ``QPU_RUN_MAX_QUBITS`` qubits are emulated (noisy emulation grows
  fast); a wider circuit gets the device's estimated success probability of its transpiled
  circuit instead, recorded as ``fidelity_source = "esp_transpiled"`` (not measured).
* **QPU time** — the modelled busy time of the device for the job's shots:
  ``shots·(scheduled duration + rep delay) + overhead`` of the circuit transpiled to the device
  (the same formula the backend reports as ``qpu_s``), not the emulator's wall time.

Every emulation and transpile runs in the measuring worker (``ray_qalloc.costmodel.measure``,
``("call", "benchmarks.fidelity:qpu_profile", ...)``) under a time cap. Results are cached in a
JSON Lines file keyed by circuit text and backend, so reruns are fast.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping

from ray_qalloc.costmodel.fidelity import (MIN_SHOTS_PER_OUTCOME, PROFILE_FEATURES, bits, effective_outcomes,
                                           esp_equivalent, exact_distribution, hellinger, observed_fidelity,
                                           profile_of)

FIDELITY_SHOTS = 8192
IDEAL_SHOTS = 100_000
EXACT_IDEAL_MAX_QUBITS = 20
QPU_RUN_MAX_QUBITS = 10
DEFAULT_PROFILE_CAP_S = 120.0

_BACKENDS: dict[str, Any] = {}


def qasm_key(qasm: str) -> str:
    return hashlib.sha1(qasm.encode("utf-8")).hexdigest()[:16]


_bits = bits


def ideal_distribution(circuit: Any) -> tuple[dict[str, float], str]:
    """The circuit's ideal output distribution over its classical bits, and "exact" or "sampled".

    Exact (``ray_qalloc.costmodel.fidelity.exact_distribution``, the formula the live allocator
    measures with, here up to ``EXACT_IDEAL_MAX_QUBITS``) when all measurements are final and
    every classical bit is measured once; keys are bitstrings with classical bit 0 rightmost (as
    Aer's counts, without register spaces)."""
    exact, _ = exact_distribution(circuit, max_qubits=EXACT_IDEAL_MAX_QUBITS, max_gates=10**9)
    if exact is not None:
        return exact, "exact"
    from qiskit_aer import AerSimulator

    res = AerSimulator(method="automatic").run(circuit, shots=IDEAL_SHOTS, seed_simulator=11).result()
    counts = res.get_counts(0)
    return {_bits(k): v / IDEAL_SHOTS for k, v in counts.items()}, "sampled"


def qpu_profile(backend_name: str, qasm: str, run: bool, shots: int, seed: int) -> dict[str, Any]:
    """In the measuring worker: the device's schedule of the circuit, and with ``run`` its
    measured Hellinger fidelity (see the module doc)."""
    from ray_qalloc.backends.fake_qpu import estimate_success, scheduled_duration
    from ray_qalloc.backends.registry import make_backend
    from ray_qalloc.circuits import parse_circuit
    from ray_qalloc.config import Limits

    backend = _BACKENDS.get(backend_name)
    if backend is None:
        name, _, scale = backend_name.partition("*")    # "qpu_fez*3": fez with 3x its calibrated noise
        backend = _BACKENDS[backend_name] = make_backend(name, **({"noise_scale": float(scale)} if scale else {}))
    circuit = parse_circuit(qasm, Limits()).circuit
    t0 = time.perf_counter()
    out: dict[str, Any] = {"backend": backend_name, "num_qubits": circuit.num_qubits,
                           "rep_delay_s": backend.calibration().rep_delay_s, "overhead_s": backend.overhead_s}
    if run:
        res = backend.run(circuit, shots, seed=seed)
        meta = res.metadata or {}
        ideal, how = ideal_distribution(circuit)
        counts = {_bits(k): v for k, v in res.counts.items()}
        out.update(duration_s=meta["duration_s"], esp=meta["esp"], noise_model=meta.get("noise_model"),
                   fidelity=hellinger(ideal, counts) if counts else None,
                   fidelity_source="measured" if counts else "no_counts", ideal=how, shots=shots, seed=seed,
                   outcomes=effective_outcomes(ideal))
    else:
        transpiled = backend.transpile(circuit)
        schedule = scheduled_duration(transpiled, backend.device.target)
        esp = estimate_success(transpiled, backend.device.target, schedule).esp
        out.update(duration_s=schedule.duration_s, esp=esp, noise_model=None, fidelity=esp,
                   fidelity_source="esp_transpiled", ideal=None)
    out["profile_s"] = time.perf_counter() - t0
    return out


def qpu_seconds(profile: Mapping[str, Any], shots: int) -> float:
    """Modelled QPU busy time for ``shots`` (the backend's own ``qpu_s`` formula)."""
    from ray_qalloc.backends.fake_qpu import modelled_qpu_seconds

    return modelled_qpu_seconds(int(shots), float(profile["duration_s"]), float(profile["rep_delay_s"]),
                                float(profile["overhead_s"]))


class QpuProfiles:
    """The cache: one JSON line per (circuit text, backend)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rows: dict[tuple[str, str], dict[str, Any]] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    r = json.loads(line)
                    self.rows[(r["qasm_key"], r["backend"])] = r

    def get(self, qasm: str, backend: str) -> dict[str, Any] | None:
        return self.rows.get((qasm_key(qasm), backend))

    def add(self, qasm: str, row: dict[str, Any]) -> None:
        row = {**row, "qasm_key": qasm_key(qasm)}
        self.rows[(row["qasm_key"], row["backend"])] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, default=str) + "\n")


def measure_profiles(circuits: Iterable[tuple[str, int]], backends: Iterable[str], cache: QpuProfiles, *,
                     cap_s: float = DEFAULT_PROFILE_CAP_S, worker: Any = None,
                     progress: Any = None) -> dict[str, int]:
    """Profile every (circuit, QPU) pair not in the cache; ``circuits`` are (qasm, qubits).
    A pair past its cap (or failing) is recorded with ``error`` and no numbers."""
    from ray_qalloc.costmodel.measure import Worker

    backends = list(backends)
    todo = [(q, n, b) for q, n in circuits for b in backends if cache.get(q, b) is None]
    stats = {"cached": 0, "measured": 0, "failed": 0, "todo": len(todo)}
    if not todo:
        return stats
    own = worker is None
    worker = worker or Worker(threads=1)
    try:
        for i, (qasm, n, b) in enumerate(todo):
            run = n <= QPU_RUN_MAX_QUBITS
            seed = zlib.crc32(qasm.encode("utf-8")) & 0x7FFFFFFF
            res = worker.call(("call", "benchmarks.fidelity:qpu_profile", (b, qasm, run, FIDELITY_SHOTS, seed)),
                              cap_s)
            if res.status == "ok":
                cache.add(qasm, res.value)
                stats["measured"] += 1
            else:
                cache.add(qasm, {"backend": b, "num_qubits": n, "error": f"{res.status}: {res.value}"[:500]})
                stats["failed"] += 1
            if progress is not None:
                progress(i + 1, len(todo), b, n)
    finally:
        if own:
            worker.close()
    return stats


# ----------------------------------------------------------------------------- fidelity model accuracy
#: Families whose ideal output is concentrated enough to measure honestly at FIDELITY_SHOTS.
ACCURACY_FAMILIES = ("ghz", "bv", "dj", "qpeexact", "wstate", "grover")
ACCURACY_SIZES = (3, 4, 5, 6, 7, 8)
ACCURACY_QPUS = ("qpu_torino", "qpu_fez", "qpu_ion_aria")
MISCALIBRATED_QPUS = ("qpu_fez*3",)


def accuracy_circuits(families: Iterable[str] = ACCURACY_FAMILIES,
                      sizes: Iterable[int] = ACCURACY_SIZES) -> list[tuple[str, str, int]]:
    """(name, OpenQASM 2, qubits) of MQT Bench circuits (algorithm level) for the fidelity benchmark."""
    from mqt.bench import BenchmarkLevel, get_benchmark
    from qiskit import qasm2

    out = []
    for fam in families:
        for n in sizes:
            if fam == "grover" and n > 6:
                continue                     # deep (multi-controlled); its transpile grows fast
            qc = get_benchmark(fam, BenchmarkLevel.ALG, circuit_size=n)
            out.append((f"{fam}-{qc.num_qubits}", qasm2.dumps(qc.decompose(reps=2)), qc.num_qubits))
    return out


def calibration_estimates(circuits: list[tuple[str, str, int]], qpus: Iterable[str], predictor: Any,
                          shots: int = FIDELITY_SHOTS) -> dict[tuple[str, str], float]:
    """Placement's uncorrected fidelity estimate per (circuit, QPU), from the views the allocator's
    fleet gives placement (calibration summary and per-qubit profile)."""
    from ray_qalloc.backends.registry import make_backend
    from ray_qalloc.config import Limits
    from ray_qalloc.jobs import make_spec, prepare_job
    from ray_qalloc.placement.model import BackendView, JobView, QubitProfile

    views = {}
    for q in qpus:
        b = make_backend(q.partition("*")[0])
        cal = b.calibration()
        views[q] = BackendView(b.spec(), True, cal.summary(), 0.0, QubitProfile.of(cal))
    out = {}
    for name, qasm, _ in circuits:
        job = prepare_job(make_spec(circuit=qasm, shots=shots, intent="quantum"), Limits())
        # the calibration's success probability: the profile intake took stays out of it
        feats = {k: v for k, v in job.features.items() if k not in PROFILE_FEATURES}
        jv = JobView(job.id, job.num_qubits, job.ops, feats, job.shots, intent="quantum")
        for q, view in views.items():
            out[(name, q)] = float(predictor.predict(jv, [view])[0].fidelity)
        out[(name, PROFILE_KEY)] = profile_of(job.features)      # type: ignore[assignment]
    return out


#: ``calibration_estimates``' key of a circuit's output profile (``costmodel.fidelity``).
PROFILE_KEY = "profile"


def fidelity_accuracy(profiles: QpuProfiles, circuits: list[tuple[str, str, int]], qpus: Iterable[str],
                      predictor: Any, *, train_share: float = 0.5, seed: int = 0) -> dict[str, Any]:
    """Held-out error of placement's fidelity estimate against measured fidelity, per device: the
    calibration estimate alone, and with the correction (``costmodel.fidelity_correction``) learned
    on the first ``train_share`` of that device's runs (a seeded order) and applied to the rest.

    A run counts when its fidelity was measured against an exact ideal distribution that its shots
    can show (``MIN_SHOTS_PER_OUTCOME``): the rule the live allocator records by."""
    import random

    from ray_qalloc.costmodel.fidelity_correction import FidelityCorrections, FidelitySample

    qpus = list(qpus)
    est = calibration_estimates(circuits, qpus, predictor)
    order = list(circuits)
    random.Random(seed).shuffle(order)
    per: dict[str, Any] = {}
    errs_cal: list[float] = []
    errs_map: list[float] = []
    errs_cor: list[float] = []
    for q in qpus:
        runs = []
        for name, qasm, _ in order:
            p = profiles.get(qasm, q)
            if (p is None or p.get("fidelity") is None or p.get("ideal") != "exact"
                    or p["shots"] / max(p.get("outcomes") or float("inf"), 1e-9) < MIN_SHOTS_PER_OUTCOME):
                continue
            runs.append((name, est[(name, q)], float(p["fidelity"]), float(p["esp"]), est.get((name, PROFILE_KEY))))
        cut = int(len(runs) * train_share)
        corr = FidelityCorrections()
        for name, e, f, _, prof in runs[:cut]:        # learned as the allocator learns: in ESP space
            corr.add(FidelitySample(q, e, esp_equivalent(f, prof), calibration_at=0.0))
        test = runs[cut:]

        def placed(e: float, prof: Any) -> float:
            """What placement shows: the device's exponent, then the circuit's depolarizing map."""
            return observed_fidelity(corr.apply(q, e, 0.0), prof)

        cal_e = [abs(e - f) for _, e, f, _, _ in test]
        map_e = [abs(observed_fidelity(e, prof) - f) for _, e, f, _, prof in test]
        cor_e = [abs(placed(e, prof) - f) for _, e, f, _, prof in test]
        esp_e = [abs(d - f) for _, _, f, d, _ in test]
        per[q] = {"n_train": cut, "n_test": len(test), "exponent": corr.exponent(q, 0.0),
                  "mae_calibration": _mean(cal_e), "mae_mapped": _mean(map_e), "mae_corrected": _mean(cor_e),
                  "mae_device_esp": _mean(esp_e),
                  "test": [{"circuit": n, "calibration": e, "mapped": observed_fidelity(e, prof),
                            "corrected": placed(e, prof), "measured": f, "device_esp": d}
                           for n, e, f, d, prof in test]}
        errs_cal += cal_e
        errs_map += map_e
        errs_cor += cor_e
    return {"fidelity_mae": _mean(errs_cor), "fidelity_mae_calibration": _mean(errs_cal),
            "fidelity_mae_mapped": _mean(errs_map), "n_test": len(errs_cor), "devices": per}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def run_accuracy(cache: Path, *, qpus: Iterable[str] = ACCURACY_QPUS,
                 miscalibrated: Iterable[str] = MISCALIBRATED_QPUS, predictor: Any = None,
                 cap_s: float = DEFAULT_PROFILE_CAP_S, progress: Any = None) -> dict[str, Any]:
    """The fidelity part of ``benchmarks.costmodel_accuracy`` (``--fidelity``): measure (cached),
    then ``fidelity_accuracy`` on the emulated devices as calibrated and on miscalibrated ones."""
    from ray_qalloc.costmodel.prior import HeuristicPrior

    predictor = predictor or HeuristicPrior()
    circuits = accuracy_circuits()
    profiles = QpuProfiles(cache)
    qpus, miscalibrated = list(qpus), list(miscalibrated)
    t0 = time.perf_counter()
    stats = measure_profiles([(q, n) for _, q, n in circuits], qpus + miscalibrated, profiles, cap_s=cap_s,
                             progress=progress)
    plain = fidelity_accuracy(profiles, circuits, qpus, predictor)
    wrong = fidelity_accuracy(profiles, circuits, miscalibrated, predictor) if miscalibrated else None
    out = {"fidelity_mae": plain["fidelity_mae"], "fidelity_mae_calibration": plain["fidelity_mae_calibration"],
           "fidelity_n_test": plain["n_test"], "detail": plain, "measure": stats,
           "measure_wall_s": time.perf_counter() - t0, "shots": FIDELITY_SHOTS,
           "circuits": [n for n, _, _ in circuits], "predictor": getattr(predictor, "source", "prior")}
    if wrong is not None:
        out.update(fidelity_mae_miscalibrated=wrong["fidelity_mae"],
                   fidelity_mae_miscalibrated_calibration=wrong["fidelity_mae_calibration"], detail_miscalibrated=wrong)
    return out


def main() -> None:
    import argparse

    from benchmarks._common import make_console, write_json

    ap = argparse.ArgumentParser(description="Fidelity model accuracy on measured emulated QPU runs.")
    ap.add_argument("--cache", type=Path, default=Path("out/qpu_profiles.jsonl"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    console = make_console()
    res = run_accuracy(args.cache, progress=lambda i, n, b, q: console.print(f"[{i}/{n}] {b} {q} qubits"))
    for key in ("detail", "detail_miscalibrated"):
        if res.get(key):
            for q, d in res[key]["devices"].items():
                console.print(f"{q}: n_train={d['n_train']} n_test={d['n_test']} exponent={d['exponent']:.3f} "
                              f"mae calibration={d['mae_calibration']} corrected={d['mae_corrected']} "
                              f"device_esp={d['mae_device_esp']}")
    console.print({k: v for k, v in res.items() if not k.startswith("detail")})
    write_json(args.json, res, console)


__all__ = ["FIDELITY_SHOTS", "QPU_RUN_MAX_QUBITS", "EXACT_IDEAL_MAX_QUBITS", "ideal_distribution", "qpu_profile",
           "qpu_seconds", "QpuProfiles", "measure_profiles", "qasm_key",
           "fidelity_accuracy", "run_accuracy", "accuracy_circuits"]


if __name__ == "__main__":
    main()
