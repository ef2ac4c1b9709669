"""Fleet discovery: which executors exist and where — a simulator pool per node (CPU, and GPU on
GPU nodes), an actor per QPU — as nodes join and leave and the pool's membership changes
(methods and backends added or retired, pools of dead nodes forgotten).

Why a mixin of its own: one concern — the fleet's membership — apart from whether its hosts
answer (``fleet_health.py``) and from giving idle nodes back (``fleet_elastic.py``). Mixed
into ``Fleet`` (``fleet.py``), whose state these methods use. A pool found here has no members
yet: the health side's first answer from it makes them (from the cores and memory it
measured); ``start`` waits for those first probes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Coroutine

import ray

from ray_qalloc.backends.actor import RemoteBackendActor, backend_actor_options
from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.backends.pools import POOL_RESOURCE_CPU, is_gpu_pool, pool_candidate_specs, pool_name
from ray_qalloc.config import Settings
from ray_qalloc.fleet_records import ELASTIC_POOL, FleetListener, Host, Member

log = logging.getLogger("ray_qalloc.fleet")

DEAD_POOL_FORGET_S = 60.0      # a pool whose node is gone this long leaves the fleet


class FleetDiscovery:
    """Mixed into ``Fleet``, whose state these methods use."""

    settings: Settings
    listener: FleetListener
    hosts: dict[str, Host]
    members: dict[str, Member]
    methods: list[str]
    backend_names: list[str]
    _declared: bool
    elastic_pools: bool
    _announced: set[str]
    _retired: set[str]
    _first_probes: dict[str, asyncio.Task]
    _drift_origin: float
    # FleetHealth's (fleet_health.py) and FleetElastic's (fleet_elastic.py)
    probe: Callable[..., Coroutine[Any, Any, None]]
    _placeholder_specs: Callable[[], list[BackendSpec]]

    # ---- start-up ------------------------------------------------------------------------------
    async def start(self) -> None:
        cluster = ray.cluster_resources()
        # A cluster that declares qalloc resources runs each executor where its resource is; a
        # plain cluster (an HPC centre's Ray job) gets a pool on every node with CPUs.
        self._declared = any(k.startswith(("qalloc_backend_", "qalloc_pool_")) for k in cluster)
        if self.methods:
            self.discover_pools()
            if not any(h.kind == "pool" for h in self.hosts.values()) and self._declared:
                log.warning("no node offers %s yet: simulator jobs wait for one (autoscaling may bring it)",
                            POOL_RESOURCE_CPU)
                self.elastic_pools = True
                self.hosts[ELASTIC_POOL] = Host(ELASTIC_POOL, "pool", None, elastic=True)
                self._add_members(self.hosts[ELASTIC_POOL], self._placeholder_specs())
        for name in self.backend_names:
            self.add_backend_host(name, cluster)
        # the allocator registers every member made so far with its scheduler
        self._announced.update(self.members)
        await asyncio.gather(*(self.probe(h, first=True) for h in list(self.hosts.values())))

    def add_backend_host(self, name: str, cluster: dict[str, float]) -> Host:
        """A QPU's (or other backend's) host and member; its actor starts where a node offers
        its resource, or waits for one (elastic) on a cluster that declares qalloc resources."""
        from ray_qalloc.backends.registry import make_backend

        spec = make_backend(name).spec()
        has = cluster.get(spec.resource_name, 0.0) >= spec.slots
        host = Host(name, "backend", None, spec=spec)
        if not has and self._declared:
            log.warning("no node offers %s yet: %s waits for one (autoscaling may bring it)",
                        spec.resource_name, name)
            host.elastic = True
        else:
            if not has:
                log.warning("no node offers %s; %s runs without its custom resource", spec.resource_name, name)
            host.actor = self._start_backend(spec, use_resource=has)
        self.hosts[name] = host
        self._add_members(host, [spec])
        return host

    def add_methods(self, methods: list[str]) -> list[Member]:
        """Members for newly offered methods on every pool that has members already (a pool
        still starting makes its members from ``self.methods`` at its first answer)."""
        added: list[Member] = []
        for host in self.hosts.values():
            if host.kind != "pool" or not host.members:
                continue
            cores = host.cores or 1.0
            memory = host.memory_bytes
            if not memory and not is_gpu_pool(host.name):   # a GPU pool without GPU memory has no members
                from ray_qalloc.backends.aer import default_memory_bytes

                memory = default_memory_bytes()
            added += self._add_members(host, pool_candidate_specs(host.name, cores=cores, memory_bytes=memory,
                                                                  methods=methods))
        return added

    def forget_member(self, name: str) -> None:
        """A member retired from the pool: out of the fleet; a backend host left with no member
        goes too, its actor stopped for good."""
        m = self.members.pop(name, None)
        self._announced.discard(name)
        host = self.hosts.get(m.host) if m is not None else None
        if host is None:
            return
        if name in host.members:
            host.members.remove(name)
        if host.kind == "backend" and not host.members:
            del self.hosts[host.name]
            if isinstance(host.actor, ray.actor.ActorHandle):
                try:
                    ray.kill(host.actor, no_restart=True)
                except Exception:  # already gone
                    pass

    def prune_dead_pools(self, alive: set[str], busy: set[str], now: float) -> list[str]:
        """Members of pools whose node has been gone for ``DEAD_POOL_FORGET_S``: a Ray node never
        comes back under its id (a returning node is a new node with a new pool), so without
        this every lost node would leave its variants in every later plan and a failing probe
        in every health round. A pool with a run still counted on it is kept until it ends."""
        gone: list[str] = []
        for host in list(self.hosts.values()):
            if host.kind != "pool" or host.node_id is None or host.name == ELASTIC_POOL:
                continue
            if host.node_id in alive:
                host.dead_since = None
                continue
            host.dead_since = host.dead_since or now
            if now - host.dead_since < DEAD_POOL_FORGET_S or set(host.members) & busy:
                continue
            if not any(h.kind == "pool" and h.node_id in alive for h in self.hosts.values()):
                continue   # the last pools are kept: their jobs wait for a node instead of failing
            log.warning("pool %s: node %s gone for %.0f s, forgetting its %d variants", host.name,
                        host.node_id[:8], now - host.dead_since, len(host.members))
            for name in host.members:
                self.members.pop(name, None)
                gone.append(name)
            del self.hosts[host.name]
            if host.actor is not None:
                try:
                    ray.kill(host.actor, no_restart=True)
                except Exception:  # already gone with its node
                    pass
        return gone

    def discover_pools(self) -> list[Host]:
        """Start a pool on every live node that offers one and has none yet (nodes that joined).

        A node whose idle elastic pool was stopped is skipped (it is waiting to be given back)
        until a queued job wants a pool again (``elastic_tick``)."""
        started = []
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            res = node.get("Resources", {})
            gpu_host = self._discover_gpu_pool(node, res)   # issue #15: a GPU pool per GPU node
            if gpu_host is not None:
                started.append(gpu_host)
            offers = res.get(POOL_RESOURCE_CPU, 0.0) >= 1.0 if self._declared else res.get("CPU", 0.0) > 0
            name = pool_name(node["NodeID"])
            if not offers or name in self.hosts or node["NodeID"] in self._retired:
                continue
            from ray_qalloc.backends.pool_actor import RemotePoolActor, pool_actor_options

            actor = RemotePoolActor.options(**pool_actor_options(
                name, node["NodeID"], self.settings.namespace, use_resource=self._declared)).remote(
                name, node["NodeID"], tuple(self.methods))
            host = Host(name, "pool", actor, node_id=node["NodeID"], cores=float(res.get("CPU", 1.0)),
                        elastic=self.elastic_pools, last_used=time.time())
            self.hosts[name] = host
            started.append(host)
            log.info("pool %s on node %s (%g CPUs%s)", name, node["NodeID"][:8], host.cores,
                     ", elastic" if host.elastic else "")
        return started

    def _discover_gpu_pool(self, node: dict[str, Any], res: dict[str, float]) -> Host | None:
        """A GPU pool on a node that offers one and has none yet (``backends.gpu_pool_actor``)."""
        from ray_qalloc.backends.gpu_pool_actor import RemoteGpuPoolActor, gpu_pool_actor_options, offers_gpu_pool

        name = pool_name(node["NodeID"], "gpu")
        if not offers_gpu_pool(res, self._declared) or name in self.hosts or node["NodeID"] in self._retired:
            return None
        actor = RemoteGpuPoolActor.options(**gpu_pool_actor_options(
            name, node["NodeID"], self.settings.namespace, use_resource=self._declared)).remote(name, node["NodeID"])
        host = Host(name, "pool", actor, node_id=node["NodeID"], cores=float(res.get("GPU", 0.0)),
                    elastic=self.elastic_pools, last_used=time.time())
        self.hosts[name] = host
        log.info("GPU pool %s on node %s (%g GPUs)", name, node["NodeID"][:8], host.cores)
        return host

    def _start_backend(self, spec: BackendSpec, *, use_resource: bool = True) -> Any:
        opts = backend_actor_options(spec, self.settings.namespace, use_resource=use_resource)
        return RemoteBackendActor.options(**opts).remote(
            spec.name, self.backend_kwargs(spec), self.settings.namespace, self.settings.allocator_name)

    def backend_kwargs(self, spec: BackendSpec) -> dict[str, Any] | None:
        """What a backend actor builds its backend with: an emulated QPU drifts when the settings
        say so, from an origin fixed in its constructor arguments (Ray replays them when it
        restarts the actor, so the restarted device is the same device at the same time)."""
        drift = self.settings.monitor.emulated_drift
        if drift is None or spec.family != "fake_qpu":
            return None
        if drift.origin_s is None:
            drift = drift.model_copy(update={"origin_s": self._drift_origin})
        return {"drift": drift}

    def _add_members(self, host: Host, specs: list[BackendSpec]) -> list[Member]:
        added = []
        for spec in specs:
            if spec.name in self.members:
                continue
            m = Member(spec, host.name, healthy=host.healthy)
            self.members[spec.name] = m
            host.members.append(spec.name)
            added.append(m)
        return added

    def _announce(self, members: list[Member]) -> None:
        """Tell the listener about members that entered placement.

        A name the listener already knows (a placeholder coming back, a pool started again on
        the same node) is not added to it twice — its scheduler would count the backend twice —
        the queue is only planned again, so queued jobs see the member again."""
        new = [m for m in members if m.spec.name not in self._announced]
        known = [m for m in members if m.spec.name in self._announced]
        self._announced.update(m.spec.name for m in new)
        if new:
            self.listener.members_added(new)
        if known:
            for m in known:
                self.listener.member_health(m.spec.name, m.healthy)
            replan = getattr(self.listener, "replan_queued", None)
            if replan is not None:
                replan()


__all__ = ["DEAD_POOL_FORGET_S", "FleetDiscovery"]
