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
* **what a device's noise does to it depends on the circuit's output** — a Hellinger fidelity
  is not the probability of an error-free run (the ESP placement's calibration estimate is):
  noise spreads counts toward uniform, and against an ideal output that is itself spread (a
  random circuit, quantum volume) uniform counts still score ~0.79. Under the global
  depolarizing model — counts ~ e·ideal + (1 - e)·uniform for a device of ESP e — the
  Hellinger fidelity is ``(Σ p·√(e + (1 - e)/(N·p)))²``; ``output_profile`` keeps that map
  on a grid of ``PROFILE_POINTS`` values of e (features ``depolarized_f0..8``, taken at intake
  for quantum-intent jobs), ``observed_fidelity`` maps an ESP to the fidelity a
  measurement will show and ``esp_equivalent`` maps a measurement back. On the 38 measured
  emulated-QPU runs of the placement traces (8-10 qubits, 8,192 shots) the ESP missed the
  measured fidelity by 0.43 on average (it said 0.00-0.67 where 0.18-0.99 was measured) and
  the depolarizing map by 0.058 (docs/notes.md, "Hellinger fidelity is not the ESP").
* **sampler jobs only** — an estimator job returns expectation values, not counts.
* **final measurements only** — mid-circuit measurements and control flow have no single
  ideal output distribution to compare against.
"""

from __future__ import annotations

import math
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
#: Points of the depolarizing map kept per circuit (``output_profile``: e = 0, 1/8, ..., 1).
PROFILE_POINTS = 9
#: Feature names of the profile (``JobView.features``).
PROFILE_FEATURES: tuple[str, ...] = tuple(f"depolarized_f{k}" for k in range(PROFILE_POINTS))
#: Feature: the ideal output's effective number of outcomes (1/Σp²), taken with the profile: it
#: says whether a run's shots can show its fidelity (``MIN_SHOTS_PER_OUTCOME``).
IDEAL_OUTCOMES_FEATURE = "ideal_outcomes"
#: Intake takes the profile of quantum-intent circuits up to this width and size (a
#: 10-qubit, 128-gate circuit: 8-20 ms of ``Statevector`` here; a QPU run takes seconds).
PROFILE_MAX_QUBITS = 10
PROFILE_MAX_GATES = 2_000


@dataclass(frozen=True)
class Measurement:
    """One measured fidelity, or why there is none (``fidelity`` None, ``reason`` set)."""

    fidelity: float | None
    method: str | None = None          # METHOD_EXACT when measured
    reason: str | None = None          # why nothing was measured
    outcomes: float | None = None      # effective number of ideal outcomes (1/Σp²)
    seconds: float = 0.0               # time the measurement took
    profile: tuple[float, ...] | None = None   # output_profile of the ideal (esp_equivalent)

    def to_dict(self) -> dict[str, Any]:
        return {"fidelity": self.fidelity, "method": self.method, "reason": self.reason,
                "outcomes": self.outcomes, "seconds": self.seconds,
                "profile": list(self.profile) if self.profile is not None else None}


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


def output_profile(distribution: Mapping[str, float], num_clbits: int,
                   points: int = PROFILE_POINTS) -> tuple[float, ...]:
    """The depolarizing map F(e) = (Σ p·√(e + (1 - e)/(N·p)))² of the ideal output (N = 2^bits),
    at ``points`` evenly spaced success probabilities e from 0 to 1.

    Why a grid of the map and not a summary of the distribution: the map is smooth and rises
    from F(0) (Σ√(p/N))² to F(1) = 1, so a linear interpolation on 9 points is within ~0.003 of
    it on the traces' circuits, where 8 quantiles of the distribution were off by up to 0.08
    (the low-probability tail carries most of the noise's overlap)."""
    probs = [p for p in distribution.values() if p > 0.0]
    total = sum(probs)
    if not probs or total <= 0:
        return tuple(k / (points - 1) for k in range(points))
    inv_n = 1.0 / 2.0 ** max(int(num_clbits), 0)
    out = []
    for k in range(points):
        e = k / (points - 1)
        g = sum(math.sqrt(p / total * (e * p / total + (1.0 - e) * inv_n)) for p in probs)
        out.append(min(max(g * g, 0.0), 1.0))
    out[-1] = 1.0
    return tuple(out)


def profile_of(features: Mapping[str, float]) -> tuple[float, ...] | None:
    """A job's output profile from its features, or None (not taken: the ESP stands)."""
    if PROFILE_FEATURES[0] not in features:      # the usual case, on every plan: no exception
        return None
    try:
        values = tuple(float(features[k]) for k in PROFILE_FEATURES)
    except (KeyError, TypeError, ValueError):
        return None
    return values if all(v >= 0.0 and v == v for v in values) else None


def observed_fidelity(esp: float, profile: tuple[float, ...] | None) -> float:
    """The Hellinger fidelity counts of a device with success probability ``esp`` will show
    against the ideal output (global depolarizing, interpolated on the profile's grid;
    ``esp`` itself without a profile)."""
    e = min(max(float(esp), 0.0), 1.0)
    if not profile or len(profile) < 2:
        return e
    x = e * (len(profile) - 1)
    k = min(int(x), len(profile) - 2)
    f = profile[k] + (profile[k + 1] - profile[k]) * (x - k)
    return min(max(f, e), 1.0)      # F(e) ≥ e: Σ p·√(e + ...) ≥ √e


def esp_equivalent(measured: float, profile: tuple[float, ...] | None, *, tol: float = 1e-6) -> float:
    """The success probability whose ``observed_fidelity`` is ``measured`` (bisection: the map
    rises with e, from F(0) ≤ 1 to F(1) = 1); 0 when the measurement is at or below F(0)."""
    m = min(max(float(measured), 0.0), 1.0)
    if not profile:
        return m
    lo, hi = 0.0, 1.0
    if observed_fidelity(0.0, profile) >= m:
        return 0.0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if observed_fidelity(mid, profile) < m:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def circuit_profile(circuit: "QuantumCircuit", *, max_qubits: int = PROFILE_MAX_QUBITS,
                    max_gates: int = PROFILE_MAX_GATES) -> dict[str, float]:
    """Profile features of ``circuit`` (empty where its exact ideal output is out of reach)."""
    ideal, _ = exact_distribution(circuit, max_qubits=max_qubits, max_gates=max_gates)
    if ideal is None:
        return {}
    return {**dict(zip(PROFILE_FEATURES, output_profile(ideal, circuit.num_clbits))),
            IDEAL_OUTCOMES_FEATURE: effective_outcomes(ideal)}


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
                       seconds=time.perf_counter() - t0, profile=output_profile(ideal, circuit.num_clbits))


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


__all__ = ["EXACT_MAX_QUBITS", "EXACT_MAX_GATES", "MIN_SHOTS_PER_OUTCOME", "METHOD_EXACT", "PROFILE_POINTS",
           "PROFILE_FEATURES", "IDEAL_OUTCOMES_FEATURE", "PROFILE_MAX_QUBITS", "PROFILE_MAX_GATES", "Measurement", "bits", "exact_distribution",
           "effective_outcomes", "hellinger", "output_profile", "profile_of", "observed_fidelity", "esp_equivalent",
           "circuit_profile", "measure_counts", "measure_payload"]
