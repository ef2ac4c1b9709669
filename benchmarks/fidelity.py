"""Measured QPU truth for the placement benchmark: fidelity and modelled QPU time per circuit.

Why measured: a benchmark whose "true" QPU fidelity is the predictor's own formula can only
agree with the predictor. Here the truth is what the emulated device gives back:

* **fidelity** — the Hellinger fidelity (``qiskit.quantum_info.hellinger_fidelity``) of the
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

FIDELITY_SHOTS = 8192
IDEAL_SHOTS = 100_000
EXACT_IDEAL_MAX_QUBITS = 20
QPU_RUN_MAX_QUBITS = 10
DEFAULT_PROFILE_CAP_S = 120.0

_BACKENDS: dict[str, Any] = {}


def qasm_key(qasm: str) -> str:
    return hashlib.sha1(qasm.encode("utf-8")).hexdigest()[:16]


def _bits(key: str) -> str:
    return key.replace(" ", "")


def ideal_distribution(circuit: Any) -> tuple[dict[str, float], str]:
    """The circuit's ideal output distribution over its classical bits, and "exact" or "sampled".

    Exact when all measurements are final and every classical bit is measured once; keys are
    bitstrings with classical bit 0 rightmost (as Aer's counts, without register spaces)."""
    from qiskit.quantum_info import Statevector

    stripped = circuit.remove_final_measurements(inplace=False)
    final_only = not any(i.operation.name == "measure" for i in stripped.data)
    where: dict[int, int] = {}
    for inst in circuit.data:
        if inst.operation.name == "measure":
            where[circuit.find_bit(inst.clbits[0]).index] = circuit.find_bit(inst.qubits[0]).index
    if (final_only and circuit.num_qubits <= EXACT_IDEAL_MAX_QUBITS and where
            and sorted(where) == list(range(circuit.num_clbits))
            and not any(getattr(i.operation, "blocks", None) for i in stripped.data)):
        qargs = [where[c] for c in range(circuit.num_clbits)]
        probs = Statevector(stripped).probabilities_dict(qargs=qargs)
        return {k: float(v) for k, v in probs.items() if v > 1e-15}, "exact"
    from qiskit_aer import AerSimulator

    res = AerSimulator(method="automatic").run(circuit, shots=IDEAL_SHOTS, seed_simulator=11).result()
    counts = res.get_counts(0)
    return {_bits(k): v / IDEAL_SHOTS for k, v in counts.items()}, "sampled"


def qpu_profile(backend_name: str, qasm: str, run: bool, shots: int, seed: int) -> dict[str, Any]:
    """In the measuring worker: the device's schedule of the circuit, and with ``run`` its
    measured Hellinger fidelity (see the module doc)."""
    from qiskit.quantum_info import hellinger_fidelity

    from ray_qalloc.backends.fake_qpu import estimate_success, scheduled_duration
    from ray_qalloc.backends.registry import make_backend
    from ray_qalloc.circuits import parse_circuit
    from ray_qalloc.config import Limits

    backend = _BACKENDS.get(backend_name)
    if backend is None:
        backend = _BACKENDS[backend_name] = make_backend(backend_name)
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
                   fidelity=float(hellinger_fidelity(ideal, counts)) if counts else None,
                   fidelity_source="measured" if counts else "no_counts", ideal=how, shots=shots, seed=seed)
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


__all__ = ["FIDELITY_SHOTS", "QPU_RUN_MAX_QUBITS", "EXACT_IDEAL_MAX_QUBITS", "ideal_distribution", "qpu_profile",
           "qpu_seconds", "QpuProfiles", "measure_profiles", "qasm_key"]
