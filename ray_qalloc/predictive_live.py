"""Predictive scaling on a live allocator: per-class history, queue and capacity read from it.

Why a module of its own: ``predictive.PredictiveController`` decides from numbers (arrivals,
capacity, queued work per demand class); this module is where those numbers come from on a
running allocator — the job store (what arrived, on which class it ran), the queue's plans
(where a job not placed yet is headed), and the fleet (pool nodes per class, their cores, the
QPUs a class's reservation can go to). It only reads the allocator's parts and calls its
``threat_add``; the allocator's job path does not change.

The allocator's ops loop calls ``scaling_tick(alloc, now)`` (``ThreatOps._scaling_tick``). On the
first call it seeds the controller with the per-class history, replacing the one-series seed
that ``ThreatOps._seed_scaling`` made at start (that one counts every job as the CPU pool's).

A job's class is the class of the backend it ran on (``jobs.backend``, ``forecast_classes``); a
job still queued counts for the class of its plan's best backend (``autoscale.waiting_for``), the
one the reactive request would ask for. A job that was never placed and is not queued (refused,
cancelled) is demand no class served and is left out.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Any, Callable, Mapping

import numpy as np

from ray_qalloc.forecast_classes import CPU_POOL, demand_class, is_pool_class, pool_class_of_pool
from ray_qalloc.predictive import BANDS, Decision, history_from_store

log = logging.getLogger("ray_qalloc.predictive")

Unplaced = Callable[[str], "str | None"]     # job id -> the class a not-yet-placed job is headed for


def class_history_from_store(engine: Any, since: float, bin_s: float, *, until: float | None = None,
                             unplaced: Unplaced | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Jobs accepted per bin of ``bin_s`` from ``since`` to ``until`` (default now), per demand
    class, and security events per bin by severity band (``history_from_store``'s).

    Placed jobs: one aggregate query (GROUP BY bin, backend; a backend's class is mapped here).
    Jobs with no backend yet: their ids (few: the queue), classed by ``unplaced``."""
    import sqlalchemy as sa

    from ray_qalloc.store import jobs_table

    until = time.time() if until is None else until
    _, events = history_from_store(engine, since, bin_s, until=until)   # events: its second query
    n = events.shape[0]
    jobs: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(n))
    if n == 0:
        return {}, events
    bin_us = int(round(bin_s * 1_000_000))
    j = jobs_table.c
    jb = (sa.cast((j.created_at - sa.literal(float(since))) * 1_000_000, sa.BigInteger)
          // sa.literal(bin_us, sa.BigInteger)).label("b")
    window = sa.and_(j.created_at >= since, j.created_at < until)
    placed = sa.select(jb, j.backend, sa.func.count()).where(window, j.backend.is_not(None)).group_by(jb, j.backend)
    waiting = sa.select(jb, j.id).where(window, j.backend.is_(None))
    with engine.connect() as conn:
        for b, backend, count in conn.execute(placed):
            if 0 <= int(b) < n:
                jobs[demand_class(str(backend))][int(b)] += count
        if unplaced is not None:
            for b, job_id in conn.execute(waiting):
                cls = unplaced(str(job_id))
                if cls is not None and 0 <= int(b) < n:
                    jobs[cls][int(b)] += 1
    return dict(jobs), events


def mean_job_seconds_by_class(engine: Any, since: float) -> dict[str, float]:
    """Mean wall time of completed attempts started since ``since``, per demand class (one
    aggregate query, by backend; classes weighted by their attempts)."""
    import sqlalchemy as sa

    from ray_qalloc.store import attempts_table

    a = attempts_table.c
    q = (sa.select(a.backend, sa.func.sum(a.wall_s), sa.func.count())
         .where(a.outcome == "completed", a.started_at >= since, a.wall_s.is_not(None)).group_by(a.backend))
    total: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    with engine.connect() as conn:
        for backend, s, k in conn.execute(q):
            t = total[demand_class(str(backend))]
            t[0] += float(s or 0.0)
            t[1] += float(k)
    return {c: s / k for c, (s, k) in total.items() if k > 0}


# ---- what the allocator holds, per class ----------------------------------------------------------
def queued_class(plan: Any) -> str | None:
    """The class a queued job is headed for: its plan's best backend's (None: nothing can run it)."""
    from ray_qalloc.autoscale import waiting_for

    best = waiting_for(plan)
    return demand_class(best[0]) if best else None


def queued_work_by_class(queued: Mapping[str, Any]) -> dict[str, float]:
    """Predicted seconds of the queued jobs, per the class each is headed for (its best estimate's)."""
    out: dict[str, float] = defaultdict(float)
    for q in queued.values():
        cls = queued_class(q.plan)
        if cls is not None:
            out[cls] += min((e.runtime_s for e in q.plan.estimates.values()), default=0.0)
    return dict(out)


def pools_by_class(hosts: Mapping[str, Any]) -> tuple[dict[str, int], dict[str, float]]:
    """Pool nodes up per pool class (hosts with an actor) and the cores (GPUs) of the largest."""
    count: dict[str, int] = defaultdict(int)
    cores: dict[str, float] = {}
    for h in hosts.values():
        if h.kind != "pool" or h.actor is None:
            continue
        cls = pool_class_of_pool(h.name)
        count[cls] += 1
        cores[cls] = max(cores.get(cls, 0.0), float(h.cores or 0.0))
    return dict(count), {c: v for c, v in cores.items() if v > 0}


def reserve_targets(members: Mapping[str, Any]) -> dict[str, str]:
    """Per QPU class, the device a surge reservation goes to: the healthy member with the most
    slots (then by name). Pools get none: what a pool class does ahead of demand is nodes."""
    best: dict[str, tuple[int, str]] = {}
    for name, m in members.items():
        if m.spec.pool is not None or not getattr(m, "healthy", False):
            continue
        cls = demand_class(name)
        if is_pool_class(cls):
            continue
        key = (-int(m.spec.slots), name)
        if cls not in best or key < best[cls]:
            best[cls] = key
    return {c: k[1] for c, k in best.items()}


# ---- the hook -------------------------------------------------------------------------------------
async def seed_by_class(alloc: Any, now: float) -> None:
    """Seed the controller with the per-class history from the store, and per-class job seconds."""
    ctrl, s = alloc.scaling, alloc.settings.scaling
    since = now - s.history_s
    unplaced = _unplaced(alloc)
    jobs, events = await alloc.d.db(class_history_from_store, alloc.store.engine, since, s.bin_s, until=now,
                                    unplaced=unplaced)
    ctrl.seed(jobs or {CPU_POOL: np.zeros(events.shape[0])}, events, since)
    work = await alloc.d.db(mean_job_seconds_by_class, alloc.store.engine, since)
    if work:
        ctrl.work_per_job_s = work
    ctrl.seeded_by_class = True         # PredictiveController.seeded_by_class
    alloc._scaling_since = now


async def scaling_tick(alloc: Any, now: float) -> Decision:
    """One forecast and decision on a live allocator: per-class arrivals since the last tick
    (from the store), pool nodes and queued work per class (from the fleet and the queue), the
    reservations the decision asks for taken through the threat desk."""
    ctrl = alloc.scaling
    if not getattr(ctrl, "seeded_by_class", False):
        await seed_by_class(alloc, now)
    since, alloc._scaling_since = alloc._scaling_since, now
    span = max(now - since, 1e-3)
    jobs, events = await alloc.d.db(class_history_from_store, alloc.store.engine, since, span, until=now,
                                    unplaced=_unplaced(alloc))
    arrived = {c: float(v.sum()) for c, v in jobs.items()}
    capacity, cores = pools_by_class(alloc.fleet.hosts)
    ctrl.reserve_targets = reserve_targets(alloc.fleet.members)
    queued = queued_work_by_class(alloc.d.queued)
    ev = events.sum(axis=0) if events.size else np.zeros(len(BANDS))
    decision: Decision = await alloc.d.db(ctrl.tick, now, arrived, ev, capacity, queued, node_cores=cores or None)
    for action in decision.reserves:
        if action["id"] in alloc.threat.actions:
            continue
        try:
            await alloc.threat_add(action, actor="predictive")
        except Exception as exc:   # a reservation the desk refuses (spent quota, gone device) must not stop scaling
            log.warning("predictive reservation %s refused: %s", action["id"], exc)
    return decision


def _unplaced(alloc: Any) -> Unplaced:
    queued = alloc.d.queued

    def cls(job_id: str) -> str | None:
        q = queued.get(job_id)
        return None if q is None else queued_class(q.plan)
    return cls


__all__ = ["class_history_from_store", "mean_job_seconds_by_class", "pools_by_class", "queued_work_by_class",
           "reserve_targets", "scaling_tick", "seed_by_class"]
