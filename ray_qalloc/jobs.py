"""Jobs as users describe them, jobs as intake accepts them, and the states a job goes through.

Intake runs once, in the caller's process, before anything is stored: a job that passes
``prepare_job`` is well-formed, within limits and carries everything placement needs
(qubits, operations, features), so nothing malformed travels further.
"""

from __future__ import annotations

import enum
import logging
import re
import uuid
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ray_qalloc import gates, runopts
from ray_qalloc.config import Limits
from ray_qalloc.exceptions import InvalidJobSpec, LimitExceeded
from ray_qalloc.priority import rank as _class_rank

log = logging.getLogger("ray_qalloc.intake")


class Priority(str, enum.Enum):
    """Priority classes, most urgent first."""

    EMERGENCY = "emergency"
    HIGH = "high"
    NORMAL = "normal"
    BATCH = "batch"

    @property
    def rank(self) -> int:
        return _PRIORITY_RANK[self]


_PRIORITY_RANK = {p: _class_rank(p.value) for p in Priority}   # the order lives in ray_qalloc.priority


class Intent(str, enum.Enum):
    """Where a job may run: ``quantum`` needs a QPU, ``classical`` a simulator."""

    AUTO = "auto"
    QUANTUM = "quantum"
    CLASSICAL = "classical"


class JobState(str, enum.Enum):
    QUEUED = "queued"          # accepted and stored, waiting for a backend
    RUNNING = "running"        # an attempt is on a backend
    COMPLETED = "completed"    # result recorded (exactly once)
    FAILED = "failed"          # gave up: no backend could run it, or too many attempts
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})

# Named transitions: the only way a job's state changes. (name -> allowed sources, target)
TRANSITIONS: dict[str, tuple[frozenset[JobState], JobState]] = {
    "accept": (frozenset(), JobState.QUEUED),
    "dispatch": (frozenset({JobState.QUEUED}), JobState.RUNNING),
    "complete": (frozenset({JobState.RUNNING}), JobState.COMPLETED),
    "failover": (frozenset({JobState.RUNNING}), JobState.QUEUED),
    "requeue": (frozenset({JobState.RUNNING}), JobState.QUEUED),
    # a backup attempt started beside an overrunning one (the first result wins)
    "hedge": (frozenset({JobState.RUNNING}), JobState.RUNNING),
    "fail": (frozenset({JobState.QUEUED, JobState.RUNNING}), JobState.FAILED),
    "cancel": (frozenset({JobState.QUEUED, JobState.RUNNING}), JobState.CANCELLED),
}

_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class JobSpec(BaseModel):
    """A job as a user submits it (field names follow the trace format)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", frozen=True)

    circuit: Any = Field(description="OpenQASM 2 or 3 text, or (in-process) a QuantumCircuit.")
    shots: int = Field(1024, description="Number of shots.")
    priority: Priority = Priority.NORMAL
    deadline_s: float | None = Field(None, description="Seconds from submission to the wanted result.")
    intent: Intent = Intent.AUTO
    fidelity_min: float | None = Field(None, description="Lowest acceptable estimated fidelity, in (0, 1].")
    tenant: str = "default"
    idempotency_key: str | None = Field(None, max_length=200)
    backends: tuple[str, ...] | None = Field(None, description="Only these backends may run the job.")
    observables: Any = Field(None, description=(
        "Estimator jobs: a list of observables, each {pauli_label: coefficient} (labels in Qiskit's "
        "order, rightmost = qubit 0). The job then returns their expectation values, not counts."))
    precision: float | None = Field(None, description=(
        "Estimator jobs: the wanted standard error; a QPU spends ceil(1/precision**2) shots per "
        "measurement basis (instead of `shots`), simulators compute exact values. 0: simulators only."))
    seed: int | None = Field(None, description="Simulator seed: the same seed on the same method gives the same result.")

    @field_validator("shots", mode="before")
    @classmethod
    def _int_shots(cls, v: Any) -> Any:
        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            raise ValueError("must be a whole number")
        return v

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, v: str) -> str:
        if not _TENANT_RE.match(v):
            raise ValueError("must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
        return v

    @field_validator("fidelity_min")
    @classmethod
    def _fidelity(cls, v: float | None) -> float | None:
        if v is not None and not (0.0 < v <= 1.0):
            raise ValueError("must be in (0, 1]")
        return v


def make_spec(**fields: Any) -> JobSpec:
    """Build a JobSpec, turning pydantic's errors into a typed error naming the field."""
    try:
        return JobSpec(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "job"
        raise InvalidJobSpec(f"field {where!r} is invalid: {err['msg']} (got {err.get('input')!r:.80}).",
                             field=where, fix=_FIX.get(where, "see ray_qalloc.jobs.JobSpec for the accepted values.")) from None


_FIX = {
    "shots": "pass a whole number of shots between 1 and the configured maximum.",
    "priority": "use one of emergency, high, normal, batch.",
    "intent": "use one of auto, quantum, classical.",
    "fidelity_min": "pass a number in (0, 1], or leave it out.",
    "deadline_s": "pass a positive number of seconds, or leave it out.",
    "tenant": "use a short name of letters, digits, '_', '.' or '-'.",
    "backends": "pass a list of backend names (see `qalloc backends`), or leave it out.",
    "precision": "pass a number >= 0 (the standard error wanted), or leave it out.",
    "seed": "pass a whole number, or leave it out.",
}


@dataclass(frozen=True)
class PreparedJob:
    """A job that passed intake: validated, normalised and featurised, not yet stored."""

    id: str
    tenant: str
    priority: Priority
    intent: Intent
    shots: int
    deadline_s: float | None
    fidelity_min: float | None
    idempotency_key: str | None
    payload: bytes
    source_format: str
    num_qubits: int
    num_clbits: int
    ops: frozenset[str]
    features: dict[str, float] = field(default_factory=dict)
    backends: tuple[str, ...] | None = None

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "tenant": self.tenant, "priority": self.priority.value,
                "intent": self.intent.value, "shots": self.shots, "num_qubits": self.num_qubits}


class CompactFeatures(Mapping[str, float]):
    """A read-only feature mapping stored as one array of doubles plus a shared key index.

    Why: the allocator keeps every queued job's features (for re-planning after a failover);
    as a dict of 36 floats that is ~2.5 kB a job, as this ~0.4 kB, which is what keeps 100,000
    queued jobs within a gigabyte."""

    __slots__ = ("_index", "_values")
    _indexes: dict[tuple[str, ...], dict[str, int]] = {}

    def __init__(self, features: Mapping[str, float]) -> None:
        keys = tuple(features)
        index = CompactFeatures._indexes.get(keys)
        if index is None:
            index = CompactFeatures._indexes.setdefault(keys, {k: i for i, k in enumerate(keys)})
        self._index = index
        self._values = array("d", (float(features[k]) for k in keys))

    def __getitem__(self, key: str) -> float:
        return self._values[self._index[key]]

    def get(self, key: str, default: Any = None) -> Any:  # hot in predictors: no ABC detour
        i = self._index.get(key)
        return default if i is None else self._values[i]

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._values)

    def __reduce__(self) -> tuple[Any, ...]:  # pickles (Ray, store rebuilds) as a plain dict
        return (CompactFeatures, (dict(self),))


def compact(job: "PreparedJob") -> "PreparedJob":
    """The same job with its features in compact form (for long-lived queues)."""
    if isinstance(job.features, CompactFeatures):
        return job
    return replace(job, features=CompactFeatures(job.features))  # type: ignore[arg-type]


def new_job_id() -> str:
    return uuid.uuid4().hex


def check_limits(spec: JobSpec, limits: Limits) -> None:
    """Limits that need no parsing, checked first."""
    if spec.shots < 1 or spec.shots > limits.max_shots:
        raise LimitExceeded(f"shots={spec.shots} is outside 1..{limits.max_shots}.", field="shots",
                            fix=f"ask for at most {limits.max_shots} shots (split larger runs into several jobs).",
                            limit=limits.max_shots)
    if spec.deadline_s is not None and not (0 < spec.deadline_s <= limits.max_deadline_s):
        raise LimitExceeded(f"deadline_s={spec.deadline_s} is outside (0, {limits.max_deadline_s}].",
                            field="deadline_s", fix="pass a positive deadline in seconds, or none.",
                            limit=limits.max_deadline_s)


def prepare_job(spec: JobSpec, limits: Limits, *, job_id: str | None = None) -> PreparedJob:
    """Validate and normalise one job; raise a typed IntakeError on anything wrong."""
    from ray_qalloc import circuits  # qiskit import kept off the module import path

    check_limits(spec, limits)
    parsed = circuits.parse_circuit(spec.circuit, limits)
    options, shots, intent = _run_options(spec, parsed.circuit, limits)
    circuit = circuits.ensure_measured(parsed.circuit)
    if circuit.num_clbits > limits.max_clbits:
        raise LimitExceeded(f"circuit: measuring all {circuit.num_qubits} qubits needs {circuit.num_clbits} "
                            f"classical bits, more than max_clbits={limits.max_clbits}.", field="circuit",
                            fix="add explicit measurements of the qubits you need.", limit=limits.max_clbits)
    ops = dict(parsed.expanded_ops)
    if circuit is not parsed.circuit:
        ops["measure"] = ops.get("measure", 0) + circuit.num_qubits
    feats = circuits.circuit_features(circuit, shots=shots, op_counts=ops)
    if intent == Intent.QUANTUM and options.observables is None:
        feats.update(_output_profile(circuit))
    if options.observables is not None:      # what the job asks of a backend beyond its gates
        ops[gates.EXPECTATION] = 1
    if feats.get("mid_circuit_measure"):
        ops[gates.MID_MEASURE] = 1
    payload = runopts.wrap_payload(circuits.encode_payload(spec.circuit, parsed), options)
    return PreparedJob(
        id=job_id or new_job_id(), tenant=spec.tenant, priority=spec.priority, intent=intent,
        shots=shots, deadline_s=spec.deadline_s, fidelity_min=spec.fidelity_min,
        idempotency_key=spec.idempotency_key, payload=payload,
        source_format=parsed.source_format, num_qubits=circuit.num_qubits,
        num_clbits=circuit.num_clbits, ops=frozenset(ops),
        features=feats, backends=spec.backends,
    )


def _output_profile(circuit: Any) -> dict[str, float]:
    """What a device's noise will do to this circuit's measured fidelity (``costmodel.fidelity``:
    the depolarizing map of its ideal output), for a quantum-intent sampler job small enough
    to compute its ideal output exactly. Why at intake: placement ranks QPUs by the fidelity a
    measurement will show, and for a spread output (a random circuit) that differs between
    devices far less than their error-free probabilities do. It costs milliseconds here, once,
    for a job that will hold a QPU for seconds."""
    from ray_qalloc.costmodel.fidelity import PROFILE_MAX_GATES, PROFILE_MAX_QUBITS, circuit_profile

    if circuit.num_qubits > PROFILE_MAX_QUBITS or circuit.size() > PROFILE_MAX_GATES:
        return {}
    try:
        return circuit_profile(circuit)
    except Exception:  # noqa: BLE001 - an unusual circuit keeps the calibration's estimate
        log.debug("no output profile for a %d-qubit circuit", circuit.num_qubits, exc_info=True)
        return {}


def _run_options(spec: JobSpec, circuit: Any, limits: Limits) -> tuple[runopts.RunOptions, int, Intent]:
    """The run options a job carries (``ray_qalloc.runopts``), the shots it is charged and
    planned with, and its intent.

    An estimator job (``observables`` given) is planned as what a QPU would spend on it: shots
    per measurement basis (from ``precision``, else the job's ``shots``) times the number of
    qubit-wise commuting bases. A simulator computes exact values instead, so its runtime
    estimate is on the safe side. ``precision=0`` asks for exact values: simulators only."""
    seed = runopts.check_seed(spec.seed)
    if spec.observables is None:
        if spec.precision is not None:
            raise InvalidJobSpec("field 'precision' is given without 'observables'.", field="precision",
                                 fix="give observables for an estimator job, or leave precision out.")
        return runopts.RunOptions(seed=seed), spec.shots, spec.intent
    from ray_qalloc import expectation  # numpy only; kept off the module import path

    observables = runopts.check_observables(spec.observables, circuit.num_qubits)
    try:
        expectation.unmeasured(circuit)
    except Exception as exc:  # BackendError at run time; here the caller's input is at fault
        raise InvalidJobSpec(f"circuit: {getattr(exc, 'message', exc)}", field="circuit",
                             fix="remove mid-circuit measurements (final ones are ignored).") from None
    precision = runopts.check_precision(spec.precision)
    intent = spec.intent
    if precision == 0.0:
        if intent == Intent.QUANTUM:
            raise InvalidJobSpec("precision=0 asks for exact expectation values, which only a simulator gives, "
                                 "but intent is 'quantum'.", field="precision",
                                 fix="give a precision > 0 for a QPU, or use intent 'auto' or 'classical'.")
        intent, per_group = Intent.CLASSICAL, 1
    elif precision is not None:
        per_group = runopts.shots_for_precision(precision)
    else:
        per_group, precision = spec.shots, spec.shots ** -0.5
    if per_group > limits.max_shots:
        raise LimitExceeded(f"precision={spec.precision} needs {per_group} shots per measurement basis, more than "
                            f"max_shots={limits.max_shots}.", field="precision",
                            fix=f"ask for a precision of at least {runopts.precision_hint(limits.max_shots)}.",
                            limit=limits.max_shots)
    groups = expectation.count_groups(observables)
    shots = per_group * groups if precision else 1
    options = runopts.RunOptions(observables=observables, precision=precision, shots_per_group=per_group,
                                 seed=seed)
    return options, shots, intent
