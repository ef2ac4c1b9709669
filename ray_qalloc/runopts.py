"""Run options a job carries inside its payload: observables (estimator jobs) and a seed.

Why inside the payload: the payload is the one thing that travels with a job from intake
through the JobStore, the allocator's queue, a failover and a restart to the runner, and it is
what idempotency checks and "the same circuit again" compare. Options kept there need no new
store column, no change to the dispatcher's call and no migration: a job without options keeps
exactly the bytes it had before, and every stored row stays readable.

The envelope is ``b"opts" NUL <JSON header> NUL <inner payload>``; JSON escapes control
characters, so the first NUL after the header is the separator. The inner payload is what
``circuits.encode_payload`` made (QASM text or QPY).

A header holds:
- ``observables``: a list of observables, each a list of ``[pauli_label, coefficient]`` pairs,
  labels in Qiskit's order (rightmost character = qubit 0). Present: an estimator job; the runner
  returns expectation values (``RunResult.metadata["expectation"]``), not counts.
- ``precision`` and ``shots_per_group``: the wanted standard error, and the shots per
  measurement-basis circuit a QPU spends to reach it (simulators compute exact values).
- ``seed``: the simulator seed the user asked for (Qiskit's ``seed`` option); it replaces the
  allocator's own seed, so the same seed on the same method gives the same counts.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from ray_qalloc.exceptions import InvalidJobSpec, LimitExceeded

MAGIC = b"opts"
_SEP = b"\0"
VERSION = 1
PAULI_LETTERS = frozenset("IXYZ")

# Limits of one estimator job (checked at intake, before anything is stored). Qiskit pubs with
# more are split by the Estimator into one job per parameter set anyway; these bound one set.
MAX_OBSERVABLES = 1_000          # observables evaluated on one bound circuit
MAX_TERMS = 5_000                # Pauli terms over all of them (grouping is about T·G·n)
MAX_SEED = 2**63 - 1

Term = tuple[str, float]
Observable = tuple[Term, ...]


@dataclass(frozen=True)
class RunOptions:
    """What a runner needs beyond the circuit and the job's shots."""

    observables: tuple[Observable, ...] | None = None
    precision: float | None = None
    shots_per_group: int | None = None
    seed: int | None = None

    @property
    def estimator(self) -> bool:
        return self.observables is not None

    @property
    def empty(self) -> bool:
        return self.observables is None and self.seed is None

    def header(self) -> dict[str, Any]:
        out: dict[str, Any] = {"v": VERSION}
        if self.observables is not None:
            out["observables"] = [[[label, coeff] for label, coeff in obs] for obs in self.observables]
            out["precision"] = self.precision
            out["shots_per_group"] = self.shots_per_group
        if self.seed is not None:
            out["seed"] = self.seed
        return out

    @classmethod
    def from_header(cls, raw: Mapping[str, Any]) -> "RunOptions":
        observables = raw.get("observables")
        return cls(
            observables=None if observables is None else
            tuple(tuple((str(label), float(coeff)) for label, coeff in obs) for obs in observables),
            precision=None if raw.get("precision") is None else float(raw["precision"]),
            shots_per_group=None if raw.get("shots_per_group") is None else int(raw["shots_per_group"]),
            seed=None if raw.get("seed") is None else int(raw["seed"]))


def wrap_payload(inner: bytes, options: RunOptions) -> bytes:
    """The payload that carries ``options``; the inner payload unchanged when there are none."""
    if options.empty:
        return inner
    header = json.dumps(options.header(), separators=(",", ":"), allow_nan=False).encode()
    return MAGIC + _SEP + header + _SEP + inner


def split_payload(payload: bytes) -> tuple[bytes, RunOptions]:
    """Inverse of ``wrap_payload``: the inner payload and its options (empty for older jobs)."""
    fmt, _, rest = payload.partition(_SEP)
    if fmt != MAGIC:
        return payload, RunOptions()
    header, _, inner = rest.partition(_SEP)
    return inner, RunOptions.from_header(json.loads(header))


# ---------------------------------------------------------------------------------------------
# Intake checks: say what is wrong and how to fix it
# ---------------------------------------------------------------------------------------------

def check_seed(seed: Any) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise InvalidJobSpec(f"field 'seed' is {seed!r}; it must be a whole number in 0..2**63-1.", field="seed",
                             fix="pass an int seed (e.g. seed=1234), or leave it out for a random one.")
    return int(seed)


def check_observables(raw: Any, num_qubits: int) -> tuple[Observable, ...]:
    """Observables as submitted (a list of ``{label: coeff}`` mappings or of ``[[label, coeff], ...]``
    lists) checked and normalised: labels of ``num_qubits`` letters I/X/Y/Z, finite real
    coefficients, equal labels summed, within MAX_OBSERVABLES and MAX_TERMS."""
    if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Iterable):
        raise InvalidJobSpec("field 'observables' must be a list of observables.", field="observables",
                             fix='pass e.g. [{"ZZ": 1.0, "XI": 0.5}] (one mapping of Pauli label to '
                                 "coefficient per observable).")
    items = list(raw)
    if not items:
        raise InvalidJobSpec("field 'observables' is empty.", field="observables",
                             fix="give at least one observable, or leave the field out for a sampler job.")
    if len(items) > MAX_OBSERVABLES:
        raise LimitExceeded(f"field 'observables' has {len(items)} observables, over the limit of {MAX_OBSERVABLES}.",
                            field="observables", fix="split them over several jobs.", limit=MAX_OBSERVABLES)
    out: list[Observable] = []
    total = 0
    for i, obs in enumerate(items):
        terms = _terms(obs, i, num_qubits)
        total += len(terms)
        if total > MAX_TERMS:
            raise LimitExceeded(f"field 'observables' has more than {MAX_TERMS} Pauli terms in all.",
                                field="observables", fix="split the observables over several jobs.", limit=MAX_TERMS)
        out.append(terms)
    return tuple(out)


def _terms(obs: Any, index: int, num_qubits: int) -> Observable:
    where = f"observables[{index}]"
    pairs: Iterable[Any]
    if isinstance(obs, Mapping):
        pairs = obs.items()
    elif isinstance(obs, (list, tuple)):
        pairs = obs
    else:
        raise InvalidJobSpec(f"{where} is a {type(obs).__name__}; it must map Pauli labels to coefficients.",
                             field="observables", fix='use {"ZZ": 1.0} or [["ZZ", 1.0]].')
    summed: dict[str, float] = {}
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise InvalidJobSpec(f"{where}: {pair!r:.60} is not a (label, coefficient) pair.", field="observables",
                                 fix='use {"ZZ": 1.0} or [["ZZ", 1.0]].')
        label, coeff = pair
        summed[_label(label, where, num_qubits)] = summed.get(label, 0.0) + _coefficient(coeff, where, label)
    if not summed:
        raise InvalidJobSpec(f"{where} has no terms.", field="observables",
                             fix='give at least one term, e.g. {"I" * num_qubits: 0.0} for zero.')
    return tuple(summed.items())


def _label(label: Any, where: str, num_qubits: int) -> str:
    if not isinstance(label, str) or not label or set(label) - PAULI_LETTERS:
        raise InvalidJobSpec(f"{where}: the label {label!r:.60} is not a Pauli string of I, X, Y, Z.",
                             field="observables", fix="write each term as a Pauli label such as 'XZI' (projectors "
                                                      "and other operators: expand them into Pauli terms first).")
    if len(label) != num_qubits:
        raise InvalidJobSpec(f"{where}: the label {label[:60]!r} acts on {len(label)} qubits, the circuit has "
                             f"{num_qubits}.", field="observables",
                             fix="give one letter per circuit qubit (rightmost = qubit 0); pad with I.")
    return label


def _coefficient(coeff: Any, where: str, label: str) -> float:
    value: complex
    try:
        value = complex(coeff)
    except (TypeError, ValueError):
        raise InvalidJobSpec(f"{where}: the coefficient of {label[:40]!r} is {coeff!r:.40}, not a number.",
                             field="observables", fix="use real numbers as coefficients.") from None
    if abs(value.imag) > 1e-10 * max(1.0, abs(value.real)):
        raise InvalidJobSpec(f"{where}: the coefficient of {label[:40]!r} is complex ({coeff}); the observable "
                             "is not Hermitian.", field="observables",
                             fix="use real coefficients (a Hermitian sum of Pauli terms).")
    if not math.isfinite(value.real):
        raise InvalidJobSpec(f"{where}: the coefficient of {label[:40]!r} is {value.real}.", field="observables",
                             fix="use finite real coefficients.")
    return float(value.real)


def check_precision(precision: Any) -> float | None:
    if precision is None:
        return None
    if isinstance(precision, bool) or not isinstance(precision, (int, float)) or not math.isfinite(precision) \
            or precision < 0:
        raise InvalidJobSpec(f"field 'precision' is {precision!r}; it must be a number >= 0.", field="precision",
                             fix="pass the wanted standard error of each expectation value (0: exact, on "
                                 "simulators only), or leave it out to give shots instead.")
    return float(precision)


def shots_for_precision(precision: float) -> int:
    """Shots per measurement basis so that each Pauli term's standard error is at most ``precision``
    (as Qiskit's BackendEstimatorV2 and IBM Runtime do: ⌈1/precision²⌉).

    Any finite precision > 0 gets an answer: one shot from precision 1 up (``precision**2``
    overflows past ~1e154), and ``sys.maxsize`` — more than any shot limit, so intake refuses it
    with the smallest precision it takes — where ⌈1/precision²⌉ is not a finite number."""
    if precision >= 1.0:
        return 1
    inverse = 1.0 / precision
    shots = inverse * inverse          # float multiplication gives inf, where ** raises OverflowError
    return int(math.ceil(shots)) if shots < sys.maxsize else sys.maxsize


def smallest_precision(max_shots: int) -> float:
    """The smallest precision > 0 intake takes: ⌈1/precision²⌉ shots per basis within ``max_shots``.

    Why nudged both ways: ``max_shots ** -0.5`` squared back can land a hair either side of
    ``max_shots`` in floating point, and a fuzzer sends exactly the documented minimum and the
    number just below it: the first must be taken, the second refused."""
    p = max_shots ** -0.5
    while shots_for_precision(p) > max_shots:
        p = math.nextafter(p, math.inf)
    while shots_for_precision(below := math.nextafter(p, 0.0)) <= max_shots:
        p = below
    return p


def precision_hint(max_shots: int) -> str:
    """The smallest precision intake takes, rounded *up* to 3 significant digits: a number the
    user can copy that is taken (rounding to nearest showed one that is refused)."""
    p = smallest_precision(max_shots)
    scale = 10 ** (2 - math.floor(math.log10(p)))
    return f"{math.ceil(p * scale) / scale:.3g}"


def labels_of(observables: Sequence[Observable]) -> list[str]:
    """Every distinct label, in first-seen order."""
    seen: dict[str, None] = {}
    for obs in observables:
        for label, _ in obs:
            seen.setdefault(label, None)
    return list(seen)


__all__ = ["MAX_OBSERVABLES", "MAX_TERMS", "Observable", "RunOptions", "check_observables", "check_precision",
           "check_seed", "labels_of", "precision_hint", "shots_for_precision", "smallest_precision", "split_payload", "wrap_payload"]
