"""The fleet: which executors exist, where they run, whether they answer — pools and health.

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
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import ray
from ray.exceptions import RayActorError, WorkerCrashedError

from ray_qalloc.backends.actor import RemoteBackendActor, backend_actor_options
from ray_qalloc.backends.base import BackendSpec, ProviderStatus, resource_name
from ray_qalloc.backends.pools import POOL_RESOURCE_CPU, is_gpu_pool, pool_candidate_specs, pool_name, pool_resource
from ray_qalloc.config import Settings
from ray_qalloc.placement import BackendView
from ray_qalloc.monitor.node import NodeStats, usable_memory_bytes
from ray_qalloc.placement.model import QubitProfile
from ray_qalloc.resources import split_pool

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
ELASTIC_POOL = "cpu-elastic"   # stands for the pool of a node the autoscaler may bring
DEAD_POOL_FORGET_S = 60.0      # a pool whose node is gone this long leaves the fleet


@dataclass
class Member:
    """One placement candidate: a QPU, or a (method, threads) variant of a pool."""

    spec: BackendSpec
    host: str
    healthy: bool = False
    calibration: dict[str, float] | None = None
    calibration_taken_at: float | None = None
    qubits: QubitProfile | None = None   # the same calibration per qubit (calwatch.py)
    memory_free_bytes: int | None = None  # a pool's node: memory free now, as it measured (None: unknown)
    failures: int = 0                 # circuit breaker: consecutive failed runs
    open_until: float = 0.0
    cooldown_s: float = 0.0

    def set_calibration(self, cal: Any) -> bool:
        """Take a new ``Calibration`` (None: the backend has none); True when it is newer."""
        taken_at = getattr(cal, "taken_at", None)
        if cal is not None and self.calibration is not None and taken_at == self.calibration_taken_at:
            return False
        self.calibration = cal.summary() if cal is not None else None
        self.calibration_taken_at = taken_at
        self.qubits = QubitProfile.of(cal) if cal is not None else None
        return True

    def set_calibration_parts(self, taken_at: float | None, summary: dict[str, float] | None,
                              profile: QubitProfile | None) -> bool:
        """Take a calibration already reduced to what placement reads (the hub did the work)."""
        if summary is not None and self.calibration is not None and taken_at == self.calibration_taken_at:
            return False
        self.calibration, self.calibration_taken_at, self.qubits = summary, taken_at, profile
        return True

    @property
    def breaker_open(self) -> bool:
        return self.open_until > 0.0

    @property
    def breaker(self) -> str:
        return "open" if self.breaker_open else "half-open" if self.cooldown_s else "closed"

    @property
    def run_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``run`` on this member's host (a pool needs the variant)."""
        if self.spec.pool is None:
            return {}
        return {"method": self.spec.method, "threads": self.spec.threads, "name": self.spec.name}

    def view(self) -> BackendView:
        age = None if self.calibration_taken_at is None else max(time.time() - self.calibration_taken_at, 0.0)
        return BackendView(self.spec, self.healthy, self.calibration, age, self.qubits, self.memory_free_bytes)


@dataclass
class Host:
    """One executor actor: a node's pool, or a QPU's backend actor."""

    name: str
    kind: str                          # "pool" | "backend"
    actor: Any
    node_id: str | None = None
    members: list[str] = field(default_factory=list)
    healthy: bool = False
    missed: int = 0
    elastic: bool = False              # started only while a node offers its resource
    last_used: float = 0.0
    cores: float = 0.0
    memory_bytes: int = 0
    running: int = 0                   # runs in flight, as the pool's last ping counted them
    spec: BackendSpec | None = None    # a backend host's spec (pools make theirs from the node)
    dead_since: float | None = None    # when its node was first seen dead
    node_stats: NodeStats | None = None  # what the pool's node measured at its last ping
    planned_free_bytes: int | None = None  # the free memory queued plans were last made with
    pid: int | None = None             # the executor's process, as its last ping gave it (a restart changes it)
    provider: ProviderStatus | None = None  # a QPU provider's last word on the device (in service, queue)


class FleetListener(Protocol):
    def member_health(self, name: str, healthy: bool) -> None: ...

    def members_added(self, members: list[Member]) -> None: ...

    def host_unreachable(self, host: Host, why: str) -> None: ...

    # optional: ``replan_queued()`` — members came back under names the listener knew already;
    # ``member_external_wait(name, seconds)`` — the provider's queue ahead of a QPU's next job


class Fleet:
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

    def _placeholder_specs(self) -> list[BackendSpec]:
        """Members of the pool a new node would bring: planned with one core and no memory
        figure yet, so jobs wait for them (unhealthy) instead of being refused."""
        from ray_qalloc.backends.aer import default_memory_bytes

        return pool_candidate_specs(ELASTIC_POOL, cores=1, memory_bytes=default_memory_bytes(),
                                    methods=self.methods)

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

    # ---- health --------------------------------------------------------------------------------
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

    # ---- elastic QPU backends ------------------------------------------------------------------
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


async def _aref(ref: Any) -> Any:
    """Await an ObjectRef (a coroutine, so asyncio.wait_for can cancel it)."""
    return await ref
