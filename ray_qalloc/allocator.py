"""The Allocator actor: the facade clients call, and its start-up.

One named, detached actor per cluster, restarted by Ray forever. The class is a facade over
parts of one concern each:

* ``Fleet`` (``fleet.py``): the executors — a simulator pool per node, an actor per QPU — their
  health and circuit breakers;
* ``Dispatcher`` (``dispatch.py``): the queue, runs and every job transition (commit first,
  then act), failover, hedging, stopping runs;
* the background loops (``allocator_loops.py``: dispatch, health, hedging, history export,
  operations, learning, model hot-reload), the operators' side (``allocator_ops.py``: live
  config, maintenance, audit, dashboard, alerts) and the security side
  (``allocator_threat.py``), mixed in because they share this actor's event loop and parts;
* recovery (``recovery.py``): the queue is memory only and rebuilt from the JobStore on every
  (re)start — QUEUED jobs are queued again; RUNNING jobs are re-attached to the executor that
  runs them, or re-queued when it no longer knows them.

What stays here: building the parts, starting them in order, and the job API (submit, status,
wait, explain, cancel) with the fleet's views (backends, pools, stats).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from typing import Any, Mapping

import ray

from ray_qalloc.adminstate import AdminState
from ray_qalloc.allocator_loops import AllocatorLoops
from ray_qalloc.allocator_ops import OperatorOps
from ray_qalloc.allocator_threat import ThreatOps
from ray_qalloc.autoscale import Requester
from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.config import Settings
from ray_qalloc.costmodel.history import RunHistory
from ray_qalloc.costmodel.registry import ArtifactWatcher, latest_artifact, load_predictor
from ray_qalloc.dispatch import Dispatcher, Queued, Running
from ray_qalloc.fleet import Fleet, Member
from ray_qalloc.jobs import JobState, PreparedJob
from ray_qalloc.maintenance import MaintenanceDesk
from ray_qalloc.placement import explain
from ray_qalloc.placement.scheduler import Scheduler
from ray_qalloc.recovery import recover
from ray_qalloc.store import JobStore

log = logging.getLogger("ray_qalloc.allocator")


class Allocator(AllocatorLoops, OperatorOps, ThreatOps):
    """See module docstring. Created by ``ray_qalloc.connect`` via ``allocator_options``."""

    def __init__(self, settings: Settings, members: Mapping[str, tuple[BackendSpec, Any]] | None = None,
                 node_cpus: dict[str, float] | None = None, predictor: Any = None) -> None:
        """``members`` injects a ready fleet (unit tests use small fakes): name -> (spec, actor);
        members whose spec names a pool share that pool's host and core budget (``node_cpus``).
        By default the fleet comes from ``settings.pool`` and the cluster's nodes. ``predictor``
        replaces the cost model from the registry (it still gets run memory)."""
        logging.basicConfig(level=logging.WARNING)
        # A long queue is a million long-lived objects; the cyclic GC's full passes over them
        # (every few hundred submits at the default thresholds) cost ~1 s each. Collect the young
        # generations as usual, the old one rarely; bulk submits also freeze what they queued.
        gc.set_threshold(50_000, 50, 100)
        self.settings = settings
        self._injected = members
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(settings.resolved_store_url)
        self.history = RunHistory(settings.history_dir)
        self._watcher = ArtifactWatcher(settings.models_dir, current=latest_artifact(settings.models_dir))
        self.sched = Scheduler(settings.scheduler_config(), node_cpus=dict(node_cpus or {}))
        self._kick = asyncio.Event()
        self._ready = asyncio.Event()
        from ray_qalloc.costmodel import policy as learning_policy
        from ray_qalloc.costmodel.bandit import BanditStore

        self.bandit_store = BanditStore(self.store.engine)   # the bandit's state survives restarts (#13)
        self.d = Dispatcher(settings, self.store, None, self.sched,  # type: ignore[arg-type]
                            learning_policy.wrap(predictor or load_predictor(settings.models_dir),
                                                 learning=settings.learning,
                                                 explore_factor=settings.placement.explore_factor,
                                                 weights=settings.placement.table(), restore=self.bandit_store.load),
                            self._kick.set)
        self.fleet = Fleet(settings, self.d)
        self.d.fleet = self.fleet
        from ray_qalloc.fidelity_meter import FidelityMeter

        # QPU runs' fidelity, measured after completion off the loop; corrects placement (#13)
        self.fidelity_meter = self.d.fidelity_meter = FidelityMeter(self.store.engine, self.d.db,
                                                                    lambda: self.d.predictor)
        self.admin = AdminState(self.store.engine)
        from ray_qalloc.backendlog import BackendLog

        self.backend_log = BackendLog(self.store.engine)
        self.d.observer.on_health_change = self._health_changed
        from ray_qalloc.threatdesk import ThreatDesk

        self.rule_engine: Any = None      # threatrules.RuleEngine, once a rule exists
        self.threat = ThreatDesk(self.admin, self.d, self.sched, lambda: self.settings.scheduler_config().reserved,
                                 self._kick.set)
        self.maint = MaintenanceDesk(self.d, self.admin, self._kick.set)
        self.d.maintenance_why = self.maint.why
        self.calwatch = self._calibration_watch(settings, members is None)
        self.retrain: Any = None          # costmodel.retrain.RetrainLoop, when learning.retrain.enabled
        self.alerts: Any = None
        if settings.alerts.enabled:
            from ray_qalloc.alerts.service import AlertService

            self.alerts = AlertService(settings.alerts, self.store.engine)
        if settings.learning.retrain.enabled:
            from ray_qalloc.costmodel.retrain import RetrainLoop

            self.retrain = RetrainLoop(settings.learning.retrain, settings.history_dir, settings.models_dir,
                                       admin=self.admin, outbox=self.alerts.outbox if self.alerts else None,
                                       busy=self._urgent_waiting)
            self.d.learn_hooks = [self.retrain.observe]
        from ray_qalloc.tenants import TenantStore

        self._tenants = TenantStore(settings.resolved_store_url)
        from ray_qalloc.liveconfig import LiveConfig, _explore
        from ray_qalloc.membership import Membership

        self.live = LiveConfig(self, settings)
        self.membership = Membership(self)
        from ray_qalloc.dashboard import Timeline

        self.timeline = Timeline()
        _explore(self.d.predictor, settings.placement.explore_factor)
        self.startup: dict[str, float] = {}          # how long the last start took, by step (stats)
        self.started_at = time.time()
        self.scaling: Any = None        # predictive.PredictiveController, when settings.scaling.enabled
        if settings.scaling.enabled and members is None:
            # Ray keeps ONE request per cluster: the reactive and the predictive parts go through
            # one sender, or each would erase the other
            from ray_qalloc.autoscale import request as send_request
            from ray_qalloc.predictive import PredictiveController, RequestMerger

            merger = RequestMerger(send_request)
            self._autoscale = Requester(slots={}, resource_of=self.fleet.resource_of, send=merger.part("reactive"))
            self.scaling = PredictiveController(settings.scaling, merger.part("predictive"))
        else:
            self._autoscale = Requester(slots={}, resource_of=self.fleet.resource_of)
        self._scaling_since = time.time()
        # A restarted allocator serves at once with the executors that answer; one still warming
        # up (restarted with it, or busy) is picked up by the health loop a moment later.
        if self._injected is None and _reconstructed():
            self.fleet.first_probe_s = settings.health_timeout_s
        self._start_error: BaseException | None = None
        self._tasks: list[asyncio.Task] = [asyncio.get_running_loop().create_task(self._start())]

    # ---- shorthands used by tests and the API -------------------------------------------------
    @property
    def queued(self) -> dict[str, Queued]:
        return self.d.queued

    @property
    def running(self) -> dict[str, Running]:
        return self.d.running

    @property
    def members(self) -> dict[str, Member]:
        return self.fleet.members

    @property
    def predictor(self) -> Any:
        return self.d.predictor

    def _calibration_watch(self, settings: Settings, real: bool) -> Any:
        """The calibration monitor: in its hub actor (calhub.py) on a real fleet, in this
        process for injected backends (which are no Ray actors a hub could call)."""
        if real and settings.monitor.hub:
            from ray_qalloc.calhub import HubWatch, RemoteCalibrationHub, hub_options

            hub = RemoteCalibrationHub.options(**hub_options(settings)).remote(settings)
            return HubWatch(hub, self.fleet, self._calibration_changed, period_s=settings.monitor.calibration_period_s,
                            max_stale_periods=settings.monitor.max_stale_periods, observer=self.d.observer)
        from ray_qalloc.calwatch import CalibrationWatch, open_monitor

        return CalibrationWatch(self.fleet, open_monitor(settings), self._calibration_changed,
                                timeout_s=max(settings.health_timeout_s, 10.0), offload=self.d.db,
                                observer=self.d.observer)

    # ==== start-up and recovery ===============================================================
    async def _start(self) -> None:
        try:
            t0 = time.monotonic()
            if self._injected is not None:
                await self._start_injected()
            else:
                await self.fleet.start()
                self._register(list(self.fleet.members.values()))
            await self.maint.load()
            await self.d.db(self.fidelity_meter.load)    # the fidelity corrections learned before
            await self.live.load()
            self.threat.load()      # after the live config (its reservations add to it), before the queue
            t1 = time.monotonic()
            recover(self.d)
            if self.scaling is not None:
                await self._seed_scaling()
            self.startup = {"backends_s": t1 - t0, "recover_s": time.monotonic() - t1,
                            "since_init_s": time.time() - self.started_at,
                            "recovered_jobs": len(self.d.queued) + len(self.d.running)}
        except BaseException as exc:  # surfaced to every caller by _wait_ready
            log.exception("allocator failed to start")
            self._start_error = exc
            self._ready.set()
            return
        self._tasks += self._start_loops()
        self._ready.set()
        self._kick.set()

    async def _start_injected(self) -> None:
        from ray_qalloc.fleet import Host

        assert self._injected is not None
        for name, (spec, actor) in self._injected.items():
            host_name = spec.pool or name
            host = self.fleet.hosts.setdefault(host_name, Host(host_name, "pool" if spec.pool else "backend",
                                                               actor, cores=self.sched.node_cpus.get(host_name, 1.0)))
            host.members.append(name)
            self.fleet.members[name] = Member(spec, host_name)
        await asyncio.gather(*(self.fleet.probe(h, first=True) for h in self.fleet.hosts.values()))
        self._register(list(self.fleet.members.values()))

    def _register(self, members: list[Member]) -> None:
        for m in members:
            node = self.fleet.sched_node(m)
            if node not in self.sched.node_cpus or self._injected is None:
                self.sched.node_cpus.setdefault(node, self.fleet.sched_cores(m))
            if m.spec.name not in self.sched.backends:
                self.sched.add_backend(m.spec, node=node, healthy=m.healthy)

    async def _wait_ready(self) -> None:
        await self._ready.wait()
        if self._start_error is not None:
            raise self._start_error

    # ==== public API (called by clients through Ray) ==========================================
    async def ready(self) -> dict[str, Any]:
        await self._wait_ready()
        return {"data_dir": str(self.settings.data_dir), "store_url": self.settings.resolved_store_url,
                "backends": list(self.fleet.members), "pools": [h.name for h in self.fleet.hosts.values()
                                                                if h.kind == "pool"],
                "started_at": self.started_at, "model": getattr(self.d.predictor, "source", "prior")}

    async def submit(self, job: PreparedJob) -> dict[str, Any]:
        """Store, then queue. Raises NoFeasibleBackend (nothing stored) if no backend could ever run it."""
        await self._wait_ready()
        return await self.d.submit(job)

    async def submit_many(self, jobs: list[PreparedJob]) -> list[dict[str, Any]]:
        await self._wait_ready()
        answers = await self.d.submit_many(jobs)
        if len(jobs) >= 1000:
            gc.freeze()   # queued jobs are acyclic and long-lived: keep them out of future passes
        return answers

    async def status(self, job_id: str) -> dict[str, Any]:
        await self._wait_ready()
        return await self.d.db(self._status, job_id)

    def _status(self, job_id: str, with_result: bool = False) -> dict[str, Any]:
        rec = self.store.get(job_id)
        out = rec.public()
        if with_result:
            out["result"] = rec.result
        out["attempt_history"] = self.store.attempt_history(job_id)
        return out

    async def wait(self, job_id: str, timeout: float | None = None) -> dict[str, Any]:
        """The job's record once it is finished, or its current record after ``timeout`` seconds."""
        await self._wait_ready()
        d = self.d
        known = job_id in d.running or job_id in d.queued
        if not known and job_id in d.finished:
            return d.finished[job_id]
        state = JobState.RUNNING if known else (await self.d.db(self.store.get, job_id)).state
        if not state.terminal and (timeout is None or timeout > 0):
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            d.waiters.setdefault(job_id, []).append(fut)
            try:
                await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                pass
            finally:
                lst = d.waiters.get(job_id, [])
                if fut in lst:
                    lst.remove(fut)
                if not lst:
                    d.waiters.pop(job_id, None)
            if job_id in d.finished:
                return d.finished[job_id]
        return await self.d.db(self._status, job_id, True)

    async def explain(self, job_id: str) -> dict[str, Any]:
        await self._wait_ready()
        rec = await self.d.db(self.store.get, job_id)
        q = self.d.queued.get(job_id) or self.d.running.get(job_id)
        if q is not None and rec.explanation is None:   # queued: the plan, and the current choice
            data = self.d.annotated(explain(q.plan, None))
            if job_id in self.d.choices:
                data.update(self.d.choices[job_id])
        else:
            data = rec.explanation or {"job_id": job_id, "chosen": None, "reason": "never placed",
                                       "backends": {}}
        data["state"] = rec.state.value
        data["flag"] = rec.flag
        data["failover_history"] = await self.d.db(self.store.attempt_history, job_id)
        return data

    async def cancel(self, job_id: str) -> bool:
        """Cancel a job; a running simulation is stopped at once (its cores free), not left to finish."""
        await self._wait_ready()
        if not await self.d.db(self.store.cancel, job_id):
            await self.d.db(self.store.get, job_id)    # raises JobNotFound for an unknown id
            return False
        self.d.cancelled(job_id)
        self.d.take(job_id)
        self.sched.remove(job_id)
        self.d.cancel_running(job_id)
        self.d.notify(job_id)
        self._kick.set()
        return True

    async def backends(self) -> list[dict[str, Any]]:
        """Every placement candidate (a pool's method variants, each QPU) with its live state."""
        await self._wait_ready()
        now = time.time()
        out = []
        for m in self.fleet.members.values():
            host = self.fleet.hosts[m.host]
            s = m.spec
            in_sched = s.name in self.sched.backends
            out.append({
                "name": s.name, "kind": s.kind, "family": s.family, "method": s.method, "device": s.device,
                "pool": s.pool, "threads": s.threads, "num_qubits": s.num_qubits, "slots": s.slots,
                "memory_bytes": s.memory_bytes,
                "running": len(self.sched.backends[s.name].runs) if in_sched else 0,
                "predicted_wait_s": self.sched.predicted_wait(s.name, now) if in_sched else None,
                "healthy": m.healthy, "node_id": host.node_id, "breaker": m.breaker,
                "elastic": host.elastic, "started": host.actor is not None,
                "resource": self.fleet.resource_of(s.name), "calibration": m.calibration,
                "provider": host.provider.to_dict() if host.provider is not None else None})
        return out

    async def pools(self) -> list[dict[str, Any]]:
        """One row per pool: its node, cores, memory, runs, and its method variants."""
        await self._wait_ready()
        rows = []
        for h in self.fleet.hosts.values():
            if h.kind != "pool":
                continue
            node = h.members[0].split("/")[0] if h.members else h.name
            busy = sum(len(self.sched.backends[n].runs) * self.sched.backends[n].spec.threads
                       for n in h.members if n in self.sched.backends)
            rows.append({"name": h.name, "node_id": h.node_id, "cores": h.cores, "memory_bytes": h.memory_bytes,
                         "healthy": h.healthy, "elastic": h.elastic, "busy_cores": busy, "pid": h.pid,
                         "plan_cores": self.sched.node_cpus.get(h.name, h.cores),
                         "foreign_cores": round(self.d.foreign.foreign.get(h.name, 0.0), 2),
                         "members": list(h.members), "sched_node": node})
        return rows

    async def stats(self) -> dict[str, Any]:
        import psutil

        await self._wait_ready()
        return {"queued": len(self.d.queued), "running": len(self.d.running), "flagged": len(self.d.flags),
                "draining": self.d.draining, "startup": self.startup, "hedges": self.d.hedges, "restarts": self.d.restarts,
                "commit_failures": self.d.commit_failures, "overruns_noted": self.d.overruns_noted, "probes": self.d.probes,
                "store": await self.d.db(self.store.counts_by_state), "uptime_s": time.time() - self.started_at,
                "pid": os.getpid(), "rss_bytes": psutil.Process().memory_info().rss}


    async def record_provider_job(self, job_id: str, attempt: int, provider_job_id: str) -> None:
        """Called by a QPU backend actor before it waits on a provider job (stored before it waits)."""
        await self.d.db(self.store.set_provider_job_id, job_id, attempt, provider_job_id)

    async def flush_history(self) -> int:
        await self._wait_ready()
        return await self.d.db(self._flush_history)



def _reconstructed() -> bool:
    """True when Ray restarted this actor (after a crash or a kill), not on its first start."""
    try:
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # not inside an actor (unit tests)
        return False


def allocator_options(settings: Settings) -> dict[str, Any]:
    return {"name": settings.allocator_name, "namespace": settings.namespace, "lifetime": "detached",
            "get_if_exists": True, "max_restarts": -1, "max_task_retries": -1, "num_cpus": 0,
            "max_concurrency": 10_000}


RemoteAllocator = ray.remote(Allocator)

__all__ = ["Allocator", "RemoteAllocator", "allocator_options"]
