"""Predictive scaling on a live allocator's parts (ray_qalloc.predictive_live): per-class history
from a real job store (placed jobs by their backend's class, queued ones by their plan's best
backend), pool nodes and QPU reservation targets from real fleet records, and one tick that
seeds per class, requests the bursting pool's shape and takes a reservation through the desk."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import sqlalchemy as sa

from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.fleet import Host, Member
from ray_qalloc.forecast_classes import CPU_POOL, GPU_POOL
from ray_qalloc.predictive import PredictiveController, PredictiveScalingSettings
from ray_qalloc.predictive_live import (class_history_from_store, mean_job_seconds_by_class, pools_by_class,
                                        queued_work_by_class, reserve_targets, scaling_tick)
from ray_qalloc.store import JobStore, jobs_table
from tests.helpers import prepared

BIN = 10.0
ION = "qpu:trapped_ion"


@dataclass
class _Est:
    runtime_s: float


@dataclass
class _Plan:
    """What ``autoscale.waiting_for`` reads of a placement plan (its ``PlanLike`` protocol)."""

    estimates: dict[str, _Est]
    filtered: dict[str, Any] = field(default_factory=dict)


def _add(store: JobStore, at: float, backend: str | None) -> str:
    job_id, _, _ = store.add_job(prepared(), now=at)
    if backend is not None:
        with store.engine.begin() as conn:
            conn.execute(sa.update(jobs_table).where(jobs_table.c.id == job_id).values(backend=backend))
    return job_id


def test_class_history_from_store(db_url):
    store = JobStore(db_url)
    try:
        since = 1_700_000_000.0
        _add(store, since + 1, "cpu-1a2b3c4d/mps")
        _add(store, since + 2, "aer_statevector_gpu")
        _add(store, since + 12, "qpu_ion_aria")
        _add(store, since + 13, "cpu-elastic/statevector")
        waiting = _add(store, since + 25, None)
        _add(store, since + 26, None)                     # neither placed nor queued: left out
        _add(store, since - 1, "qpu_ion_aria")             # before the window
        queued = {waiting: ION}
        jobs, events = class_history_from_store(store.engine, since, BIN, until=since + 30,
                                                unplaced=lambda i: queued.get(i))
        assert {c: v.tolist() for c, v in jobs.items()} == {
            CPU_POOL: [1, 1, 0], GPU_POOL: [1, 0, 0], ION: [0, 1, 1]}
        assert events.shape == (3, 3)
        assert mean_job_seconds_by_class(store.engine, since) == {}
    finally:
        store.close()


def _spec(name: str, slots: int = 1, pool: str | None = None) -> BackendSpec:
    return BackendSpec(name=name, kind="qpu" if pool is None else "simulator", family="fake_qpu", num_qubits=20,
                       slots=slots, pool=pool)


def test_pools_queue_and_reservation_targets_per_class():
    hosts = {"cpu-aaaa": Host("cpu-aaaa", "pool", object(), cores=8), "cpu-bbbb": Host("cpu-bbbb", "pool", object(), cores=16),
             "gpu-cccc": Host("gpu-cccc", "pool", object(), cores=4), "cpu-dead": Host("cpu-dead", "pool", None, cores=8),
             "qpu_torino": Host("qpu_torino", "backend", object())}
    count, cores = pools_by_class(hosts)
    assert count == {CPU_POOL: 2, GPU_POOL: 1} and cores == {CPU_POOL: 16.0, GPU_POOL: 4.0}
    members = {"qpu_ion_aria": Member(_spec("qpu_ion_aria", 2), "qpu_ion_aria", healthy=True),
               "qpu_fez": Member(_spec("qpu_fez", 1), "qpu_fez", healthy=True),
               "qpu_kyiv": Member(_spec("qpu_kyiv", 3), "qpu_kyiv", healthy=True),
               "qpu_torino": Member(_spec("qpu_torino", 5), "qpu_torino", healthy=False),
               "cpu-aaaa/mps": Member(_spec("cpu-aaaa/mps", 8, pool="cpu-aaaa"), "cpu-aaaa", healthy=True)}
    # per QPU class the healthy device with the most slots (torino has more, but is down); no pool
    assert reserve_targets(members) == {"qpu:superconducting": "qpu_kyiv", ION: "qpu_ion_aria"}
    queued = {"a": SimpleNamespace(plan=_Plan({"cpu-aaaa/mps": _Est(3.0), "qpu_torino": _Est(9.0)})),
              "b": SimpleNamespace(plan=_Plan({"qpu_ion_aria": _Est(5.0)})),
              "c": SimpleNamespace(plan=_Plan({}))}
    assert queued_work_by_class(queued) == {CPU_POOL: 3.0, ION: 5.0}


class _Desk:
    def __init__(self) -> None:
        self.actions: dict[str, Any] = {}


class _Alloc:
    """The allocator parts ``scaling_tick`` reads: a real store and controller, fleet records, a
    store thread stand-in that runs the call in place, and ``threat_add`` that records."""

    def __init__(self, store: JobStore, settings: PredictiveScalingSettings, sent: list) -> None:
        self.store, self.settings = store, SimpleNamespace(scaling=settings)
        self.scaling = PredictiveController(settings, lambda b: sent.append([dict(x) for x in b]))
        self.threat = _Desk()
        self.added: list[dict[str, Any]] = []
        self.fleet = SimpleNamespace(
            hosts={"cpu-aaaa": Host("cpu-aaaa", "pool", object(), cores=4), "gpu-cccc": Host("gpu-cccc", "pool", object(), cores=2)},
            members={"qpu_ion_aria": Member(_spec("qpu_ion_aria"), "qpu_ion_aria", healthy=True)})

        async def db(fn, *a, **kw):
            return fn(*a, **kw)

        self.d = SimpleNamespace(db=db, queued={})
        self._scaling_since = 0.0

    async def threat_add(self, raw: dict[str, Any], actor: str = "admin") -> dict[str, Any]:
        self.added.append(raw)
        self.threat.actions[raw["id"]] = raw
        return raw


def test_a_tick_seeds_per_class_and_scales_the_class_events_lead(tmp_path):
    """A stored history where high-severity events lead bursts of CPU-pool and trapped-ion jobs
    (GPU jobs: background only): one tick right after an event burst requests CPU-pool nodes
    only and reserves the trapped-ion device."""
    from ray_qalloc.integration.eventstore import EventStore, events_table

    store = JobStore(f"sqlite:///{tmp_path / 'j.db'}")
    EventStore(store.engine)
    settings = PredictiveScalingSettings(enabled=True, bin_s=BIN, horizon_s=90.0, boot_s=90.0, min_history_s=3600.0,
                                         history_s=3 * 3600.0, max_extra_nodes=6, reserve_on_surge=True)
    rng = np.random.default_rng(5)
    now = 1_700_000_000.0
    t0 = now - settings.history_s
    jobs: list = []
    events: list = []

    def ev(at: float, sev: int) -> None:
        us = int(at * 1_000_000)
        events.append({"tenant": "t", "id": f"e{len(events)}", "time": us, "received_at": us, "class_uid": 0,
                       "category_uid": 0, "severity_id": sev, "format": "cef", "message": None, "event": "{}", "raw": "x"})

    for t in np.arange(t0, now, 60.0):                    # background: a job a minute per class, a low event
        for b in ("cpu-aaaa/mps", "gpu-cccc/statevector", "qpu_ion_aria"):
            jobs.append((t + rng.uniform(0, 60), b))
        ev(t + rng.uniform(0, 60), 1)
    for s in np.arange(t0 + 300, now - 400, 900.0):        # event bursts, then job bursts 120 s later
        for k in range(24):
            ev(s + rng.uniform(0, 30), 5)
        for k in range(90):
            jobs.append((s + 120 + rng.uniform(0, 120), "cpu-aaaa/mps"))
        for k in range(20):
            jobs.append((s + 120 + rng.uniform(0, 120), "qpu_ion_aria"))
    burst = now - 20.0                                     # an event burst that ends as the tick comes
    for k in range(24):
        ev(burst + rng.uniform(0, 15), 5)
    store.add_jobs([prepared() for _ in jobs])
    with store.engine.begin() as conn:
        ids = [r[0] for r in conn.execute(sa.select(jobs_table.c.id).order_by(jobs_table.c.id))]
        for job_id, (at, backend) in zip(ids, jobs):
            conn.execute(sa.update(jobs_table).where(jobs_table.c.id == job_id).values(created_at=at, backend=backend))
        conn.execute(events_table.insert(), events)
    sent: list = []
    alloc = _Alloc(store, settings, sent)
    alloc.scaling.work_per_job_s = 20.0                    # no attempt is stored: the seed keeps this
    try:
        d = asyncio.run(scaling_tick(alloc, now))
    finally:
        store.close()
    assert alloc.scaling.seeded_by_class and set(alloc.scaling.reports) == {CPU_POOL, GPU_POOL, ION}
    assert "events" in alloc.scaling.reports[CPU_POOL].groups and "events" in alloc.scaling.reports[ION].groups
    assert "events" not in alloc.scaling.reports[GPU_POOL].groups
    assert d.per_class[CPU_POOL].requested_nodes >= 3
    assert d.per_class[GPU_POOL].requested_nodes <= 1
    shapes = [next(iter(b)) for b in sent[-1]]
    assert shapes.count("qalloc_pool_cpu") == d.per_class[CPU_POOL].requested_nodes
    assert [a["target"] for a in alloc.added] == ["qpu_ion_aria"]


def test_the_real_allocator_runs_the_per_class_hook(tmp_path):
    """The hook on a real Allocator (its store, store thread, fleet, queue and threat desk; fake
    backends): seeding and a tick after jobs ran count the jobs for the class they ran on, and
    the tick's request goes to the controller's sender."""
    from ray_qalloc.backends.pools import pool_candidate_specs
    from tests.test_allocator_unit import FakeBackend, make

    sent: list = []
    specs = pool_candidate_specs("cpu-live", cores=4, memory_bytes=8 << 30, methods=["statevector"])[:1]

    async def main() -> Any:
        alloc = make(tmp_path, [FakeBackend(specs[0].name)], specs=specs, hedge={"enabled": False})
        await alloc.ready()
        settings = PredictiveScalingSettings(enabled=True, bin_s=BIN, horizon_s=90.0, boot_s=90.0,
                                             min_history_s=3600.0, history_s=3600.0)
        alloc.scaling = PredictiveController(settings, lambda b: sent.append([dict(x) for x in b]))
        alloc.settings = alloc.settings.model_copy(update={"scaling": settings})
        await alloc._seed_scaling()
        ids = [(await alloc.submit(prepared(shots=10)))["id"] for _ in range(5)]
        for job_id in ids:
            assert (await alloc.wait(job_id, timeout=10))["state"] == "completed"
        await alloc._scaling_tick(time.time())
        return alloc

    alloc = asyncio.run(asyncio.wait_for(main(), 60))
    ctrl = alloc.scaling
    assert ctrl.seeded_by_class and ctrl.last is not None
    held = sum(ctrl._jobs.get(CPU_POOL, [])) + ctrl._open_jobs.get(CPU_POOL, 0.0)
    assert held == 5, (ctrl._jobs, ctrl._open_jobs)   # the five jobs, counted for the pool they ran on
