"""Amazon Braket devices as ray-qalloc backends, through qiskit-braket-provider.

Why the provider: it is maintained by the Qiskit and Braket teams, compiles a Qiskit circuit
for a Braket device's gate set and connectivity, and reads Braket's results back into
Qiskit's counts order, so this adapter is only what the allocator needs around it.

* ``braket_local`` (and ``braket_local_dm``): Braket's local state-vector (density-matrix)
  simulator. No account, no network: the tests run it through the real allocator. It is a
  ``simulator``, like the managed SV1; placement treats it as any backend outside a pool.
* ``braket_<device>`` (``braket_sv1``, ``braket_forte_1``, ``braket_ankaa_3``, ...): a managed
  device, only where AWS credentials are configured (``boto3`` finds them: environment,
  ``~/.aws``, an instance role). QPUs are ``qpu``, managed simulators ``simulator``.

A managed task costs money and is not idempotent: its id (the task ARN) goes to
``on_submitted`` before the adapter waits on it, and a restarted actor calls ``reattach``,
which waits on the same task (``retrieve_job``) and never submits again — as for IBM.
Local tasks die with their process and are never reported (a restart runs them again).
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any, Callable

from ray_qalloc.backends.base import BackendSpec, Price, ProviderStatus, RunResult
from ray_qalloc.exceptions import BackendError

if TYPE_CHECKING:  # pragma: no cover
    from qiskit import QuantumCircuit

LOCAL_DEVICES: dict[str, str] = {"braket_local": "braket_sv", "braket_local_dm": "braket_dm"}
STATUS_TTL_S = 30.0
#: Rough list prices (USD) for the money scorer; an operator sets real ones per backend.
QPU_PRICE = Price(per_job=0.30, per_shot=0.0009)
MANAGED_SIMULATOR_PRICE = Price(per_second=0.075 / 60.0)

_EXTRA_FIX = "install the 'braket' extra: pip install 'ray-qalloc[braket]'."


def _provider_module() -> Any:
    try:
        import qiskit_braket_provider
    except ImportError as exc:
        raise BackendError(f"Braket backends need qiskit-braket-provider ({exc}).", fix=_EXTRA_FIX) from None
    return qiskit_braket_provider


def has_aws_credentials() -> bool:
    """True when boto3 finds credentials (environment, shared files, role); no network call."""
    try:
        import boto3

        return boto3.Session().get_credentials() is not None
    except Exception:  # noqa: BLE001 - no boto3 or unreadable config: no credentials
        return False


def short_name(device_name: str) -> str:
    """``"Forte 1"`` -> ``"forte_1"``, ``"SV1"`` -> ``"sv1"``: the part after ``braket_``."""
    return re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")


def counts_by_register(counts: dict[str, int], circuit: "QuantumCircuit") -> dict[str, int]:
    """Counts with Qiskit's spaces between registers, whatever the provider returned (it writes
    one bit string over all classical bits)."""
    sizes = [len(r) for r in circuit.cregs]
    if len(sizes) <= 1:
        return dict(counts)
    out: dict[str, int] = {}
    for key, n in counts.items():
        bits = key.replace(" ", "")
        parts, end = [], len(bits)
        for size in sizes:                      # register 0 is rightmost
            parts.append(bits[end - size:end])
            end -= size
        spaced = " ".join(reversed(parts))
        out[spaced] = out.get(spaced, 0) + n
    return out


class BraketBackend:
    """One Braket device (local simulator or managed device) via qiskit-braket-provider."""

    def __init__(self, name: str, backend: Any, *, local: bool, kind: str = "simulator",
                 price: Price | None = None) -> None:
        self._name = name
        self._backend = backend
        self._local = local
        self._kind = kind
        self._price = price or Price()
        self._spec: BackendSpec | None = None
        self._status: ProviderStatus | None = None

    @classmethod
    def local(cls, name: str = "braket_local") -> "BraketBackend":
        device = LOCAL_DEVICES.get(name)
        if device is None:
            raise BackendError(f"unknown Braket local simulator {name!r}.",
                               fix=f"use one of {', '.join(LOCAL_DEVICES)}.")
        provider = _provider_module()
        return cls(name, provider.BraketLocalBackend(name=device), local=True)

    @classmethod
    def managed(cls, name: str, *, provider: Any = None) -> "BraketBackend":
        """``braket_<device>`` on the Braket service; needs AWS credentials."""
        if provider is None:
            if not has_aws_credentials():
                raise BackendError(f"{name!r} needs AWS credentials, and none are configured.",
                                   fix="configure them as for the AWS CLI (AWS_ACCESS_KEY_ID/"
                                       "AWS_SECRET_ACCESS_KEY/AWS_DEFAULT_REGION, ~/.aws, or a role), "
                                       "or use braket_local.")
            provider = _provider_module().BraketProvider()
        want = name.removeprefix("braket_")
        try:
            found = [b for b in provider.backends() if short_name(b.name) == want]
        except Exception as exc:  # noqa: BLE001
            raise BackendError(f"cannot list Amazon Braket devices: {exc}",
                               fix="check the AWS credentials, region and Braket access.") from exc
        if not found:
            raise BackendError(f"Amazon Braket has no device called {want!r} in this region.",
                               fix="name it braket_<device> as in short_name(device.name), e.g. braket_sv1.")
        backend = found[0]
        qpu = str(getattr(getattr(backend, "_device", None), "type", "")).upper().endswith("QPU")
        return cls(name, backend, local=False, kind="qpu" if qpu else "simulator",
                   price=QPU_PRICE if qpu else MANAGED_SIMULATOR_PRICE)

    # -- protocol -------------------------------------------------------------------------

    def spec(self) -> BackendSpec:
        if self._spec is None:
            target = self._backend.target
            basis = tuple(sorted(n for n in target.operation_names if n not in ("measure", "barrier")))
            where = "local simulator" if self._local else "Amazon Braket"
            self._spec = BackendSpec(
                name=self._name, kind=self._kind, family="braket", num_qubits=int(target.num_qubits or 0),
                slots=1, device=str(self._backend.name), basis_gates=basis, noisy=self._kind == "qpu",
                price=self._price, description=f"Braket {self._backend.name} ({where}) via qiskit-braket-provider.")
        return self._spec

    def calibration(self) -> None:
        """Braket publishes no calibration in a common form; fidelity uses the typical prior."""
        return None

    def provider_status(self) -> ProviderStatus | None:
        """Online or not, and the device's queue of normal-priority tasks (managed devices only)."""
        if self._local:
            return None
        now = time.time()
        if self._status is None or now - self._status.read_at > STATUS_TTL_S:
            try:
                device = self._backend._device
                status = str(device.status)
                pending = None
                try:
                    depth = self._backend.queue_depth().quantum_tasks
                    pending = int(next(iter(depth.values()), 0)) if isinstance(depth, dict) else None
                except Exception:  # noqa: BLE001 - the queue is a nice-to-have
                    pending = None
                self._status = ProviderStatus(operational=status == "ONLINE", pending_jobs=pending,
                                              message="" if status == "ONLINE" else status, read_at=now)
            except Exception:  # noqa: BLE001 - keep the last word on a blip
                return self._status
        return self._status

    def run(self, circuit: "QuantumCircuit", shots: int, *, seed: int | None = None,
            on_submitted: Callable[[str], None] | None = None) -> RunResult:
        start = time.perf_counter()
        try:
            task = self._backend.run(circuit, shots=shots)
        except Exception as exc:  # noqa: BLE001
            raise BackendError(f"Braket {self._backend.name} refused the circuit: {exc}",
                               fix="use standard gates and at most the device's qubit count.") from exc
        task_id = str(task.job_id())
        submitted = time.perf_counter()
        if on_submitted is not None and not self._local:
            on_submitted(task_id)      # stored before waiting: a restart re-attaches, never resubmits
        counts = self._counts(task, task_id, circuit)
        return RunResult(counts=counts, shots=shots, backend=self._name, wall_s=time.perf_counter() - start,
                         transpile_s=submitted - start, execute_s=time.perf_counter() - submitted,
                         provider_job_id=task_id,
                         metadata={"device": str(self._backend.name), "local": self._local})

    def reattach(self, provider_job_id: str, shots: int) -> RunResult:
        """Wait again on a task submitted before a crash (managed devices only)."""
        if self._local:
            raise BackendError("cannot re-attach to a Braket local simulator task: it did not outlive its process.",
                               fix="run the job again.")
        start = time.perf_counter()
        try:
            task = self._backend.retrieve_job(provider_job_id)
        except Exception as exc:  # noqa: BLE001
            raise BackendError(f"Amazon Braket has no task {provider_job_id!r}: {exc}",
                               fix="run the job again.") from exc
        counts = self._counts(task, provider_job_id, None)
        return RunResult(counts=counts, shots=sum(counts.values()) or shots, backend=self._name,
                         wall_s=time.perf_counter() - start, provider_job_id=provider_job_id,
                         metadata={"reattached": True, "device": str(self._backend.name)})

    def _counts(self, task: Any, task_id: str, circuit: "QuantumCircuit | None") -> dict[str, int]:
        try:
            raw = task.result().get_counts()
        except Exception as exc:  # noqa: BLE001
            raise BackendError(f"Braket task {task_id} failed: {exc}",
                               fix="look the task up in the Braket console; run the job again if it was "
                                   "cancelled.") from exc
        raw = dict(raw if isinstance(raw, dict) else raw[0])
        return counts_by_register(raw, circuit) if circuit is not None else raw
