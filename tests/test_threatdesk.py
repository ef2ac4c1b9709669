"""Timed allocation actions on a real allocator (small fake backends, no Ray): a boost moves a
tenant's queued jobs ahead and explain says which action (rule, event) did it; a pause holds a
tenant's jobs (stored, none started) until resume; a reservation keeps a slot for emergency
jobs; actions are idempotent by id, refused with the field when malformed, expire, and come
back after a restart."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from ray_qalloc.exceptions import Conflict, InvalidRequest
from ray_qalloc.jobs import JobState, Priority
from ray_qalloc.placement.model import Estimate, JobView, Plan
from ray_qalloc.placement.scheduler import Scheduler, SchedulerConfig
from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.threatdesk import parse_action
from tests.helpers import prepared
from tests.test_allocator_unit import FakeBackend, make, run_async


def _started(alloc: Any, job_id: str) -> float:
    return alloc.store.attempts(job_id)[0]["started_at"]


def test_a_boost_moves_a_tenants_jobs_ahead_and_explain_names_the_rule(tmp_path):
    async def main() -> tuple[list[str], list[str], dict[str, Any], dict[str, Any]]:
        a = FakeBackend("a", delay=0.15)
        alloc = make(tmp_path, [a], cpus=1.0)
        await alloc.ready()
        others = [(await alloc.submit(prepared(tenant="lab")))["id"] for _ in range(3)]
        soc = [(await alloc.submit(prepared(tenant="soc", priority=Priority.BATCH)))["id"] for _ in range(2)]
        out = await alloc.threat_add({"id": "inc-42/boost", "kind": "boost", "tenant": "soc", "to": "high",
                                      "until": time.time() + 60, "by": "rule:ransomware", "rule": "ransomware",
                                      "event_id": "ev-1", "reason": "ransomware on a lab host"}, actor="rule:ransomware")
        again = await alloc.threat_add({"id": "inc-42/boost", "kind": "boost", "tenant": "soc", "to": "high",
                                        "until": out["action"]["until"], "by": "rule:ransomware",
                                        "rule": "ransomware", "event_id": "ev-1",
                                        "reason": "ransomware on a lab host"}, actor="rule:ransomware")
        queued_explain = await alloc.explain(soc[0])
        for j in others + soc:
            await alloc.wait(j, timeout=10)
        return others, soc, queued_explain, again

    others, soc, ex, again = run_async(main)
    assert again["created"] is False
    assert ex["priority"]["served_as"] == "high" and ex["priority"]["own"] == "batch"
    assert ex["priority"]["changed_by"]["rule"] == "ransomware" and ex["priority"]["changed_by"]["event_id"] == "ev-1"


def test_boosted_jobs_start_before_the_queue_they_were_behind(tmp_path):
    async def main() -> tuple[list[float], list[float], Any]:
        a = FakeBackend("a", delay=0.1)
        alloc = make(tmp_path, [a], cpus=1.0)
        await alloc.ready()
        others = [(await alloc.submit(prepared(tenant="lab")))["id"] for _ in range(4)]
        soc = [(await alloc.submit(prepared(tenant="soc")))["id"] for _ in range(2)]
        await alloc.threat_add({"id": "b1", "kind": "boost", "tenant": "soc", "to": "emergency",
                                "until": time.time() + 60}, actor="soar")
        for j in others + soc:
            await alloc.wait(j, timeout=10)
        return ([_started(alloc, j) for j in others], [_started(alloc, j) for j in soc],
                alloc.store.audit("threat.actions") if hasattr(alloc.store, "audit") else None)

    lab, soc, _ = run_async(main)
    # the first lab job was already running; every soc job started before the lab jobs queued behind it
    assert max(soc) < sorted(lab)[1]


def test_a_paused_tenant_is_stored_and_held_until_resumed(tmp_path):
    async def main() -> tuple[str, str, str, str, bool]:
        a = FakeBackend("a", delay=0.01)
        alloc = make(tmp_path, [a])
        await alloc.ready()
        await alloc.threat_add({"id": "p1", "kind": "pause", "tenant": "mallory", "reason": "credentials leaked"},
                               actor="soar")
        held = (await alloc.submit(prepared(tenant="mallory")))["id"]
        free = (await alloc.submit(prepared(tenant="lab")))["id"]
        await alloc.wait(free, timeout=10)
        await asyncio.sleep(0.2)
        state_paused = alloc.store.get(held).state.value
        removed = await alloc.threat_remove("p1", actor="soar")
        rec = await alloc.wait(held, timeout=10)
        return state_paused, rec["state"], free, held, removed

    paused_state, final, _, _, removed = run_async(main)
    assert paused_state == JobState.QUEUED.value and removed and final == "completed"


def test_a_timed_reservation_keeps_a_slot_for_emergency_jobs_and_expires(tmp_path):
    async def main() -> tuple[str, str, str]:
        a = FakeBackend("a", delay=0.01)
        alloc = make(tmp_path, [a])
        await alloc.ready()
        await alloc.threat_add({"id": "r1", "kind": "reserve", "target": "a", "slots": 1,
                                "until": time.time() + 0.6}, actor="soar")
        normal = (await alloc.submit(prepared(tenant="lab")))["id"]
        urgent = (await alloc.submit(prepared(tenant="soc", priority=Priority.EMERGENCY)))["id"]
        await alloc.wait(urgent, timeout=10)
        waiting = alloc.store.get(normal).state.value
        await asyncio.sleep(0.7)
        await alloc.ops_tick()          # the operations loop expires the reservation
        rec = await alloc.wait(normal, timeout=10)
        return waiting, rec["state"], alloc.store.get(urgent).state.value

    waiting, normal_final, urgent_final = run_async(main)
    assert waiting == "queued" and urgent_final == "completed" and normal_final == "completed"


def test_actions_survive_a_restart_and_bad_ones_are_refused_with_their_field(tmp_path):
    async def first() -> None:
        alloc = make(tmp_path, [FakeBackend("a")])
        await alloc.ready()
        await alloc.threat_add({"id": "p1", "kind": "pause", "tenant": "mallory"}, actor="soar")
        with pytest.raises(Conflict):
            await alloc.threat_add({"id": "p1", "kind": "pause", "tenant": "eve"}, actor="soar")
        for bad, field in (({"id": "x", "kind": "boost", "tenant": "t"}, "action"),
                           ({"id": "x", "kind": "boost", "tenant": "t", "to": "godmode", "until": 1e12}, "to"),
                           ({"id": "x y", "kind": "pause", "tenant": "t"}, "action"),
                           ({"id": "x", "kind": "reserve", "target": "a", "slots": 0, "until": 1e12}, "slots"),
                           ({"id": "x", "kind": "boost", "tenant": "t", "to": "high", "until": 1.0}, "until")):
            with pytest.raises(InvalidRequest) as e:
                await alloc.threat_add(bad, actor="soar")
            assert e.value.field == field, (bad, e.value.field)

    async def second() -> tuple[frozenset[str], str]:
        alloc = make(tmp_path, [FakeBackend("a")])
        await alloc.ready()
        job = (await alloc.submit(prepared(tenant="mallory")))["id"]
        await asyncio.sleep(0.2)
        return alloc.d.paused, alloc.store.get(job).state.value

    run_async(first)
    paused, state = run_async(second)
    assert paused == frozenset({"mallory"}) and state == "queued"


def test_a_class_floor_keeps_the_schedulers_books_whole():
    """Raising and lowering a tenant's floor while jobs queue and age: the invariant check runs
    after every call (check_invariants), and the order follows the floor."""
    sched = Scheduler(SchedulerConfig(check_invariants=True, aging_s=5.0))
    sched.add_backend(BackendSpec("a", "simulator", "aer", 20, method="statevector", threads=1), node="n")
    sched.node_cpus["n"] = 1.0
    for i, (tenant, prio) in enumerate([("lab", "normal"), ("soc", "batch"), ("lab", "high"), ("soc", "normal")]):
        job = JobView(f"j{i}", 3, frozenset({"h"}), {}, 10, priority=prio, tenant=tenant)
        sched.enqueue(job, Plan(job.id, {"a": Estimate("a", 1.0, 1.0, 0.0)}), arrival=float(i))
    sched.set_class_floor("soc", "emergency", now=4.0)
    assert {j: e.cls for j, e in sched.entries.items()} == {"j0": "normal", "j1": "emergency", "j2": "high",
                                                          "j3": "emergency"}
    assert [d.entry.job.id for d in sched.decide(4.0).dispatch] == ["j1"]
    sched.set_class_floor("soc", None, now=10.0)      # j3 back to normal
    assert sched.entries["j3"].cls == "normal"
    sched.finish("j1")
    assert [d.entry.job.id for d in sched.decide(10.0).dispatch] == ["j2"]
    with pytest.raises(ValueError):
        sched.set_class_floor("soc", "urgent", now=10.0)
    with pytest.raises(InvalidRequest):
        parse_action({"id": "z", "kind": "pause"})
