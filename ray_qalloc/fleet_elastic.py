"""Elastic pools and backends: scale to zero on an autoscaling cluster.

On a cluster that declares qalloc resources but where no node offers a pool yet, the fleet
plans with a placeholder pool (``ELASTIC_POOL``, members unhealthy: jobs wait for it, and the
autoscaling request asks for ``qalloc_pool_cpu``). Pools found while the fleet is elastic are
elastic themselves: once idle for ``settings.elastic_idle_s`` the pool's actor is stopped, its
members leave placement and the placeholder comes back; the node it ran on is not given a pool
again unless a queued job wants one. An elastic QPU backend starts when a node offers its
resource and a queued job wants it, and stops when idle.

Why a mixin of its own: one concern — giving nodes back to the autoscaler and taking them
again — apart from finding the executors (``fleet_discovery.py``) and probing them
(``fleet_health.py``). Mixed into ``Fleet`` (``fleet.py``), whose state these methods use.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

import ray

from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.backends.pools import pool_candidate_specs
from ray_qalloc.config import Settings
from ray_qalloc.fleet_records import ELASTIC_POOL, FleetListener, Host, Member

log = logging.getLogger("ray_qalloc.fleet")


class FleetElastic:
    """Mixed into ``Fleet``, whose state these methods use."""

    settings: Settings
    listener: FleetListener
    hosts: dict[str, Host]
    members: dict[str, Member]
    methods: list[str]
    elastic_pools: bool
    _retired: set[str]
    _first_probes: dict[str, asyncio.Task]
    # FleetDiscovery's (fleet_discovery.py) and FleetHealth's (fleet_health.py)
    _add_members: Callable[[Host, list[BackendSpec]], list[Member]]
    _announce: Callable[[list[Member]], None]
    _start_backend: Callable[..., Any]
    _set_host_health: Callable[[Host, bool], None]

    # ---- the placeholder pool --------------------------------------------------------------------
    def _placeholder_specs(self) -> list[BackendSpec]:
        """Members of the pool a new node would bring: planned with one core and no memory
        figure yet, so jobs wait for them (unhealthy) instead of being refused."""
        from ray_qalloc.backends.aer import default_memory_bytes

        return pool_candidate_specs(ELASTIC_POOL, cores=1, memory_bytes=default_memory_bytes(),
                                    methods=self.methods)

    def _drop_placeholder(self) -> None:
        host = self.hosts.get(ELASTIC_POOL)
        if host is None:
            return
        for name in host.members:
            self.members.pop(name, None)
            self.listener.member_health(name, False)
        host.members.clear()

    def _restore_placeholder(self) -> None:
        """No elastic pool is left: queued simulator jobs wait for (and ask for) a new node."""
        host = self.hosts.get(ELASTIC_POOL)
        if host is None or host.members:
            return
        if any(h.kind == "pool" and h.actor is not None for h in self.hosts.values()):
            return
        self._announce(self._add_members(host, self._placeholder_specs()))

    # ---- stopping and starting ------------------------------------------------------------------
    def elastic_tick(self, wanted: set[str], busy: set[str], cluster: dict[str, float]) -> None:
        """Start elastic backends whose resource appeared and that queued jobs want; stop idle
        ones (QPU backends and elastic pools) so their node can be released."""
        now = time.time()
        self._elastic_pools_tick(wanted, busy, now)
        for host in self.hosts.values():
            if not host.elastic or host.kind != "backend" or host.spec is None:
                continue
            if set(host.members) & (wanted | busy):
                host.last_used = now
            spec = host.spec
            if host.actor is None and set(host.members) & wanted and cluster.get(spec.resource_name, 0.0) >= spec.slots:
                log.warning("a node offers %s now: starting backend %s", spec.resource_name, host.name)
                host.actor, host.last_used = self._start_backend(spec), now
            elif host.actor is not None and now - host.last_used > self.settings.elastic_idle_s:
                log.warning("elastic backend %s idle for %.0f s: stopping it so its node can be released",
                            host.name, now - host.last_used)
                try:
                    ray.kill(host.actor, no_restart=True)
                except Exception:  # already gone
                    pass
                host.actor = None
                self._set_host_health(host, False)

    def _elastic_pools_tick(self, wanted: set[str], busy: set[str], now: float) -> None:
        if not self.elastic_pools:
            return
        placeholder = self.hosts.get(ELASTIC_POOL)
        if placeholder is not None and set(placeholder.members) & wanted and self._retired:
            # a job waits for a pool: nodes kept only until they are given back may serve again
            log.warning("a queued job wants a pool: nodes of stopped pools may host one again")
            self._retired.clear()
        for host in list(self.hosts.values()):
            if host.kind != "pool" or not host.elastic or host.actor is None:
                continue
            if set(host.members) & (wanted | busy) or host.running or host.name in self._first_probes:
                host.last_used = now
            elif now - host.last_used > self.settings.elastic_idle_s:
                self._stop_pool(host, f"idle for {now - host.last_used:.0f} s")

    def _stop_pool(self, host: Host, why: str) -> None:
        """Stop an elastic pool: kill its actor (frees ``qalloc_pool_cpu``, so the autoscaler may
        give the node back), take its members out of placement, bring the placeholder back."""
        log.warning("elastic pool %s %s: stopping it so its node can be released", host.name, why)
        try:
            ray.kill(host.actor, no_restart=True)
        except Exception:  # already gone
            pass
        task = self._first_probes.pop(host.name, None)
        if task is not None:
            task.cancel()
        host.actor = None
        for name in host.members:
            m = self.members.pop(name, None)
            if m is not None and m.healthy:
                m.healthy = False
            self.listener.member_health(name, False)
        host.members.clear()
        self.hosts.pop(host.name, None)
        if host.node_id:
            self._retired.add(host.node_id)
        self._restore_placeholder()


__all__ = ["FleetElastic"]
