"""The API's request and response bodies: jobs, batches, results, tokens and tenants.

Why a module of its own: the routers (``api_jobs.py``, ``api_tenants.py``) and the OpenAPI
document's limits (``api_openapi.py``) read the same models, and the document the app serves
is built from them; a change of shape is a change of the public API, made here.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from ray_qalloc.api_errors import ErrorDetail
from ray_qalloc.runopts import MAX_OBSERVABLES, MAX_SEED, MAX_TERMS
from ray_qalloc.tenants import Quota
from ray_qalloc.wire import JsonFloat, JsonInt, json_integer_or_null

Priority = Literal["emergency", "high", "normal", "batch"]
Intent = Literal["auto", "quantum", "classical"]


PAULI_LABEL = r"^[IXYZ]+$"
_OBSERVABLE_SCHEMA = {
    "type": "object", "minProperties": 1, "propertyNames": {"pattern": PAULI_LABEL},
    "additionalProperties": {"type": "number"},
    "description": "Pauli label (one letter I/X/Y/Z per circuit qubit, rightmost = qubit 0) -> real coefficient.",
}
Observable = Annotated[
    dict[Annotated[str, Field(pattern=PAULI_LABEL)], Annotated[float, Field(strict=True, allow_inf_nan=False)]],
    Field(min_length=1),
    # pydantic writes a key pattern as `patternProperties`, which lets other keys through in the
    # document while the model refuses them: `propertyNames` says exactly what the model checks
    WithJsonSchema(_OBSERVABLE_SCHEMA)]
"""One observable: a Pauli sum as ``{label: coefficient}``. JSON numbers only (``"1"`` is refused)."""


# A JSON integer or null. Why not ``JsonInt | None``: pydantic then writes the bounds of the
# integer branch into the document as `ge`/`le`, which no JSON Schema reader understands.
Seed = Annotated[Annotated[int, Field(ge=0, le=MAX_SEED)] | None, BeforeValidator(json_integer_or_null)]


class JobIn(BaseModel):
    """One job, in the field names of the trace format (DESIGN.md). The tenant is the token's.

    Numbers are ``wire`` types: ``"5"`` or ``true`` for ``shots`` is refused, not coerced."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "qasm": 'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2];\ncreg c[2];\nh q[0];\ncx q[0],q[1];\n'
                "measure q -> c;\n", "shots": 1000, "priority": "normal"}]})

    qasm: str = Field(min_length=1, description="OpenQASM 2 or 3 text (no includes but qelib1.inc / stdgates.inc).")
    format: Literal["qasm", "cirq", "braket"] = Field("qasm", description=(
        "What wrote `qasm`: `qasm` standard OpenQASM 2/3; `cirq` what `cirq.qasm` writes (standard OpenQASM, "
        "read as is); `braket` Braket's OpenQASM 3 (`Circuit.to_ir('OPENQASM')`, Braket gate names such as "
        "`cnot`, `phaseshift`, `xy`; no includes; `#pragma braket` result types, noise, verbatim boxes and "
        "unitaries are refused). Counts use Qiskit's bit order (classical bit 0 rightmost) for every format."))
    shots: JsonInt = Field(1024, ge=1, description="Number of shots.")
    priority: Priority = Field("normal", description="Priority class; `emergency` only where granted.")
    deadline_s: JsonFloat | None = Field(None, gt=0, description="Seconds from submission to the wanted result.")
    intent: Intent = Field("auto", description="`quantum` needs a QPU, `classical` a simulator, `auto` either.")
    fidelity_min: JsonFloat | None = Field(None, gt=0, le=1, description="Lowest acceptable estimated fidelity.")
    backends: list[str] | None = Field(None, max_length=64, description=(
        "Only these may run the job: backend or candidate names (`cpu-1a2b3c4d/mps`), pool names "
        "(`cpu-1a2b3c4d`: every method there) or method names (`statevector`, `mps`, `stabilizer`, "
        "`density_matrix`: that method on every pool)."))
    tenant: str | None = Field(None, description="Optional; must be the token's tenant when given.")
    id: str | None = Field(None, max_length=200, description="A trace's own job id; echoed as `client_id`.")
    arrival_s: JsonFloat | None = Field(None, description="Trace replay field; ignored.")
    observables: list[Observable] | None = Field(None, min_length=1, description=(
        "Makes it an estimator job: the result carries `expectation` (one value per observable, in this order), "
        "not counts. Each observable is `{pauli_label: coefficient}`, one letter per circuit qubit "
        f"(rightmost = qubit 0). At most {MAX_OBSERVABLES:,} observables and {MAX_TERMS:,} Pauli terms in all; "
        "final measurements are ignored, earlier ones refused."))
    precision: JsonFloat | None = Field(None, ge=0, allow_inf_nan=False, description=(
        "Estimator jobs only: the wanted standard error. A QPU spends ceil(1/precision^2) shots per "
        "measurement basis (at most `max_shots`); simulators compute exact values. 0: exact values, "
        "simulators only. Left out: `shots` per basis."))
    seed: Seed = Field(None, description=(
        "Simulator seed: the same seed on the same method gives the same counts (pin the method with "
        "`backends`); QPUs ignore it."))


class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    jobs: list[JobIn] = Field(min_length=1, description="The jobs, answered in the same order.")


class JobAccepted(BaseModel):
    id: str
    created: bool = Field(description="False when the Idempotency-Key named an earlier job.")
    state: str
    flag: str | None = Field(None, description="Why it is predicted to miss its deadline, if it is.")
    client_id: str | None = None
    simulators_only: bool = Field(False, description="Limited to simulators: the tenant's QPU time is spent.")


class BatchItem(BaseModel):
    id: str | None = None
    created: bool | None = None
    client_id: str | None = None
    error: ErrorDetail | None = None


class BatchOut(BaseModel):
    jobs: list[BatchItem]
    accepted: int
    refused: int


class JobOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    tenant: str
    state: str
    priority: str
    intent: str
    shots: int
    deadline_s: float | None = None
    fidelity_min: float | None = None
    num_qubits: int
    created_at: float
    updated_at: float
    backend: str | None = None
    attempts: int
    error: str | None = None
    flag: str | None = None


class JobPage(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; null at the end.")


class ExpectationOut(BaseModel):
    """An estimator job's values, one per submitted observable, in order."""

    evs: list[float] = Field(description="Expectation values.")
    stds: list[float] = Field(description="Their standard errors: 0 where computed exactly.")
    exact: bool = Field(description="Computed exactly (a simulator), not from shots.")
    groups: int = Field(0, description="Measurement bases run (qubit-wise commuting groups); 0 when exact.")
    shots_per_group: int = Field(0, description="Shots per measurement basis; 0 when exact.")
    precision: float | None = Field(None, description="The standard error asked for (from `precision` or `shots`).")


class ResultOut(BaseModel):
    id: str
    state: str
    counts: dict[str, int] = Field(description="Measured outcomes; empty for an estimator job (see `expectation`).")
    shots: int
    backend: str
    wall_s: float
    queue_s: float
    qpu_s: float | None = None
    attempts: int
    failover_history: list[dict[str, Any]] = Field(default_factory=list)
    expectation: ExpectationOut | None = Field(None, description="An estimator job's values; null for a sampler job.")


class Pending(BaseModel):
    id: str
    state: str


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenant: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    admin: bool = Field(False, strict=True)   # `0` or "no" is refused, not read as false
    scopes: list[Literal["soar"]] = Field(default_factory=list, max_length=4, description=(
        "Grants beyond the tenant's own jobs: `soar` takes threat actions (boost, reserve, pause, resume)."))


class TokenOut(BaseModel):
    tenant: str
    admin: bool
    token: str = Field(description="Shown once; only its hash is stored.")


class TenantOut(BaseModel):
    tenant: str
    quota: Quota
    usage: dict[str, float]


__all__ = ["BatchIn", "BatchItem", "BatchOut", "ExpectationOut", "Intent", "JobAccepted", "JobIn", "JobOut",
           "JobPage", "Observable", "PAULI_LABEL", "Pending", "Priority", "ResultOut", "Seed", "TenantOut",
           "TokenIn", "TokenOut"]
