"""``QAllocEstimator``: a Qiskit ``BaseEstimatorV2`` whose circuits run wherever the allocator puts them.

Why: Estimator code (a VQE loop with ``SparsePauliOp``, a parametrized ansatz and scipy's
``minimize``) switches to ray-qalloc by one line (``estimator = QAllocEstimator()`` instead
of ``StatevectorEstimator()``) and keeps reading ``result[0].data.evs`` / ``.stds``.

How: a pub ``(circuit, observables, parameter_values, precision)`` is broadcast as Qiskit
defines it; each parameter set becomes ONE ray-qalloc job carrying the observables that set
needs (``observables`` and ``precision`` job fields, ``ray_qalloc.runopts``), and all jobs of
one ``run`` go to the client in one ``submit_many``. The allocator places each job like any
other: on a simulator the runner computes exact expectation values (``stds`` 0), on a QPU
it measures one circuit per qubit-wise commuting basis with ⌈1/precision²⌉ shots each and
returns the values with their shot-noise standard errors (``ray_qalloc.expectation``).

The default precision is 1/64 (as Qiskit's ``BackendEstimatorV2`` and IBM Runtime), so QPUs
stay eligible; ``precision=0`` asks for exact values and keeps the job on simulators.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Mapping, Sequence

import numpy as np
from qiskit.primitives import BaseEstimatorV2, DataBin, PrimitiveResult, PubResult
from qiskit.primitives.containers.estimator_pub import EstimatorPub, EstimatorPubLike

from ray_qalloc.exceptions import BackendError, JobFailed
from ray_qalloc.expectation import unmeasured
from ray_qalloc.primitive_base import PrimitiveOptions, QAllocPrimitive, make_options
from ray_qalloc.primitive_job import InvalidPub, PrimitiveClient, QAllocPrimitiveJob, _Handle, pub_error, submit_all
from ray_qalloc.runopts import PAULI_LETTERS

if TYPE_CHECKING:  # pragma: no cover
    from qiskit import QuantumCircuit

DEFAULT_PRECISION = 0.015625    # 1/64: 4096 shots per basis on a QPU, as BackendEstimatorV2


@dataclass(frozen=True)
class QAllocEstimatorOptions(PrimitiveOptions):
    """Job options applied to every parameter set, and the precision when neither the pub nor ``run`` says."""

    default_precision: float = DEFAULT_PRECISION

    run_default: ClassVar[str] = "default_precision"


@dataclass(frozen=True)
class _PubPlan:
    """One coerced pub: its jobs (one per parameter set) and how to spread their values back."""

    pub: EstimatorPub
    circuits: list["QuantumCircuit"]            # bound, one per parameter set (C order)
    needed: list[list[int]]                     # per parameter set: flat observable indices it computes
    param_index: np.ndarray                     # pub.shape -> parameter set
    obs_index: np.ndarray                       # pub.shape -> flat observable index


class QAllocEstimator(QAllocPrimitive, BaseEstimatorV2):
    """An EstimatorV2 that submits its circuits to ray-qalloc.

    Args:
        client: as for ``QAllocSampler``; ``None`` connects with ``ray_qalloc.connect()``.
        default_precision: precision when neither the pub nor ``run`` says (1/64; 0 = exact
            values, simulators only).
        seed: an int sent to every simulator run (Qiskit's ``seed``); real QPUs ignore it.
        priority, intent, fidelity_min, deadline_s, backends, tenant: job options, as for
            ``QAlloc.submit``; ``None`` leaves each to the client's default.
        timeout_s: how long ``job.result()`` waits for all jobs of one ``run`` (None: forever).
    """

    def __init__(self, client: PrimitiveClient | None = None, *, default_precision: float = DEFAULT_PRECISION,
                 seed: int | None = None, priority: str | None = None, intent: str | None = None,
                 fidelity_min: float | None = None, deadline_s: float | None = None,
                 backends: Iterable[str] | None = None, tenant: str | None = None,
                 timeout_s: float | None = None) -> None:
        _check_precision(default_precision, "default_precision")
        options = make_options(QAllocEstimatorOptions, priority=priority, intent=intent, fidelity_min=fidelity_min,
                               deadline_s=deadline_s, backends=backends, tenant=tenant, timeout_s=timeout_s,
                               seed=seed, default_precision=float(default_precision))
        self._init_primitive(client, options)

    @property
    def options(self) -> QAllocEstimatorOptions:
        return self._options  # type: ignore[return-value]

    @property
    def default_precision(self) -> float:
        return self.options.default_precision

    def run(self, pubs: Iterable[EstimatorPubLike], *, precision: float | None = None) -> "QAllocEstimatorJob":
        """Validate every pub, submit one job per parameter set in one ``submit_many``, return the job.

        Bad pubs raise ``ValueError`` here (``InvalidPub``); backend failures and timeouts raise
        from ``job.result()``."""
        if precision is None:
            precision = self.options.default_precision
        _check_precision(precision, "precision")
        plans = [_plan(i, pub, precision) for i, pub in enumerate(_as_list(pubs))]
        fields = self._options.job_fields()
        jobs = []
        for plan in plans:
            observables = [_pauli_terms(o) for o in plan.pub.observables.ravel().tolist()]
            for circuit, needed in zip(plan.circuits, plan.needed):
                jobs.append(dict(fields, circuit=circuit, observables=[observables[o] for o in needed],
                                 precision=float(plan.pub.precision)))
        handles = submit_all(self._client, jobs, "estimator")
        return QAllocEstimatorJob(plans, handles, self._options.timeout_s)


class QAllocEstimatorJob(QAllocPrimitiveJob[PrimitiveResult[PubResult]]):
    """The ray-qalloc jobs of one ``run``, collected in a background thread into a PrimitiveResult."""

    def __init__(self, plans: list[_PubPlan], handles: list[_Handle], timeout_s: float | None) -> None:
        self._plans = plans
        super().__init__(handles, timeout_s, self._results,
                         timeout_fix=f"raise QAllocEstimator(timeout_s=...) (now {timeout_s} s).")

    def _results(self, handles: list[_Handle], outcomes: list[Any]) -> PrimitiveResult[PubResult]:
        results, start = [], 0
        for plan in self._plans:
            n = len(plan.circuits)
            results.append(_pub_result(plan, handles[start:start + n], outcomes[start:start + n]))
            start += n
        return PrimitiveResult(results, metadata={"version": 2})


# ---------------------------------------------------------------------------------------------
# Pubs in
# ---------------------------------------------------------------------------------------------

def _as_list(pubs: Iterable[EstimatorPubLike]) -> list[EstimatorPubLike]:
    from qiskit import QuantumCircuit

    if isinstance(pubs, (QuantumCircuit, EstimatorPub)):
        raise InvalidPub("run() takes a list of pubs, got a single one.", field="pubs",
                         fix="wrap it in a list: estimator.run([(circuit, observables)]).")
    return list(pubs)


def _check_precision(precision: Any, name: str) -> None:
    if isinstance(precision, bool) or not isinstance(precision, (int, float, np.floating, np.integer)) \
            or not np.isfinite(precision) or precision < 0:
        raise InvalidPub(f"{name}={precision!r} must be a number >= 0.", field=name,
                         fix="pass the wanted standard error (e.g. 0.01; 0 = exact values, simulators only).")


def _plan(index: int, pub_like: EstimatorPubLike, precision: float) -> _PubPlan:
    where = f"pub {index}"
    try:
        pub = EstimatorPub.coerce(pub_like, precision)
    except (ValueError, TypeError) as exc:
        raise pub_error(exc, f"{where}: {exc}",
                        fix="give (circuit, observables), (circuit, observables, parameter_values) or (circuit, "
                            "observables, parameter_values, precision), with shapes that broadcast.") from None
    if pub.precision is not None:
        _check_precision(pub.precision, f"{where} precision")
    try:
        unmeasured(pub.circuit)
    except BackendError as exc:
        raise InvalidPub(f"{where}: {exc.message}", field="pubs", fix=exc.fix) from None
    try:
        bound = pub.parameter_values.bind_all(pub.circuit)
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidPub(f"{where}: cannot bind the parameter values: {exc}", field="pubs",
                         fix="give one value per circuit parameter.") from None
    params = np.arange(bound.size).reshape(bound.shape)
    observables = np.arange(pub.observables.size).reshape(pub.observables.shape)
    param_index = np.broadcast_to(params, pub.shape)
    obs_index = np.broadcast_to(observables, pub.shape)
    circuits, needed = [], []
    for p in range(bound.size):
        wanted = sorted({int(o) for o in obs_index[param_index == p]})
        if wanted:   # a parameter set no broadcast position uses is not run
            circuits.append(bound.flat[p])
            needed.append(wanted)
    unbound = next((c for c in circuits if c.num_parameters), None)
    if unbound is not None:
        raise InvalidPub(f"{where}: parameters left unbound: {', '.join(p.name for p in unbound.parameters)}.",
                         field="pubs", fix="give a value for every circuit parameter.")
    return _PubPlan(pub=pub, circuits=circuits, needed=needed, param_index=param_index, obs_index=obs_index)


def _pauli_terms(observable: Mapping[str, float]) -> dict[str, float]:
    """An observable as {Pauli label: coefficient}; projector letters (0 1 + - r l, which Qiskit's
    ``SparseObservable`` allows) are expanded into Pauli terms first."""
    if all(set(label) <= PAULI_LETTERS for label in observable):
        return {label: float(np.real(coeff)) for label, coeff in observable.items()}
    from qiskit.quantum_info import SparseObservable, SparsePauliOp

    total = None
    for label, coeff in observable.items():
        term = SparsePauliOp.from_sparse_observable(SparseObservable.from_label(label)) * coeff
        total = term if total is None else total + term
    assert total is not None
    out: dict[str, float] = {}
    for label, coeff in total.simplify().to_list():
        out[label] = out.get(label, 0.0) + float(np.real(coeff))
    return out


# ---------------------------------------------------------------------------------------------
# Values out
# ---------------------------------------------------------------------------------------------

def _expectation(outcome: Any, handle: _Handle, count: int) -> Mapping[str, Any]:
    meta = getattr(outcome, "metadata", None) or {}
    exp = meta.get("expectation")
    if not exp or len(exp.get("evs", ())) != count:
        raise JobFailed(f"job {handle.id} returned no expectation values (or not {count}).",
                        fix="use a client and server of this ray-qalloc version (the job ran as a sampler job).")
    return exp


def _pub_result(plan: _PubPlan, handles: Sequence[_Handle], outcomes: Sequence[Any]) -> PubResult:
    pub = plan.pub
    evs = np.zeros(pub.shape, dtype=np.float64)
    stds = np.zeros(pub.shape, dtype=np.float64)
    found: dict[int, Mapping[str, Any]] = {}
    # parameter set p -> its position among the submitted jobs (sets no position uses were skipped)
    used = sorted({int(p) for p in np.unique(plan.param_index)}) if plan.param_index.size else []
    position = {p: i for i, p in enumerate(used)}
    for i, (handle, outcome) in enumerate(zip(handles, outcomes)):
        found[i] = _expectation(outcome, handle, len(plan.needed[i]))
    slot = [{o: k for k, o in enumerate(needed)} for needed in plan.needed]
    for idx in np.ndindex(pub.shape):
        i = position[int(plan.param_index[idx])]
        k = slot[i][int(plan.obs_index[idx])]
        evs[idx] = found[i]["evs"][k]
        stds[idx] = found[i]["stds"][k]
    exps = [found[i] for i in range(len(handles))]
    metadata = {"target_precision": float(pub.precision), "circuit_metadata": pub.circuit.metadata,
                "job_ids": [h.id for h in handles],
                "backends": [str(getattr(o, "backend", "")) for o in outcomes],
                "exact": [bool(e.get("exact")) for e in exps],
                "shots": [int(e.get("shots_per_group") or 0) * int(e.get("groups") or 0) for e in exps]}
    return PubResult(DataBin(evs=evs, stds=stds, shape=pub.shape), metadata=metadata)


__all__ = ["DEFAULT_PRECISION", "QAllocEstimator", "QAllocEstimatorJob", "QAllocEstimatorOptions"]
