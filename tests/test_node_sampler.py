"""NodeSampler on this machine's real psutil, NVML through fake modules, and the planning helpers."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_qalloc.monitor import node
from ray_qalloc.monitor.node import (
    GpuStats,
    NodeSampler,
    NodeStats,
    _cgroup_cpu_limit,
    foreign_busy_cores,
    usable_memory_bytes,
)

GIB = 1 << 30


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def stats(**overrides: Any) -> NodeStats:
    base: dict[str, Any] = dict(
        taken_at=1000.0, cores=8, cpu_ratio=0.5, load_1m=4.0, load_5m=3.0, load_15m=2.0,
        memory_total_bytes=64 * GIB, memory_available_bytes=16 * GIB, memory_used_bytes=48 * GIB,
        process_rss_bytes=GIB,
    )
    base.update(overrides)
    return NodeStats(**base)


@pytest.fixture
def no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """A None entry in sys.modules makes ``import pynvml`` raise ImportError."""
    monkeypatch.setitem(sys.modules, "pynvml", None)


# --------------------------------------------------------------------------- real psutil


def test_memory_cores_load_on_this_machine(no_nvml: None) -> None:
    s = NodeSampler().sample()
    assert 0 < s.memory_available_bytes <= s.memory_total_bytes
    assert s.memory_used_bytes == s.memory_total_bytes - s.memory_available_bytes
    assert 0.0 <= s.memory_pressure_ratio <= 1.0
    assert 1 <= s.cores <= (os.cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        assert s.cores <= len(os.sched_getaffinity(0))
    for load in (s.load_1m, s.load_5m, s.load_15m):
        assert load is not None and load >= 0.0
    assert s.gpus == ()
    assert abs(s.taken_at - time.time()) < 5.0


def test_now_sets_taken_at(no_nvml: None) -> None:
    assert NodeSampler().sample(now=12.5).taken_at == 12.5


def test_rss_of_this_process_and_vanished_pid_skipped(no_nvml: None) -> None:
    dead = subprocess.Popen(["sleep", "0"])
    dead.wait()                                          # reaped: its pid is gone

    own = NodeSampler().sample().process_rss_bytes
    assert own is not None and own > 0

    with_dead = NodeSampler(pids=lambda: [os.getpid(), dead.pid]).sample().process_rss_bytes
    assert with_dead is not None and with_dead > 0
    assert NodeSampler(pids=lambda: [dead.pid]).sample().process_rss_bytes == 0
    # A pid listed twice is counted once.
    twice = NodeSampler(pids=lambda: [os.getpid(), os.getpid()]).sample().process_rss_bytes
    assert twice is not None and twice < 2 * own


def test_rss_of_a_child_adds_up(no_nvml: None) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)
        both = NodeSampler(pids=lambda: [os.getpid(), child.pid]).sample().process_rss_bytes
        alone = psutil.Process(os.getpid()).memory_info().rss
        assert both is not None and both > alone
    finally:
        child.kill()
        child.wait()


def test_failing_pid_source_is_a_gap(no_nvml: None) -> None:
    def broken() -> list[int]:
        raise RuntimeError("worker registry gone")

    assert NodeSampler(pids=broken).sample().process_rss_bytes is None


def test_cpu_ratio_rises_with_a_busy_loop(no_nvml: None) -> None:
    sampler = NodeSampler()
    time.sleep(0.3)
    before = sampler.sample()
    assert before.cpu_ratio is not None and 0.0 <= before.cpu_ratio <= 1.0
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        after = sampler.sample()
    finally:
        busy.kill()
        busy.wait()
    print(f"busy_cores before={before.busy_cores:.2f} after={after.busy_cores}")
    assert after.busy_cores is not None and after.busy_cores >= 0.5
    assert foreign_busy_cores(after, own_threads=0.0) == pytest.approx(after.busy_cores)


def test_first_window_too_short_reports_none_then_keeps_last_good(no_nvml: None) -> None:
    clock = Clock()
    sampler = NodeSampler(clock=clock, min_interval_s=0.2)
    clock.t += 0.05
    assert sampler.sample().cpu_ratio is None           # primed, but no valid window yet
    time.sleep(0.25)                                     # let real CPU time accumulate
    clock.t += 0.25
    first = sampler.sample().cpu_ratio
    assert first is not None and 0.0 <= first <= 1.0
    for _ in range(5):                                   # faster than min_interval_s
        clock.t += 0.01
        assert sampler.sample().cpu_ratio == first


def test_new_thread_is_primed_not_trusted(no_nvml: None) -> None:
    """psutil's baseline is per thread: another thread's first reading must not surface as 0.0."""
    clock = Clock()
    sampler = NodeSampler(clock=clock, min_interval_s=0.0)
    seen: list[float | None] = []
    worker = threading.Thread(target=lambda: seen.append(sampler.sample().cpu_ratio))
    worker.start()
    worker.join()
    assert seen == [None]


def test_sample_is_cheap(no_nvml: None) -> None:
    sampler = NodeSampler(min_interval_s=0.0)            # every call takes a fresh CPU reading
    sampler.sample()
    n = 50
    start = time.perf_counter()
    for _ in range(n):
        sampler.sample()
    per_call = (time.perf_counter() - start) / n
    print(f"NodeSampler.sample: {per_call * 1e3:.3f} ms per call")
    assert per_call < 0.05


def test_stats_pickle(no_nvml: None) -> None:
    s = NodeSampler(gpus=lambda: [GpuStats(0, "H200", 0.25, 141 * GIB, GIB)]).sample()
    assert pickle.loads(pickle.dumps(s)) == s


def test_min_interval_must_not_be_negative() -> None:
    with pytest.raises(ValueError):
        NodeSampler(min_interval_s=-1.0)


# --------------------------------------------------------------------------- GPU sources


def test_injected_gpu_source() -> None:
    gpus = [GpuStats(0, "A100", 0.5, 80 * GIB, 10 * GIB), GpuStats(1, "A100", None, 80 * GIB, 0)]
    s = NodeSampler(gpus=lambda: gpus).sample()
    assert s.gpus == tuple(gpus)


def test_failing_injected_gpu_source_is_empty() -> None:
    def broken() -> list[GpuStats]:
        raise RuntimeError("site accounting down")

    assert NodeSampler(gpus=broken).sample().gpus == ()


def test_nvml_module_absent(no_nvml: None) -> None:
    sampler = NodeSampler()
    assert sampler.sample().gpus == ()
    assert sampler.sample().gpus == ()
    sampler.close()


def test_nvml_init_raises_is_decided_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    class NVMLError(Exception):
        pass

    def nvml_init() -> None:
        calls.append("init")
        raise NVMLError("NVML Shared Library Not Found")

    fake = types.ModuleType("pynvml")
    fake.nvmlInit = nvml_init  # type: ignore[attr-defined]
    fake.nvmlDeviceGetCount = lambda: pytest.fail("must not query devices after a failed init")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", fake)

    sampler = NodeSampler()
    for _ in range(3):
        assert sampler.sample().gpus == ()
    assert calls == ["init"]
    sampler.close()


def fake_pynvml(calls: list[str], *, fail_device: int | None = None,
                no_util_device: int | None = None) -> types.ModuleType:
    class NVMLError(Exception):
        pass

    devices = [
        ("NVIDIA H200", 37, 141 * GIB, 20 * GIB),
        (b"NVIDIA A100-SXM4-80GB", 100, 80 * GIB, 79 * GIB),   # older bindings return bytes
    ]
    fake = types.ModuleType("pynvml")

    def get_handle(i: int) -> Any:
        if i == fail_device:
            raise NVMLError("GPU is lost")
        return ("handle", i)

    def get_util(h: Any) -> Any:
        if h[1] == no_util_device:
            raise NVMLError("Not Supported")
        return types.SimpleNamespace(gpu=devices[h[1]][1], memory=0)

    fake.NVMLError = NVMLError  # type: ignore[attr-defined]
    fake.nvmlInit = lambda: calls.append("init")  # type: ignore[attr-defined]
    fake.nvmlShutdown = lambda: calls.append("shutdown")  # type: ignore[attr-defined]
    fake.nvmlDeviceGetCount = lambda: len(devices)  # type: ignore[attr-defined]
    fake.nvmlDeviceGetHandleByIndex = get_handle  # type: ignore[attr-defined]
    fake.nvmlDeviceGetName = lambda h: devices[h[1]][0]  # type: ignore[attr-defined]
    fake.nvmlDeviceGetUtilizationRates = get_util  # type: ignore[attr-defined]
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(  # type: ignore[attr-defined]
        total=devices[h[1]][2], used=devices[h[1]][3], free=devices[h[1]][2] - devices[h[1]][3])
    return fake


def test_nvml_reads_two_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(calls))
    sampler = NodeSampler()
    s = sampler.sample()
    assert s.gpus == (
        GpuStats(0, "NVIDIA H200", 0.37, 141 * GIB, 20 * GIB),
        GpuStats(1, "NVIDIA A100-SXM4-80GB", 1.0, 80 * GIB, 79 * GIB),
    )
    sampler.sample()
    assert calls == ["init"]
    sampler.close()
    assert calls == ["init", "shutdown"]
    assert NodeStats.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_nvml_device_failures_are_gaps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([], fail_device=0, no_util_device=1))
    gpus = NodeSampler().sample().gpus
    assert gpus == (GpuStats(1, "NVIDIA A100-SXM4-80GB", None, 80 * GIB, 79 * GIB),)


# --------------------------------------------------------------------------- dict form


def test_round_trip_with_gpus() -> None:
    s = stats(gpus=(GpuStats(0, "H200", 0.5, 141 * GIB, GIB), GpuStats(1, "H200", None, 141 * GIB, 0)))
    d = s.to_dict()
    assert isinstance(d["gpus"], list)
    assert NodeStats.from_dict(d) == s
    assert NodeStats.from_dict(json.loads(json.dumps(d))) == s


def test_from_dict_of_an_older_pool() -> None:
    old = {"taken_at": 5.0, "cores": 4, "memory_total_bytes": 8 * GIB, "memory_available_bytes": 2 * GIB,
           "some_future_key": "ignored"}
    s = NodeStats.from_dict(old)
    assert s == NodeStats(taken_at=5.0, cores=4, cpu_ratio=None, load_1m=None, load_5m=None, load_15m=None,
                          memory_total_bytes=8 * GIB, memory_available_bytes=2 * GIB,
                          memory_used_bytes=6 * GIB, process_rss_bytes=None, gpus=())
    assert s.busy_cores is None
    assert foreign_busy_cores(s, 1.0) is None
    gpu = GpuStats.from_dict({"index": 0, "memory_total_bytes": GIB})
    assert gpu == GpuStats(0, "", None, GIB, 0)


def test_from_dict_missing_required_key() -> None:
    with pytest.raises(ValueError, match="cores"):
        NodeStats.from_dict({"taken_at": 1.0, "memory_total_bytes": 1, "memory_available_bytes": 1})


opt_float = st.none() | st.floats(min_value=0.0, max_value=1e6, allow_nan=False)
nonneg = st.integers(min_value=0, max_value=2**62)
gpu_stats = st.builds(GpuStats, index=st.integers(0, 64), name=st.text(max_size=40),
                      utilization_ratio=st.none() | st.floats(0.0, 1.0),
                      memory_total_bytes=nonneg, memory_used_bytes=nonneg)
node_stats = st.builds(
    NodeStats,
    taken_at=st.floats(min_value=0.0, max_value=4e9, allow_nan=False),
    cores=st.integers(1, 4096),
    cpu_ratio=st.none() | st.floats(0.0, 1.0),
    load_1m=opt_float, load_5m=opt_float, load_15m=opt_float,
    memory_total_bytes=nonneg, memory_available_bytes=nonneg, memory_used_bytes=nonneg,
    process_rss_bytes=st.none() | nonneg,
    gpus=st.lists(gpu_stats, max_size=4).map(tuple),
)


@settings(max_examples=200, deadline=None)
@given(node_stats)
def test_round_trip_property(s: NodeStats) -> None:
    assert NodeStats.from_dict(s.to_dict()) == s
    assert NodeStats.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert 0.0 <= s.memory_pressure_ratio <= 1.0


# --------------------------------------------------------------------------- planning helpers


def test_busy_cores_and_pressure() -> None:
    s = stats()
    assert s.busy_cores == 4.0
    assert s.memory_pressure_ratio == pytest.approx(0.75)
    assert stats(memory_total_bytes=0, memory_available_bytes=0).memory_pressure_ratio == 0.0
    assert stats(cpu_ratio=None).busy_cores is None


def test_foreign_busy_cores() -> None:
    s = stats()                                        # 4 of 8 cores busy
    assert foreign_busy_cores(s, 1.5) == pytest.approx(2.5)
    assert foreign_busy_cores(s, 4.0) == 0.0
    assert foreign_busy_cores(s, 6.0) == 0.0           # our threads were idle-waiting
    assert foreign_busy_cores(stats(cpu_ratio=None), 0.0) is None


def test_usable_memory_bytes() -> None:
    s = stats()                                        # 16 GiB of 64 available
    assert usable_memory_bytes(s) == 16 * GIB - int(64 * GIB * 0.05)
    assert usable_memory_bytes(s, reserve_ratio=0.0) == 16 * GIB
    assert usable_memory_bytes(s, reserve_ratio=0.25) == 0
    assert usable_memory_bytes(s, reserve_ratio=0.5) == 0
    with pytest.raises(ValueError):
        usable_memory_bytes(s, reserve_ratio=1.5)


# --------------------------------------------------------------------------- cgroup quota


def _cgroup_tree(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    proc_file = tmp_path / "proc_cgroup"
    proc_file.write_text(proc)
    return root, proc_file


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    root, proc = _cgroup_tree(tmp_path, "0::/job/step\n", {
        "job/cpu.max": "150000 100000\n",          # 1.5 cores on the job: 2 whole cores
        "job/step/cpu.max": "max 100000\n",
    })
    assert _cgroup_cpu_limit(root, proc) == 2


def test_cgroup_v2_unlimited_and_v1_quota(tmp_path: Path) -> None:
    root, proc = _cgroup_tree(tmp_path, "0::/\n", {"cpu.max": "max 100000\n"})
    assert _cgroup_cpu_limit(root, proc) is None
    root, proc = _cgroup_tree(tmp_path / "v1", "4:cpu,cpuacct:/slurm/job\n3:memory:/x\n", {
        "cpu,cpuacct/slurm/job/cpu.cfs_quota_us": "300000\n",
        "cpu,cpuacct/slurm/job/cpu.cfs_period_us": "100000\n",
        "cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
        "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    })
    assert _cgroup_cpu_limit(root, proc) == 3


def test_cgroup_unreadable(tmp_path: Path) -> None:
    assert _cgroup_cpu_limit(tmp_path / "none", tmp_path / "missing") is None


def test_cgroup_limit_caps_cores(monkeypatch: pytest.MonkeyPatch, no_nvml: None) -> None:
    monkeypatch.setattr(node, "_cgroup_cpu_limit", lambda: 1)
    assert NodeSampler().sample().cores == 1
