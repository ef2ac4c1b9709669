"""The Allocator actor: the facade clients call, start-up and recovery, background loops.

One named, detached actor per cluster, restarted by Ray forever. It holds three parts, one
concern each:

* ``Fleet`` (``fleet.py``): the executors — a simulator pool per node, an actor per QPU — their
  health and circuit breakers;
* ``Dispatcher`` (``dispatch.py``): the queue, runs and every job transition (commit first,
  then act), failover, hedging, stopping runs;
* this class: the public API, start-up, recovery from the store, and the loops (dispatch,
  health, hedging, history export, model hot-reload).

Its queue is memory only and rebuilt from the JobStore on every (re)start: QUEUED jobs are
queued again; RUNNING jobs are re-attached to the executor that runs them (which keeps its
in-flight and recent runs), or re-queued when it no longer knows them.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from typing import Any, Mapping

import ray
from pydantic import ValidationError

from ray_qalloc.adminstate import AdminState
from ray_qalloc.allocator_threat import ThreatOps
from ray_qalloc.autoscale import Requester, waiting_for
from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.config import Settings
from ray_qalloc.costmodel.history import RunHistory
from ray_qalloc.costmodel.registry import ArtifactWatcher, latest_artifact, load_predictor
from ray_qalloc.dispatch import Dispatcher, Queued, Running
from ray_qalloc.exceptions import QAllocError
from ray_qalloc.fleet import Fleet, Member
from ray_qalloc.jobs import JobState, PreparedJob, compact
from ray_qalloc.maintenance import MaintenanceDesk, MaintenanceWindow
from ray_qalloc.placement import explain
from ray_qalloc.placement.scheduler import Scheduler
from ray_qalloc.store import JobStore

log = logging.getLogger("ray_qalloc.allocator")

_RESTING_OUTCOMES = ("running", "completed", "superseded", "requeued", "unreachable", "lost", "preempted",
                     "hedge_lost", "stopped")


class Allocator(ThreatOps):
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
        from ray_qalloc import overruns

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
        self._arrived, self._scaling_since = 0, time.time()
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
            await self._recover()
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
        loop = asyncio.get_running_loop()
        self._tasks += [loop.create_task(self._scheduler()), loop.create_task(self._health_loop()),
                        loop.create_task(self._history_loop()), loop.create_task(self._hedge_loop()),
                        loop.create_task(self.calwatch.run()), loop.create_task(self._ops_loop()),
                        loop.create_task(self._threat_loop()), loop.create_task(self._learning_loop())]
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

    async def _recover(self) -> None:
        """Rebuild the queue from the store; re-attach to runs that were in flight."""
        reattach = []
        for rec in self.store.active():
            job = compact(rec.to_prepared())
            attempts = self.store.attempts(rec.id)
            blocked = frozenset(a["backend"] for a in attempts if a["outcome"] not in _RESTING_OUTCOMES)
            view = self.d.view(job, blocked)
            if rec.state == JobState.QUEUED:
                self.d.enqueue(job, view, rec.created_at)
            else:
                reattach.append((job, view, rec, attempts))
        for job, view, rec, attempts in reattach:
            self._reattach(job, view, rec, attempts)

    def _reattach(self, job: PreparedJob, view: Any, rec: Any, attempts: list[dict[str, Any]]) -> None:
        """Re-attach to the job's newest running attempt (a hedge's other attempt is closed)."""
        live = [a for a in attempts if a["outcome"] == "running"]
        attempt = max(live, key=lambda a: a["n"]) if live else None
        for a in live:
            if a is not attempt:
                self.store.close_attempt(job.id, a["n"], "superseded", "allocator restarted during a hedge")
        m = self.fleet.members.get(attempt["backend"]) if attempt else None
        actor = self.fleet.actor_of(m.spec.name) if m else None
        if attempt is None or m is None or actor is None:
            if attempt is not None:
                self.store.end_attempt(job.id, attempt["n"], "requeued", "allocator restarted", then="requeue")
            self.d.enqueue(job, view, rec.created_at)
            return
        p = self.d.plan_for(view)
        predicted = attempt.get("predicted_s") or 1.0
        r = Running(job, view, p, m.spec.name, attempt["n"], attempt["started_at"], predicted,
                    created_at=rec.created_at)
        self.sched.start(job.id, m.spec.name, attempt["started_at"], predicted, job.priority.value)
        if attempt.get("provider_job_id"):
            ref = actor.reattach.remote(job.id, r.attempt, attempt["provider_job_id"], job.shots,
                                        payload=job.payload)   # an estimator job's observables
        else:
            ref = actor.attach.remote(job.id, r.attempt)
        self.d.attach(r, ref)

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
        self._arrived += 1
        return await self.d.submit(job)

    async def submit_many(self, jobs: list[PreparedJob]) -> list[dict[str, Any]]:
        await self._wait_ready()
        self._arrived += len(jobs)
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
                "draining": self.d.draining, "startup": self.startup, "hedges": self.d.hedges,
                "commit_failures": self.d.commit_failures, "overruns_noted": self.d.overruns_noted, "probes": self.d.probes,
                "store": await self.d.db(self.store.counts_by_state), "uptime_s": time.time() - self.started_at,
                "pid": os.getpid(), "rss_bytes": psutil.Process().memory_info().rss}

    async def drain_all(self, timeout_s: float = 60.0) -> dict[str, int]:
        """Graceful shutdown, step one: start no new runs, wait up to ``timeout_s`` for the
        running ones to finish. Queued (and newly submitted) jobs stay in the store; the next
        allocator to start, or ``resume()``, runs them."""
        await self._wait_ready()
        self.d.draining = True
        deadline = time.monotonic() + timeout_s
        while self.d.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return {"running": len(self.d.running), "queued": len(self.d.queued)}

    async def resume(self) -> None:
        self.d.draining = False
        self._kick.set()

    # ---- live configuration (liveconfig.py) ----------------------------------------------------
    async def config(self) -> dict[str, Any]:
        """The settings in force, what was changed live, and which keys may change."""
        await self._wait_ready()
        return self.live.view()

    async def set_config(self, changes: dict[str, Any], actor: str = "admin",
                         unset: list[str] | None = None) -> dict[str, Any]:
        """Change settings on the running allocator: validated whole, audited, durable, applied."""
        await self._wait_ready()
        out = await self.live.set(changes, actor=actor, unset=unset or ())
        self._kick.set()
        return out

    # ---- maintenance (maintenance.py) ----------------------------------------------------------
    async def cordon(self, name: str, reason: str = "", actor: str = "admin") -> dict[str, Any]:
        """No new runs start on ``name`` (a candidate, a pool or a QPU); running ones finish."""
        await self._wait_ready()
        return await self.maint.cordon(name, actor=actor, reason=reason)

    async def drain(self, timeout_s: float = 60.0, name: str | None = None, reason: str = "",
                    actor: str = "admin") -> dict[str, Any]:
        """With ``name``: cordon it and wait up to ``timeout_s`` for its runs to end (its queued
        jobs go to their next-best backends). Without: the whole allocator (see ``drain_all``)."""
        if name is None:
            return await self.drain_all(timeout_s)
        await self._wait_ready()
        await self.maint.cordon(name, actor=actor, reason=reason, drain=True)
        return await self.maint.wait_drained(name, timeout_s)

    async def uncordon(self, name: str, actor: str = "admin") -> dict[str, Any]:
        await self._wait_ready()
        return await self.maint.uncordon(name, actor=actor)

    async def maintenance_window(self, name: str, start: float, end: float, reason: str = "",
                                 actor: str = "admin") -> dict[str, Any]:
        await self._wait_ready()
        try:
            window = MaintenanceWindow(start=start, end=end, reason=reason)
        except ValidationError as exc:   # the caller's mistake, said plainly (not an outage)
            raise QAllocError(f"bad maintenance window: {exc.errors()[0]['msg']}",
                              field="end", fix="give start < end, in Unix seconds.") from None
        return await self.maint.add_window(name, window, actor=actor)

    async def clear_maintenance_windows(self, name: str, actor: str = "admin") -> dict[str, Any]:
        await self._wait_ready()
        return await self.maint.clear_windows(name, actor=actor)

    async def maintenance(self, name: str | None = None) -> dict[str, Any]:
        await self._wait_ready()
        return self.maint.status(name)

    async def audit(self, key: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Operators' changes, newest first: who, when, action, old → new."""
        await self._wait_ready()
        return await self.d.db(self.admin.audit, key=key, limit=limit)

    async def record_provider_job(self, job_id: str, attempt: int, provider_job_id: str) -> None:
        """Called by a QPU backend actor before it waits on a provider job (stored before it waits)."""
        await self.d.db(self.store.set_provider_job_id, job_id, attempt, provider_job_id)

    async def flush_history(self) -> int:
        await self._wait_ready()
        return await self.d.db(self._flush_history)

    # ==== background loops ====================================================================
    async def _scheduler(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            try:
                await self.d.apply(self.d.decide(time.time()))
            except Exception:  # never let the loop die; the next kick retries
                log.exception("dispatch pass failed")

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            try:
                if self._injected is None:
                    await self.fleet.tick()
                    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
                    busy = {r.backend for r in self.d._all_runs()}
                    self.d.members_removed(self.fleet.prune_dead_pools(alive, busy, time.time()))
                else:
                    await asyncio.gather(*(self.fleet.probe(h) for h in self.fleet.hosts.values()),
                                         return_exceptions=True)
                self.membership.sweep()
                if self._injected is None and any(h.elastic for h in self.fleet.hosts.values()):
                    self._elastic_tick(ray.cluster_resources())
            except Exception:  # never let the health loop die
                log.exception("health tick failed")
            try:
                await self.d.db(self.backend_log.flush)
            except Exception:  # the change stream misses nothing: the rows stay noted until a flush works
                log.exception("backend log flush failed")
            self._poll_model()

    def _health_changed(self, backend: str, up: bool, at: float) -> None:
        host = self.fleet.hosts.get(backend)
        provider = host.provider if host is not None else None
        why = "" if up else (f"out of service at its provider: {provider.message}"
                             if provider is not None and not provider.operational else "not answering")
        self.backend_log.note(backend, "up" if up else "down", why, at)

    async def _ops_loop(self) -> None:
        """Gauges of the allocator's state, and one alert evaluation, every ``alerts.interval_s``."""
        while True:
            await asyncio.sleep(self.settings.alerts.interval_s)
            try:
                await self.ops_tick()
            except Exception:  # never let the loop die; the next round decides again
                log.exception("operations round failed")

    async def ops_tick(self, now: float | None = None) -> dict[str, Any]:
        """One round: refresh state gauges; evaluate the alert rules on a snapshot (commit, then
        apply); returns what the evaluation sent."""
        from ray_qalloc import opsview

        from ray_qalloc import dashboard

        now = time.time() if now is None else now
        await self._expire_threat_actions(now)
        if self.scaling is not None:
            await self._scaling_tick(now)
        opsview.record_gauges(self, now)
        self.timeline.sample(now, dashboard.utilisation(self), dashboard.queue_by_class(self))
        if self.alerts is None:
            return {"events": 0}
        obs = self.d.observer.observations(
            queue_waits=opsview.queue_waits(self.d.queued.values(), now),
            breakers={n: m.breaker for n, m in self.fleet.members.items()},
            calibrated_at=opsview.calibrated_at(self.calwatch, self.fleet),
            quotas=await self.d.db(opsview.quotas, self._tenants, self.d), node_memory=opsview.node_memory(self.fleet),
            now=now)
        decision = await self.d.db(self.alerts.evaluate, obs)
        return {"events": len(decision.events), "errors": list(decision.errors)}

    async def dashboard(self) -> dict[str, Any]:
        """Everything one refresh of the operators' page shows (dashboard.py)."""
        from ray_qalloc import dashboard

        alerts = await self.alerts_view(20)
        prefetch = getattr(self.calwatch, "prefetch", None)
        if prefetch is not None:
            await prefetch()
        return dashboard.data(self, alerts)

    async def alerts_view(self, limit: int = 100) -> dict[str, Any]:
        """Firing alerts, the newest events and per-sink delivery state."""
        await self._wait_ready()
        if self.alerts is None:
            return {"enabled": False, "firing": [], "recent": [], "sinks": {}}
        from ray_qalloc.alerts.service import alert_dict

        recent = await self.d.db(self.alerts.recent, limit)
        counts = await self.d.db(self.alerts.delivery_counts)
        return {"enabled": True, "firing": [alert_dict(a) for a in self.alerts.firing()],
                "recent": [alert_dict(e) for e in recent], "sinks": counts}

    def _calibration_changed(self, names: list[str]) -> None:
        """New calibrations arrived: queued jobs are planned again against them (fidelity,
        coherence budget, freshness), each keeping its place in line."""
        log.info("calibration changed on %s: planning the queue again", ", ".join(names))
        self.d.replan_queued()

    async def calibration_status(self) -> list[dict[str, Any]]:
        """Per QPU: calibration age, staleness, series in alarm, last fetch error."""
        await self._wait_ready()
        return self.calwatch.status()

    async def refresh_calibration(self, name: str | None = None) -> list[dict[str, Any]]:
        """Read calibrations now (one QPU or all), instead of waiting for the period."""
        await self._wait_ready()
        events = await self.calwatch.tick(names=None if name is None else [name])
        return [{"device": e.device, "series": e.key.label, "kind": e.kind, "at": e.at, "factor": e.factor,
                 "message": e.message} for e in events]

    def _elastic_tick(self, cluster: dict[str, float]) -> None:
        """Keep the autoscaling request in step with what queued jobs wait for; start and stop
        elastic QPU backends."""
        waiting = [waiting_for(q.plan) for q in self.d.queued.values()]
        wanted = {b for w in waiting for b in w[:1]}
        busy = {r.backend for r in self.d.running.values()}
        self.fleet.elastic_tick(wanted, busy, cluster)
        try:
            self._autoscale.update(waiting, cluster)
        except Exception as exc:  # no autoscaler here, or the GCS is busy: try next tick
            log.debug("autoscaling request not sent: %s", exc)

    async def _hedge_loop(self) -> None:
        """Overrunning simulator runs: remember the overrun, start a backup where it pays."""
        from ray_qalloc import overruns

        interval = self.settings.hedge.interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                await overruns.tick(self.d, self.settings, time.time())
            except Exception:
                log.exception("hedge tick failed")

    def _poll_model(self) -> None:
        """Pick up a newly published model artifact without a restart (new plans use it)."""
        try:
            fresh = self._watcher.poll()
        except Exception:  # a half-written registry must not stop the allocator
            log.exception("model registry poll failed")
            return
        if fresh is not None:
            log.warning("cost model switched to %s", self._watcher.current)
            from ray_qalloc import overruns

            from ray_qalloc.costmodel import policy as learning_policy

            self.d.predictor = learning_policy.wrap(fresh, self.d.predictor, learning=self.settings.learning,
                                                    explore_factor=self.settings.placement.explore_factor,
                                                    weights=self.settings.placement.table())
            from ray_qalloc.liveconfig import _explore

            _explore(self.d.predictor, self.settings.placement.explore_factor)

    def _urgent_waiting(self) -> bool:
        """Retraining runs at batch priority: not while emergency or high-priority jobs wait."""
        return any(q.job.priority.value in ("emergency", "high") for q in self.d.queued.values())

    async def _learning_loop(self) -> None:
        """Save the bandit's state every ``learning.save_s``; step the retraining loop every
        ``learning.retrain.check_s`` (both in the store thread: they touch the database)."""
        from ray_qalloc.costmodel.policy import bandit_of

        learning = self.settings.learning
        last_check = time.time()
        while True:
            await asyncio.sleep(learning.save_s)
            bandit = bandit_of(self.d.predictor)
            try:
                if bandit is not None:
                    await self.d.db(self.bandit_store.save, bandit.snapshot())
                if self.retrain is not None and (self.retrain.state != "idle"
                                                 or time.time() - last_check >= learning.retrain.check_s):
                    last_check = time.time()
                    await self.d.db(self.retrain.tick)
            except Exception:  # never let the loop die; the next round tries again
                log.exception("learning round failed")

    async def _history_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.history_flush_s)
            try:
                await self.d.db(self._flush_history)
            except Exception:  # the store keeps the rows; the next flush retries
                log.exception("history flush failed")

    def _flush_history(self) -> int:
        rows = self.store.unexported_runs()
        if not rows:
            return self.fidelity_meter.export(self.history)
        self.history.append(rows)
        self.store.mark_exported(r["id"] for r in rows)
        return len(rows) + self.fidelity_meter.export(self.history)


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
