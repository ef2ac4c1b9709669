"""Value objects placement works on. No Ray, no Qiskit: plain, frozen, picklable data.

Why: placement decides in microseconds and is tested table-driven with small fakes; it
must not depend on how backends are run or how circuits are parsed.
"""

from __future__ import annotations

import math
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
class QubitProfile:
    """A QPU's qubits ranked the way a noise-aware layout ranks them, as prefix sums, so that
    "the n best qubits" costs a tuple index in placement's hot path.

    Medians hide what a job meets: a 5-qubit circuit is laid out on the good part of a chip,
    and one qubit with a TLS defect must not lower every estimate nor go unnoticed when it is
    among the few a job needs. Coherence and readout are ranked separately, so the n best by
    one and the m best by the other may not be one connected layout: estimates are optimistic
    by that much, never pessimistic.
    """

    decay_rate_sum: tuple[float, ...]      # [k]: Σ over the k best qubits of (1/T1 + 1/T2)/2, 1/s
    coherence_s: tuple[float, ...]         # [k]: min(T1, T2) of the k-th best qubit (descending)
    readout_logfid_sum: tuple[float, ...]  # [k]: Σ over the k best qubits of -log(1 - readout error)
    gate_1q_s: float | None = None         # calibrated durations (medians), for scheduled duration
    gate_2q_s: float | None = None
    readout_s: float | None = None
    rep_delay_s: float | None = None       # per shot beside the gates (reset, cooling, atom loading)

    @property
    def qubits(self) -> int:
        return len(self.coherence_s)

    def decay(self, n: int, duration_s: float) -> float:
        """exp(-duration · Σ rates) over the ``n`` best-coherence qubits."""
        n = min(max(n, 0), self.qubits)
        return math.exp(-duration_s * self.decay_rate_sum[n]) if n else 1.0

    def readout_fidelity(self, m: int) -> float:
        m = min(max(m, 0), self.qubits)
        return math.exp(-self.readout_logfid_sum[m]) if m else 1.0

    def weakest_coherence_s(self, n: int) -> float:
        """min(T1, T2) of the weakest of the ``n`` best qubits (the one a duration must fit)."""
        if n <= 0 or not self.coherence_s:
            return math.inf
        return self.coherence_s[min(n, self.qubits) - 1]

    @classmethod
    def from_calibration(cls, t1_s: tuple[float | None, ...], t2_s: tuple[float | None, ...],
                         readout_error: tuple[float | None, ...], gate_1q_s: float | None = None,
                         gate_2q_s: float | None = None, readout_s: float | None = None,
                         rep_delay_s: float | None = None) -> "QubitProfile":
        """From a calibration's per-qubit figures; qubits with a missing T1/T2 rank last."""
        def ok(v: float | None) -> bool:
            return v is not None and v == v and v > 0

        rates, coherence = [], []
        for t1, t2 in zip(t1_s, t2_s):
            if ok(t1) and ok(t2):
                rates.append((1.0 / t1 + 1.0 / t2) / 2.0)   # type: ignore[operator]
                coherence.append(min(t1, t2))                # type: ignore[type-var]
            else:
                rates.append(math.inf)
                coherence.append(0.0)
        ro = sorted(math.inf if e is None or e != e else -math.log(min(max(1.0 - e, 1e-12), 1.0))
                    for e in readout_error)
        return cls(_prefix(sorted(rates)), tuple(sorted(coherence, reverse=True)), _prefix(ro),
                   gate_1q_s, gate_2q_s, readout_s, rep_delay_s)

    @classmethod
    def of(cls, calibration: Any) -> "QubitProfile":
        """From a ``backends.base.Calibration``: per-qubit T1, T2 and readout; the median durations
        of a single-qubit gate, of the native two-qubit gate, of readout, and the per-shot delay."""
        durations = calibration.gate_duration_s or {}

        def first(names: tuple[str, ...]) -> float | None:
            for name in names:
                value = durations.get(name)
                if value:
                    return float(value)
            return None

        return cls.from_calibration(tuple(calibration.t1_s), tuple(calibration.t2_s),
                                    tuple(calibration.readout_error), first(("sx", "x", "rx")),
                                    first(("cz", "ecr", "cx", "rzz")),
                                    float(calibration.readout_duration_s or 0.0) or first(("measure",)),
                                    float(getattr(calibration, "rep_delay_s", 0.0) or 0.0) or None)


def _prefix(values: list[float]) -> tuple[float, ...]:
    out, total = [0.0], 0.0
    for v in values:
        total += v
        out.append(total)
    return tuple(out)


@dataclass(frozen=True)
class BackendView:
    """A backend's fixed spec with the part of its live state that filters read."""

    spec: BackendSpec
    healthy: bool = True
    calibration: Mapping[str, float] | None = None  # Calibration.summary()
    calibration_age_s: float | None = None          # how old its calibration is (None: n/a)
    qubits: QubitProfile | None = None              # per-qubit ranking of the same calibration
    memory_free_bytes: int | None = None            # free on the node now, as measured (None: unknown)

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
