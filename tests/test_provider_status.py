"""A QPU provider's status (in service, jobs of other users ahead) reaches placement: the IBM
adapter reads it, the backend actor hands it out with its health answer without ever blocking
on the provider, the fleet turns the queue into wait and "out of service" into unhealthy, and
the scheduler adds that wait to every estimate on the device."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from ray_qalloc.backends.actor import BackendActor
from ray_qalloc.backends.base import BackendSpec, ProviderStatus
from ray_qalloc.backends.ibm import STATUS_TTL_S, IBMRuntimeBackend
from ray_qalloc.jobs import Intent
from ray_qalloc.placement.model import Estimate, JobView, Plan
from ray_qalloc.placement.scheduler import Scheduler, SchedulerConfig
from tests.helpers import prepared
from tests.test_allocator_unit import FakeBackend, make, run_async


def _status(operational: bool = True, pending: int | None = 0, msg: str = "active") -> Any:
    from qiskit_ibm_runtime.models.backend_status import BackendStatus

    return BackendStatus("fake_manila", "1", operational, pending if pending is not None else 0, msg)


class _Device:
    """FakeManilaV2 whose provider status a test sets (and counts the reads of)."""

    def __new__(cls, *a: Any, **kw: Any) -> Any:
        from qiskit_ibm_runtime.fake_provider import FakeManilaV2

        class Device(FakeManilaV2):
            answer: Any = _status()
            reads = 0

            def status(self) -> Any:
                type(self).reads += 1
                if isinstance(self.answer, Exception):
                    raise self.answer
                return self.answer

        return Device()


def test_the_ibm_adapter_reads_the_providers_status_and_caches_it(monkeypatch):
    device = _Device()
    device.answer = _status(True, 17, "active")
    ibm = IBMRuntimeBackend(backend=device)
    first = ibm.provider_status()
    assert first == ProviderStatus(True, 17, "active", first.read_at)
    device.answer = _status(False, 3, "maintenance")
    assert ibm.provider_status() is first and type(device).reads == 1      # within the TTL: no call
    later = time.time() + STATUS_TTL_S + 1
    monkeypatch.setattr("ray_qalloc.backends.ibm.time.time", lambda: later)
    now = ibm.provider_status()
    assert (now.operational, now.pending_jobs, now.message) == (False, 3, "maintenance")
    # a failed read keeps what was known (a network blip must not take a device out of service)
    device.answer = ConnectionError("provider unreachable")
    monkeypatch.setattr("ray_qalloc.backends.ibm.time.time", lambda: later + 2 * STATUS_TTL_S)
    assert ibm.provider_status() is now


def test_provider_status_round_trips_and_refuses_nonsense():
    s = ProviderStatus(False, 12, "calibrating", 1.5)
    assert ProviderStatus.from_dict(s.to_dict()) == s
    assert ProviderStatus.from_dict({"pending_jobs": -4}).pending_jobs == 0
    with pytest.raises(ValueError):
        ProviderStatus.from_dict({"pending_jobs": "many"})


def _actor_over(backend: Any) -> BackendActor:
    """A BackendActor around ``backend`` without Ray (only what ``ping`` reads)."""
    actor = object.__new__(BackendActor)
    actor._backend = backend
    actor._spec = BackendSpec("ibm_manila", "qpu", "ibm", 5)
    actor._runs, actor._node_id, actor._started_at = {}, "n1", 0.0
    actor._lock = threading.Lock()
    actor._provider, actor._provider_reader = None, None
    return actor


def test_a_ping_never_waits_for_a_slow_provider():
    release = threading.Event()

    class Slow:
        def provider_status(self) -> ProviderStatus:
            release.wait(10)
            return ProviderStatus(True, 5, "active", time.time())

    actor = _actor_over(Slow())
    t0 = time.perf_counter()
    first = actor.ping()
    assert time.perf_counter() - t0 < 1.0 and "provider" not in first   # answered, nothing known yet
    release.set()
    deadline = time.time() + 5
    while "provider" not in actor.ping() and time.time() < deadline:
        time.sleep(0.02)
    assert actor.ping()["provider"]["pending_jobs"] == 5


def test_a_backend_without_a_provider_status_pings_as_before():
    actor = _actor_over(object())
    assert "provider" not in actor.ping()


# ---- the scheduler --------------------------------------------------------------------------

def _qpu(name: str) -> BackendSpec:
    return BackendSpec(name, "qpu", "fake_qpu", 27, device=name, noisy=True, threads=0)


def test_the_providers_queue_is_wait_placement_weighs():
    sched = Scheduler(SchedulerConfig(check_invariants=True))
    for n in ("qpu_a", "qpu_b"):
        sched.add_backend(_qpu(n), node=f"qpu:{n}")
    job = JobView("j1", 3, frozenset({"h", "cx"}), {}, 100, intent="quantum")
    # a is the better device; b is a little worse, and nothing waits on either of ours
    plan = Plan("j1", {"qpu_a": Estimate("qpu_a", 2.0, 0.95, 1.0), "qpu_b": Estimate("qpu_b", 2.0, 0.93, 1.0)})
    sched.set_external_wait("qpu_a", 600.0)       # ten jobs of others ahead at 60 s each
    sched.enqueue(job, plan, arrival=0.0)
    out = sched.decide(0.0)
    assert [d.choice.backend for d in out.dispatch] == ["qpu_b"]
    assert sched.live(0.0)["qpu_a"].wait_s == pytest.approx(600.0)
    assert sched.predicted_wait("qpu_a", 0.0) == pytest.approx(600.0)
    # the queue empties: the better device wins again
    sched.set_external_wait("qpu_a", 0.0)
    sched.enqueue(JobView("j2", 3, frozenset({"h", "cx"}), {}, 100, intent="quantum"),
                  Plan("j2", dict(plan.estimates)), arrival=1.0)
    assert [d.choice.backend for d in sched.decide(1.0).dispatch] == ["qpu_a"]
    with pytest.raises(ValueError, match="finite"):
        sched.set_external_wait("qpu_a", float("inf"))


# ---- the allocator, end to end with fake QPU actors -----------------------------------------

class FakeQPU(FakeBackend):
    def __init__(self, name: str, provider: dict[str, Any] | None = None) -> None:
        super().__init__(name, delay=0.01)
        self.provider = provider

    async def _ping(self) -> dict[str, Any]:
        out: dict[str, Any] = {"node_id": self.node}
        if self.provider is not None:
            out["provider"] = dict(self.provider)
        return out


def test_the_allocator_follows_what_the_provider_says(tmp_path):
    async def main() -> tuple[list[str], Any, Any, list[dict[str, Any]]]:
        busy = FakeQPU("qpu_a", {"operational": True, "pending_jobs": 40, "message": "active"})
        idle = FakeQPU("qpu_b", {"operational": True, "pending_jobs": 0, "message": "active"})
        alloc = make(tmp_path, [busy, idle], specs=[_qpu("qpu_a"), _qpu("qpu_b")])
        await alloc.ready()
        await asyncio.sleep(0.2)                   # a health round reads the providers
        went = []
        for _ in range(3):
            out = await alloc.submit(prepared(intent=Intent.QUANTUM, backends=("qpu_a", "qpu_b")))
            went.append((await alloc.wait(out["id"], timeout=10))["result"]["backend"])
        rows = {r["name"]: r for r in await alloc.backends()}
        # the idle device's provider takes it out of service: it is unhealthy, jobs go to the other
        idle.provider = {"operational": False, "pending_jobs": 0, "message": "maintenance"}
        await asyncio.sleep(0.2)
        down = alloc.members["qpu_b"].healthy
        out = await alloc.submit(prepared(intent=Intent.QUANTUM, backends=("qpu_a", "qpu_b")))
        rec = await alloc.wait(out["id"], timeout=10)
        idle.provider = {"operational": True, "pending_jobs": 0, "message": "active"}
        await asyncio.sleep(0.2)
        return went, (down, rec["result"]["backend"], alloc.members["qpu_b"].healthy), rows, \
            alloc.sched.backends["qpu_a"].external_wait_s

    went, (down, after, back), rows, wait_a = run_async(main)
    assert went == ["qpu_b"] * 3                   # 40 jobs ahead at qpu_a (60 s each by default)
    assert rows["qpu_a"]["provider"]["pending_jobs"] == 40 and rows["qpu_b"]["provider"]["operational"]
    assert wait_a == pytest.approx(40 * 60.0)
    assert down is False and after == "qpu_a" and back is True
