"""Measured fidelity: how close a QPU's counts came to the circuit's exact ideal distribution.

Why measured and not estimated: the fidelity placement predicts for a QPU is a formula of the
device's calibration (``prior.qpu_fidelity``). A correction learned against that same formula
would only agree with itself. The truth is what the device gave back: the Hellinger fidelity
(``qiskit.quantum_info.hellinger_fidelity``) of its counts against the circuit's *exact* ideal
output distribution. This module is the one owner of that formula: the live allocator
(``ray_qalloc.fidelity_meter``) and the benchmarks (``benchmarks.fidelity``) both call it.

What can be measured honestly, and what is recorded as nothing (``Measurement.reason``):

* **exact** — the ideal distribution is computed as a statevector (``Statevector``
  probabilities over the measured qubits), which is cheap up to ``EXACT_MAX_QUBITS`` (12)
  qubits and ``EXACT_MAX_GATES`` gates: measured on this 2-core machine under load ~11,
  QFT-12 (360 gates) took 70-90 ms and a random depth-20 12-qubit circuit (600 gates)
  80-270 ms; a 14-qubit circuit took 1-2.3 s (``Statevector`` evolves by einsum over an
  n-index tensor, which falls off a cliff past 12). Wider circuits record nothing: their
  ideal distribution would cost seconds to minutes, and a sampled one would bias the
  fidelity by its own sampling error.
* **only when the counts can show it** — a Hellinger fidelity from ``shots`` samples of a
  distribution spread over many outcomes is biased low (each outcome's count is a small
  Poisson number, and E[√X] < √E[X]): with ideal mass on S equally likely outcomes the
  measured value is ≈ 1 - S/(4·shots) even for a perfect device. So a measurement is kept
  only when ``shots / effective outcomes ≥ MIN_SHOTS_PER_OUTCOME`` (32: bias ≲ 1 %/F),
  where the effective number of outcomes is the participation ratio 1/Σp². GHZ, BV, DJ,
  adders, phase estimation with exact phases and Grover pass at 1,024 shots; random circuits
  and quantum volume do not, and are recorded as nothing.
* **sampler jobs only** — an estimator job returns expectation values, not counts.
* **final measurements only** — mid-circuit measurements and control flow have no single
  ideal output distribution to compare against.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # pragma: no cover
    from qiskit import QuantumCircuit

#: Widest circuit whose ideal distribution is computed exactly (statevector, ~0.1 s here).
EXACT_MAX_QUBITS = 12
#: Most gates in such a circuit (per-gate cost ~0.1-0.3 ms at 12 qubits on a loaded core).
EXACT_MAX_GATES = 20_000
#: Fewest shots per effective ideal outcome for a Hellinger fidelity worth recording.
MIN_SHOTS_PER_OUTCOME = 32.0
#: The method recorded with an exact measurement.
METHOD_EXACT = "hellinger_exact"


@dataclass(frozen=True)
class Measurement:
    """One measured fidelity, or why there is none (``fidelity`` None, ``reason`` set)."""

    fidelity: float | None
    method: str | None = None          # METHOD_EXACT when measured
    reason: str | None = None          # why nothing was measured
    outcomes: float | None = None      # effective number of ideal outcomes (1/Σp²)
    seconds: float = 0.0               # time the measurement took

    def to_dict(self) -> dict[str, Any]:
        return {"fidelity": self.fidelity, "method": self.method, "reason": self.reason,
                "outcomes": self.outcomes, "seconds": self.seconds}


def bits(key: str) -> str:
    """A counts key as one bitstring (Qiskit separates registers with spaces)."""
    return key.replace(" ", "")


def _final_measurement_map(circuit: "QuantumCircuit") -> dict[int, int] | None:
    """Clbit index -> qubit index when every measurement is final and each clbit is written
    once; None otherwise (mid-circuit measurement, control flow, resets after measuring)."""
    from qiskit.circuit import ControlFlowOp

    where: dict[int, int] = {}
    measured: set[int] = set()
    for inst in circuit.data:
        op = inst.operation
        if isinstance(op, ControlFlowOp) or getattr(op, "blocks", None):
            return None
        qubits = [circuit.find_bit(q).index for q in inst.qubits]
        if op.name == "measure":
            c = circuit.find_bit(inst.clbits[0]).index
            if c in where or qubits[0] in measured:
                return None
            where[c] = qubits[0]
            measured.add(qubits[0])
        elif op.name != "barrier" and measured.intersection(qubits):
            return None   # an operation after a measurement of its qubit: not final
    return where


def exact_distribution(circuit: "QuantumCircuit", *, max_qubits: int = EXACT_MAX_QUBITS,
                       max_gates: int = EXACT_MAX_GATES) -> tuple[dict[str, float] | None, str | None]:
    """The circuit's exact ideal output distribution over its classical bits, or (None, why).

    Keys are bitstrings with classical bit 0 rightmost (Aer's counts without register
    spaces). Exact only for circuits whose measurements are all final and write every
    classical bit once, at most ``max_qubits`` qubits and ``max_gates`` gates."""
    if circuit.num_qubits > max_qubits:
        return None, f"wider than {max_qubits} qubits"
    if circuit.size() > max_gates:
        return None, f"more than {max_gates} gates"
    where = _final_measurement_map(circuit)
    if where is None:
        return None, "not only final measurements"
    if not where or sorted(where) != list(range(circuit.num_clbits)):
        return None, "some classical bits are not measured"
    from qiskit.quantum_info import Statevector

    stripped = circuit.remove_final_measurements(inplace=False)
    probs = Statevector(stripped).probabilities_dict(qargs=[where[c] for c in range(circuit.num_clbits)])
    return {k: float(v) for k, v in probs.items() if v > 1e-15}, None


def effective_outcomes(distribution: Mapping[str, float]) -> float:
    """Participation ratio 1/Σp²: how many equally likely outcomes the distribution is worth."""
    total = sum(p * p for p in distribution.values())
    return 1.0 / total if total > 0 else float("inf")


def hellinger(ideal: Mapping[str, float], counts: Mapping[str, int | float]) -> float:
    """Hellinger fidelity of ``counts`` against ``ideal`` (Qiskit's definition, (Σ√(p·q))²)."""
    from qiskit.quantum_info import hellinger_fidelity

    return float(hellinger_fidelity(dict(ideal), {bits(k): v for k, v in counts.items()}))


def measure_counts(circuit: "QuantumCircuit", counts: Mapping[str, int | float], shots: int | None = None, *,
                   max_qubits: int = EXACT_MAX_QUBITS, max_gates: int = EXACT_MAX_GATES,
                   min_shots_per_outcome: float = MIN_SHOTS_PER_OUTCOME) -> Measurement:
    """Hellinger fidelity of ``counts`` against ``circuit``'s exact ideal output, where honest."""
    t0 = time.perf_counter()
    total = float(sum(counts.values())) if counts else 0.0
    shots = int(shots) if shots else int(total)
    if not counts or total <= 0:
        return Measurement(None, reason="no counts", seconds=time.perf_counter() - t0)
    ideal, why = exact_distribution(circuit, max_qubits=max_qubits, max_gates=max_gates)
    if ideal is None:
        return Measurement(None, reason=why, seconds=time.perf_counter() - t0)
    outcomes = effective_outcomes(ideal)
    if shots / outcomes < min_shots_per_outcome:
        return Measurement(None, reason=f"{shots} shots over ~{outcomes:.0f} ideal outcomes: biased",
                           outcomes=outcomes, seconds=time.perf_counter() - t0)
    return Measurement(hellinger(ideal, counts), METHOD_EXACT, outcomes=outcomes,
                       seconds=time.perf_counter() - t0)


def measure_payload(payload: bytes, counts: Mapping[str, int | float], shots: int | None = None,
                    **limits: Any) -> Measurement:
    """``measure_counts`` of a job's stored payload: sampler jobs only (an estimator job's
    result holds expectation values, not counts)."""
    from ray_qalloc.circuits import decode_payload

    t0 = time.perf_counter()
    if payload[:4] == b"opts":
        from ray_qalloc.runopts import split_payload

        if split_payload(payload)[1].estimator:
            return Measurement(None, reason="estimator job", seconds=time.perf_counter() - t0)
    try:
        circuit = decode_payload(payload)
    except Exception as exc:  # noqa: BLE001 - a payload that no longer decodes measures nothing
        return Measurement(None, reason=f"payload: {type(exc).__name__}", seconds=time.perf_counter() - t0)
    return measure_counts(circuit, counts, shots, **limits)


__all__ = ["EXACT_MAX_QUBITS", "EXACT_MAX_GATES", "MIN_SHOTS_PER_OUTCOME", "METHOD_EXACT", "Measurement",
           "bits", "exact_distribution", "effective_outcomes", "hellinger", "measure_counts", "measure_payload"]
