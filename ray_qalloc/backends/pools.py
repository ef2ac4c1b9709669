"""Names and specs of simulator pools and of the (method, threads) variants they offer.

Why a pool and not one backend per method: a free core is free for any method. A node has
one simulator pool (Ray resource ``qalloc_pool_cpu``); its slots are the node's cores, and
every run holds the Ray CPUs of the threads it uses. Placement still chooses among
*candidates* — one per (pool, method, threads) — because estimates, breakers and explain
rows belong to a method on a pool, while waits belong to the pool (the scheduler puts all
candidates of a pool on one core budget: the pool is the scheduler's "node").

Names, stable and readable:

* pool ``cpu-<first 8 hex digits of the Ray node id>`` (``cpu-local`` where there is no Ray);
* candidate ``<pool>/<method>`` for one thread, ``<pool>/<method>@<threads>`` for more,
  with the short method names ``statevector``, ``mps``, ``stabilizer``, ``density_matrix``,
  ``extended_stabilizer``;
* a GPU pool ``gpu-<first 8 hex digits of the node id>`` (resource ``qalloc_pool_gpu``) offers
  ``gpu-<node8>/statevector`` (one GPU), ``gpu-<node8>/statevector@<gpus>`` (the state split
  over several GPUs) and ``gpu-<node8>/tensornet`` (cuTensorNet contraction, one GPU): on a GPU
  pool the number after ``@`` counts GPUs, and its budget is the node's GPUs, not its cores.

Old names (``aer_statevector``, ``aer_mps``, ...) still read: they name a method, and an
allow-list that holds one accepts that method on every pool (``resolve_allowed``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from ray_qalloc.backends.base import BackendSpec, Price

POOL_RESOURCE_CPU = "qalloc_pool_cpu"
POOL_RESOURCE_GPU = "qalloc_pool_gpu"

# Aer method -> the short name used in candidate names (and back).
METHOD_SHORT: dict[str, str] = {
    "statevector": "statevector",
    "matrix_product_state": "mps",
    "stabilizer": "stabilizer",
    "density_matrix": "density_matrix",
    "extended_stabilizer": "extended_stabilizer",
    "tensor_network": "tensornet",
}
SHORT_METHOD: dict[str, str] = {v: k for k, v in METHOD_SHORT.items()}
_METHOD_ALIASES: dict[str, str] = {"sv": "statevector", "dm": "density_matrix", "clifford": "stabilizer",
                                   "mps": "matrix_product_state", "tn": "tensor_network"}
# Methods whose runs Aer parallelises over threads (others use one thread whatever they hold).
PARALLEL_METHODS: frozenset[str] = frozenset({"statevector", "density_matrix"})
DEFAULT_METHODS: tuple[str, ...] = ("statevector", "matrix_product_state", "stabilizer", "density_matrix")
# GPU pools (ray_qalloc.backends.gpu): the methods they run, the ones only they run (a CPU pool
# never offers them), and the ones one run may spread over several GPUs.
GPU_METHODS: tuple[str, ...] = ("statevector", "tensor_network")
GPU_ONLY_METHODS: frozenset[str] = frozenset({"tensor_network"})
MULTI_GPU_METHODS: frozenset[str] = frozenset({"statevector"})
DEFAULT_GPU_ONLY_METHODS: tuple[str, ...] = ("tensor_network",)   # what ``default`` adds for GPU pools


def pool_name(node_id: str | None, kind: str = "cpu") -> str:
    return f"{kind}-{(node_id or 'local')[:8]}"


def is_gpu_pool(pool: str | None) -> bool:
    """A GPU pool's name (``gpu-1a2b3c4d``): its variants hold GPUs, not cores."""
    return bool(pool) and str(pool).startswith("gpu-")


def pool_resource(pool: str | None) -> str:
    """The Ray resource a node offers to host ``pool`` (autoscaling asks for it)."""
    return POOL_RESOURCE_GPU if is_gpu_pool(pool) else POOL_RESOURCE_CPU


def candidate_name(pool: str, method: str, threads: int = 1) -> str:
    short = METHOD_SHORT.get(method, method)
    return f"{pool}/{short}" if threads <= 1 else f"{pool}/{short}@{int(threads)}"


@dataclass(frozen=True)
class Candidate:
    pool: str
    method: str          # Aer's name (matrix_product_state, not mps)
    threads: int = 1

    @property
    def name(self) -> str:
        return candidate_name(self.pool, self.method, self.threads)


def parse_candidate(name: str) -> Candidate | None:
    """``cpu-1a2b3c4d/mps@2`` -> Candidate; None for anything that is not a candidate name."""
    pool, sep, rest = name.partition("/")
    if not sep or not pool or not rest:
        return None
    short, _, threads = rest.partition("@")
    method = SHORT_METHOD.get(short) or _METHOD_ALIASES.get(short)
    if method is None:
        return None
    try:
        n = int(threads) if threads else 1
    except ValueError:
        return None
    return Candidate(pool, method, max(n, 1))


def method_of_name(name: str) -> str | None:
    """The Aer method a name stands for: a candidate, a legacy ``aer_<method>`` backend or a bare
    method name (``statevector``, ``mps``); None otherwise."""
    c = parse_candidate(name)
    if c is not None:
        return c.method
    short = name.removeprefix("aer_")
    return SHORT_METHOD.get(short) or _METHOD_ALIASES.get(short) or (short if short in METHOD_SHORT else None)


def resolve_allowed(allowed: Iterable[str], names: Iterable[str]) -> frozenset[str]:
    """Expand an allow-list over the backends and candidates in ``names``.

    An entry may be an exact name, a pool (``cpu-1a2b3c4d``: all its candidates), a method
    (``statevector``, ``mps``, legacy ``aer_statevector``: that method on every pool, any
    thread count) or ``pool/method`` without a thread suffix (every thread count)."""
    names = list(names)
    out: set[str] = set()
    for entry in allowed:
        if entry in names:
            out.add(entry)
        want = method_of_name(entry) if "/" not in entry else None
        for n in names:
            c = parse_candidate(n)
            if c is None:
                continue
            if entry == c.pool or (want is not None and c.method == want):
                out.add(n)
            elif "/" in entry and n.split("@", 1)[0] == entry.split("@", 1)[0] and "@" not in entry:
                out.add(n)
    return frozenset(out)


def unknown_allowed(allowed: Iterable[str], names: Iterable[str]) -> list[str]:
    """Entries of an allow-list that name nothing in ``names`` (for a clear error)."""
    names = list(names)
    return sorted(e for e in allowed if not resolve_allowed([e], names))


def candidate_spec(pool: str, method: str, threads: int, *, cores: float, memory_bytes: int,
                   price: Price | None = None, device: str = "CPU") -> BackendSpec:
    """The spec placement sees for one candidate: ``slots`` = the pool's cores (the scheduler's
    core budget of the pool bounds how many run at once, whatever their method). On a GPU pool
    ``threads`` counts GPUs, ``cores`` the pool's GPUs and ``memory_bytes`` one GPU's budget
    (``ray_qalloc.backends.gpu.gpu_candidate_spec``)."""
    if is_gpu_pool(pool):
        from ray_qalloc.backends.gpu import gpu_candidate_spec

        return gpu_candidate_spec(pool, method, threads, gpus_in_pool=cores, memory_bytes=memory_bytes, price=price)
    from ray_qalloc.backends.aer import DEFAULT_PRICE, qubits_for_memory, supported_operations

    return BackendSpec(
        name=candidate_name(pool, method, threads), kind="simulator", family="aer",
        num_qubits=qubits_for_memory(method, memory_bytes), slots=max(int(cores), 1), method=method,
        basis_gates=tuple(sorted(supported_operations(method))), clifford_only=method == "stabilizer",
        memory_bytes=int(memory_bytes), threads=max(int(threads), 1), noisy=False,
        price=price or DEFAULT_PRICE, pool=pool,
        description=f"Qiskit Aer {method} on pool {pool} ({device}), {threads} thread(s) per run.")


def pool_variants(cores: float, methods: Iterable[str] = DEFAULT_METHODS) -> list[tuple[str, int]]:
    """(method, threads) variants a pool of ``cores`` offers: every method on one thread, and the
    methods Aer parallelises also on all the pool's cores. Methods only GPU pools run are left out."""
    out: list[tuple[str, int]] = []
    n = max(int(cores), 1)
    for m in methods:
        if m in GPU_ONLY_METHODS:
            continue
        out.append((m, 1))
        if m in PARALLEL_METHODS and n > 1:
            out.append((m, n))
    return out


def gpu_pool_variants(gpus: int, methods: Iterable[str]) -> list[tuple[str, int]]:
    """(method, GPUs) variants a GPU pool of ``gpus`` offers: each GPU method on one GPU, and the
    statevector also split over all of them (a state twice or more as wide as one GPU holds).
    None without a GPU: GPU candidates exist only where a GPU is present."""
    out: list[tuple[str, int]] = []
    n = int(gpus)
    if n < 1:
        return out
    for m in methods:
        if m not in GPU_METHODS:
            continue
        out.append((m, 1))
        if m in MULTI_GPU_METHODS and n > 1:
            out.append((m, n))
    return out


def pool_candidate_specs(pool: str, *, cores: float, memory_bytes: int,
                         methods: Iterable[str] = DEFAULT_METHODS) -> list[BackendSpec]:
    """Every candidate of a pool. A GPU pool reads ``cores`` as its GPUs and ``memory_bytes`` as one
    GPU's budget; with no GPU (0) or no GPU memory reported it has no candidates."""
    if is_gpu_pool(pool):
        if memory_bytes <= 0:
            return []
        return [candidate_spec(pool, m, g, cores=cores, memory_bytes=memory_bytes)
                for m, g in gpu_pool_variants(int(cores), methods)]
    return [candidate_spec(pool, m, t, cores=cores, memory_bytes=memory_bytes)
            for m, t in pool_variants(cores, methods)]
