"""Fleet health: probes (pings), what a ping reports (a node's memory and load, a QPU
provider's status), host health, and each member's circuit breaker.

Why a mixin of its own: one concern — whether the fleet's executors answer and may take runs —
apart from which executors exist (``fleet_discovery.py``). Health is a host's (one ping answers
for every member of a pool); the circuit breaker is a member's (a method that keeps failing on
a pool is switched off there, the other methods stay). Ray calls are bounded in time; an actor
that does not answer is unhealthy, not an error. Mixed into ``Fleet`` (``fleet.py``), whose
state these methods use.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from ray.exceptions import RayActorError, WorkerCrashedError

from ray_qalloc.backends.base import ProviderStatus
from ray_qalloc.backends.pools import is_gpu_pool, pool_candidate_specs
from ray_qalloc.config import Settings
from ray_qalloc.fleet_records import ELASTIC_POOL, FleetListener, Host, Member
from ray_qalloc.monitor.node import NodeStats, usable_memory_bytes

log = logging.getLogger("ray_qalloc.fleet")

try:  # Ray ≥ 2.x raises this for an actor that is restarting
    from ray.exceptions import ActorUnavailableError
except ImportError:  # pragma: no cover
    ActorUnavailableError = RayActorError  # type: ignore[misc,assignment]

try:  # the actor (or the task) is bound to a node that died: hard node affinity, a pool's run
    from ray.exceptions import ActorUnschedulableError, NodeDiedError
except ImportError:  # pragma: no cover
    ActorUnschedulableError = NodeDiedError = RayActorError  # type: ignore[misc,assignment]

# An executor that is gone, for now or for good: its runs fail over (the backend is blocked for
# that job) and its host is unhealthy until a probe answers. ``ActorUnschedulableError`` is what
# a pool pinned to a dead node raises from then on (it derives from RayError, not
# RayActorError); ``NodeDiedError`` is what a call in flight on that node may raise instead.
ACTOR_GONE = (RayActorError, ActorUnavailableError, WorkerCrashedError, ActorUnschedulableError, NodeDiedError)
FIRST_PROBE_S = 60.0
UNREACHABLE_AFTER = 2      # missed health checks in a row before a pool's runs are placed again


class FleetHealth:
    """Mixed into ``Fleet``, whose state these methods use."""

    settings: Settings
    listener: FleetListener
    hosts: dict[str, Host]
    members: dict[str, Member]
    methods: list[str]
    first_probe_s: float
    _first_probes: dict[str, asyncio.Task]
    # FleetDiscovery's (fleet_discovery.py) and FleetElastic's (fleet_elastic.py)
    discover_pools: Callable[[], list[Host]]
    _add_members: Callable[[Host, list[Any]], list[Member]]
    _announce: Callable[[list[Member]], None]
    _drop_placeholder: Callable[[], None]

    async def probe(self, host: Host, first: bool = False) -> None:
        """Ping a host; on the first answer of a pool, make its members from what it measured."""
        timeout = self.first_probe_s if first else self.settings.health_timeout_s
        if host.actor is None:   # elastic, no node yet
            self._set_host_health(host, False)
            return
        try:
            info = await asyncio.wait_for(_aref(host.actor.ping.remote()), timeout)
            if self.hosts.get(host.name) is not host:   # stopped meanwhile (an idle elastic pool)
                return
            host.node_id = info.get("node_id") or host.node_id
            host.pid = info.get("pid") or host.pid
            if host.kind == "pool":
                if first:   # a fresh pool warms a worker per core; its first jobs should not pay for that
                    await asyncio.wait_for(_aref(host.actor.warmed.remote(timeout)), timeout)
                host.cores = float(info.get("cores") or host.cores or 1.0)
                host.memory_bytes = int(info.get("memory_bytes") or 0)
                host.running = int(info.get("running") or 0)
                self._node_measured(host, info.get("node"))
                if not host.members and self.methods:
                    offered = info.get("methods")   # a GPU pool offers what its installed engines run
                    methods = [m for m in self.methods if offered is None or m in offered]
                    specs = pool_candidate_specs(host.name, cores=host.cores, memory_bytes=host.memory_bytes,
                                                 methods=methods)
                    # a real pool answered: the placeholder that stood for it goes now, not
                    # before (if this pool never answers, jobs keep waiting for the placeholder)
                    if not is_gpu_pool(host.name):
                        self._drop_placeholder()
                    self._announce(self._add_members(host, specs))
            else:
                for name in host.members:
                    m = self.members[name]
                    if first or m.calibration is None:
                        cal = await asyncio.wait_for(_aref(host.actor.calibration.remote()), timeout)
                        m.set_calibration(cal)
                if not self._provider_says(host, info.get("provider")):
                    return
        except Exception as exc:  # noqa: BLE001 - whatever the reason, a host that does not answer is unhealthy
            # (catching only known Ray errors let ActorUnschedulableError — a pool pinned to a
            # dead node — escape, and its members stayed healthy forever)
            if host.healthy:
                log.warning("%s %s failed its health check: %s", host.kind, host.name, type(exc).__name__)
            host.missed += 1
            host.running = 0   # unknown now; its runs are failed over, it must not count as busy forever
            self._set_host_health(host, False)
            if host.missed >= UNREACHABLE_AFTER and host.kind == "pool":
                self.listener.host_unreachable(host, f"pool unreachable: {host.missed} health checks missed "
                                                     f"({type(exc).__name__})")
            return
        host.missed = 0
        self._set_host_health(host, True)

    def _provider_says(self, host: Host, raw: Any) -> bool:
        """Take a QPU provider's status from a ping: its queue of other users' jobs becomes wait
        placement adds to the device, and a device its provider took out of service is
        unhealthy (jobs wait or go elsewhere) until the provider says otherwise. False: the
        host is out of service (its health is set here)."""
        if not raw:
            return True
        try:
            status = ProviderStatus.from_dict(raw)
        except (TypeError, ValueError):
            return True
        before, host.provider = host.provider, status
        pending = status.pending_jobs or 0
        wait = pending * self.settings.placement.provider_job_s
        tell = getattr(self.listener, "member_external_wait", None)
        if tell is not None:
            for name in host.members:
                tell(name, wait)
        from ray_qalloc.metrics import metrics

        for name in host.members:
            metrics.provider_queue(name, pending, status.operational)
        if status.operational:
            return True
        if before is None or before.operational:
            log.warning("QPU %s taken out of service by its provider (%s): no new runs there until it is back",
                        host.name, status.message or "not operational")
        host.missed = 0
        self._set_host_health(host, False)
        return False

    def _node_measured(self, host: Host, raw: Any) -> None:
        """Take a pool's node reading; placement plans on the memory the node has free now (a
        shared HPC node's other work included), so a large change plans the queue again."""
        if not raw:
            return
        try:
            stats = NodeStats.from_dict(raw)
        except (TypeError, ValueError):
            return
        before = host.planned_free_bytes
        host.node_stats = stats
        gpu = is_gpu_pool(host.name)
        if gpu:   # a GPU pool's runs live in GPU memory: the freest GPU's, as NVML read it
            from ray_qalloc.backends.gpu_probe import free_gpu_bytes

            usable = free_gpu_bytes(stats.gpus) or 0
        else:
            usable = usable_memory_bytes(stats)
        for name in host.members:
            m = self.members.get(name)
            if m is not None:
                m.memory_free_bytes = usable
        from ray_qalloc.metrics import metrics

        measured = getattr(self.listener, "pool_measured", None)
        if measured is not None and host.kind == "pool" and not gpu:   # CPU load is no GPU pool's budget
            measured(host.name, max(host.cores, 1.0), stats.busy_cores)
        node = (host.node_id or host.name)[:8]
        metrics.node(node, cpu_ratio=stats.cpu_ratio, memory_used_bytes=stats.memory_used_bytes,
                     memory_total_bytes=stats.memory_total_bytes)
        for device in stats.gpus:
            if device.utilization_ratio is not None:
                metrics.gpu(node, device.index, device.utilization_ratio)
            metrics.gpu_memory(node, device.index, used_bytes=device.memory_used_bytes,
                               total_bytes=device.memory_total_bytes)
        if before is None:
            host.planned_free_bytes = usable
        elif abs(usable - before) > 0.25 * max(before, 1):   # against the value plans were made with
            host.planned_free_bytes = usable
            replan = getattr(self.listener, "replan_queued", None)
            if replan is not None:
                replan()

    def _set_host_health(self, host: Host, healthy: bool) -> None:
        host.healthy = healthy
        now = time.time()
        observer = getattr(self.listener, "observer", None)
        if observer is not None and host.name != ELASTIC_POOL:
            observer.on_health(host.name, healthy, now)
        for name in host.members:
            m = self.members[name]
            ok = healthy
            if m.breaker_open:
                if healthy and now >= m.open_until:   # half-open: the probe answered; the next run decides
                    log.warning("member %s: breaker half-open after %.0f s, trying it again", name, m.cooldown_s)
                    m.open_until = 0.0
                else:
                    ok = False
            if m.healthy != ok:
                m.healthy = ok
                self.listener.member_health(name, ok)

    def mark_unhealthy(self, name: str) -> None:
        """A run on ``name`` died with its actor or timed out: out of placement until a probe answers."""
        m = self.members.get(name)
        if m is None:
            return
        host = self.hosts[m.host]
        self._set_host_health(host, False)

    def run_failed(self, name: str) -> None:
        """Circuit breaker: after ``breaker_failures`` failed runs in a row the member gets no runs
        until a probe succeeds after a cooldown (doubling while it keeps failing), so a broken
        method does not burn every queued job's attempts."""
        m = self.members.get(name)
        if m is None:
            return
        m.failures += 1
        s = self.settings
        if m.failures < s.breaker_failures and not m.breaker_open and m.cooldown_s == 0.0:
            return
        m.cooldown_s = s.breaker_cooldown_s if m.cooldown_s == 0.0 else min(2 * m.cooldown_s, s.breaker_max_cooldown_s)
        m.open_until = time.time() + m.cooldown_s
        if m.healthy:
            m.healthy = False
            self.listener.member_health(name, False)
        log.warning("member %s: breaker open for %.0f s after %d failed runs", name, m.cooldown_s, m.failures)

    def run_succeeded(self, name: str) -> None:
        m = self.members.get(name)
        if m is not None and (m.failures or m.cooldown_s):
            m.failures, m.cooldown_s, m.open_until = 0, 0.0, 0.0

    async def tick(self) -> None:
        """One health round: probe every host; start pools on nodes that joined.

        A new pool's first probe waits for its warm-up (seconds to a minute): it runs on its
        own, so the other hosts are still probed every round meanwhile (a node lost while
        another joins is noticed as quickly as ever)."""
        if any(h.kind == "pool" for h in self.hosts.values()) or self.methods:
            try:
                for host in self.discover_pools():
                    task = asyncio.get_running_loop().create_task(self.probe(host, first=True))
                    self._first_probes[host.name] = task
                    task.add_done_callback(lambda _t, n=host.name: self._first_probes.pop(n, None))
            except Exception:  # the GCS is busy: next tick
                log.exception("pool discovery failed")
        await asyncio.gather(*(self.probe(h) for h in list(self.hosts.values()) if h.name not in self._first_probes),
                             return_exceptions=True)


async def _aref(ref: Any) -> Any:
    """Await an ObjectRef (a coroutine, so asyncio.wait_for can cancel it)."""
    return await ref


__all__ = ["ACTOR_GONE", "FIRST_PROBE_S", "FleetHealth", "UNREACHABLE_AFTER"]
