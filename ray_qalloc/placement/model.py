"""Value objects placement works on. No Ray, no Qiskit: plain, frozen, picklable data.

Why: placement decides in microseconds and is tested table-driven with small fakes; it
must not depend on how backends are run or how circuits are parsed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, NamedTuple

from ray_qalloc.backends.base import BackendSpec

StatusCode = Literal["ok", "unschedulable", "unresolvable"]


@dataclass(frozen=True)
class JobView:
    """What placement needs to know of a job."""

    id: str
    num_qubits: int
    ops: frozenset[str]
    features: Mapping[str, float]
    shots: int
    intent: str = "auto"                   # auto | quantum | classical
    priority: str = "normal"
    fidelity_min: float | None = None
    deadline_s: float | None = None
    tenant: str = "default"
    blocked: frozenset[str] = frozenset()  # backends this job must not use again (failover)
    allowed: frozenset[str] | None = None  # only these backends (None: any)
    circuit_key: str | None = None         # content hash of the circuit (run memory), None: unknown


@dataclass(frozen=True)
class BackendView:
    """A backend's fixed spec with the part of its live state that filters read."""

    spec: BackendSpec
    healthy: bool = True
    calibration: Mapping[str, float] | None = None  # Calibration.summary()
    calibration_age_s: float | None = None          # how old its calibration is (None: n/a)

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class Status:
    """Outcome of one filter for one backend, Kubernetes style.

    ``unschedulable``: waiting may help (busy, unhealthy, stale calibration).
    ``unresolvable``: nothing will help (too many qubits, wrong kind of backend).
    """

    code: StatusCode
    plugin: str = ""
    reasons: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.code == "ok"


OK = Status("ok")


@dataclass(frozen=True)
class Estimate:
    """Predictions for one job on one backend, made once at enqueue."""

    backend: str
    runtime_s: float            # predicted time from start to result (modelled QPU time for QPUs)
    fidelity: float             # expected fidelity of the result, in [0, 1]
    cost: float                 # money
    memory_bytes: float = 0.0   # predicted peak memory
    source: str = "prior"       # "prior", a model artifact id, or "memory:<how>"
    # Spread of log(actual / predicted) runtime: runtime is taken as log-normal with median
    # ``runtime_s`` and this sd. 0 = certain (e.g. measured on this very circuit).
    log_sd: float = 0.0


@dataclass
class Plan:
    """Every backend considered for a job: filtered out (why) or estimated."""

    job_id: str
    estimates: dict[str, Estimate] = field(default_factory=dict)
    filtered: dict[str, Status] = field(default_factory=dict)
    static: dict[str, dict[str, float]] = field(default_factory=dict, repr=False, compare=False)
    # select's per-plan precomputation (pipeline.py), keyed like ``static``
    rows: dict[str, tuple[tuple[str, float, float], ...]] = field(default_factory=dict, repr=False,
                                                                  compare=False)
    # how this job's class trades time against fidelity and money (pipeline.WeightTable);
    # None: the defaults. Set by whoever makes the plan, from the typed settings.
    weights: Any = field(default=None, repr=False, compare=False)

    @property
    def feasible(self) -> list[str]:
        return list(self.estimates)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "filtered": {b: {"code": s.code, "plugin": s.plugin, "reasons": list(s.reasons)}
                         for b, s in self.filtered.items()},
            "estimates": {b: {"runtime_s": e.runtime_s, "fidelity": e.fidelity, "cost": e.cost,
                              "memory_bytes": e.memory_bytes, "source": e.source, "log_sd": e.log_sd}
                          for b, e in self.estimates.items()},
        }


class LiveState(NamedTuple):
    """A backend's load at dispatch time, as the allocator tracks it. A tuple, not a
    dataclass: one is built per backend a decision weighs, on the dispatch hot path."""

    wait_s: float        # predicted wait before a new job could start here
    can_start: bool      # a slot (and, for simulators, the node's cores) is free now
