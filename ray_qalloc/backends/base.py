"""The one protocol every executor implements, and the value objects it speaks.

Why plain frozen dataclasses: placement must not import Ray or Qiskit (it sees only these
values), and the same values cross process boundaries through Ray, into the JobStore and
into the run history, so they must be cheap to pickle and easy to turn into JSON.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from qiskit import QuantumCircuit

BackendKind = Literal["simulator", "qpu"]

# A device counts as all-to-all (no routing) when at least this fraction of its qubit pairs has a
# two-qubit gate: trapped ions and reconfigurable neutral atoms are 1.0, heavy-hex chips ~0.02.
ALL_TO_ALL_DENSITY = 0.99


@dataclass(frozen=True)
class Price:
    """Money model of a backend: what one job costs, in the operator's currency unit."""

    per_second: float = 0.0
    per_shot: float = 0.0
    per_job: float = 0.0

    def cost(self, seconds: float, shots: int) -> float:
        return self.per_job + self.per_shot * shots + self.per_second * seconds


@dataclass(frozen=True)
class BackendSpec:
    """What a backend is and can do; fixed for the backend's lifetime."""

    name: str
    kind: BackendKind
    family: str                      # "aer", "fake_qpu", "ibm", "gpu"
    num_qubits: int                  # widest circuit it accepts
    slots: int = 1                   # jobs it runs at once
    method: str | None = None        # simulation method, for simulators
    device: str | None = None        # device name, for QPUs (real or emulated)
    basis_gates: tuple[str, ...] = ()    # native operations (empty: transpiles anything standard)
    clifford_only: bool = False      # e.g. the stabilizer method
    memory_bytes: int | None = None  # memory a simulation may use (None: not memory bound)
    threads: int = 1                 # CPU threads one run uses (simulators)
    noisy: bool = False              # results carry hardware noise (QPUs, emulated QPUs)
    price: Price = field(default_factory=Price)
    description: str = ""
    pool: str | None = None          # the simulator pool this (method, threads) variant runs in
    refuses: tuple[str, ...] = ()    # operations and job markers (gates.JOB_MARKERS) it cannot run

    @property
    def resource_name(self) -> str:
        """The Ray custom resource that carries this backend's slots."""
        return resource_name(self.name)

    def copy(self, **changes: Any) -> "BackendSpec":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resource_name(backend_name: str) -> str:
    return f"qalloc_backend_{backend_name}"


@dataclass(frozen=True)
class Calibration:
    """Live calibration of a QPU: per-qubit and per-gate figures, in SI units.

    ``gate_error`` and ``gate_duration_s`` map an operation name to its median over all
    qubit tuples of the device; ``edge_error`` keeps two-qubit errors per coupler so that
    layout and fidelity estimates can use the good part of a chip.
    """

    backend: str
    taken_at: float                              # unix seconds of the snapshot
    t1_s: tuple[float, ...]
    t2_s: tuple[float, ...]
    readout_error: tuple[float, ...]
    gate_error: dict[str, float]
    gate_duration_s: dict[str, float]
    readout_duration_s: float = 0.0
    edge_error: dict[tuple[int, int], float] = field(default_factory=dict)
    rep_delay_s: float = 0.0

    def summary(self) -> dict[str, float]:
        """Medians a person (or a feature vector) can read at a glance."""
        def med(values: tuple[float, ...]) -> float:
            good = [v for v in values if v is not None and v == v]
            return float(statistics.median(good)) if good else float("nan")

        two_q = [e for e in self.edge_error.values() if e is not None]
        return {
            "coupling_density": self.coupling_density(),
            "rep_delay_s": float(self.rep_delay_s),
            "qubits": float(len(self.t1_s)),
            "t1_median_us": med(self.t1_s) * 1e6,
            "t2_median_us": med(self.t2_s) * 1e6,
            "readout_error_median": med(self.readout_error),
            "gate_1q_error_median": _first(self.gate_error, ("sx", "x", "rx")),
            "gate_2q_error_median": float(statistics.median(two_q)) if two_q else float("nan"),
            "age_s": 0.0,
        }

    def coupling_density(self) -> float:
        """Fraction of qubit pairs with a calibrated two-qubit gate (NaN: none calibrated).

        Why placement reads it: on a sparse chip a circuit's distant pairs cost SWAPs (routing),
        on an all-to-all device (ions, reconfigurable atoms) they cost nothing."""
        n = len(self.t1_s)
        pairs = {(min(a, b), max(a, b)) for a, b in self.edge_error}
        if n < 2 or not pairs:
            return float("nan")
        return len(pairs) / (n * (n - 1) / 2)


def _first(values: dict[str, float], names: tuple[str, ...]) -> float:
    for n in names:
        if n in values:
            return float(values[n])
    return float("nan")


@dataclass(frozen=True)
class ProviderStatus:
    """What a QPU's provider says of the device now: in service or not, and how many jobs of
    other users wait ahead of a new one.

    Why apart from ``Calibration``: providers publish calibrations a few times a day but the
    queue moves by the minute, and a device can go out of service between two calibrations.
    ``pending_jobs`` None: the provider does not say (emulated devices, some providers)."""

    operational: bool = True
    pending_jobs: int | None = None
    message: str = ""
    read_at: float = 0.0             # unix seconds of the reading

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ProviderStatus":
        pending = raw.get("pending_jobs")
        return cls(operational=bool(raw.get("operational", True)),
                   pending_jobs=None if pending is None else max(int(pending), 0),
                   message=str(raw.get("message") or ""), read_at=float(raw.get("read_at") or 0.0))


@dataclass
class RunResult:
    """Counts plus measured timings of one run on one backend."""

    counts: dict[str, int]
    shots: int
    backend: str
    wall_s: float                    # time spent inside Backend.run
    transpile_s: float = 0.0
    execute_s: float = 0.0
    qpu_s: float | None = None       # modelled (emulated) or billed (real) QPU time
    method: str | None = None        # method the simulator actually used
    provider_job_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class Backend(Protocol):
    """An executor of circuits. Implementations: aer, fake_qpu, ibm (gpu where a GPU exists)."""

    def spec(self) -> BackendSpec: ...

    def calibration(self) -> Calibration | None: ...

    def run(self, circuit: "QuantumCircuit", shots: int, *, seed: int | None = None,
            on_submitted: Callable[[str], None] | None = None) -> RunResult:
        """Run ``circuit`` and return counts with measured timings.

        ``on_submitted`` is called with the provider's job id before a remote backend waits
        on it, so that the id is stored and a restarted actor re-attaches instead of paying
        for the job twice. Local simulators never call it.
        """
        ...


@runtime_checkable
class Reattachable(Protocol):
    """A backend whose jobs live at a provider and can be waited on again after a crash."""

    def reattach(self, provider_job_id: str, shots: int) -> RunResult: ...
