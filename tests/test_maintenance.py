"""Cordon, drain, uncordon and maintenance windows on the allocator (small fake backends, no
Ray): queued jobs go to their next-best backend, running ones finish, nothing is lost, a job
with nowhere else to go waits; changes are audited and survive a restart."""

from __future__ import annotations

import asyncio
import time

import pytest

from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.jobs import Intent
from ray_qalloc.exceptions import UnknownBackend
from ray_qalloc.maintenance import MaintenanceBook, MaintenanceWindow
from ray_qalloc.placement.model import Estimate, JobView, Plan
from ray_qalloc.placement.scheduler import Scheduler, SchedulerConfig
from tests.helpers import prepared
from tests.test_allocator_unit import FakeBackend, make, run_async, sim


def qpu(name: str) -> BackendSpec:
    return BackendSpec(name, "qpu", "fake_qpu", 27, device=name, noisy=True, threads=0)


def test_cordoned_backend_gets_no_new_runs_and_running_ones_finish(tmp_path):
    async def main():
        a, b = FakeBackend("a", delay=0.3), FakeBackend("b", delay=0.05)
        alloc = make(tmp_path, [a, b])
        first = await alloc.submit(prepared(backends=("a",)))      # runs on a
        await asyncio.sleep(0.1)
        st = await alloc.cordon("a", reason="firmware update", actor="ops@site")
        later = [await alloc.submit(prepared()) for _ in range(5)]
        recs = [await alloc.wait(j["id"], timeout=10) for j in [first, *later]]
        ex = await alloc.explain(later[0]["id"])
        return st, recs, ex, alloc

    st, recs, ex, alloc = run_async(main)
    assert st["backends"][0]["cordoned"] and st["backends"][0]["running"] == [recs[0]["id"]]
    assert recs[0]["state"] == "completed" and recs[0]["result"]["backend"] == "a"   # not stopped
    assert all(r["state"] == "completed" and r["result"]["backend"] == "b" for r in recs[1:])
    assert "cordoned by ops@site: firmware update" in ex["backends"]["a"]["maintenance"]
    audit = alloc.admin.audit()
    assert audit[0]["action"] == "cordon" and audit[0]["actor"] == "ops@site"
    assert audit[0]["old"] is None and audit[0]["new"]["backends"]["a"]["cordoned"] is True


def test_a_job_allowed_only_on_a_cordoned_backend_waits_and_runs_after_uncordon(tmp_path):
    async def main():
        alloc = make(tmp_path, [FakeBackend("a"), FakeBackend("b")])
        await alloc.cordon("a")
        j = await alloc.submit(prepared(backends=("a",)))
        await asyncio.sleep(0.3)
        waiting = (await alloc.status(j["id"]))["state"]
        st = await alloc.maintenance("a")
        await alloc.uncordon("a")
        rec = await alloc.wait(j["id"], timeout=10)
        return waiting, st, rec

    waiting, st, rec = run_async(main)
    assert waiting == "queued"                           # not failed: it waits for the backend
    assert st["backends"][0]["waiting_for_it"] and st["backends"][0]["waiting_for_it"][0]
    assert rec["state"] == "completed" and rec["result"]["backend"] == "a"


def test_drain_of_a_busy_qpu_moves_queued_jobs_and_loses_none(tmp_path):
    """Quantum jobs go to the other QPU, auto jobs may go to the simulator; every job completes
    exactly once; the drain returns once the QPU's running job ended."""
    async def main():
        q1, q2, s = FakeBackend("q1", delay=0.2), FakeBackend("q2", delay=0.2), FakeBackend("s", delay=0.02)
        alloc = make(tmp_path, [q1, q2, s], [qpu("q1"), qpu("q2"), sim("s")])
        jobs = [await alloc.submit(prepared(intent=Intent.QUANTUM if i % 2 else Intent.AUTO))
                for i in range(16)]
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        st = await alloc.drain(10.0, name="q1", reason="recalibration")
        drain_s = time.monotonic() - t0
        started_after = time.time()
        recs = [await alloc.wait(j["id"], timeout=30) for j in jobs]
        return st, drain_s, started_after, recs, alloc

    st, drain_s, started_after, recs, alloc = run_async(main)
    assert st["drained"] and st["backends"][0]["draining"]
    assert drain_s < 5.0
    assert all(r["state"] == "completed" for r in recs)
    for r in recs:
        hist = r["attempt_history"]
        assert [h["outcome"] for h in hist].count("completed") == 1
        names = [t["name"] for t in alloc.store.transitions(r["id"])]
        assert names.count("complete") == 1
        for h in hist:        # nothing started on the drained QPU after the drain returned
            assert not (h["backend"] == "q1" and h["started_at"] > started_after)
        if r["intent"] == "quantum":
            assert r["result"]["backend"] in ("q1", "q2")


def test_maintenance_survives_a_restart(tmp_path):
    async def first():
        alloc = make(tmp_path, [FakeBackend("a"), FakeBackend("b")])
        await alloc.cordon("a", reason="broken fridge", actor="alice")
        await alloc.maintenance_window("b", time.time() + 3600, time.time() + 7200, "vendor", actor="bob")

    async def second():
        alloc = make(tmp_path, [FakeBackend("a"), FakeBackend("b")])
        j = await alloc.submit(prepared())
        rec = await alloc.wait(j["id"], timeout=10)
        return rec, await alloc.maintenance(), await alloc.audit()

    run_async(first)
    rec, st, audit = run_async(second)
    rows = {r["backend"]: r for r in st["backends"]}
    assert rows["a"]["cordoned"] and rows["a"]["reason"] == "broken fridge"
    assert len(rows["b"]["windows"]) == 1
    assert rec["result"]["backend"] == "b"               # a is still cordoned after the restart
    assert [x["actor"] for x in audit] == ["bob", "alice"]


def test_unknown_names_and_bad_windows_are_refused(tmp_path):
    async def main():
        alloc = make(tmp_path, [FakeBackend("a")])
        with pytest.raises(UnknownBackend, match="no backend, pool or QPU named 'nope'"):
            await alloc.cordon("nope")
        with pytest.raises(ValueError, match="must be after start"):
            MaintenanceWindow(start=10.0, end=5.0)
        with pytest.raises(Exception, match="has passed"):
            await alloc.maintenance_window("a", 1.0, 2.0)
        return await alloc.audit()

    assert run_async(main) == []                         # nothing refused was recorded


def test_a_pool_name_cordons_all_its_variants(tmp_path):
    async def main():
        fakes = [FakeBackend("p/sv"), FakeBackend("p/mps"), FakeBackend("b")]
        alloc = make(tmp_path, fakes, [sim("p/sv", pool="p"), sim("p/mps", pool="p"), sim("b")], cpus=2.0)
        st = await alloc.cordon("p")
        j = await alloc.submit(prepared())
        return st, await alloc.wait(j["id"], timeout=10)

    st, rec = run_async(main)
    assert sorted(r["backend"] for r in st["backends"]) == ["p/mps", "p/sv"]
    assert rec["result"]["backend"] == "b"


# ---- windows, on the scheduler -----------------------------------------------------------------
def _sched() -> Scheduler:
    s = Scheduler(SchedulerConfig(), node_cpus={"n": 4.0})
    s.add_backend(BackendSpec("x", "simulator", "aer", 30, threads=1, pool="n"), node="n")
    s.add_backend(BackendSpec("y", "simulator", "aer", 30, threads=1, pool="n"), node="n")
    return s


def _job(i: int, run_x: float, run_y: float) -> tuple[JobView, Plan]:
    job = JobView(f"j{i}", 5, frozenset({"h"}), {}, 100)
    return job, Plan(job.id, {"x": Estimate("x", run_x, 1.0, 0.0), "y": Estimate("y", run_y, 1.0, 0.0)})


def test_a_run_that_would_reach_a_window_starts_elsewhere_or_waits():
    s = _sched()
    s.set_windows("x", [(100.0, 200.0)])
    long_job, p1 = _job(1, 50.0, 80.0)        # x is faster, but 60 + 50 > 100: y
    short_job, p2 = _job(2, 10.0, 80.0)       # 60 + 10 < 100: x
    s.enqueue(long_job, p1, 0.0)
    s.enqueue(short_job, p2, 0.0)
    got = {d.entry.job.id: d.choice.backend for d in s.decide(60.0).dispatch}
    assert got == {"j1": "y", "j2": "x"}


def test_no_run_starts_during_a_window_and_one_starts_after_it():
    s = _sched()
    s.set_windows("x", [(100.0, 200.0)])
    s.set_health("y", False)
    job, p = _job(1, 1.0, 1.0)
    s.enqueue(job, p, 0.0)
    assert s.decide(150.0).dispatch == []       # in the window, y down: it waits
    assert [d.choice.backend for d in s.decide(200.0).dispatch] == ["x"]


def test_book_prunes_ended_windows_and_idle_backends():
    book = MaintenanceBook.model_validate({"backends": {
        "a": {"windows": [{"start": 1, "end": 2}]},
        "b": {"cordoned": True, "windows": [{"start": 1, "end": 2}, {"start": 5, "end": 9}]}}})
    pruned = book.prune(3.0)
    assert set(pruned.backends) == {"b"} and [w.start for w in pruned.backends["b"].windows] == [5]
