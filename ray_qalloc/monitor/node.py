"""Classical node monitor: what a node's CPUs, memory and GPUs are actually doing.

An HPC node is shared. Other users' batch jobs, the node's own daemons and whatever else the
scheduler packed next to us use cores and memory that Ray's resource accounting never sees: Ray
only counts the logical ``num_cpus`` it handed out itself. A placement planned on Ray's numbers
alone oversubscribes a node that is already busy, and a statevector simulation sized to "free"
memory that another job is using dies of OOM half-way through. So each node's simulator pool
calls :meth:`NodeSampler.sample` on every health ping and hands the :class:`NodeStats` back to
the allocator, which plans on what the node *measured* (:func:`foreign_busy_cores`,
:func:`usable_memory_bytes`) rather than on what Ray believes.

The sampler runs inside the health ping, so it must be cheap and must never fail the ping:
the CPU reading is non-blocking, a vanished process or a missing GPU driver is a gap in the
data, not an error. The stats are plain frozen dataclasses (no Ray, no Qiskit) so they pickle
across actor boundaries and travel as dicts (:meth:`NodeStats.to_dict`) to pools of older or
newer versions.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

log = logging.getLogger(__name__)

__all__ = [
    "GpuStats",
    "NodeSampler",
    "NodeStats",
    "foreign_busy_cores",
    "usable_memory_bytes",
]

DEFAULT_MIN_INTERVAL_S = 0.2


# --------------------------------------------------------------------------- the stats


@dataclass(frozen=True)
class GpuStats:
    """One GPU as NVML saw it; other jobs' kernels and allocations show up here, not in Ray."""

    index: int
    name: str
    utilization_ratio: float | None   # 0..1; None where the device does not report it
    memory_total_bytes: int
    memory_used_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "utilization_ratio": self.utilization_ratio,
            "memory_total_bytes": self.memory_total_bytes,
            "memory_used_bytes": self.memory_used_bytes,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GpuStats:
        """Tolerant of a missing name or utilization so a pool on another NVML version still parses."""
        try:
            return cls(
                index=int(data["index"]),
                name=str(data.get("name") or ""),
                utilization_ratio=_opt_float(data.get("utilization_ratio")),
                memory_total_bytes=int(data["memory_total_bytes"]),
                memory_used_bytes=int(data.get("memory_used_bytes") or 0),
            )
        except KeyError as exc:
            raise ValueError(f"GPU stats lack required key {exc.args[0]!r}") from None


@dataclass(frozen=True)
class NodeStats:
    """One measurement of a node, taken by the pool that runs there.

    ``cores`` is what this process may run on (affinity / cgroup limits applied), and
    ``cpu_ratio`` is the busy fraction of those CPUs, so ``busy_cores`` is in the same unit the
    allocator plans threads in. ``None`` means "not measured": the allocator must tell a gap
    apart from an idle node.
    """

    taken_at: float                    # wall clock, seconds since the epoch
    cores: int
    cpu_ratio: float | None            # 0..1 over ``cores``; None until a valid interval elapsed
    load_1m: float | None
    load_5m: float | None
    load_15m: float | None
    memory_total_bytes: int
    memory_available_bytes: int
    memory_used_bytes: int             # total - available: what is *not* to be had
    process_rss_bytes: int | None      # our own pool's processes; None when the pid source failed
    gpus: tuple[GpuStats, ...] = field(default=())

    @property
    def memory_pressure_ratio(self) -> float:
        """Share of memory not available to us; clamped to [0, 1] so odd readings stay plannable."""
        if self.memory_total_bytes <= 0:
            return 0.0
        ratio = 1.0 - self.memory_available_bytes / self.memory_total_bytes
        return min(max(ratio, 0.0), 1.0)

    @property
    def busy_cores(self) -> float | None:
        """Busy CPUs in cores, the unit the allocator's thread counts are in."""
        if self.cpu_ratio is None:
            return None
        return self.cpu_ratio * self.cores

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: health pings cross versions and the admin API, not only pickles."""
        return {
            "taken_at": self.taken_at,
            "cores": self.cores,
            "cpu_ratio": self.cpu_ratio,
            "load_1m": self.load_1m,
            "load_5m": self.load_5m,
            "load_15m": self.load_15m,
            "memory_total_bytes": self.memory_total_bytes,
            "memory_available_bytes": self.memory_available_bytes,
            "memory_used_bytes": self.memory_used_bytes,
            "process_rss_bytes": self.process_rss_bytes,
            "gpus": [g.to_dict() for g in self.gpus],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NodeStats:
        """Parse a pool's dict; optional keys may be missing (older pools) and unknown ones are ignored (newer)."""
        try:
            total = int(data["memory_total_bytes"])
            available = int(data["memory_available_bytes"])
            used = data.get("memory_used_bytes")
            return cls(
                taken_at=float(data["taken_at"]),
                cores=int(data["cores"]),
                cpu_ratio=_opt_float(data.get("cpu_ratio")),
                load_1m=_opt_float(data.get("load_1m")),
                load_5m=_opt_float(data.get("load_5m")),
                load_15m=_opt_float(data.get("load_15m")),
                memory_total_bytes=total,
                memory_available_bytes=available,
                memory_used_bytes=total - available if used is None else int(used),
                process_rss_bytes=_opt_int(data.get("process_rss_bytes")),
                gpus=tuple(GpuStats.from_dict(g) for g in data.get("gpus") or ()),
            )
        except KeyError as exc:
            raise ValueError(f"node stats lack required key {exc.args[0]!r}") from None


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


# --------------------------------------------------------------------------- planning helpers


def foreign_busy_cores(stats: NodeStats, own_threads: float) -> float | None:
    """Cores busy with work that is not ours, the part of the load placement must route around.

    Our own threads are part of the measured load; subtracting them keeps the allocator from
    counting its own work twice. Floored at 0 because our threads may be idle-waiting.
    """
    busy = stats.busy_cores
    if busy is None:
        return None
    return max(busy - own_threads, 0.0)


def usable_memory_bytes(stats: NodeStats, reserve_ratio: float = 0.05) -> int:
    """Memory a new simulation may plan on, leaving a reserve so the node's OOM killer stays asleep.

    "Available" is an estimate that moves while we plan, and the kernel, page cache and other
    jobs need headroom; the reserve is a share of total memory so it scales with the node.
    """
    if not 0.0 <= reserve_ratio <= 1.0:
        raise ValueError(f"reserve_ratio must be within [0, 1], got {reserve_ratio}")
    reserve = int(stats.memory_total_bytes * reserve_ratio)
    return max(stats.memory_available_bytes - reserve, 0)


# --------------------------------------------------------------------------- GPUs via NVML


class _Nvml:
    """NVML, if this node has it: imported and initialised lazily, once, never raising.

    Most nodes have no GPU or no driver; that is a fact about the node, decided on first use
    and cached, so a ping never pays an import attempt or an ``nvmlInit`` failure twice.
    """

    def __init__(self) -> None:
        self._module: ModuleType | None = None
        self._decided = False
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return self._load() is not None

    def _load(self) -> ModuleType | None:
        with self._lock:
            if self._decided:
                return self._module
            self._decided = True
            try:
                module = importlib.import_module("pynvml")
            except Exception as exc:  # ImportError mostly; a broken install must not fail pings
                log.debug("NVML unavailable (pynvml not importable): %s", exc)
                return None
            try:
                module.nvmlInit()
            except Exception as exc:  # NVMLError: no driver, no device, permission
                log.info("NVML unavailable (nvmlInit failed): %s", exc)
                return None
            self._module = module
            return module

    def read(self) -> tuple[GpuStats, ...]:
        """Every readable device; a device that fails is left out, a failed count yields ()."""
        nvml = self._load()
        if nvml is None:
            return ()
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            log.warning("NVML device count failed: %s", exc)
            return ()
        gpus: list[GpuStats] = []
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                total, used = int(memory.total), int(memory.used)
            except Exception as exc:
                log.debug("NVML device %d unreadable: %s", index, exc)
                continue
            gpus.append(GpuStats(index=index, name=_gpu_name(nvml, handle),
                                 utilization_ratio=_gpu_utilization(nvml, handle),
                                 memory_total_bytes=total, memory_used_bytes=used))
        return tuple(gpus)

    def close(self) -> None:
        with self._lock:
            module, self._module = self._module, None
            if module is not None:
                try:
                    module.nvmlShutdown()
                except Exception as exc:
                    log.debug("nvmlShutdown failed: %s", exc)


def _gpu_name(nvml: ModuleType, handle: Any) -> str:
    try:
        name = nvml.nvmlDeviceGetName(handle)
    except Exception:
        return ""
    # Older nvidia-ml-py returns bytes.
    return name.decode(errors="replace") if isinstance(name, bytes) else str(name)


def _gpu_utilization(nvml: ModuleType, handle: Any) -> float | None:
    try:
        return float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu) / 100.0
    except Exception:  # NVMLError_NotSupported on some devices (MIG slices, older boards)
        return None


# --------------------------------------------------------------------------- CPU limits


def _affinity() -> frozenset[int] | None:
    """CPUs this process may run on (Slurm / taskset cpusets show up here); None where unknown."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is None:
        return None
    try:
        return frozenset(getaffinity(0))
    except OSError:
        return None


def _cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup"),
                      proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Whole cores a CFS quota (cgroup v2 ``cpu.max`` / v1 ``cfs_quota_us``) allows; None if unlimited.

    A container or batch job limited by quota rather than by cpuset sees every CPU in its
    affinity mask but may only use a share of them; planning on the mask would oversubscribe.
    The strictest limit on the path from our cgroup up to the root applies.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":                      # cgroup v2 unified hierarchy
            bases, reader = [root], _read_cpu_max
        elif "cpu" in controllers.split(","):      # cgroup v1
            bases, reader = [root / controllers, root / "cpu,cpuacct", root / "cpu"], _read_cfs_quota
        else:
            continue
        for base in bases:
            for directory in _ancestors(base, path):
                cores = reader(directory)
                if cores is not None:
                    limits.append(cores)
    if not limits:
        return None
    return max(1, math.ceil(min(limits)))


def _ancestors(base: Path, path: str) -> list[Path]:
    parts = [p for p in path.strip().split("/") if p]
    return [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _read_cpu_max(directory: Path) -> float | None:
    try:
        fields = (directory / "cpu.max").read_text().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = float(fields[0]), float(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _read_cfs_quota(directory: Path) -> float | None:
    try:
        quota = float((directory / "cpu.cfs_quota_us").read_text())
        period = float((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


# --------------------------------------------------------------------------- the sampler


def _own_pid() -> Iterable[int]:
    return (os.getpid(),)


class NodeSampler:
    """Measures the node on demand; one per pool, called on every health ping.

    ``pids`` lists the pool's processes (the actor and its simulator workers) whose resident
    memory is ours rather than foreign; it is called on every sample because workers come and
    go. ``gpus`` replaces NVML as the GPU source (tests, or a site's own accounting). ``clock``
    is the monotonic clock that paces CPU readings.
    """

    def __init__(self, *, pids: Callable[[], Iterable[int]] | None = None,
                 gpus: Callable[[], Sequence[GpuStats]] | None = None,
                 min_interval_s: float = DEFAULT_MIN_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if min_interval_s < 0:
            raise ValueError(f"min_interval_s must be >= 0, got {min_interval_s}")
        self._pids = pids or _own_pid
        self._nvml: _Nvml | None = _Nvml() if gpus is None else None
        self._gpus = gpus if gpus is not None else self._nvml.read  # type: ignore[union-attr]
        self._min_interval_s = float(min_interval_s)
        self._clock = clock
        self._lock = threading.Lock()
        # psutil keeps the cpu_percent baseline per thread; so do we, to know which are primed.
        self._cpu_called: dict[int, float] = {}
        self._cpu_ratio: float | None = None
        # A quota is a property of the job, not of the moment: read once, not on every ping.
        self._cgroup_limit = _cgroup_cpu_limit()
        self._logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
        self._cpu_reading()   # prime: psutil's first non-blocking reading is meaningless

    def sample(self, now: float | None = None) -> NodeStats:
        """Measure the node now; cheap and non-raising enough to sit inside a health ping."""
        taken_at = time.time() if now is None else float(now)
        affinity = _affinity()
        memory = psutil.virtual_memory()
        total, available = int(memory.total), int(memory.available)
        load_1m, load_5m, load_15m = _load_average()
        return NodeStats(
            taken_at=taken_at,
            cores=self._cores(affinity),
            cpu_ratio=self._cpu_ratio_over(affinity),
            load_1m=load_1m,
            load_5m=load_5m,
            load_15m=load_15m,
            memory_total_bytes=total,
            memory_available_bytes=available,
            memory_used_bytes=total - available,
            process_rss_bytes=self._rss(),
            gpus=self._read_gpus(),
        )

    def close(self) -> None:
        """Release NVML; the pool calls this when it shuts down."""
        if self._nvml is not None:
            self._nvml.close()

    # ----------------------------------------------------------------- parts

    def _cores(self, affinity: frozenset[int] | None) -> int:
        cores = self._logical
        if affinity:
            cores = min(cores, len(affinity))
        if self._cgroup_limit is not None:
            cores = min(cores, self._cgroup_limit)
        return max(cores, 1)

    def _cpu_reading(self) -> list[float] | None:
        """A fresh per-CPU reading, or None when this thread's window is too short to mean anything.

        A reading resets psutil's baseline, so reading faster than ``min_interval_s`` would not
        only be noisy itself but also shorten the next window; skipping keeps windows long.
        """
        tid = threading.get_ident()
        t = self._clock()
        with self._lock:
            last = self._cpu_called.get(tid)
            if last is not None and t - last < self._min_interval_s:
                return None
            self._cpu_called[tid] = t
            percents = psutil.cpu_percent(interval=None, percpu=True)
        # A thread's first call only sets its baseline; its number is psutil's meaningless 0.0.
        return None if last is None else percents

    def _cpu_ratio_over(self, affinity: frozenset[int] | None) -> float | None:
        """Busy share of the CPUs we may use; the last good value when no fresh one is due."""
        percents = self._cpu_reading()
        if percents is None:
            return self._cpu_ratio
        if not percents:
            return self._cpu_ratio
        # Average over our cpuset: other users' jobs on CPUs we cannot run on do not crowd us.
        # Offline CPUs shift psutil's indices; then fall back to the whole node.
        if affinity and len(affinity) < len(percents) and max(affinity) < len(percents):
            chosen = [percents[i] for i in affinity]
        else:
            chosen = percents
        ratio = min(max(sum(chosen) / (100.0 * len(chosen)), 0.0), 1.0)
        with self._lock:
            self._cpu_ratio = ratio
        return ratio

    def _rss(self) -> int | None:
        """Resident memory of our own processes, so the allocator can tell ours from foreign use."""
        try:
            pids = set(self._pids())
        except Exception as exc:   # a pid-source bug must not fail the health ping
            log.warning("node sampler: pid source failed: %s", exc)
            return None
        total = 0
        for pid in pids:
            try:
                total += psutil.Process(pid).memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue           # a worker that exited between listing and reading
        return total

    def _read_gpus(self) -> tuple[GpuStats, ...]:
        try:
            return tuple(self._gpus())
        except Exception as exc:   # an injected source that fails is a gap, as NVML's would be
            log.warning("node sampler: GPU source failed: %s", exc)
            return ()


def _load_average() -> tuple[float | None, float | None, float | None]:
    """Load counts runnable tasks of every user, which is exactly the foreign work we need to see."""
    try:
        one, five, fifteen = os.getloadavg()
    except (AttributeError, OSError):   # Windows has none; some sandboxes refuse
        return None, None, None
    return float(one), float(five), float(fifteen)
