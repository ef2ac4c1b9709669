"""GPU simulators: a statevector on cuStateVec and tensor-network contraction on cuTensorNet.

Two methods, each with the engines that can run it (``gpu_probe.ENGINES``):

* **statevector** — ``custatevec``: cuquantum-python's cuStateVec bindings directly (the state
  in CuPy memory, each gate one ``apply_matrix``, shots from cuStateVec's sampler); or
  ``aer_gpu``: Qiskit Aer's CUDA build with ``cuStateVec_enable`` (Aer's gate fusion, its
  whole instruction set, and a state split over several GPUs by chunks). Which is faster is
  for ``python -m benchmarks.gpu`` to measure on a GPU node; *not measured yet* (this project's
  machines have no GPU). Until it is, a one-GPU run prefers Aer's build where the node has it
  (gate fusion cuts passes over the state) and the bindings otherwise; a state split over
  several GPUs needs Aer's build. ``QALLOC_GPU_STATEVECTOR_ENGINE=custatevec|aer_gpu`` pins one.
* **tensor_network** — ``cutensornet``: the circuit as a tensor network (our converter,
  ``backends.tensornet``, checked on CPU against Qiskit), sampled with cuTensorNet's own
  sampler (``NetworkState.compute_sampling``: chain-rule sampling over light-cone-reduced
  marginals) where this cuquantum-python has it, else our chain-rule sampler contracting each
  marginal with ``cuquantum.tensornet.contract``. For wide, shallow circuits no statevector holds.

Everything here imports the GPU libraries only inside ``run``: the package imports and its
specs are built on a machine without them.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable

from ray_qalloc.backends.base import BackendSpec, Calibration, Price, RunResult
from ray_qalloc.backends.pools import candidate_name
from ray_qalloc.exceptions import BackendError
from ray_qalloc.gates import EXPECTATION, MID_MEASURE

if TYPE_CHECKING:  # pragma: no cover
    from qiskit import QuantumCircuit

    from ray_qalloc.runopts import RunOptions

log = logging.getLogger(__name__)

GPU_PRICE = Price(per_second=0.001)   # a GPU-second costs ~10x a core-second (cloud list prices)
TN_MAX_QUBITS = 1000                  # a width cap only; whether a network contracts is the prior's call
TN_SAMPLE_GROUP = 4                   # qubits per conditional marginal in our own sampler (2^4 outcomes)
STATEVECTOR_ENGINES = ("aer_gpu", "custatevec")
# What the GPU runners cannot run, whichever engine the node has: cuStateVec and cuTensorNet apply
# gates to a network (no resets, no measurement before the end), and no engine computes
# expectation values yet — the operations filter keeps such jobs on CPU pools and QPUs.
GPU_REFUSES = ("reset", MID_MEASURE, EXPECTATION)


@lru_cache(maxsize=1)
def gpu_operations() -> frozenset[str]:
    """What the GPU methods run without transpiling: Qiskit's standard gates (each has a matrix)
    and final measurements. No control flow, no resets: the operations filter refuses those."""
    from qiskit.circuit.library import get_standard_gate_name_mapping

    names = {n for n, g in get_standard_gate_name_mapping().items() if n not in ("reset", "delay", "measure")}
    return frozenset(names | {"measure", "barrier", "unitary"})


def gpu_candidate_spec(pool: str, method: str, gpus: int, *, gpus_in_pool: float | None = None,
                       memory_bytes: int, price: Price | None = None) -> BackendSpec:
    """The spec placement sees for one GPU candidate. ``memory_bytes`` is one GPU's budget; a run
    that holds ``gpus`` GPUs has ``gpus`` times that for its state. ``threads`` counts GPUs (the
    scheduler's budget of a GPU pool is its GPUs, ``gpus_in_pool``, which ``slots`` reports)."""
    from ray_qalloc.backends.aer import qubits_for_memory

    held = max(int(gpus), 1)
    pool_gpus = max(int(gpus_in_pool if gpus_in_pool is not None else held), held)
    if method == "tensor_network":
        width, budget = TN_MAX_QUBITS, int(memory_bytes)
        what = "cuTensorNet contraction (cuquantum-python), 1 GPU"
    elif method == "statevector":
        budget = int(memory_bytes) * held
        width = qubits_for_memory("statevector", budget)
        what = f"statevector on cuStateVec, {held} GPU(s)"
    else:
        raise BackendError(f"GPU pools do not run {method!r}.", fix="use statevector or tensornet on a GPU pool.")
    return BackendSpec(
        name=candidate_name(pool, method, held), kind="simulator", family="gpu", num_qubits=width,
        slots=pool_gpus, method=method, basis_gates=tuple(sorted(gpu_operations())), memory_bytes=budget,
        threads=held, noisy=False, price=price or GPU_PRICE, pool=pool, refuses=GPU_REFUSES,
        description=f"GPU {what} on pool {pool}.")


# ---- running -----------------------------------------------------------------------------------------
def choose_statevector_engine(engines: frozenset[str] | set[str], gpus: int = 1) -> str:
    """The engine a statevector run uses (see the module docstring); raises when none is here."""
    pinned = os.environ.get("QALLOC_GPU_STATEVECTOR_ENGINE")
    if pinned:
        if pinned not in engines:
            raise BackendError(f"QALLOC_GPU_STATEVECTOR_ENGINE={pinned} but that engine is not installed here.",
                               fix="install the gpu extra (custatevec) or qiskit-aer-gpu (aer_gpu), or unset it.")
        return pinned
    if gpus > 1:
        if "aer_gpu" in engines:
            return "aer_gpu"
        raise BackendError("a statevector over several GPUs needs Qiskit Aer's CUDA build.",
                           fix="pip uninstall qiskit-aer && pip install qiskit-aer-gpu on the GPU node.")
    for e in STATEVECTOR_ENGINES:
        if e in engines:
            return e
    raise BackendError("no GPU statevector engine is installed on this node.",
                       fix="pip install 'ray-qalloc[gpu]' (cuStateVec) or qiskit-aer-gpu on the GPU node.")


class GpuBackend:
    """One GPU method in this process (a Ray task holding ``gpus`` GPUs runs it)."""

    def __init__(self, method: str, *, gpus: int = 1, memory_bytes: int, name: str,
                 engines: frozenset[str] | None = None) -> None:
        self._method = method
        self._gpus = max(int(gpus), 1)
        self._memory_bytes = int(memory_bytes)
        self._name = name
        if engines is None:
            from ray_qalloc.backends.gpu_probe import default_probe

            engines = default_probe().engines()
        self._engines = frozenset(engines)
        self._aer: Any = None

    def spec(self) -> BackendSpec:
        pool = self._name.split("/", 1)[0]
        return gpu_candidate_spec(pool, self._method, self._gpus, memory_bytes=self._memory_bytes // self._gpus
                                  if self._method == "statevector" else self._memory_bytes)

    def calibration(self) -> Calibration | None:
        return None

    @property
    def engine(self) -> str:
        if self._method == "tensor_network":
            if "cutensornet" not in self._engines:
                raise BackendError("cuTensorNet is not installed on this node.",
                                   fix="pip install 'ray-qalloc[gpu]' on the GPU node.")
            return "cutensornet"
        return choose_statevector_engine(self._engines, self._gpus)

    def warm_up(self) -> None:
        """CUDA context, library handles and kernels' first launch, paid before the first timed run."""
        from qiskit import QuantumCircuit

        qc = QuantumCircuit(2, 2)
        qc.h(0)
        qc.cx(0, 1)
        qc.measure([0, 1], [0, 1])
        self.run(qc, 16, seed=1)

    def run(self, circuit: "QuantumCircuit", shots: int, *, seed: int | None = None,
            on_submitted: Callable[[str], None] | None = None) -> RunResult:
        start = time.perf_counter()
        width = self.spec().num_qubits
        if circuit.num_qubits > width:
            raise BackendError(f"{circuit.num_qubits} qubits exceed what {self._name} holds ({width}).",
                               fix="use the tensor network for wide shallow circuits, or MPS.")
        engine = self.engine
        t_exec = time.perf_counter()
        try:
            if engine == "aer_gpu":
                counts, transpile_s = self._run_aer(circuit, shots, seed)
            elif engine == "custatevec":
                counts, transpile_s = run_custatevec(circuit, shots, seed), 0.0
            else:
                counts, transpile_s = run_cutensornet(circuit, shots, seed), 0.0
        except ImportError as exc:   # the probe said yes, this worker cannot import it: the node's setup
            raise BackendError(f"the GPU engine {engine} cannot be imported on this node: {exc}",
                               fix="pip install 'ray-qalloc[gpu]' (or the gpu-cu13 extra) on the GPU node.") from None
        return RunResult(counts=counts, shots=shots, backend=self._name, wall_s=time.perf_counter() - start,
                         transpile_s=transpile_s, execute_s=time.perf_counter() - t_exec - transpile_s,
                         qpu_s=None, method=self._method,
                         metadata={"device": "GPU", "engine": engine, "gpus": self._gpus, "noise_model": "ideal"})

    def estimate(self, circuit: "QuantumCircuit", options: "RunOptions", *, seed: int | None = None) -> RunResult:
        raise BackendError("GPU pools do not compute expectation values yet.",
                           fix="the allocator places estimator jobs on CPU pools or QPUs.")

    def _run_aer(self, circuit: "QuantumCircuit", shots: int, seed: int | None) -> tuple[dict[str, int], float]:
        if self._aer is None:
            from ray_qalloc.backends.aer import AerBackend

            self._aer = AerBackend("statevector", memory_bytes=self._memory_bytes, name=self._name, device="GPU")
            options: dict[str, Any] = {"cuStateVec_enable": True}
            if self._gpus > 1:   # chunks of the state on each GPU; Aer exchanges them between gates
                options.update(blocking_enable=True,
                               blocking_qubits=max(circuit.num_qubits - self._gpus.bit_length() + 1, 1))
            self._aer.simulator.set_options(**options)
        res = self._aer.run(circuit, shots, seed=seed)
        return res.counts, res.transpile_s


# ---- cuStateVec, through cuquantum-python's bindings ------------------------------------------------------
def run_custatevec(circuit: "QuantumCircuit", shots: int, seed: int | None) -> dict[str, int]:
    """Apply every gate of ``circuit`` to a CuPy statevector with ``custatevec.apply_matrix`` and
    draw ``shots`` from cuStateVec's sampler over the measured qubits. Unverified here (no GPU):
    ``python -m benchmarks.gpu`` checks it against Aer on a GPU node."""
    import cupy as cp
    import numpy as np

    from ray_qalloc.backends.gpu_probe import import_custatevec
    from ray_qalloc.backends.tensornet import circuit_network

    cusv = import_custatevec()
    data_type, compute_type = _cuda_types(cusv)
    net = circuit_network(circuit)
    n = net.num_qubits
    sv = cp.zeros(1 << n, dtype=cp.complex128)
    sv[0] = 1.0
    handle = cusv.create()
    try:
        for g in net.gates:
            matrix = np.ascontiguousarray(g.matrix, dtype=np.complex128)
            targets = np.asarray(g.qubits, dtype=np.int32)   # little-endian, as Qiskit's matrices
            size = cusv.apply_matrix_get_workspace_size(
                handle, data_type, n, matrix.ctypes.data, data_type, cusv.MatrixLayout.ROW, 0,
                len(targets), 0, compute_type)
            work = cp.cuda.alloc(size) if size > 0 else None
            cusv.apply_matrix(handle, sv.data.ptr, data_type, n, matrix.ctypes.data, data_type,
                              cusv.MatrixLayout.ROW, 0, targets.ctypes.data, len(targets), 0, 0, 0,
                              compute_type, work.ptr if work is not None else 0, size)
        order = net.sampled_qubits
        if not order or shots <= 0:
            return net.format_counts(Counter({(): shots})) if shots > 0 else {}
        sampler, size = cusv.sampler_create(handle, sv.data.ptr, data_type, n, shots)
        try:
            work = cp.cuda.alloc(size) if size > 0 else None
            cusv.sampler_preprocess(handle, sampler, work.ptr if work is not None else 0, size)
            bits = np.empty(shots, dtype=np.int64)
            ordering = np.asarray(order, dtype=np.int32)
            rand = np.random.default_rng(seed).random(shots, dtype=np.float64)
            cusv.sampler_sample(handle, sampler, bits.ctypes.data, ordering.ctypes.data, len(order),
                                rand.ctypes.data, shots, cusv.SamplerOutput.RANDNUM_ORDER)
        finally:
            cusv.sampler_destroy(sampler)
        cp.cuda.Device().synchronize()
    finally:
        cusv.destroy(handle)
    # bit i of each sample is the value of order[i]
    outcomes = Counter(tuple((int(b) >> i) & 1 for i in range(len(order))) for b in bits.tolist())
    return net.format_counts(outcomes)


def _cuda_types(cusv: Any) -> tuple[Any, Any]:
    """(complex128 data type, 64-bit compute type), wherever this cuquantum-python keeps them."""
    import cuquantum

    data = getattr(cuquantum, "cudaDataType", None)
    compute = getattr(cuquantum, "ComputeType", None) or getattr(cusv, "ComputeType", None)
    if data is None:
        from cuda.bindings.runtime import cudaDataType as data  # type: ignore[no-redef]
    return data.CUDA_C_64F, compute.COMPUTE_64F


# ---- cuTensorNet ------------------------------------------------------------------------------------------
def run_cutensornet(circuit: "QuantumCircuit", shots: int, seed: int | None) -> dict[str, int]:
    """Sample the measured qubits of ``circuit`` as a tensor network on the GPU (see the module
    docstring). Unverified here (no GPU)."""
    from ray_qalloc.backends.tensornet import circuit_network

    net = circuit_network(circuit)
    order = net.sampled_qubits
    if not order or shots <= 0:
        return net.format_counts(Counter({(): shots})) if shots > 0 else {}
    state_cls = _network_state_class()
    if state_cls is not None:
        from qiskit import QuantumCircuit

        bare = QuantumCircuit(circuit.num_qubits)   # the unitary part, on the same wires
        for inst in circuit.data:
            if inst.operation.name not in ("measure", "barrier"):
                bare.append(inst.operation, [circuit.find_bit(q).index for q in inst.qubits])
        with state_cls.from_circuit(bare, dtype="complex128", backend="cupy") as state:
            raw = state.compute_sampling(shots, modes=list(order),
                                         seed=None if seed is None else max(int(seed), 1))
        # keys are the modes' values in ``modes`` order (numpy's array2string: may wrap long lines)
        outcomes = Counter({tuple(int(c) for c in str(key) if c in "01"): int(v) for key, v in raw.items()})
        return net.format_counts(outcomes)
    import cupy as cp

    from ray_qalloc.backends.gpu_probe import import_tensornet
    from ray_qalloc.backends.tensornet import sample

    contract = import_tensornet().contract
    return net.format_counts(sample(net, shots, seed=seed, group=TN_SAMPLE_GROUP, contract=contract, xp=cp))


def _network_state_class() -> Any:
    for module in ("cuquantum.tensornet.experimental", "cuquantum.tensornet", "cuquantum.cutensornet.experimental"):
        try:
            mod = __import__(module, fromlist=["NetworkState"])
        except ImportError:
            continue
        cls = getattr(mod, "NetworkState", None)
        if cls is not None and hasattr(cls, "from_circuit"):
            return cls
    return None
