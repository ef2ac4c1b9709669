"""What GPUs a node has and which GPU simulators can run on them: one small, injectable probe.

Why a probe and not direct NVML calls: GPU presence and memory are the only facts of the GPU
pool that cannot exist on a machine without a GPU. Everything else (naming, resources, memory
filters, the pool's members, the cost model's GPU rows) is plain code that must be tested
everywhere. So the GPU pool, the registry and the benchmark ask a :class:`GpuProbe`; the real
one (:class:`NvmlProbe`) reads NVML (``pynvml`` from ``nvidia-ml-py``, the ``gpu`` extra) and
tries the GPU libraries' imports; tests pass a :class:`StaticProbe` that reports "present, one
80 GiB GPU, cuQuantum importable" or "absent" through the same interface.

Engines (what can simulate on the GPU here):

* ``custatevec`` — cuquantum-python's cuStateVec bindings with CuPy (the ``gpu`` extra);
* ``cutensornet`` — cuquantum-python's cuTensorNet (the same extra);
* ``aer_gpu`` — Qiskit Aer's CUDA build (``qiskit-aer-gpu``, installed *in place of*
  ``qiskit-aer``, so it cannot be an extra; cluster.yaml's GPU worker swaps them).

A probe never raises: a missing driver, library or device is an answer ("no GPU"), not an error.
"""

from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Iterable, Protocol, runtime_checkable

from ray_qalloc.monitor.node import GpuStats

log = logging.getLogger(__name__)

ENGINES: tuple[str, ...] = ("custatevec", "cutensornet", "aer_gpu")
GPU_MEMORY_FRACTION = 0.9
"""Share of one GPU's total memory a run may plan on: the state (or the largest intermediate
tensor) plus the library's workspace, with the CUDA context and the allocator's slack left out."""
GPU_RESERVE_RATIO = 0.1
"""The rest, kept free of plans when reading a GPU's free memory."""


@runtime_checkable
class GpuProbe(Protocol):
    """The interface the GPU pool, the registry and the benchmark read; see the module docstring."""

    def devices(self) -> tuple[GpuStats, ...]:
        """Every GPU of this node as NVML reports it now (memory used includes other processes)."""
        ...

    def engines(self) -> frozenset[str]:
        """GPU simulators importable in this process (a subset of ``ENGINES``)."""
        ...


@dataclass(frozen=True)
class StaticProbe:
    """A probe that reports what it was given: how tests (and a site's own accounting) say
    "present" or "absent" without a GPU. Frozen and plain, so it pickles into a Ray actor."""

    gpus: tuple[GpuStats, ...] = ()
    available: frozenset[str] = field(default_factory=frozenset)

    def devices(self) -> tuple[GpuStats, ...]:
        return self.gpus

    def engines(self) -> frozenset[str]:
        return self.available if self.gpus else frozenset()

    @classmethod
    def present(cls, count: int = 1, memory_gib: float = 80.0, *, name: str = "NVIDIA H100 80GB HBM3",
                used_gib: float = 0.5, engines: Iterable[str] = ("custatevec", "cutensornet")) -> "StaticProbe":
        """``count`` identical GPUs of ``memory_gib`` each, ``used_gib`` of it taken already."""
        total = int(memory_gib * 2**30)
        used = int(used_gib * 2**30)
        gpus = tuple(GpuStats(index=i, name=name, utilization_ratio=0.0, memory_total_bytes=total,
                              memory_used_bytes=used) for i in range(int(count)))
        return cls(gpus, frozenset(engines))

    @classmethod
    def absent(cls) -> "StaticProbe":
        return cls()


class NvmlProbe:
    """The real probe: NVML for devices (``monitor.node``'s reader, initialised once) and an
    import attempt per engine (decided once per process; a failed import is logged once)."""

    def __init__(self) -> None:
        from ray_qalloc.monitor.node import _Nvml

        self._nvml = _Nvml()
        self._engines: frozenset[str] | None = None
        self._lock = threading.Lock()

    def devices(self) -> tuple[GpuStats, ...]:
        return self._nvml.read()

    def engines(self) -> frozenset[str]:
        with self._lock:
            if self._engines is None:
                self._engines = frozenset(e for e in ENGINES if _engine_importable(e)) if self._nvml.available \
                    else frozenset()
            return self._engines


def _engine_importable(engine: str) -> bool:
    try:
        if engine == "custatevec":
            import_custatevec()
            importlib.import_module("cupy")
        elif engine == "cutensornet":
            import_tensornet()
            importlib.import_module("cupy")
        elif engine == "aer_gpu":
            from qiskit_aer import AerSimulator

            return "GPU" in AerSimulator().available_devices()
        else:
            return False
    except Exception as exc:  # ImportError mostly; a broken CUDA install is "not here" too
        log.info("GPU engine %s unavailable: %s", engine, exc)
        return False
    return True


def import_custatevec():  # noqa: ANN201 - a module
    """cuStateVec's Python bindings: ``cuquantum.bindings.custatevec`` (cuquantum-python ≥ 25.03),
    else the older ``cuquantum.custatevec``."""
    try:
        return importlib.import_module("cuquantum.bindings.custatevec")
    except ImportError:
        return importlib.import_module("cuquantum.custatevec")


def import_tensornet():  # noqa: ANN201 - a module
    """cuTensorNet's Pythonic API (``contract``, ``CircuitToEinsum``, ``NetworkState``):
    ``cuquantum.tensornet`` (≥ 25.03), else the top-level ``cuquantum`` of older releases."""
    try:
        return importlib.import_module("cuquantum.tensornet")
    except ImportError:
        module = importlib.import_module("cuquantum")
        if not hasattr(module, "contract"):
            raise
        return module


_DEFAULT: GpuProbe | None = None
_DEFAULT_LOCK = threading.Lock()


def default_probe() -> GpuProbe:
    """This process's NVML probe (one per process: NVML is initialised once)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = NvmlProbe()
        return _DEFAULT


def visible(devices: tuple[GpuStats, ...], limit: float | None = None) -> tuple[GpuStats, ...]:
    """The devices a pool may use: NVML sees every GPU of the node, Ray may have been given fewer
    (``ray start --num-gpus``); the first ``limit`` are the pool's (Ray numbers them the same way
    when ``CUDA_VISIBLE_DEVICES`` is unset at ``ray start``)."""
    if limit is None:
        return devices
    return devices[: max(int(limit), 0)]


def per_gpu_budget_bytes(devices: Iterable[GpuStats], fraction: float = GPU_MEMORY_FRACTION) -> int:
    """What one run may plan on per GPU: a share of the *smallest* GPU's total memory (a run does
    not choose its GPU; Ray assigns one), 0 without GPUs."""
    totals = [d.memory_total_bytes for d in devices]
    return int(min(totals) * fraction) if totals else 0


def free_gpu_bytes(devices: Iterable[GpuStats], reserve_ratio: float = GPU_RESERVE_RATIO) -> int | None:
    """Memory a new one-GPU run may plan on now: the freest GPU's free memory less a reserve (other
    processes' allocations show up in NVML, not in Ray); None without a reading."""
    free = [d.memory_total_bytes - d.memory_used_bytes - int(d.memory_total_bytes * reserve_ratio)
            for d in devices]
    return max(max(free), 0) if free else None
