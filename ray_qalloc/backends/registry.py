"""Backends by name: the default pool, and a factory a worker process can call.

Why names: a Ray actor is rebuilt from its constructor arguments, so what crosses the
process boundary is a picklable name (``"aer_mps"``, ``"qpu_torino"``), and the actor
builds its backend with ``make_backend(name)`` in its own process. Construction is cheap
on purpose (no transpiling, no noise models; at most a fake device's JSON is loaded), so
a pool starts in about a second.

Naming scheme:

* ``aer_<method>`` with method ``statevector``, ``mps``, ``stabilizer``, ``density_matrix``
  (``aer_statevector_gpu`` for Aer's GPU statevector as a backend of its own, only where Aer
  sees a GPU; GPU *pools*, ``gpu-<node>/statevector`` and ``gpu-<node>/tensornet``, are the
  fleet's, found per GPU node: ``backends.gpu_pool_actor``, ``gpu_pool_available``);
* ``qpu_<device>`` for an emulated IBM device of ``qiskit_ibm_runtime.fake_provider``
  (``qpu_torino``, ``qpu_sherbrooke``, ``qpu_fez``, ``qpu_kyiv``, ...), or an emulated device of
  another architecture built from published specifications (``backends.architectures``):
  ``qpu_ion_aria`` (trapped ion), ``qpu_atom_rydberg`` (neutral atom);
* ``ibm_<device>`` for real IBM Quantum hardware, only where credentials are configured;
* ``braket_local`` / ``braket_local_dm`` for Braket's local simulators (the ``braket`` extra),
  ``braket_<device>`` (``braket_sv1``, ``braket_forte_1``) for Amazon Braket, only where AWS
  credentials are configured (``ray_qalloc.backends.braket``).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from ray_qalloc.backends.aer import ALIASES, SHORT_NAMES, AerBackend
from ray_qalloc.backends.architectures import DEFAULT_ARCHITECTURE_DEVICES
from ray_qalloc.backends.base import Backend
from ray_qalloc.backends.fake_qpu import DEFAULT_DEVICES, FakeQPUBackend, short_device_name
from ray_qalloc.backends.ibm import IBMRuntimeBackend
from ray_qalloc.exceptions import BackendError

log = logging.getLogger(__name__)

AER_POOL: tuple[str, ...] = tuple(f"aer_{short}" for short in SHORT_NAMES.values())
FAKE_QPU_POOL: tuple[str, ...] = (tuple(f"qpu_{short_device_name(d)}" for d in DEFAULT_DEVICES)
                                  + tuple(f"qpu_{d}" for d in DEFAULT_ARCHITECTURE_DEVICES))
DEFAULT_POOL: tuple[str, ...] = AER_POOL + FAKE_QPU_POOL
GPU_BACKEND_NAME = "aer_statevector_gpu"


@lru_cache(maxsize=1)
def gpu_available() -> bool:
    """True only when this Aer build can simulate on a GPU (the legacy ``aer_statevector_gpu``
    backend). The GPU *pools* ask ``gpu_pool_available`` instead."""
    try:
        from qiskit_aer import AerSimulator

        return "GPU" in AerSimulator().available_devices()
    except Exception:  # a broken CUDA setup means no GPU for us
        return False


def gpu_pool_available(probe: Any = None) -> bool:
    """True when this node can host a GPU pool with members: NVML reports a GPU and an engine
    (cuStateVec, cuTensorNet or Aer's CUDA build) imports. ``probe`` (a ``GpuProbe``) replaces
    NVML and the import attempts, e.g. ``StaticProbe.present()`` in tests."""
    from ray_qalloc.backends.gpu_pool_actor import gpu_methods_for
    from ray_qalloc.backends.gpu_probe import default_probe

    probe = probe or default_probe()
    try:
        return bool(probe.devices()) and bool(gpu_methods_for(frozenset(probe.engines())))
    except Exception:  # a broken driver means no GPU pool, as for Aer
        return False


def _aer_method(short: str) -> str | None:
    for method, name in SHORT_NAMES.items():
        if short in (name, method):
            return method
    return ALIASES.get(short)


def make_backend(name: str, *, threads: int = 1, **kwargs: Any) -> Backend:
    """Build the backend called ``name`` in this process (see the module's naming scheme)."""
    if name.startswith("aer_"):
        short = name.removeprefix("aer_")
        device = "CPU"
        if short.endswith("_gpu"):
            short, device = short.removesuffix("_gpu"), "GPU"
        method = _aer_method(short)
        if method is None:
            raise BackendError(f"unknown Aer backend {name!r}.",
                               fix=f"use one of {', '.join(AER_POOL)} (or {GPU_BACKEND_NAME}).")
        return AerBackend(method, threads=threads, name=name, device=device, **kwargs)
    if name.startswith("qpu_"):
        return FakeQPUBackend(f"fake_{name.removeprefix('qpu_')}", name=name, threads=threads, **kwargs)
    if name.startswith("ibm_"):
        backend = IBMRuntimeBackend.from_env(name, **kwargs)
        if backend is None:
            raise BackendError(f"{name!r} needs IBM Quantum credentials, and none are configured.",
                               fix="set QISKIT_IBM_TOKEN (and QISKIT_IBM_INSTANCE), or save an account "
                                   "with QiskitRuntimeService.save_account().")
        return backend
    if name.startswith("braket_"):
        from ray_qalloc.backends.braket import LOCAL_DEVICES, BraketBackend   # the optional extra, on use

        return BraketBackend.local(name) if name in LOCAL_DEVICES else BraketBackend.managed(name)
    raise BackendError(f"unknown backend name {name!r}.",
                       fix=f"use aer_<method>, qpu_<device>, ibm_<device> or braket_<device>, e.g. "
                           f"{', '.join(DEFAULT_POOL)}, braket_local.")


backend_by_name = make_backend


def default_pool(*, include_gpu: bool | None = None) -> tuple[str, ...]:
    """DEFAULT_POOL, plus the GPU statevector where a GPU is available."""
    gpu = gpu_available() if include_gpu is None else include_gpu
    return DEFAULT_POOL + ((GPU_BACKEND_NAME,) if gpu else ())


def default_backends(*, threads: int = 1) -> list[Backend]:
    """The four Aer methods, the emulated QPUs (three IBM devices, a trapped-ion and a neutral-atom
    one), a GPU simulator and IBM hardware where present."""
    backends: list[Backend] = [make_backend(n, threads=threads) for n in default_pool()]
    try:
        ibm = IBMRuntimeBackend.from_env()
    except BackendError as exc:  # configured but unusable: the rest of the pool still works
        log.warning("IBM Quantum backend skipped: %s", exc)
        ibm = None
    if ibm is not None:
        backends.append(ibm)
    return backends
