"""Observables → expectation values: exact on a simulator, from counts on a QPU.

The one place that turns an estimator job's observables into expectation values, so every
executor computes them the same way:

- **exact** (``exact_on_aer``): Aer's ``save_expectation_value`` on the circuit without its final
  measurements. Every pool method supports it for Pauli sums (statevector, matrix product state,
  stabilizer, density matrix), so placement stays free to choose any of them; ``stds`` are 0.
- **from counts** (``estimate_by_sampling``): the Pauli terms of all observables are grouped
  into qubit-wise commuting sets (``measurement_groups``), one circuit per set measures its
  qubits in the set's basis (``basis_circuits``), and ``evs_from_counts`` turns the counts into
  expectation values with their standard errors (shot noise, covariances within a basis
  included). The emulated QPUs and IBM Runtime share this path; a backend with ``run_many``
  gets all basis circuits at once (IBM: one provider job, so a restart re-attaches to it).

Results travel as ``RunResult.metadata["expectation"]`` (``ExpectationResult.to_dict``): the
job's counts stay empty, which keeps the result model and the stored rows as they were.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from ray_qalloc.backends.base import RunResult
from ray_qalloc.exceptions import BackendError
from ray_qalloc.runopts import Observable, RunOptions, labels_of

if TYPE_CHECKING:  # pragma: no cover
    from qiskit import QuantumCircuit

_CODE = {"I": 0, "X": 1, "Y": 2, "Z": 3}
_LETTER = "IXYZ"


@dataclass(frozen=True)
class ExpectationResult:
    """Expectation values of a job's observables, in the order they were submitted."""

    evs: list[float]
    stds: list[float]
    exact: bool
    shots_per_group: int = 0
    groups: int = 0
    precision: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {"evs": self.evs, "stds": self.stds, "exact": self.exact, "shots_per_group": self.shots_per_group,
               "groups": self.groups, "precision": self.precision}
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "ExpectationResult":
        return cls(evs=[float(v) for v in raw["evs"]], stds=[float(v) for v in raw["stds"]],
                   exact=bool(raw.get("exact", False)), shots_per_group=int(raw.get("shots_per_group") or 0),
                   groups=int(raw.get("groups") or 0), precision=raw.get("precision"))


# ---------------------------------------------------------------------------------------------
# Grouping (pure Python + numpy: intake uses it to count basis circuits without Qiskit)
# ---------------------------------------------------------------------------------------------

def measurement_groups(observables: Sequence[Observable]) -> tuple[list[str], dict[str, int]]:
    """Qubit-wise commuting groups of every non-identity term: the bases (Pauli labels, I where a
    qubit is not measured) and each label's group. Greedy, heaviest terms first, deterministic."""
    labels = [label for label in labels_of(observables) if set(label) != {"I"}]
    if not labels:
        return [], {}
    codes = np.array([[_CODE[c] for c in label] for label in labels], dtype=np.uint8)
    order = sorted(range(len(labels)), key=lambda i: (-int(np.count_nonzero(codes[i])), i))
    bases = np.zeros((0, codes.shape[1]), dtype=np.uint8)
    group_of: dict[str, int] = {}
    for i in order:
        term = codes[i]
        ok = np.all((bases == 0) | (term == 0) | (bases == term), axis=1) if len(bases) else np.zeros(0, bool)
        hit = np.flatnonzero(ok)
        if hit.size:
            g = int(hit[0])
            bases[g] = np.where(term != 0, term, bases[g])
        else:
            g = len(bases)
            bases = np.vstack([bases, term])
        group_of[labels[i]] = g
    return ["".join(_LETTER[c] for c in row) for row in bases], group_of


def count_groups(observables: Sequence[Observable]) -> int:
    """Basis circuits a QPU runs for these observables (1 at least: an identity-only set runs once)."""
    return max(len(measurement_groups(observables)[0]), 1)


def measured_qubits(basis: str) -> list[int]:
    """Qubit indices a basis measures, ascending (label character n-1-q is qubit q)."""
    n = len(basis)
    return [q for q in range(n) if basis[n - 1 - q] != "I"]


# ---------------------------------------------------------------------------------------------
# Circuits
# ---------------------------------------------------------------------------------------------

def unmeasured(circuit: "QuantumCircuit") -> "QuantumCircuit":
    """The circuit without its final measurements; mid-circuit measurements are refused (the
    expectation value of a state after them is not one number), as Qiskit's estimators do."""
    from ray_qalloc.circuits import has_measurement

    bare = circuit.remove_final_measurements(inplace=False)
    if has_measurement(bare):
        raise BackendError("the circuit measures before its end; an estimator needs the state before any "
                           "measurement.", fix="remove mid-circuit measurements (final ones are ignored).")
    return bare


def basis_circuits(bare: "QuantumCircuit", bases: Sequence[str]) -> list["QuantumCircuit"]:
    """One circuit per basis: ``bare``, the rotations into the basis, and measurements of the
    basis's qubits into a fresh register (clbit j = j-th measured qubit, ascending)."""
    from qiskit import ClassicalRegister, QuantumCircuit

    out = []
    for basis in bases or ["I" * bare.num_qubits]:
        qubits = measured_qubits(basis) or [0]
        qc = QuantumCircuit(bare.num_qubits)
        qc.compose(bare, qubits=range(bare.num_qubits), inplace=True)
        n = len(basis)
        for q in qubits:
            letter = basis[n - 1 - q]
            if letter == "X":
                qc.h(q)
            elif letter == "Y":
                qc.sdg(q)
                qc.h(q)
        creg = ClassicalRegister(len(qubits), "meas")
        qc.add_register(creg)
        qc.measure(qubits, creg)
        out.append(qc)
    return out


# ---------------------------------------------------------------------------------------------
# Counts → expectation values
# ---------------------------------------------------------------------------------------------

def _outcome_bits(counts: Mapping[Any, int], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes as a (K, width) bool matrix (column j = clbit j) and their counts."""
    keys = list(counts)
    rows = np.zeros((len(keys), width), dtype=bool)
    for r, key in enumerate(keys):
        if isinstance(key, str) and not key.startswith("0x"):
            text = key.replace(" ", "")
            value = int(text, 2) if text else 0
        else:
            value = int(key, 16) if isinstance(key, str) else int(key)
        rows[r] = [(value >> j) & 1 for j in range(width)]
    return rows, np.array([int(counts[k]) for k in keys], dtype=np.float64)


def evs_from_counts(observables: Sequence[Observable], bases: Sequence[str], group_of: Mapping[str, int],
                    counts: Sequence[Mapping[Any, int]]) -> tuple[list[float], list[float]]:
    """Expectation values and standard errors from one counts dict per basis.

    Per observable and basis, each shot gives v = Σ c_t·(±1)_t over the observable's terms in
    that basis (±1: the parity of the term's measured bits); the estimate is the mean of v, its
    variance var(v)/shots. Bases are independent runs, so the values and variances add."""
    per_basis = []
    for basis, c in zip(bases, counts):
        qubits = measured_qubits(basis)
        bits, weights = _outcome_bits(c, len(qubits))
        total = float(weights.sum())
        if total <= 0:
            raise BackendError(f"the run for measurement basis {basis} returned no shots.",
                               fix="run the job again; check the backend that ran it.")
        per_basis.append((bits, weights, total, {q: j for j, q in enumerate(qubits)}))
    evs, stds = [], []
    for obs in observables:
        value, variance = 0.0, 0.0
        by_group: dict[int, list[tuple[str, float]]] = {}
        for label, coeff in obs:
            if set(label) == {"I"}:
                value += coeff
            else:
                by_group.setdefault(group_of[label], []).append((label, coeff))
        for g, terms in by_group.items():
            bits, weights, total, column = per_basis[g]
            n = len(terms[0][0])
            v = np.zeros(len(weights))
            for label, coeff in terms:
                cols = [column[q] for q in range(n) if label[n - 1 - q] != "I"]
                parity = np.bitwise_xor.reduce(bits[:, cols], axis=1) if cols else np.zeros(len(weights), bool)
                v += coeff * np.where(parity, -1.0, 1.0)
            mean = float(weights @ v / total)
            var = max(float(weights @ (v * v) / total) - mean * mean, 0.0)
            value += mean
            variance += var / total
        evs.append(value)
        stds.append(float(np.sqrt(variance)))
    return evs, stds


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def sparse_pauli_op(obs: Observable) -> Any:
    from qiskit.quantum_info import SparsePauliOp

    labels, coeffs = zip(*obs)
    return SparsePauliOp(list(labels), np.array(coeffs, dtype=complex))


def exact_on_aer(simulator: Any, prepared: "QuantumCircuit", observables: Sequence[Observable],
                 seed: int | None = None) -> list[float]:
    """Exact expectation values on an Aer simulator (any method with ``save_expectation_value``).

    ``prepared`` is the measurement-free circuit as the simulator will run it; where the
    transpiler moved qubits (a layout), the observables follow."""
    qc = prepared.copy()
    layout = getattr(prepared, "layout", None)
    for i, obs in enumerate(observables):
        op = sparse_pauli_op(obs)
        if layout is not None:
            op = op.apply_layout(layout, num_qubits=qc.num_qubits)
        qc.save_expectation_value(op, range(qc.num_qubits), label=f"ev{i}")
    options: dict[str, Any] = {"shots": 1}
    if seed is not None:
        options["seed_simulator"] = seed
    try:
        result = simulator.run(qc, **options).result()
    except Exception as exc:
        raise BackendError(f"Aer could not compute the expectation values: {exc}",
                           fix="check the circuit's gates against the method; try another method.") from exc
    if not result.success:
        raise BackendError(f"Aer could not compute the expectation values: {result.status}",
                           fix="check the circuit's gates against the method; try another method.")
    data = result.data(0)
    return [float(np.real(data[f"ev{i}"])) for i in range(len(observables))]


def estimate_by_sampling(backend: Any, circuit: "QuantumCircuit", options: RunOptions, *, seed: int | None = None,
                         on_submitted: Callable[[str], None] | None = None) -> RunResult:
    """Expectation values from measurement-basis circuits run on ``backend`` (a QPU, real or
    emulated): ``backend.run_many`` where it has one (one provider job), else ``run`` per basis."""
    assert options.observables is not None
    start = time.perf_counter()
    observables = options.observables
    shots = int(options.shots_per_group or 1)
    bases, group_of = measurement_groups(observables)
    circuits = basis_circuits(unmeasured(circuit), bases)
    run_many = getattr(backend, "run_many", None)
    if callable(run_many):
        runs = list(run_many(circuits, shots, seed=seed, on_submitted=on_submitted))
    else:
        runs = [backend.run(c, shots, seed=None if seed is None else seed + i, on_submitted=on_submitted)
                for i, c in enumerate(circuits)]
    evs, stds = evs_from_counts(observables, bases, group_of, [r.counts for r in runs]) if bases else \
        ([sum(c for _, c in obs) for obs in observables], [0.0] * len(observables))
    return combine_runs(runs, ExpectationResult(evs, stds, exact=False, shots_per_group=shots,
                                                groups=len(circuits), precision=options.precision),
                        wall_s=time.perf_counter() - start)


def combine_runs(runs: Sequence[RunResult], expectation: ExpectationResult, *, wall_s: float) -> RunResult:
    """One RunResult for the basis circuits of one estimator job: times and QPU seconds summed,
    the first run's metadata kept (device, layout, ...), the expectation values attached."""
    first = runs[0]
    qpu = [r.qpu_s for r in runs if r.qpu_s is not None]
    metadata = dict(first.metadata)
    metadata["expectation"] = expectation.to_dict()
    return RunResult(counts={}, shots=sum(r.shots for r in runs), backend=first.backend, wall_s=wall_s,
                     transpile_s=sum(r.transpile_s for r in runs), execute_s=sum(r.execute_s for r in runs),
                     qpu_s=sum(qpu) if qpu else None, method=first.method,
                     provider_job_id=first.provider_job_id, metadata=metadata)


def expectation_from_reattached(res: RunResult, payload: bytes) -> RunResult:
    """A re-attached provider job of an estimator job: its expectation values from the counts of
    every pub (``metadata["pub_counts"]``, one per measurement basis); other jobs unchanged."""
    from ray_qalloc.runopts import split_payload

    _, options = split_payload(payload)
    if not options.estimator:
        return res
    assert options.observables is not None
    bases, group_of = measurement_groups(options.observables)
    pub_counts = res.metadata.get("pub_counts") or [res.counts]
    if len(pub_counts) != max(len(bases), 1):
        raise BackendError(f"the re-attached provider job has {len(pub_counts)} results, the estimator job "
                           f"needs {max(len(bases), 1)} (one per measurement basis).",
                           fix="run the job again.")
    evs, stds = evs_from_counts(options.observables, bases, group_of, pub_counts) if bases else \
        ([sum(c for _, c in obs) for obs in options.observables], [0.0] * len(options.observables))
    metadata = {k: v for k, v in res.metadata.items() if k != "pub_counts"}
    metadata["expectation"] = ExpectationResult(evs, stds, exact=False, shots_per_group=options.shots_per_group or 0,
                                                groups=len(pub_counts), precision=options.precision).to_dict()
    return RunResult(counts={}, shots=res.shots * len(pub_counts), backend=res.backend, wall_s=res.wall_s,
                     qpu_s=res.qpu_s, provider_job_id=res.provider_job_id, metadata=metadata)


__all__ = ["expectation_from_reattached", "ExpectationResult", "basis_circuits", "combine_runs", "count_groups", "estimate_by_sampling",
           "evs_from_counts", "exact_on_aer", "measured_qubits", "measurement_groups", "unmeasured"]
