"""What a node must offer to host this configuration's executors (Ray custom resources).

Its own module so that the session (which starts a local Ray with these resources), the
autoscaling helper (which waits for them) and the fleet (which reads ``settings.pool``) share
one reading of the pool without importing each other.
"""

from __future__ import annotations

from ray_qalloc.backends.pools import DEFAULT_GPU_ONLY_METHODS, DEFAULT_METHODS, POOL_RESOURCE_CPU, method_of_name
from ray_qalloc.config import Settings


def split_pool(pool: list[str]) -> tuple[list[str], list[str]]:
    """``settings.pool`` → (Aer methods the simulator pools offer, QPU and other backend names).

    ``default`` is every default method plus the default emulated QPUs, and the tensor network
    that only GPU pools run (CPU pools leave it out; a cluster without GPUs never sees it); a
    method may be named ``statevector``, ``mps``, ``tensornet`` or the old backend name
    ``aer_statevector``."""
    from ray_qalloc.backends.registry import FAKE_QPU_POOL

    methods: list[str] = []
    backends: list[str] = []
    for entry in pool:
        if entry == "default":
            methods += [m for m in (*DEFAULT_METHODS, *DEFAULT_GPU_ONLY_METHODS) if m not in methods]
            backends += [b for b in FAKE_QPU_POOL if b not in backends]
            continue
        m = method_of_name(entry)
        if m is not None and not entry.endswith("_gpu"):
            if m not in methods:
                methods.append(m)
        elif entry not in backends:
            backends.append(entry)
    return methods, backends


def node_resources(settings: Settings) -> dict[str, float]:
    """Custom resources one node must offer to host the whole configured pool."""
    from ray_qalloc.backends.registry import make_backend

    methods, backends = split_pool(settings.pool)
    out: dict[str, float] = {POOL_RESOURCE_CPU: 1.0} if methods else {}
    for name in backends:
        spec = make_backend(name).spec()
        out[spec.resource_name] = float(spec.slots)
    return out
