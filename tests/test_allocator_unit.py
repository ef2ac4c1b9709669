"""The Allocator's logic with small fake backends (no Ray): timeouts, failover, recovery,
exactly-once completion, per-node CPU accounting, refusal of impossible jobs."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import pytest
from ray.exceptions import RayActorError

from ray_qalloc.allocator import Allocator
from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.config import load_settings
from ray_qalloc.exceptions import BackendError, NoFeasibleBackend, StoreError
from ray_qalloc.jobs import JobState
from ray_qalloc.store import JobStore
from tests.helpers import prepared


class FakeMethod:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.calls: list[tuple] = []

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(args)
        return self.fn(*args, **kwargs)


class FakeBackend:
    """Answers like a BackendActor; ``behaviour`` decides what ``run`` does."""

    def __init__(self, name: str, behaviour: str = "ok", delay: float = 0.0, node: str = "n1") -> None:
        self.name, self.behaviour, self.delay, self.node = name, behaviour, delay, node
        self.hang = asyncio.Event()
        self.ping = FakeMethod(self._ping)
        self.calibration = FakeMethod(self._calibration)
        self.run = FakeMethod(self._run)
        self.attach = FakeMethod(self._attach)
        self.stop = FakeMethod(self._stop)
        self.warmed = FakeMethod(self._warmed)
        self.stopped: list[tuple[str, int]] = []
        self.known: dict[tuple[str, int], dict[str, Any]] = {}

    async def _ping(self) -> dict[str, Any]:
        return {"node_id": self.node}

    async def _calibration(self) -> None:
        return None

    async def _warmed(self, timeout_s: float = 0.0) -> bool:
        return True

    def _stop(self, job_id: str, attempt: int) -> bool:   # fire and forget, like the real call
        self.stopped.append((job_id, attempt))
        return True

    async def _run(self, job_id: str, attempt: int, payload: bytes, shots: int, **variant: Any) -> dict[str, Any]:
        await asyncio.sleep(self.delay)
        if self.behaviour == "hang":
            await self.hang.wait()
        if self.behaviour == "die":
            raise RayActorError()
        if self.behaviour == "error":
            raise BackendError("cannot run this circuit here", fix="try another backend")
        return {"counts": {"000": shots}, "shots": shots, "backend": variant.get("name", self.name), "wall_s": self.delay,
                "metadata": {}}

    async def _attach(self, job_id: str, attempt: int) -> dict[str, Any] | None:
        return self.known.get((job_id, attempt))


def sim(name: str, threads: int = 1, pool: str | None = None) -> BackendSpec:
    """A simulator backend of its own, or with ``pool`` a method variant of that pool (all
    variants of a pool share its actor and its cores, ``cpus``)."""
    return BackendSpec(name, "simulator", "aer", 30, method="statevector", memory_bytes=2**30,
                       threads=threads, pool=pool)


def run_async(coro_fn: Callable[[], Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(), 60))


def make(tmp_path, fakes: list[FakeBackend], specs: list[BackendSpec] | None = None, cpus: float = 4.0,
         **settings: Any) -> Allocator:
    cfg = load_settings(data_dir=tmp_path, health_interval_s=0.05, history_flush_s=60.0, **settings)
    specs = specs or [sim(f.name) for f in fakes]
    members = {s.name: (s, f) for s, f in zip(specs, fakes)}
    return Allocator(cfg, members=members, node_cpus={"n1": cpus, **{f"backend:{s.name}": cpus for s in specs}})


def test_timed_out_attempt_fails_over_and_late_result_is_ignored(tmp_path):
    async def main():
        a, b = FakeBackend("a", "hang"), FakeBackend("b")
        alloc = make(tmp_path, [a, b], run_timeout_floor_s=0.05, run_timeout_factor=1.5,
                     hedge={"enabled": False})        # the timeout alone (hedging is tested apart)
        out = await alloc.submit(prepared(shots=10))
        rec = await alloc.wait(out["id"], timeout=10)
        a.hang.set()  # the hung run finally answers: must not be recorded
        await asyncio.sleep(0.05)
        return alloc, rec

    alloc, rec = run_async(main)
    assert rec["state"] == "completed" and rec["result"]["backend"] == "b"
    outcomes = [(h["backend"], h["outcome"]) for h in rec["attempt_history"]]
    assert outcomes == [("a", "timed_out"), ("b", "completed")]
    names = [t["name"] for t in alloc.store.transitions(rec["id"])]
    assert names.count("complete") == 1


@pytest.mark.parametrize("behaviour, outcome", [("die", "actor_died"), ("error", "backend_error")])
def test_failures_fail_over_with_the_backend_blocked(tmp_path, behaviour, outcome):
    async def main():
        alloc = make(tmp_path, [FakeBackend("a", behaviour), FakeBackend("b")])
        out = await alloc.submit(prepared())
        return await alloc.wait(out["id"], timeout=10)

    rec = run_async(main)
    assert rec["state"] == "completed"
    assert [(h["backend"], h["outcome"]) for h in rec["attempt_history"]] == [("a", outcome), ("b", "completed")]


def test_job_fails_when_every_backend_failed_it(tmp_path):
    async def main():
        alloc = make(tmp_path, [FakeBackend("a", "error"), FakeBackend("b", "error")])
        out = await alloc.submit(prepared())
        return await alloc.wait(out["id"], timeout=10)

    rec = run_async(main)
    assert rec["state"] == "failed" and "no other backend" in rec["error"]
    assert [h["outcome"] for h in rec["attempt_history"]] == ["backend_error", "backend_error"]


def test_impossible_job_is_refused_before_it_is_stored(tmp_path):
    async def main():
        alloc = make(tmp_path, [FakeBackend("a")])
        with pytest.raises(NoFeasibleBackend, match="needs 40 qubits"):
            await alloc.submit(prepared(num_qubits=40))
        return alloc

    alloc = run_async(main)
    assert alloc.store.counts_by_state() == {}


def test_node_cores_are_shared_by_simulator_backends(tmp_path):
    """Two methods on a one-core node: the second job waits although its backend is idle."""
    async def main():
        a, b = FakeBackend("a", delay=0.3), FakeBackend("b", delay=0.3)
        alloc = make(tmp_path, [a, b], [sim("a", pool="n1"), sim("b", pool="n1")], cpus=1.0)
        j1 = await alloc.submit(prepared(backends=("a",)))
        j2 = await alloc.submit(prepared(backends=("b",)))
        r1 = await alloc.wait(j1["id"], timeout=10)
        r2 = await alloc.wait(j2["id"], timeout=10)
        return r1, r2

    r1, r2 = run_async(main)
    s1 = r1["attempt_history"][0]
    s2 = r2["attempt_history"][0]
    assert s2["started_at"] >= s1["finished_at"] - 0.02


def test_restart_requeues_queued_and_reattaches_running_jobs(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    queued = prepared()
    running = prepared()
    lost = prepared()
    store.add_job(queued)
    store.add_job(running)
    store.add_job(lost)
    store.dispatch(running.id, "a", predicted_s=0.1, queued_at=time.time())
    store.dispatch(lost.id, "a", predicted_s=0.1, queued_at=time.time())
    a = FakeBackend("a")
    a.known[(running.id, 1)] = {"counts": {"1": 7}, "shots": 7, "backend": "a", "wall_s": 0.1, "metadata": {}}

    async def main():
        alloc = make(tmp_path, [a])
        return [await alloc.wait(j.id, timeout=10) for j in (queued, running, lost)]

    recs = run_async(main)
    assert all(r["state"] == "completed" for r in recs)
    assert recs[1]["result"]["counts"] == {"1": 7}          # re-attached: not run again
    assert all(call[0] != running.id for call in a.run.calls)
    lost_history = [h["outcome"] for h in recs[2]["attempt_history"]]
    assert lost_history == ["lost", "completed"]            # the actor no longer knew it: re-run
    assert store.get(running.id).state == JobState.COMPLETED


def test_a_job_that_cannot_meet_its_deadline_is_flagged_at_submit(tmp_path):
    async def main():
        alloc = make(tmp_path, [FakeBackend("a", delay=0.3)])
        busy = await alloc.submit(prepared())
        late = await alloc.submit(prepared(deadline_s=0.001))    # predicted run alone is longer
        rec = await alloc.wait(late["id"], timeout=10)
        ex = await alloc.explain(late["id"])
        await alloc.wait(busy["id"], timeout=10)
        return late, rec, ex

    late, rec, ex = run_async(main)
    assert late["flag"] and "deadline" in late["flag"]
    assert rec["state"] == "completed" and rec["flag"] == late["flag"]     # still runs, flagged
    assert ex["flag"] == late["flag"]


def test_tenant_permissions_are_enforced_at_placement(tmp_path):
    async def main():
        alloc = make(tmp_path, [FakeBackend("a"), FakeBackend("b")], tenant_backends={"t1": ["b"]})
        mine = await alloc.submit(prepared(tenant="t1"))
        other = await alloc.submit(prepared(tenant="t2", backends=("a",)))
        with pytest.raises(NoFeasibleBackend, match="may not use"):
            await alloc.submit(prepared(tenant="t1", backends=("a",)))
        return await alloc.wait(mine["id"], timeout=10), await alloc.wait(other["id"], timeout=10)

    mine, other = run_async(main)
    assert mine["result"]["backend"] == "b" and other["result"]["backend"] == "a"


def test_a_job_waits_for_its_only_backend_to_recover_instead_of_failing(tmp_path):
    """Health is live state, not a plan filter: a job for a restarting backend waits for it."""
    async def main():
        a = FakeBackend("a")
        alloc = make(tmp_path, [a])
        await alloc.ready()
        healthy_ping = a.ping.fn

        async def down() -> dict[str, Any]:
            raise RayActorError()

        a.ping.fn = down
        await asyncio.sleep(0.2)          # a health check sees it down
        assert not alloc.members["a"].healthy
        out = await alloc.submit(prepared())
        await asyncio.sleep(0.2)
        assert alloc.store.get(out["id"]).state == JobState.QUEUED     # waiting, not failed
        a.ping.fn = healthy_ping          # it comes back
        return await alloc.wait(out["id"], timeout=10)

    rec = run_async(main)
    assert rec["state"] == "completed" and rec["result"]["backend"] == "a"


def test_circuit_breaker_opens_after_repeated_failures_and_closes_after_a_good_run(tmp_path):
    async def main():
        bad, good = FakeBackend("bad", "error"), FakeBackend("good", delay=0.05)
        alloc = make(tmp_path, [bad, good], breaker_failures=2, breaker_cooldown_s=0.3)
        # each job may use either; "bad" is tried first for some (fastest prediction ties by name)
        outs = [await alloc.submit(prepared()) for _ in range(6)]
        recs = [await alloc.wait(o["id"], timeout=10) for o in outs]
        opened = alloc.members["bad"].breaker_open or alloc.members["bad"].cooldown_s > 0
        runs_on_bad = len(bad.run.calls)
        bad.behaviour = "ok"                        # repaired
        await asyncio.sleep(0.5)                    # cooldown passes, a probe half-opens it
        late = await alloc.submit(prepared(backends=("bad",)))
        late_rec = await alloc.wait(late["id"], timeout=10)
        return recs, opened, runs_on_bad, late_rec, alloc.members["bad"]

    recs, opened, runs_on_bad, late_rec, member = run_async(main)
    assert all(r["state"] == "completed" for r in recs)
    # the breaker stopped further runs on it: two failures open it; at most one trial run when the
    # 0.3 s cooldown ends while the six jobs are still being placed (without it: six runs)
    assert opened and runs_on_bad <= 3
    assert late_rec["state"] == "completed" and late_rec["result"]["backend"] == "bad"
    assert member.failures == 0 and not member.breaker_open and member.cooldown_s == 0.0


def test_drain_finishes_running_jobs_and_keeps_queued_ones_stored(tmp_path):
    async def main():
        a = FakeBackend("a", delay=0.2)
        alloc = make(tmp_path, [a])
        first = await alloc.submit(prepared())
        await asyncio.sleep(0.05)
        second = await alloc.submit(prepared())
        left = await alloc.drain(timeout_s=5)
        during = await alloc.submit(prepared())          # still accepted while draining
        await asyncio.sleep(0.3)
        states = [alloc.store.get(j["id"]).state for j in (first, second, during)]
        await alloc.resume()
        done = [await alloc.wait(j["id"], timeout=10) for j in (second, during)]
        return left, states, done

    left, states, done = run_async(main)
    assert left == {"running": 0, "queued": 1}
    assert states == [JobState.COMPLETED, JobState.QUEUED, JobState.QUEUED]
    assert all(d["state"] == "completed" for d in done)


def test_the_same_submit_call_twice_makes_one_job(tmp_path):
    """Ray re-sends an actor call whose first try may have committed (allocator restarted):
    the job is stored and run once."""
    async def main():
        a = FakeBackend("a", delay=0.2)
        alloc = make(tmp_path, [a])
        job = prepared()
        first = await alloc.submit(job)
        again = await alloc.submit(job)          # while it runs
        rec = await alloc.wait(job.id, timeout=10)
        late = await alloc.submit(job)           # after it finished
        return first, again, late, rec, alloc

    first, again, late, rec, alloc = run_async(main)
    assert first["created"] is True and again["created"] is False and late["created"] is False
    assert first["id"] == again["id"] == late["id"] == rec["id"]
    assert rec["state"] == "completed" and len(rec["attempt_history"]) == 1
    assert alloc.store.counts_by_state() == {"completed": 1}


def test_store_add_job_twice_with_the_same_job_is_not_an_error(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'j.db'}")
    job = prepared()
    assert store.add_job(job)[:2] == (job.id, True)
    assert store.add_job(job)[:2] == (job.id, False)
    other = prepared(id=job.id, payload=b"another circuit")
    with pytest.raises(StoreError):
        store.add_job(other)


def _no_phantoms(alloc: Allocator) -> None:
    """Every run the scheduler counts is a run the dispatcher watches, and vice versa."""
    watched = {r.sched_id for r in alloc.d._all_runs()}
    assert set(alloc.sched.runs) == watched, (set(alloc.sched.runs), watched)
    assert set(alloc.sched.entries) == set(alloc.d.queued)
    check = getattr(alloc.sched, "validate_state", None)
    if check is not None:
        check()


def test_a_submit_whose_commit_fails_leaves_no_phantom_run(tmp_path):
    """Regression: the pass made for a submit started runs before the job was committed; a store
    error (here a NUL byte in the idempotency key, refused by the store) left the pass's runs
    holding their slots with nobody running them. Now the pass is undone."""
    async def main():
        a = FakeBackend("a", delay=0.3)
        alloc = make(tmp_path, [a])
        busy = await alloc.submit(prepared())                    # takes the only slot
        waiting = await alloc.submit(prepared())                 # queued behind it
        await asyncio.sleep(0.05)
        before = len(a.run.calls)
        with pytest.raises(Exception, match="NUL"):
            await alloc.submit(prepared(idempotency_key="bad\x00key"))
        _no_phantoms(alloc)
        assert len(a.run.calls) == before
        recs = [await alloc.wait(j["id"], timeout=10) for j in (busy, waiting)]
        _no_phantoms(alloc)
        return alloc, recs

    alloc, recs = run_async(main)
    assert [r["state"] for r in recs] == ["completed", "completed"]
    assert alloc.store.counts_by_state() == {"completed": 2}      # nothing stored for the bad one


def test_a_dispatch_whose_commit_fails_keeps_the_job_in_line(tmp_path):
    """A database blip at dispatch: the job is not started (no phantom run), keeps its place,
    and starts at a later pass."""
    async def main():
        a = FakeBackend("a", delay=0.1)
        alloc = make(tmp_path, [a])
        first = await alloc.submit(prepared())
        second = await alloc.submit(prepared())
        real = alloc.store.dispatch
        failures = {"n": 0}

        def flaky(*args: Any, **kw: Any) -> Any:
            if failures["n"] == 0:
                failures["n"] += 1
                raise StoreError("database is locked", fix="retry")
            return real(*args, **kw)

        alloc.store.dispatch = flaky                 # the next dispatch commit fails once
        r1 = await alloc.wait(first["id"], timeout=10)
        await asyncio.sleep(0.05)
        _no_phantoms(alloc)
        r2 = await alloc.wait(second["id"], timeout=10)
        _no_phantoms(alloc)
        return alloc, r1, r2, failures["n"]

    alloc, r1, r2, n = run_async(main)
    assert n == 1 and alloc.d.commit_failures == 1
    assert r1["state"] == r2["state"] == "completed"
    assert len(r2["attempt_history"]) == 1          # started once, after the blip


def test_cancel_stops_the_run_on_its_pool(tmp_path):
    async def main():
        a = FakeBackend("a", "hang")
        alloc = make(tmp_path, [a], [sim("a", pool="n1")], cpus=1.0)
        job = await alloc.submit(prepared())
        await asyncio.sleep(0.05)
        assert await alloc.cancel(job["id"])
        await asyncio.sleep(0.05)
        _no_phantoms(alloc)
        return a, job, alloc

    a, job, alloc = run_async(main)
    assert a.stopped == [(job["id"], 1)]
    assert alloc.store.get(job["id"]).state == JobState.CANCELLED


def test_old_store_rows_naming_aer_methods_still_read_and_recover(tmp_path):
    """A store written by the per-method design: a queued job allowed on ``aer_statevector`` and a
    job RUNNING on the old ``aer_mps`` backend. After the upgrade the first runs on the pool's
    statevector, the second is placed again (its old executor is gone), both complete."""
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    queued = prepared(backends=("aer_statevector",))
    running = prepared()
    store.add_job(queued)
    store.add_job(running)
    store.dispatch(running.id, "aer_mps", predicted_s=0.1, queued_at=time.time())
    pool = FakeBackend("cpu-n1", delay=0.01)
    specs = [sim("cpu-n1/statevector", pool="cpu-n1"),
             BackendSpec("cpu-n1/mps", "simulator", "aer", 30, method="matrix_product_state", pool="cpu-n1")]

    async def main():
        alloc = Allocator(load_settings(data_dir=tmp_path, health_interval_s=0.05, history_flush_s=60.0),
                          members={s.name: (s, pool) for s in specs}, node_cpus={"cpu-n1": 2.0})
        return [await alloc.wait(j.id, timeout=10) for j in (queued, running)]

    q, r = run_async(main)
    assert q["state"] == r["state"] == "completed"
    assert q["result"]["backend"] == "cpu-n1/statevector"
    assert [(h["backend"], h["outcome"]) for h in r["attempt_history"]][0] == ("aer_mps", "requeued")
    assert store.get(running.id).allowed_backends is None


def test_a_pool_whose_node_is_gone_for_good_leaves_the_fleet(tmp_path):
    from ray_qalloc.fleet import DEAD_POOL_FORGET_S, Fleet, Host

    class Listener:
        def member_health(self, name: str, healthy: bool) -> None: ...
        def members_added(self, members: Any) -> None: ...
        def host_unreachable(self, host: Any, why: str) -> None: ...

    fleet = Fleet(load_settings(data_dir=tmp_path), Listener())
    for pool, node in (("cpu-aaaa", "aaaa1111"), ("cpu-bbbb", "bbbb2222")):
        fleet.hosts[pool] = Host(pool, "pool", None, node_id=node)
        fleet._add_members(fleet.hosts[pool], [sim(f"{pool}/statevector", pool=pool)])
    assert fleet.prune_dead_pools({"aaaa1111"}, set(), 100.0) == []          # just died: kept
    assert fleet.prune_dead_pools({"aaaa1111"}, {"cpu-bbbb/statevector"}, 100.0 + DEAD_POOL_FORGET_S + 1) == []
    gone = fleet.prune_dead_pools({"aaaa1111"}, set(), 100.0 + DEAD_POOL_FORGET_S + 1)
    assert gone == ["cpu-bbbb/statevector"] and set(fleet.hosts) == {"cpu-aaaa"}
    assert set(fleet.members) == {"cpu-aaaa/statevector"}
