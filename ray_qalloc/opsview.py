"""The allocator's state as operators read it: gauges for metrics, the parts of an alert snapshot
that are state rather than events (queue waits, calibration ages, quotas, node memory).

Why apart from ``observer.py``: the observer keeps what *happened*; this module reads what
*is* — from the dispatcher's queue, the fleet and the tenant store — once per operations
round, so the hot path never pays for it.
"""

from __future__ import annotations

import collections
from typing import Any, Iterable

from ray_qalloc.alerts.engine import MemoryUsage, QuotaUsage
from ray_qalloc.metrics import metrics

NOT_PLACED = "none"


def queue_waits(queued: Iterable[Any], now: float) -> dict[str, list[float]]:
    """Per priority class, how long each queued job has waited since it was accepted."""
    out: dict[str, list[float]] = collections.defaultdict(list)
    for q in queued:
        out[q.job.priority.value].append(max(now - q.created_at, 0.0))
    return dict(out)


def _pool_of(q: Any) -> str:
    """The pool (or QPU) of a queued job's fastest estimate; ``none`` when it has none yet."""
    best = min(q.plan.estimates.items(), key=lambda kv: kv[1].runtime_s, default=None)
    return best[0].partition("/")[0] if best else NOT_PLACED


def queue_depths(queued: Iterable[Any]) -> dict[tuple[str, str], int]:
    out: collections.Counter[tuple[str, str]] = collections.Counter()
    for q in queued:
        out[(q.job.priority.value, _pool_of(q))] += 1
    return dict(out)


def record_gauges(alloc: Any, now: float) -> None:
    """Queue depth per class and pool, health and breaker per member (cheap: buffered sets)."""
    depths = queue_depths(alloc.d.queued.values())
    before: set[tuple[str, str]] = getattr(alloc, "_depth_keys", set())
    for (cls, pool), n in depths.items():
        metrics.queued(cls, pool, n)
    for cls, pool in before - set(depths):   # a queue that emptied reads 0, not its last value
        metrics.queued(cls, pool, 0)
    alloc._depth_keys = before | set(depths)
    for name, m in alloc.fleet.members.items():
        metrics.breaker(name, m.breaker)


def calibrated_at(calwatch: Any, fleet: Any) -> dict[str, float | None]:
    """Per QPU, when its calibration was last read successfully (stale: the reads stopped)."""
    out: dict[str, float | None] = {}
    for host in fleet.hosts.values():
        if host.kind != "backend" or not any(
                n in fleet.members and fleet.members[n].spec.kind == "qpu" for n in host.members):
            continue
        try:
            out[host.name] = calwatch.monitor.last_sampled(host.name)
        except Exception:  # not watched yet (started moments ago)
            out[host.name] = None
    return out


def quotas(tenants: Any, d: Any) -> dict[str, dict[str, QuotaUsage]]:
    """Quota use of the tenants with live jobs (a tenant with nothing queued exhausts nothing new)."""
    live = {q.job.tenant for q in d.queued.values()} | {r.job.tenant for r in d.running.values()}
    out = {}
    for tenant in sorted(t for t in live if t):
        try:
            quota, use = tenants.quota(tenant), tenants.usage(tenant)
        except Exception:  # an unknown tenant (jobs submitted without the API): not watched
            continue
        out[tenant] = {
            "max_active_jobs": QuotaUsage(float(use.get("active_jobs", 0)), float(quota.max_active_jobs)),
            "shots_per_day": QuotaUsage(float(use.get("shots_today", 0)), float(quota.shots_per_day)),
            "qpu_seconds_per_day": QuotaUsage(float(use.get("qpu_seconds_today", 0.0)),
                                              float(quota.qpu_seconds_per_day))}
    return out


def node_memory(fleet: Any) -> dict[str, MemoryUsage]:
    """Per node, memory in use as its pool last measured it."""
    out = {}
    for host in fleet.hosts.values():
        stats = getattr(host, "node_stats", None)
        if host.kind == "pool" and stats is not None and stats.memory_total_bytes > 0:
            out[(host.node_id or host.name)[:8]] = MemoryUsage(int(stats.memory_used_bytes),
                                                                int(stats.memory_total_bytes))
    return out
