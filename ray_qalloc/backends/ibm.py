"""IBM Quantum hardware through Qiskit Runtime's SamplerV2, as a ray-qalloc backend.

Why this shape: the same code must run against hardware and in Qiskit Runtime's local
testing mode (``backend=FakeManilaV2()``), so that its whole path - transpiling to the
device's ISA, submitting, reporting the job id, reading counts - is tested without an
account. The provider's job id goes to ``on_submitted`` *before* the adapter waits on the
result: a restarted actor then calls ``reattach`` instead of paying for the job twice.

The adapter is enabled only by configured credentials (``from_env``: the
``QISKIT_IBM_TOKEN`` / ``QISKIT_IBM_INSTANCE`` / ``QISKIT_IBM_CHANNEL`` variables or an
account saved with ``QiskitRuntimeService.save_account``); with none it returns ``None``
without touching the network.

QPU time: the billed quantum seconds of ``job.usage()`` on hardware; in local mode (no
usage) the same model as the emulated QPUs: shots x (scheduled duration + rep delay) +
``overhead_s``.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ray_qalloc.backends.base import BackendSpec, Calibration, Price, ProviderStatus, RunResult
from ray_qalloc.backends.fake_qpu import (DEFAULT_OVERHEAD_S, QPU_PRICE, calibration_of,
                                          modelled_qpu_seconds, rep_delay_of, scheduled_duration)
from ray_qalloc.exceptions import BackendError

if TYPE_CHECKING:  # pragma: no cover
    from qiskit import QuantumCircuit

ENV_TOKEN = "QISKIT_IBM_TOKEN"
ENV_INSTANCE = "QISKIT_IBM_INSTANCE"
ENV_CHANNEL = "QISKIT_IBM_CHANNEL"
ENV_BACKEND = "QISKIT_IBM_BACKEND"
DEFAULT_CHANNEL = "ibm_quantum_platform"
CALIBRATION_TTL_S = 300.0
STATUS_TTL_S = 30.0         # the provider's queue moves by the minute; one status call per TTL


def saved_account_file() -> Path:
    """Where ``QiskitRuntimeService.save_account`` writes, resolved now (HOME may change)."""
    return Path.home() / ".qiskit" / "qiskit-ibm.json"


def has_saved_account() -> bool:
    """True when an account file with at least one account exists; reads only the disk."""
    path = saved_account_file()
    if not path.is_file():
        return False
    try:
        from qiskit_ibm_runtime import QiskitRuntimeService

        return bool(QiskitRuntimeService.saved_accounts(filename=str(path)))
    except Exception:  # unreadable or malformed file: treat as no account
        return False


def service_from_env(environ: dict[str, str] | None = None) -> Any | None:
    """A QiskitRuntimeService from the environment or a saved account; None when neither."""
    env = dict(os.environ if environ is None else environ)
    token = env.get(ENV_TOKEN)
    if not token and not has_saved_account():
        return None
    from qiskit_ibm_runtime import QiskitRuntimeService

    try:
        if token:
            return QiskitRuntimeService(channel=env.get(ENV_CHANNEL) or DEFAULT_CHANNEL, token=token,
                                        instance=env.get(ENV_INSTANCE) or None)
        return QiskitRuntimeService(filename=str(saved_account_file()),
                                    instance=env.get(ENV_INSTANCE) or None)
    except Exception as exc:
        raise BackendError(f"IBM Quantum credentials are configured but the service refused them: {exc}",
                           fix=f"check {ENV_TOKEN}, {ENV_INSTANCE} and {ENV_CHANNEL}, or the saved "
                               "account (QiskitRuntimeService.saved_accounts()).") from exc


def counts_by_register(pub_result: Any) -> dict[str, int]:
    """Counts in Qiskit's classic format: registers last-first, separated by spaces."""
    data = pub_result.data
    names = list(data.keys())
    if not names:
        return {}
    if len(names) == 1:
        return dict(data[names[0]].get_counts())
    columns = [data[n].get_bitstrings() for n in reversed(names)]
    counts: dict[str, int] = {}
    for parts in zip(*columns):
        key = " ".join(parts)
        counts[key] = counts.get(key, 0) + 1
    return counts


def _is_local(backend: Any) -> bool:
    """True for fake (local testing mode) backends: they have no service behind them."""
    return type(backend).__module__.startswith("qiskit_ibm_runtime.fake_provider") or \
        getattr(backend, "service", None) is None


class IBMRuntimeBackend:
    """One IBM Quantum device (or a fake one, in local testing mode) via SamplerV2."""

    def __init__(self, backend_name: str | None = None, *, service: Any = None, backend: Any = None,
                 name: str | None = None, overhead_s: float = DEFAULT_OVERHEAD_S,
                 price: Price | None = None, optimization_level: int = 1) -> None:
        if backend is None and service is None:
            raise BackendError("IBMRuntimeBackend needs a service (hardware) or a backend (local mode).",
                               fix="use IBMRuntimeBackend.from_env(), or pass backend=FakeManilaV2() for local mode.")
        if service is None and backend is not None and not _is_local(backend):
            service = getattr(backend, "service", None)  # a real IBMBackend knows its service
        self._backend_name = backend_name
        self._service = service
        self._backend = backend
        self._name = name
        self._overhead_s = float(overhead_s)
        self._price = price or QPU_PRICE
        self._optimization_level = optimization_level
        self._pass_manager: Any = None
        self._spec: BackendSpec | None = None
        self._calibration: Calibration | None = None
        self._calibration_at = 0.0
        self._status: ProviderStatus | None = None

    @classmethod
    def from_env(cls, backend_name: str | None = None, *, environ: dict[str, str] | None = None,
                 **kwargs: Any) -> "IBMRuntimeBackend | None":
        """The adapter for configured credentials, or None (no network call) when there are none."""
        env = dict(os.environ if environ is None else environ)
        service = service_from_env(env)
        if service is None:
            return None
        return cls(backend_name or env.get(ENV_BACKEND) or None, service=service, **kwargs)

    # -- protocol -------------------------------------------------------------------------

    def spec(self) -> BackendSpec:
        if self._spec is None:
            backend = self.backend
            target = backend.target
            basis = tuple(sorted(n for n in target.operation_names
                                 if not isinstance(target.operation_from_name(n), type)))
            self._spec = BackendSpec(
                name=self.name, kind="qpu", family="ibm", num_qubits=backend.num_qubits, slots=1,
                device=backend.name, basis_gates=basis, noisy=True, price=self._price,
                description=f"IBM Quantum {backend.name} via Qiskit Runtime SamplerV2"
                            + (" (local testing mode)" if self.local else "") + ".")
        return self._spec

    def calibration(self) -> Calibration:
        """The device's calibration, refreshed at most every CALIBRATION_TTL_S seconds."""
        now = time.time()
        if self._calibration is None or now - self._calibration_at > CALIBRATION_TTL_S:
            backend = self.backend
            if not self.local and hasattr(backend, "refresh"):
                try:
                    backend.refresh()
                except Exception:  # stale calibration beats none
                    pass
            self._calibration = calibration_of(backend, self.name)
            self._calibration_at = now
        return self._calibration

    def provider_status(self) -> ProviderStatus | None:
        """The provider's word on the device (``backend.status()``: operational, pending jobs),
        read at most every STATUS_TTL_S seconds. A failed read keeps the last answer (None
        before the first): a network blip must not take a device out of service."""
        now = time.time()
        if self._status is None or now - self._status.read_at > STATUS_TTL_S:
            try:
                raw = self.backend.status()
            except Exception:  # noqa: BLE001 - any failure of the provider call: keep what we knew
                return self._status
            pending = getattr(raw, "pending_jobs", None)
            self._status = ProviderStatus(
                operational=bool(getattr(raw, "operational", True)),
                pending_jobs=None if pending is None else max(int(pending), 0),
                message=str(getattr(raw, "status_msg", "") or ""), read_at=now)
        return self._status

    def run(self, circuit: "QuantumCircuit", shots: int, *, seed: int | None = None,
            on_submitted: Callable[[str], None] | None = None) -> RunResult:
        start = time.perf_counter()
        backend = self.backend
        if circuit.num_qubits > backend.num_qubits:
            raise BackendError(f"{circuit.num_qubits} qubits exceed {backend.name}'s {backend.num_qubits}.",
                               fix="choose a larger device or a simulator.")
        t0 = time.perf_counter()
        isa = self._transpile(circuit)
        transpile_s = time.perf_counter() - t0
        schedule = scheduled_duration(isa, backend.target)
        t1 = time.perf_counter()
        job = self._submit(isa, shots, seed)
        job_id = str(job.job_id())
        if on_submitted is not None:
            on_submitted(job_id)
        result = self._wait(job, job_id)
        execute_s = time.perf_counter() - t1
        modelled = modelled_qpu_seconds(shots, schedule.duration_s, rep_delay_of(backend), self._overhead_s)
        billed = self._usage(job)
        return RunResult(
            counts=counts_by_register(result[0]), shots=shots, backend=self.name,
            wall_s=time.perf_counter() - start, transpile_s=transpile_s, execute_s=execute_s,
            qpu_s=billed if billed is not None else modelled, provider_job_id=job_id,
            metadata={"device": backend.name, "local": self.local, "duration_s": schedule.duration_s,
                      "qpu_s_source": "usage" if billed is not None else "modelled",
                      "modelled_qpu_s": modelled, "depth": isa.depth()})

    def run_many(self, circuits: "list[QuantumCircuit]", shots: int, *, seed: int | None = None,
                 on_submitted: Callable[[str], None] | None = None) -> list[RunResult]:
        """Several circuits (an estimator job's measurement bases) as ONE provider job of several
        pubs: one id to store before waiting, so a restart re-attaches to all of them at once."""
        start = time.perf_counter()
        backend = self.backend
        wide = max(c.num_qubits for c in circuits)
        if wide > backend.num_qubits:
            raise BackendError(f"{wide} qubits exceed {backend.name}'s {backend.num_qubits}.",
                               fix="choose a larger device or a simulator.")
        t0 = time.perf_counter()
        isas = [self._transpile(c) for c in circuits]
        transpile_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        job = self._submit(isas, shots, seed)
        job_id = str(job.job_id())
        if on_submitted is not None:
            on_submitted(job_id)
        result = self._wait(job, job_id)
        execute_s = time.perf_counter() - t1
        billed = self._usage(job)
        out = []
        for i, isa in enumerate(isas):
            schedule = scheduled_duration(isa, backend.target)
            modelled = modelled_qpu_seconds(shots, schedule.duration_s, rep_delay_of(backend), self._overhead_s)
            share = None if billed is None else billed / len(isas)
            out.append(RunResult(
                counts=counts_by_register(result[i]), shots=shots, backend=self.name,
                wall_s=time.perf_counter() - start if i == 0 else 0.0,
                transpile_s=transpile_s if i == 0 else 0.0, execute_s=execute_s if i == 0 else 0.0,
                qpu_s=share if share is not None else modelled, provider_job_id=job_id,
                metadata={"device": backend.name, "local": self.local, "duration_s": schedule.duration_s,
                          "qpu_s_source": "usage" if billed is not None else "modelled",
                          "modelled_qpu_s": modelled, "depth": isa.depth(), "pubs": len(isas)}))
        return out

    def reattach(self, provider_job_id: str, shots: int) -> RunResult:
        """Wait again on a job submitted before a crash; needs a service (not local mode)."""
        if self._service is None:
            raise BackendError("cannot re-attach to a job in local testing mode: local jobs do not "
                               "outlive their process.",
                               fix="run the job again; re-attaching needs an IBM Quantum account.")
        start = time.perf_counter()
        try:
            job = self._service.job(provider_job_id)
        except Exception as exc:
            raise BackendError(f"IBM Quantum has no job {provider_job_id!r}: {exc}",
                               fix="run the job again.") from exc
        result = self._wait(job, provider_job_id)
        counts = counts_by_register(result[0])
        metadata: dict[str, Any] = {"reattached": True, "qpu_s_source": "usage"}
        if len(result) > 1:   # an estimator job's measurement bases: every pub's counts
            metadata["pub_counts"] = [counts_by_register(r) for r in result]
        return RunResult(counts=counts, shots=sum(counts.values()) or shots, backend=self.name,
                         wall_s=time.perf_counter() - start, qpu_s=self._usage(job),
                         provider_job_id=provider_job_id, metadata=metadata)

    # -- helpers --------------------------------------------------------------------------

    @property
    def backend(self) -> Any:
        """The Qiskit backend, looked up on first use (least busy device when none named)."""
        if self._backend is None:
            try:
                if self._backend_name:
                    self._backend = self._service.backend(self._backend_name)
                else:
                    self._backend = self._service.least_busy(operational=True, simulator=False)
            except Exception as exc:
                raise BackendError(f"cannot reach IBM Quantum backend {self._backend_name or '(least busy)'}: {exc}",
                                   fix=f"check the name in {ENV_BACKEND} and your instance's access.") from exc
        return self._backend

    @property
    def name(self) -> str:
        if self._name is None:
            device = self._backend_name or self.backend.name
            self._name = device if device.startswith("ibm_") else f"ibm_{device}"
        return self._name

    @property
    def local(self) -> bool:
        return self._service is None and _is_local(self.backend)

    def _transpile(self, circuit: "QuantumCircuit") -> "QuantumCircuit":
        if self._pass_manager is None:
            from qiskit.transpiler import generate_preset_pass_manager

            self._pass_manager = generate_preset_pass_manager(
                optimization_level=self._optimization_level, backend=self.backend)
        try:
            return self._pass_manager.run(circuit)
        except Exception as exc:
            raise BackendError(f"cannot transpile the circuit to {self.backend.name}: {exc}",
                               fix="use standard gates and at most the device's qubit count.") from exc

    def _submit(self, isa: "QuantumCircuit | list[QuantumCircuit]", shots: int, seed: int | None) -> Any:
        from qiskit_ibm_runtime import SamplerV2

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # SamplerV2 deprecated in 0.50
                sampler = SamplerV2(mode=self.backend)
                if seed is not None and self.local:
                    sampler.options.simulator.seed_simulator = seed
                return sampler.run(isa if isinstance(isa, list) else [isa], shots=shots)
        except Exception as exc:
            raise BackendError(f"IBM Quantum refused the job: {exc}",
                               fix="check the account's instance, the device's status and the shot count.") from exc

    def _wait(self, job: Any, job_id: str) -> Any:
        try:
            return job.result()
        except Exception as exc:
            raise BackendError(f"IBM Quantum job {job_id} failed: {exc}",
                               fix="look the job up in the IBM Quantum dashboard; run it again if it was cancelled.") from exc

    def _usage(self, job: Any) -> float | None:
        """Billed quantum seconds, or None where the job reports none (local mode)."""
        if self.local:
            return None
        try:
            usage = job.usage()
        except Exception:  # older jobs or transient errors: fall back to the model
            return None
        try:
            value = float(usage)
        except (TypeError, ValueError):
            return None
        return value if value > 0 else None
