"""Hedging and stopping, live: a real PoolActor on the session's Ray runs a volume-law circuit
that the cost model wrongly believes is fast on MPS. The run overruns, a backup starts on
statevector, the first result wins and the MPS run is stopped (its core comes back); the next
job of the same circuit goes to statevector at once (run memory). With no core free for a
backup, the overrunning run itself is stopped and the job placed again without MPS."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, Sequence

import pytest
import ray

from ray_qalloc.allocator import Allocator
from ray_qalloc.backends.pool_actor import RemotePoolActor, pool_actor_options
from ray_qalloc.backends.pools import pool_candidate_specs
from ray_qalloc.config import Limits, load_settings
from ray_qalloc.costmodel.prior import HeuristicPrior
from ray_qalloc.jobs import make_spec, prepare_job
from ray_qalloc.placement import BackendView, Estimate, JobView

pytestmark = pytest.mark.timeout(300)


class MpsOptimist:
    """The heuristic prior, except that it believes MPS runs in a hundredth of the statevector's
    time, with certainty: the kind of model error a circuit unlike the training data causes.
    (Relative to the statevector estimate, not to the prior's MPS one: the prior itself now
    sees a volume-law circuit's bond dimension, and a fixed shrink of it no longer fools it.)"""

    source = "test:mps-optimist"

    def __init__(self) -> None:
        self.base = HeuristicPrior()

    def predict(self, job: JobView, backends: Sequence[BackendView]) -> list[Estimate]:
        est = self.base.predict(job, backends)
        sv = min((e.runtime_s for e in est if e.backend.endswith("/statevector")), default=1.0)
        return [dataclasses.replace(e, runtime_s=sv / 100.0, log_sd=0.0) if e.backend.endswith("/mps") else e
                for e in est]


def volume_law(n: int):
    from qiskit.circuit.library import quantum_volume

    qc = quantum_volume(n, seed=3).decompose()
    qc.measure_all()
    return qc


def test_an_overrunning_run_is_hedged_and_the_loser_is_stopped(qa, tmp_path):
    node = ray.get_runtime_context().get_node_id()
    pool = "cpu-hedge"
    actor = RemotePoolActor.options(**pool_actor_options(pool, node, "hedge-test", use_resource=False)).remote(
        pool, node, ("statevector",))
    specs = pool_candidate_specs(pool, cores=2, memory_bytes=4 << 30,
                                 methods=["matrix_product_state", "statevector"])
    specs = [s for s in specs if s.threads == 1]
    settings = load_settings(data_dir=tmp_path, health_interval_s=0.5, history_flush_s=60.0,
                             hedge={"overrun_factor": 3.0, "min_overrun_s": 0.5, "interval_s": 0.1,
                                    "probe_idle": False})     # the overrun alone (probes: the test below)
    job = prepare_job(make_spec(circuit=volume_law(18), shots=100), Limits())
    again = prepare_job(make_spec(circuit=volume_law(18), shots=100), Limits())

    async def main() -> tuple[Any, ...]:
        alloc = Allocator(settings, members={s.name: (s, actor) for s in specs}, node_cpus={pool: 2.0},
                          predictor=MpsOptimist())
        await alloc.ready()
        t0 = time.monotonic()
        first = await alloc.submit(job)
        rec = await alloc.wait(first["id"], timeout=120)
        took = time.monotonic() - t0
        await asyncio.sleep(1.0)
        running_after = await _aref(actor.running.remote())
        second = await alloc.submit(again)
        rec2 = await alloc.wait(second["id"], timeout=120)
        ex2 = await alloc.explain(second["id"])
        stats = await alloc.stats()
        return rec, took, running_after, rec2, ex2, stats

    rec, took, running_after, rec2, ex2, stats = asyncio.run(main())
    ray.kill(actor)
    history = [(h["backend"], h["outcome"]) for h in rec["attempt_history"]]
    assert rec["state"] == "completed"
    assert history == [(f"{pool}/mps", "hedge_lost"), (f"{pool}/statevector", "completed")], history
    assert rec["result"]["backend"] == f"{pool}/statevector"
    assert took < 30.0                     # MPS alone runs for minutes on this circuit
    assert running_after == []             # the losing MPS run was stopped, not left to burn a core
    assert stats["hedges"] == 1
    # the next job of the same circuit is placed by what ran, not by the model's guess
    assert rec2["result"]["backend"] == f"{pool}/statevector"
    assert [h["outcome"] for h in rec2["attempt_history"]] == ["completed"]
    assert ex2["backends"][f"{pool}/mps"]["source"].startswith("memory")


def test_an_overrunning_run_with_no_free_core_is_stopped_and_placed_again(qa, tmp_path):
    """The same wrong prediction on a pool with ONE core: no backup can start beside the MPS run,
    which would hold the core until the hard timeout. It is stopped (its core comes back) and the
    job placed again without MPS, keeping its place; it completes on statevector."""
    node = ray.get_runtime_context().get_node_id()
    pool = "cpu-restart"
    actor = RemotePoolActor.options(**pool_actor_options(pool, node, "restart-test", use_resource=False)).remote(
        pool, node, ("statevector",))
    specs = [s for s in pool_candidate_specs(pool, cores=1, memory_bytes=4 << 30,
                                             methods=["matrix_product_state", "statevector"]) if s.threads == 1]
    settings = load_settings(data_dir=tmp_path, health_interval_s=0.5, history_flush_s=60.0,
                             hedge={"overrun_factor": 3.0, "min_overrun_s": 0.5, "interval_s": 0.1,
                                    "probe_idle": False})
    job = prepare_job(make_spec(circuit=volume_law(18), shots=100), Limits())

    async def main() -> tuple[Any, ...]:
        alloc = Allocator(settings, members={s.name: (s, actor) for s in specs}, node_cpus={pool: 1.0},
                          predictor=MpsOptimist())
        # a one-core node: the pool's ping reports this machine's cores, which would give the
        # scheduler a second core for a backup
        alloc.d.pool_measured = lambda *args, **kwargs: None  # type: ignore[method-assign]
        await alloc.ready()
        t0 = time.monotonic()
        first = await alloc.submit(job)
        rec = await alloc.wait(first["id"], timeout=120)
        took = time.monotonic() - t0
        await asyncio.sleep(1.0)
        return rec, took, await _aref(actor.running.remote()), await alloc.stats()

    rec, took, running_after, stats = asyncio.run(main())
    ray.kill(actor)
    history = [(h["backend"], h["outcome"]) for h in rec["attempt_history"]]
    assert rec["state"] == "completed"
    assert history == [(f"{pool}/mps", "restarted"), (f"{pool}/statevector", "completed")], history
    assert took < 30.0                     # MPS alone runs for minutes on this circuit
    assert running_after == []             # the MPS run was stopped, not left to burn the core
    assert stats["restarts"] == 1 and stats["hedges"] == 0


class MpsPessimist(MpsOptimist):
    """Believes MPS 1000× slower than the prior says: the model error no overrun ever reveals."""

    source = "test:mps-pessimist"

    def predict(self, job: JobView, backends: Sequence[BackendView]) -> list[Estimate]:
        return [dataclasses.replace(e, runtime_s=e.runtime_s * (1000.0 if e.backend.endswith("/mps") else 1.0),
                                    log_sd=0.0 if e.backend.endswith("/mps") else e.log_sd)
                for e in self.base.predict(job, backends)]


def test_an_idle_core_races_a_method_the_model_believes_slow(qa, tmp_path):
    """QFT-20: statevector ~0.3 s on one thread, MPS ~0.03 s, but the model says MPS is very slow.
    With a core idle and nothing queued, the statevector run gets an MPS probe beside it; MPS
    wins, the statevector run is stopped and remembered as a lower bound, and the next job of the
    circuit goes to MPS at once."""
    from qiskit.circuit.library import QFT

    node = ray.get_runtime_context().get_node_id()
    pool = "cpu-probe"
    actor = RemotePoolActor.options(**pool_actor_options(pool, node, "probe-test", use_resource=False)).remote(
        pool, node, ("statevector", "matrix_product_state"))
    specs = [s for s in pool_candidate_specs(pool, cores=2, memory_bytes=4 << 30,
                                             methods=["matrix_product_state", "statevector"]) if s.threads == 1]
    settings = load_settings(data_dir=tmp_path, health_interval_s=0.5, history_flush_s=60.0)
    qft = QFT(20).decompose()
    qft.measure_all()
    first, again = (prepare_job(make_spec(circuit=qft, shots=100), Limits()) for _ in range(2))

    async def main() -> tuple[Any, ...]:
        alloc = Allocator(settings, members={s.name: (s, actor) for s in specs}, node_cpus={pool: 2.0},
                          predictor=MpsPessimist())
        await alloc.ready()
        a = await alloc.submit(first)
        rec = await alloc.wait(a["id"], timeout=120)
        await asyncio.sleep(0.5)
        b = await alloc.submit(again)
        rec2 = await alloc.wait(b["id"], timeout=120)
        return rec, rec2, await alloc.stats(), await alloc.explain(b["id"])

    rec, rec2, stats, ex2 = asyncio.run(main())
    ray.kill(actor)
    history = [(h["backend"], h["outcome"]) for h in rec["attempt_history"]]
    assert history == [(f"{pool}/statevector", "hedge_lost"), (f"{pool}/mps", "completed")], history
    assert stats["probes"] == 1 and stats["hedges"] == 0, (rec2["attempt_history"], ex2["backends"][f"{pool}/statevector"], ex2["backends"][f"{pool}/mps"])
    assert rec2["result"]["backend"] == f"{pool}/mps"            # memory: MPS measured, statevector bounded
    assert ex2["backends"][f"{pool}/mps"]["source"] == "memory:exact"
    assert ex2["backends"][f"{pool}/statevector"]["source"].startswith("memory")


async def _aref(ref: Any) -> Any:
    return await ref
