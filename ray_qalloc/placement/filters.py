"""Filters: each removes backends that cannot run a job, and says why.

One small class per concern (Kubernetes scheduling framework style): a filter returns
``OK`` or a Status with reasons, never raises for an expected outcome.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Protocol

from ray_qalloc.gates import CLIFFORD_GATES, CONTROL_FLOW_BLOCKS, IDENTITY, JOB_MARKERS, LOOP_CONTROL, NOT_GATES
from ray_qalloc.placement.model import OK, BackendView, Estimate, JobView, Status

# Operations every backend accepts (transpilation maps standard gates to any basis), and the
# job markers (what a backend refuses of them is ``spec.refuses``).
_DIRECTIVES = NOT_GATES | {IDENTITY} | JOB_MARKERS
_CONTROL_FLOW = CONTROL_FLOW_BLOCKS | LOOP_CONTROL
CLIFFORD_OPS = CLIFFORD_GATES | _DIRECTIVES


class Filter(Protocol):
    name: str

    def check(self, job: JobView, backend: BackendView) -> Status: ...


class QubitsFilter:
    name = "qubits"

    def check(self, job: JobView, backend: BackendView) -> Status:
        if job.num_qubits > backend.spec.num_qubits:
            return Status("unresolvable", self.name,
                          (f"needs {job.num_qubits} qubits, backend has {backend.spec.num_qubits}",))
        return OK


class MemoryFilter:
    """A statevector needs 16·2ⁿ bytes, a density matrix 16·4ⁿ.

    Two limits: the variant's own budget (fixed; over it, never) and what the node measured
    free at its pool's last ping (``BackendView.memory_free_bytes``; over it, *wait*: other
    work on a shared node, or our own runs, hold the rest for now)."""

    name = "memory"

    def check(self, job: JobView, backend: BackendView) -> Status:
        spec = backend.spec
        if spec.memory_bytes is None or spec.kind != "simulator":
            return OK
        need = memory_needed(spec.method, job.num_qubits)
        if need > spec.memory_bytes:
            return Status("unresolvable", self.name,
                          (f"{spec.method} of {job.num_qubits} qubits needs {_gib(need)}, "
                           f"backend may use {_gib(spec.memory_bytes)}",))
        free = backend.memory_free_bytes
        if free is not None and need > free:
            return Status("unschedulable", self.name,
                          (f"{spec.method} of {job.num_qubits} qubits needs {_gib(need)}, the node has "
                           f"{_gib(free)} free now",))
        return OK


def memory_needed(method: str | None, n: int) -> float:
    if method == "statevector":
        return 16.0 * 2.0 ** n
    if method == "density_matrix":
        return 16.0 * 4.0 ** n
    return 0.0


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


class OperationsFilter:
    name = "operations"

    def check(self, job: JobView, backend: BackendView) -> Status:
        spec = backend.spec
        if spec.refuses:
            refused = sorted(job.ops.intersection(spec.refuses))
            if refused:
                return Status("unresolvable", self.name, (f"cannot run {', '.join(refused)}",))
        ops = job.ops - _DIRECTIVES
        if spec.clifford_only:
            bad = sorted(ops - CLIFFORD_OPS)
            if bad:
                return Status("unresolvable", self.name, (f"not Clifford: {', '.join(bad[:5])}",))
        flow = ops & _CONTROL_FLOW
        if flow and spec.basis_gates and not flow <= set(spec.basis_gates):
            return Status("unresolvable", self.name,
                          (f"no support for {', '.join(sorted(flow - set(spec.basis_gates)))}",))
        return OK


class IntentFilter:
    name = "intent"

    def check(self, job: JobView, backend: BackendView) -> Status:
        kind = backend.spec.kind
        if job.intent == "quantum" and kind != "qpu":
            return Status("unresolvable", self.name, ("intent 'quantum' needs a QPU",))
        if job.intent == "classical" and kind != "simulator":
            return Status("unresolvable", self.name, ("intent 'classical' needs a simulator",))
        return OK


class AllowListFilter:
    """The job (or its tenant) named the backends it may use."""

    name = "allow_list"

    def check(self, job: JobView, backend: BackendView) -> Status:
        if job.allowed is not None and backend.name not in job.allowed:
            return Status("unresolvable", self.name, ("not in the job's list of allowed backends",))
        return OK


class TenantFilter:
    """Tenant permissions: a tenant with an entry may use only the backends it names — a name, a
    pool (all its method variants), a method (``statevector``, ``mps``, old ``aer_statevector``: that
    method on every pool), or ``kind:qpu`` / ``kind:simulator`` for a whole kind; others use any."""

    name = "tenant"

    def __init__(self, permissions: Mapping[str, Iterable[str]] | None = None) -> None:
        from ray_qalloc.backends.pools import method_of_name

        self.permissions = {t: frozenset(v) for t, v in (permissions or {}).items()}
        self._methods = {t: frozenset(m for e in v if "/" not in e and (m := method_of_name(e)) is not None)
                         for t, v in self.permissions.items()}

    def check(self, job: JobView, backend: BackendView) -> Status:
        allowed = self.permissions.get(job.tenant)
        spec = backend.spec
        if (allowed is None or backend.name in allowed or f"kind:{spec.kind}" in allowed
                or (spec.pool is not None and (spec.pool in allowed or spec.method in self._methods[job.tenant]))):
            return OK
        return Status("unresolvable", self.name, (f"tenant {job.tenant!r} may not use this backend",))


class CalibrationFreshnessFilter:
    """A QPU whose calibration is older than ``max_age_s`` is not used until it is refreshed
    (waiting may help: *unschedulable*). Off when ``max_age_s`` is None."""

    name = "calibration"

    def __init__(self, max_age_s: float | None = None) -> None:
        self.max_age_s = max_age_s

    def check(self, job: JobView, backend: BackendView) -> Status:
        age = backend.calibration_age_s
        if self.max_age_s is None or backend.spec.kind != "qpu" or age is None or age <= self.max_age_s:
            return OK
        return Status("unschedulable", self.name,
                      (f"calibration is {age / 3600:.3g} h old (limit {self.max_age_s / 3600:.3g} h)",))


class CoherenceBudgetFilter:
    """Claim 5a: a QPU whose best ``n`` qubits cannot hold the circuit is not a candidate.

    The circuit's scheduled duration on the device (its depth at the calibrated gate times,
    ``prior.qpu_duration_s``) must fit in ``budget`` times the coherence time — min(T1, T2) —
    of the weakest of the ``n`` qubits a noise-aware layout would choose. Past one coherence
    time a qubit has lost most of its state: the counts would be close to noise whatever the
    gate errors say. Only QPUs with a per-qubit profile are checked (``BackendView.qubits``);
    ``budget=None`` turns it off.

    *Unschedulable* (wait: the next calibration may allow it) while the duration would fit the
    chip's single best qubit — the ``n`` best are degraded now; *unresolvable* when it would not
    fit even that one: no layout on this device holds the circuit, and waiting for it would be
    waiting forever."""

    name = "coherence"

    def __init__(self, budget: float | None = 1.0) -> None:
        self.budget = budget

    def check(self, job: JobView, backend: BackendView) -> Status:
        qubits = backend.qubits
        if self.budget is None or backend.spec.kind != "qpu" or qubits is None or job.num_qubits < 1:
            return OK
        from ray_qalloc.costmodel.prior import qpu_duration_s

        duration = qpu_duration_s(job, qubits)
        limit = qubits.weakest_coherence_s(job.num_qubits)
        if duration <= self.budget * limit:
            return OK
        best = qubits.weakest_coherence_s(1)
        if duration > self.budget * best:
            return Status("unresolvable", self.name,
                          (f"scheduled duration {duration * 1e6:.3g} µs exceeds {self.budget:g} × the coherence "
                           f"time {best * 1e6:.3g} µs of the device's best qubit",))
        return Status("unschedulable", self.name,
                      (f"scheduled duration {duration * 1e6:.3g} µs exceeds {self.budget:g} × the coherence "
                       f"time {limit * 1e6:.3g} µs of the weakest of the {job.num_qubits} best qubits",))


class HealthFilter:
    name = "health"

    def check(self, job: JobView, backend: BackendView) -> Status:
        if not backend.healthy:
            return Status("unschedulable", self.name, ("backend failed its last health check",))
        return OK


class BlockedFilter:
    """Failover: a backend that failed this job is not tried for it again."""

    name = "failover"

    def check(self, job: JobView, backend: BackendView) -> Status:
        if backend.name in job.blocked:
            return Status("unresolvable", self.name, ("an earlier attempt of this job failed here",))
        return OK


class FidelityFilter:
    """Runs after estimation: needs the predicted fidelity."""

    name = "fidelity"

    def check_estimate(self, job: JobView, estimate: Estimate) -> Status:
        if job.fidelity_min is not None and estimate.fidelity < job.fidelity_min:
            return Status("unresolvable", self.name,
                          (f"estimated fidelity {estimate.fidelity:.3f} < floor {job.fidelity_min:.3f}",))
        return OK


# Aer's statevector_parallel_threshold: a run uses its threads only when its state vector is
# wider than this (qubitvector.hpp: ``num_qubits_ > omp_threshold_``, 14 by default); a density
# matrix of n qubits is a vector of 2n. Narrower, a many-thread variant only holds idle cores:
# measured here on a quiet machine, 14-qubit circuits ran 0-40 % slower on two threads.
AER_PARALLEL_THRESHOLD = 14


def aer_parallelises(method: str | None, num_qubits: int) -> bool:
    """Whether Aer spreads a ``method`` run of ``num_qubits`` over the threads it is given."""
    width = 2 * num_qubits if method == "density_matrix" else num_qubits
    return width > AER_PARALLEL_THRESHOLD


class ThreadsFilter:
    """A pool's many-thread variant is for circuits wide enough for Aer to parallelise."""

    name = "threads"

    def check(self, job: JobView, backend: BackendView) -> Status:
        spec = backend.spec
        if spec.kind == "simulator" and spec.pool is not None and spec.threads > 1 \
                and not aer_parallelises(spec.method, job.num_qubits):
            return Status("unresolvable", self.name,
                          (f"Aer runs {spec.method or 'this method'} on one thread up to "
                           f"{AER_PARALLEL_THRESHOLD} state qubits; {spec.threads} threads would idle",))
        return OK


DEFAULT_FILTERS: tuple[Filter, ...] = (AllowListFilter(), IntentFilter(), QubitsFilter(), ThreadsFilter(), MemoryFilter(), OperationsFilter(),
                                       BlockedFilter(), HealthFilter())


def make_filters(tenant_backends: Mapping[str, Iterable[str]] | None = None,
                 max_calibration_age_s: float | None = None, *, health: bool = True,
                 coherence_budget: float | None = 1.0) -> tuple[Filter, ...]:
    """The default pipeline plus the configured tenant permissions and calibration freshness.

    ``health=False`` leaves health out of the plan: the live allocator tracks it in the
    scheduler instead (an unhealthy backend is "not startable now"), so a job whose backends
    are all restarting waits for them rather than being refused or failed."""
    base = DEFAULT_FILTERS if health else tuple(f for f in DEFAULT_FILTERS if not isinstance(f, HealthFilter))
    return base + (TenantFilter(tenant_backends), CalibrationFreshnessFilter(max_calibration_age_s),
                   CoherenceBudgetFilter(coherence_budget))
