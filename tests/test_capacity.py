"""Foreign CPU load: a pool plans on the cores its node has free of other work, never below one,
and a reading that only caught our own runs takes nothing away. Against a simple reference over
random readings, and on the real scheduler's wait estimates."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_qalloc.placement.capacity import ForeignLoad


def test_our_own_runs_are_not_foreign_and_noise_is_ignored():
    f = ForeignLoad(slack=0.5)
    assert f.update("p", 8, busy=4.0, own_threads=4.0) == 8       # all ours
    assert f.update("p", 8, busy=4.3, own_threads=4.0) == 8       # noise within the slack
    assert f.update("p", 8, busy=None, own_threads=0.0) == 8      # not measured: all cores


def test_a_foreign_job_takes_cores_off_and_gives_them_back_when_it_ends():
    f = ForeignLoad(slack=0.5, alpha=1.0)
    assert f.update("p", 8, busy=5.0, own_threads=1.0) == 5       # 4 foreign -> 3.5 beyond slack -> 3 off
    assert f.update("p", 8, busy=8.0, own_threads=0.0) == 1       # never below one
    assert f.update("p", 8, busy=1.0, own_threads=1.0) == 8


def test_one_reading_moves_the_plan_only_halfway():
    f = ForeignLoad(slack=0.5, alpha=0.5)
    assert f.update("p", 4, busy=0.0, own_threads=0.0) == 4
    assert f.update("p", 4, busy=4.0, own_threads=0.0) == 3       # smoothed: 2.0 foreign -> 1 core off
    assert f.update("p", 4, busy=4.0, own_threads=0.0) == 2       # 3.0 -> 2 off


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 64), st.floats(0, 64)), min_size=1, max_size=20),
       st.integers(1, 64), st.floats(0, 2))
def test_against_a_reference(readings, cores, slack):
    f = ForeignLoad(slack=slack, alpha=0.5)
    ref = None
    for busy, own in readings:
        got = f.update("p", cores, busy, own)
        raw = max(busy - own, 0.0)
        ref = raw if ref is None else 0.5 * raw + 0.5 * ref
        want = max(cores - math.floor(max(ref - slack, 0.0)), 1)
        assert got == want
        assert 1 <= got <= cores


def test_the_allocator_plans_fewer_cores_on_a_pool_shared_with_foreign_work(tmp_path):
    """On the real allocator: foreign load on the pool's node shows in its planned cores."""
    import asyncio

    from ray_qalloc.allocator import Allocator
    from ray_qalloc.backends.pools import pool_candidate_specs
    from ray_qalloc.config import load_settings
    from tests.test_allocator_unit import FakeBackend

    specs = pool_candidate_specs("cpu-test", cores=4, memory_bytes=8 << 30, methods=["statevector"])[:1]
    fake = FakeBackend("cpu-test")

    async def main():
        cfg = load_settings(data_dir=tmp_path, health_interval_s=60.0, history_flush_s=60.0)
        alloc = Allocator(cfg, members={specs[0].name: (specs[0], fake)}, node_cpus={"cpu-test": 4.0})
        await alloc.ready()
        before = alloc.sched.node_cpus["cpu-test"]
        alloc.d.pool_measured("cpu-test", 4, 3.9)      # a foreign job holds ~4 cores
        alloc.d.pool_measured("cpu-test", 4, 3.9)
        shared = alloc.sched.node_cpus["cpu-test"]
        rows = await alloc.pools()
        alloc.d.pool_measured("cpu-test", 4, 0.0)
        alloc.d.pool_measured("cpu-test", 4, 0.0)
        alloc.d.pool_measured("cpu-test", 4, 0.0)
        return before, shared, rows, alloc.sched.node_cpus["cpu-test"]

    before, shared, rows, after = asyncio.run(asyncio.wait_for(main(), 30))
    assert before == 4 and shared == 1 and after == 4
    assert rows and rows[0]["plan_cores"] == 1 and rows[0]["foreign_cores"] > 3


def test_a_real_foreign_process_is_seen_by_the_live_pool(qa):
    """Real Ray, the real pool and its node sampler: busy processes that are not ours take
    cores off the pool's plan while they run, and give them back when they end. (The session's
    allocator runs with foreign_cpu off, as every test process on this one machine would count
    as foreign; it is switched on live here.)"""
    import subprocess
    import sys
    import time

    import ray

    def pool_row() -> dict:
        return next(r for r in ray.get(qa.allocator.pools.remote(), timeout=30) if not r["elastic"])

    def wait_for(cond, what: str, limit: float = 30.0) -> dict:
        end = time.monotonic() + limit
        while True:
            row = pool_row()
            if cond(row):
                return row
            assert time.monotonic() < end, f"timed out waiting for {what}: {row}"
            time.sleep(0.25)

    cores = pool_row()["cores"]
    ray.get(qa.allocator.set_config.remote({"placement.foreign_cpu": True}, "test"), timeout=30)
    time.sleep(3.0)                         # a few node samples with foreign_cpu on
    before = pool_row()
    if before["plan_cores"] < cores:        # other work on this machine (not a test's) is foreign too
        ray.get(qa.allocator.set_config.remote({}, "test", ["placement.foreign_cpu"]), timeout=30)
        pytest.skip(f"the machine is busy before the test starts ({before['foreign_cores']:.1f} foreign "
                    f"cores): nothing left for busy processes to take off the plan")
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(int(cores))]
    try:
        busy = wait_for(lambda r: r["plan_cores"] < cores, "the pool to plan fewer cores")
        assert busy["foreign_cores"] > 0.5 and busy["plan_cores"] >= 1, busy
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    try:
        wait_for(lambda r: r["plan_cores"] == cores, "the cores back")
    finally:
        ray.get(qa.allocator.set_config.remote({}, "test", ["placement.foreign_cpu"]), timeout=30)
