"""The fleet: which executors exist, where they run, whether they answer — pools and health.

``Fleet`` is the dispatcher's one handle on the executors; its parts are one concern each:

* ``fleet_records.py``: the records — a host, its members — and the listener protocol;
* ``fleet_discovery.py``: membership — pools found on the nodes (CPU, and GPU on GPU nodes),
  QPU backends, members added and retired, pools of dead nodes forgotten;
* ``fleet_health.py``: probes, what a ping reports, host health and circuit breakers;
* ``fleet_elastic.py``: the placeholder pool, elastic pools and backends stopped when idle
  and started when wanted;
* this module: the fleet's state and the views placement and the allocator read.

Two kinds of *host* (one Ray actor each):

* a **pool** per node that offers ``qalloc_pool_cpu`` (``PoolActor``): it offers placement one
  *member* per (method, threads) variant (``cpu-1a2b3c4d/mps``, ``.../statevector@2``), all on
  the pool's core budget;
* a **backend** actor per QPU (``BackendActor``): one member, its own slots.

Health is a host's (one ping answers for every member of a pool); the circuit breaker is a
member's (a method that keeps failing on a pool is switched off there, the other methods stay).

The fleet tells its listener (the dispatcher) what changed — a member's health, members that
appeared (a node joined, a pool answered for the first time), a host that stopped answering —
and never touches the queue itself. Ray calls are bounded in time; an actor that does not
answer is unhealthy, not an error.

Elastic pools: on a cluster that declares qalloc resources but where no node offers a pool
yet, the fleet plans with a placeholder pool (``ELASTIC_POOL``, members unhealthy: jobs wait
for it, and the autoscaling request asks for ``qalloc_pool_cpu``). Pools found while the fleet
is elastic are elastic themselves: once idle for ``settings.elastic_idle_s`` the pool's actor is
stopped (its detached actor holds ``qalloc_pool_cpu``, which keeps the node busy for the
autoscaler forever otherwise), its members leave placement and the placeholder comes back. The
node it ran on is not given a pool again unless a queued job wants one.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ray_qalloc.backends.base import resource_name
from ray_qalloc.backends.pools import pool_resource
from ray_qalloc.config import Settings
from ray_qalloc.fleet_discovery import DEAD_POOL_FORGET_S, FleetDiscovery
from ray_qalloc.fleet_elastic import FleetElastic
from ray_qalloc.fleet_health import ACTOR_GONE, FIRST_PROBE_S, UNREACHABLE_AFTER, FleetHealth
from ray_qalloc.fleet_records import ELASTIC_POOL, FleetListener, Host, Member
from ray_qalloc.placement import BackendView
from ray_qalloc.resources import split_pool


class Fleet(FleetDiscovery, FleetHealth, FleetElastic):
    """Hosts and members; probes them; keeps breakers. See the module docstring."""

    def __init__(self, settings: Settings, listener: FleetListener) -> None:
        self.settings = settings
        self.listener = listener
        self.hosts: dict[str, Host] = {}
        self.members: dict[str, Member] = {}
        self.methods, self.backend_names = split_pool(settings.pool)
        self.first_probe_s = FIRST_PROBE_S
        self._declared = False
        self.elastic_pools = False          # no pool at start: pools found later may be stopped when idle
        self._announced: set[str] = set()   # member names the listener (the scheduler) knows
        self._retired: set[str] = set()     # nodes whose idle elastic pool was stopped
        self._first_probes: dict[str, asyncio.Task] = {}
        self._drift_origin = time.time()

    # ---- views -----------------------------------------------------------------------------------
    def views(self) -> list[BackendView]:
        return [m.view() for m in self.members.values()]

    def host_of(self, name: str) -> Host | None:
        m = self.members.get(name)
        return None if m is None else self.hosts.get(m.host)

    def actor_of(self, name: str) -> Any:
        host = self.host_of(name)
        return None if host is None else host.actor

    def resource_of(self, name: str) -> str:
        """The Ray resource a node must offer to run member ``name`` (for autoscaling requests)."""
        m = self.members.get(name)
        if m is not None and m.spec.pool is not None:
            return pool_resource(m.spec.pool)
        return resource_name(name)

    def sched_node(self, m: Member) -> str:
        """The scheduler's core budget a member counts against: its pool; a QPU is its own."""
        return m.spec.pool or f"backend:{m.spec.name}"

    def sched_cores(self, m: Member) -> float:
        host = self.hosts[m.host]
        if m.spec.pool is not None:
            return max(host.cores, 1.0)
        return float(max(m.spec.slots, 1) * max(m.spec.threads, 1))


__all__ = ["ACTOR_GONE", "DEAD_POOL_FORGET_S", "ELASTIC_POOL", "FIRST_PROBE_S", "UNREACHABLE_AFTER", "Fleet",
           "FleetListener", "Host", "Member"]
