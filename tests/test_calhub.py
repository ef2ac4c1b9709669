"""The calibration hub on real Ray: the quantum monitor runs in its own actor, the allocator
takes digests (changed devices' summary and profile, drift events, status), a restarted hub
is picked up again, and one digest carries any number of devices."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from ray_qalloc.calhub import HubWatch, RemoteCalibrationHub, hub_name, hub_options
from ray_qalloc.config import load_settings


def test_the_allocator_reads_calibrations_through_its_hub(qa):
    hub = ray.get_actor(hub_name(qa.settings), namespace=qa.settings.namespace)
    qpus = sorted(b["name"] for b in qa.backends() if b["kind"] == "qpu")
    deadline = time.monotonic() + 60     # the hub is its own process: it may still be starting
    while True:
        stats = ray.get(hub.stats.remote(), timeout=30)
        if stats["devices"] == len(qpus) and stats["rounds"] >= 1:
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.25)
    assert len(qpus) >= 1
    status = ray.get(qa.allocator.calibration_status.remote(), timeout=30)
    assert sorted(s["device"] for s in status) == qpus
    assert all(s["read_age_s"] is not None and not s["error"] for s in status), status
    # a refresh asked of the allocator goes through the hub and comes back
    ray.get(qa.allocator.refresh_calibration.remote(qpus[0]), timeout=60)
    after = ray.get(hub.stats.remote(), timeout=30)
    assert after["rounds"] > stats["rounds"]


def test_a_killed_hub_comes_back_and_the_allocator_follows(qa):
    hub = ray.get_actor(hub_name(qa.settings), namespace=qa.settings.namespace)
    pid = ray.get(hub.stats.remote(), timeout=30)["pid"]
    ray.kill(hub, no_restart=False)
    deadline = time.monotonic() + 60
    while True:
        try:
            ray.get(qa.allocator.refresh_calibration.remote(), timeout=30)
            status = ray.get(qa.allocator.calibration_status.remote(), timeout=30)
            if status and all(s["read_age_s"] is not None for s in status):
                break
        except Exception:  # noqa: BLE001 - restarting
            pass
        assert time.monotonic() < deadline, "the hub did not come back"
        time.sleep(0.5)
    assert ray.get(hub.stats.remote(), timeout=30)["pid"] != pid


@dataclass
class _Member:
    spec: Any
    calibration: Any = None
    calibration_taken_at: float | None = None
    qubits: Any = None

    def set_calibration_parts(self, taken_at, summary, profile) -> bool:
        if self.calibration is not None and taken_at == self.calibration_taken_at:
            return False
        self.calibration, self.calibration_taken_at, self.qubits = summary, taken_at, profile
        return True


@dataclass
class _Spec:
    kind: str = "qpu"


@dataclass
class _Host:
    name: str
    actor: Any = None
    kind: str = "backend"
    members: list[str] = field(default_factory=list)


class _Fleet:
    def __init__(self, names: list[str]) -> None:
        self.hosts = {n: _Host(n, members=[n]) for n in names}
        self.members = {n: _Member(_Spec()) for n in names}


def test_one_digest_carries_every_changed_device(qa, tmp_path):
    settings = load_settings(data_dir=tmp_path, allocator_name=f"hubtest-{time.time_ns()}",
                             monitor={"calibration_period_s": 1.0})
    hub = RemoteCalibrationHub.options(**hub_options(settings)).remote(settings)
    try:
        assert ray.get(hub.watch_synthetic.remote(6), timeout=60) == 6
        names = [f"qpu_syn{i:04d}" for i in range(6)]
        fleet = _Fleet(names)
        changed: list[list[str]] = []
        watch = HubWatch(hub, fleet, changed.append, period_s=1.0, max_stale_periods=3.0)

        async def pulls() -> None:
            await watch.pull()
            first = {n: fleet.members[n].calibration_taken_at for n in names}
            await asyncio.sleep(1.5)        # the hub's loop reads again: every device publishes anew
            await watch.pull()
            second = {n: fleet.members[n].calibration_taken_at for n in names}
            assert all(first[n] is not None and second[n] > first[n] for n in names), (first, second)

        asyncio.run(pulls())
        assert sorted(changed[0]) == names and sorted(changed[-1]) == names
        m = fleet.members[names[0]]
        assert m.qubits.qubits == 127 and m.calibration["qubits"] == 127
        assert {s["device"] for s in watch.status()} == set(names)
    finally:
        ray.kill(hub, no_restart=True)
