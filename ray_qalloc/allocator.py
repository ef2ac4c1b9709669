"""The Allocator actor: queue, placement, dispatch, completion, failover.

One named, detached actor per cluster, restarted by Ray forever. Its queue is memory only
and rebuilt from the JobStore in ``_start`` on every (re)start: QUEUED jobs are queued
again; RUNNING jobs are re-attached to the backend actor that runs them (which keeps its
in-flight and recent runs), or re-queued when that actor no longer knows them.

Every state change goes to the store first (``JobStore`` transitions), then happens:
the store says RUNNING before the backend is called, COMPLETED before a waiter is woken.

Failover follows SkyPilot: when an attempt dies with its backend actor, times out or
raises a backend error, the job is placed again with that backend blocked, and the
attempts table keeps the failover history.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

from ray_qalloc.backends.actor import RemoteBackendActor, backend_actor_options
from ray_qalloc.autoscale import Requester, waiting_for
from ray_qalloc.backends.base import BackendSpec, resource_name
from ray_qalloc.config import Settings
from ray_qalloc.costmodel.history import RunHistory
from ray_qalloc.costmodel.registry import ArtifactWatcher, latest_artifact, load_predictor
from ray_qalloc.exceptions import BackendError, InvalidJobSpec, JobNotFound, NoFeasibleBackend
from ray_qalloc.jobs import JobState, PreparedJob, compact
from ray_qalloc.placement import BackendView, JobView, Plan, explain, plan
from ray_qalloc.placement.filters import make_filters
from ray_qalloc.placement.scheduler import PassResult, Run, Scheduler, SchedulerConfig
from ray_qalloc.store import JobStore

log = logging.getLogger("ray_qalloc.allocator")

try:  # Ray ≥ 2.x raises this for an actor that is restarting
    from ray.exceptions import ActorUnavailableError
except ImportError:  # pragma: no cover
    ActorUnavailableError = RayActorError  # type: ignore[misc,assignment]

_FINISHED_KEEP = 10_000
_ACTOR_GONE = (RayActorError, ActorUnavailableError, WorkerCrashedError)
_FIRST_PROBE_S = 30.0
_UNREACHABLE_AFTER = 2   # missed health checks in a row before a simulator's runs are placed again


@dataclass
class Member:
    """A backend of the pool as the allocator sees it."""

    spec: BackendSpec
    actor: Any
    healthy: bool = False
    calibration: dict[str, float] | None = None
    node_id: str | None = None
    calibration_taken_at: float | None = None
    # circuit breaker: consecutive failed runs; while open, no runs until a probe succeeds
    failures: int = 0
    missed: int = 0                   # health checks missed in a row
    elastic: bool = False             # started only while a node offers its resource
    last_used: float = 0.0
    open_until: float = 0.0
    cooldown_s: float = 0.0

    @property
    def breaker_open(self) -> bool:
        return self.open_until > 0.0

    def view(self) -> BackendView:
        age = None if self.calibration_taken_at is None else max(time.time() - self.calibration_taken_at, 0.0)
        return BackendView(self.spec, self.healthy, self.calibration, age)


@dataclass
class Queued:
    job: PreparedJob
    view: JobView
    plan: Plan
    enqueued_at: float
    created_at: float


@dataclass
class Running:
    job: PreparedJob
    view: JobView
    plan: Plan
    backend: str
    attempt: int
    started_at: float
    predicted_s: float
    task: asyncio.Task | None = None
    created_at: float = 0.0


class Allocator:
    """See module docstring. Created by ``ray_qalloc.connect`` via ``allocator_options``."""

    def __init__(self, settings: Settings, members: dict[str, "Member"] | None = None,
                 node_cpus: dict[str, float] | None = None) -> None:
        """``members`` and ``node_cpus`` inject a ready pool (tests use small fakes); by
        default the pool comes from ``settings.pool`` and the cluster's nodes."""
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
        self.predictor: Any = load_predictor(settings.models_dir)
        self.filters = make_filters(settings.tenant_backends, settings.max_calibration_age_s, health=False)
        self._watcher = ArtifactWatcher(settings.models_dir, current=latest_artifact(settings.models_dir))
        self.members: dict[str, Member] = {}
        self.queued: dict[str, Queued] = {}
        self.running: dict[str, Running] = {}
        self.waiters: dict[str, list[asyncio.Future[None]]] = {}
        self.choices: dict[str, dict[str, Any]] = {}
        # Final records of recently completed single-attempt jobs: a waiter is answered from
        # memory instead of two store reads (the store has the same data, committed first).
        self.finished: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self.node_cpus: dict[str, float] = dict(node_cpus or {})
        self.sched = Scheduler(SchedulerConfig(**settings.scheduler), node_cpus=self.node_cpus)
        self.flags: dict[str, str] = {}              # job -> why it will miss its deadline
        self._preempting: dict[str, str] = {}        # job -> backend whose run is being stopped for an emergency
        self.draining = False                        # drain(): accept and store, start nothing new
        self.startup: dict[str, float] = {}          # how long the last start took, by step (stats)
        self.started_at = time.time()
        self._kick = asyncio.Event()
        self._ready = asyncio.Event()
        self._autoscale = Requester(slots={})
        # A restarted allocator serves at once with the backends that answer; one still warming
        # up (restarted with it, or busy) is picked up by the health loop a moment later. A fresh
        # one waits for its new backends' warm-up so that the first jobs find them ready.
        self._first_probe_s = _FIRST_PROBE_S
        if self._injected is None and _reconstructed():
            self._first_probe_s = settings.health_timeout_s
        self._start_error: BaseException | None = None
        self._tasks: list[asyncio.Task] = [asyncio.get_running_loop().create_task(self._start())]

    # ==== start-up and recovery ===============================================================
    async def _start(self) -> None:
        try:
            t0 = time.monotonic()
            await self._start_backends()
            t1 = time.monotonic()
            await self._recover()
            self.startup = {"backends_s": t1 - t0, "recover_s": time.monotonic() - t1,
                            "since_init_s": time.time() - self.started_at,
                            "recovered_jobs": len(self.queued) + len(self.running)}
        except BaseException as exc:  # surfaced to every caller by _wait_ready
            log.exception("allocator failed to start")
            self._start_error = exc
            self._ready.set()
            return
        loop = asyncio.get_running_loop()
        self._tasks += [loop.create_task(self._scheduler()), loop.create_task(self._health_loop()),
                        loop.create_task(self._history_loop())]
        self._ready.set()
        self._kick.set()

    async def _start_backends(self) -> None:
        from ray_qalloc.backends.registry import make_backend

        if self._injected is not None:
            self.members = dict(self._injected)
            await asyncio.gather(*(self._probe(m, first=True) for m in self.members.values()))
            self._register_pool()
            return
        cluster = ray.cluster_resources()
        self._refresh_nodes()
        # A cluster that declares qalloc resources places each backend on the nodes that offer
        # its resource; a backend no node offers yet is *elastic*: its actor is started when an
        # (autoscaled) node brings the resource, and stopped again when idle so the node can go.
        # A plain cluster that declares none runs every backend without its resource.
        declared = any(k.startswith(resource_name("")) for k in cluster)
        for name in pool_names(self.settings.pool):
            spec = make_backend(name).spec()
            self._autoscale.slots[name] = spec.slots
            has_resource = cluster.get(spec.resource_name, 0.0) >= spec.slots
            if not has_resource and declared:
                log.warning("no node offers %s yet: %s waits for one (autoscaling may bring it)",
                            spec.resource_name, name)
                self.members[name] = Member(spec, None, elastic=True)
                continue
            if not has_resource:
                log.warning("no node offers %s; %s runs without its custom resource",
                            spec.resource_name, name)
            self.members[name] = Member(spec, self._start_actor(spec, use_resource=has_resource))
        await asyncio.gather(*(self._probe(m, first=True) for m in self.members.values()))
        self._register_pool()

    def _refresh_nodes(self) -> None:
        """Each live node's CPU count, for the scheduler's per-node core sharing (the scheduler
        keeps its own copy: both are updated)."""
        for node in ray.nodes():
            if node.get("Alive"):
                cpus = float(node.get("Resources", {}).get("CPU", 1.0))
                self.node_cpus[node["NodeID"]] = cpus
                self.sched.node_cpus[node["NodeID"]] = cpus

    def _start_actor(self, spec: BackendSpec, *, use_resource: bool = True) -> Any:
        opts = backend_actor_options(spec, self.settings.namespace, use_resource=use_resource)
        return RemoteBackendActor.options(**opts).remote(
            spec.name, None, self.settings.namespace, self.settings.allocator_name)

    def _elastic_tick(self, cluster: dict[str, float]) -> None:
        """Start elastic backends whose resource appeared; stop idle ones so their node can go;
        keep the autoscaling request in step with what queued jobs wait for."""
        now = time.time()
        waiting = [waiting_for(q.plan) for q in self.queued.values()]
        wanted = {b for w in waiting for b in w[:1]}
        busy = {r.backend for r in self.running.values()}
        for name, m in self.members.items():
            if not m.elastic:
                continue
            if name in wanted or name in busy:
                m.last_used = now
            if m.actor is None and name in wanted and cluster.get(m.spec.resource_name, 0.0) >= m.spec.slots:
                log.warning("a node offers %s now: starting backend %s", m.spec.resource_name, name)
                m.actor, m.last_used = self._start_actor(m.spec), now
            elif m.actor is not None and now - m.last_used > self.settings.elastic_idle_s:
                log.warning("elastic backend %s idle for %.0f s: stopping it so its node can be released",
                            name, now - m.last_used)
                try:
                    ray.kill(m.actor, no_restart=True)
                except Exception:  # already gone
                    pass
                m.actor, m.healthy = None, False
                if name in self.sched.backends:
                    self.sched.set_health(name, False)
        try:
            self._autoscale.update(waiting, cluster)
        except Exception as exc:  # no autoscaler here, or the GCS is busy: try next tick
            log.debug("autoscaling request not sent: %s", exc)

    def _register_pool(self) -> None:
        default_node = next(iter(self.node_cpus), "local")
        for m in self.members.values():
            self.sched.add_backend(m.spec, node=m.node_id or default_node, healthy=m.healthy)

    async def _probe(self, m: Member, first: bool = False) -> None:
        # The first probe waits for the actor to start and warm up, but not forever: a backend
        # whose node is gone must not keep a restarted allocator from serving the others; it
        # stays unhealthy and the health loop keeps probing it.
        timeout = self._first_probe_s if first else self.settings.health_timeout_s
        if m.breaker_open and time.time() < m.open_until:
            return   # cooling down: not probed, stays out of placement
        if m.actor is None:   # elastic backend without a node yet
            m.healthy = False
            return
        try:
            info = await asyncio.wait_for(_aref(m.actor.ping.remote()), timeout)
            m.node_id = info.get("node_id")
            was = m.healthy
            m.healthy = True
            if m.breaker_open:   # half-open: the probe answered; the next run decides
                log.warning("backend %s: breaker half-open after %.0f s, trying it again", m.spec.name,
                            m.cooldown_s)
                m.open_until = 0.0
            if m.node_id and m.node_id not in self.sched.node_cpus and self._injected is None:
                self._refresh_nodes()   # a node that joined since: learn its cores first
            if m.spec.name in self.sched.backends:
                self.sched.set_health(m.spec.name, True)
                if m.node_id:
                    self.sched.set_node(m.spec.name, m.node_id)
            if first or m.calibration is None:
                cal = await asyncio.wait_for(_aref(m.actor.calibration.remote()), timeout)
                m.calibration = cal.summary() if cal is not None else None
                m.calibration_taken_at = getattr(cal, "taken_at", None)
            if not was:
                self._kick.set()
        except (asyncio.TimeoutError, *_ACTOR_GONE, RayTaskError) as exc:
            if m.healthy:
                log.warning("backend %s failed its health check: %s", m.spec.name, type(exc).__name__)
            m.healthy = False
            m.missed += 1
            if m.spec.name in self.sched.backends:
                self.sched.set_health(m.spec.name, False)
            if m.missed >= _UNREACHABLE_AFTER and m.spec.kind == "simulator":
                self._fail_over_runs_on(m.spec.name, f"backend unreachable: {m.missed} health checks missed "
                                                     f"({type(exc).__name__})")
            return
        m.missed = 0

    def _fail_over_runs_on(self, name: str, why: str) -> None:
        """Runs on a simulator that stopped answering are placed again without waiting for Ray
        to declare its node dead (tens of seconds). A simulator run is idempotent, and a late
        result of the abandoned attempt is ignored (completion is exactly-once per job), so
        this costs at most duplicate work. QPU runs are not re-submitted (they cost money):
        they are re-attached when the actor comes back."""
        for r in [r for r in self.running.values() if r.backend == name]:
            if r.task is not None:
                r.task.cancel()
            self._failover(r, "unreachable", why, block=False)

    async def _recover(self) -> None:
        """Rebuild the queue from the store; re-attach to runs that were in flight."""
        reattach = []
        for rec in self.store.active():
            job = compact(rec.to_prepared())
            blocked = frozenset(a["backend"] for a in self.store.attempts(rec.id)
                                if a["outcome"] not in ("running", "completed", "superseded", "requeued",
                                                        "unreachable", "lost", "preempted"))
            view = self._view(job, blocked)
            if rec.state == JobState.QUEUED:
                self._enqueue(job, view, rec.created_at)
            else:
                reattach.append((job, view, rec))
        for job, view, rec in reattach:
            self._reattach(job, view, rec)

    def _reattach(self, job: PreparedJob, view: JobView, rec: Any) -> None:
        attempt = self.store.attempt(job.id, rec.attempts)
        m = self.members.get(rec.backend or "")
        if attempt is None or m is None:
            self.store.end_attempt(job.id, rec.attempts, "requeued", "allocator restarted", then="requeue")
            self._enqueue(job, view, rec.created_at)
            return
        p = plan(view, [x.view() for x in self.members.values()], self.predictor, self.filters)
        predicted = attempt.get("predicted_s") or 1.0
        r = Running(job, view, p, m.spec.name, attempt["n"], attempt["started_at"], predicted,
                    created_at=rec.created_at)
        self.running[job.id] = r
        self.sched.start(job.id, m.spec.name, attempt["started_at"], predicted, job.priority.value)
        if attempt.get("provider_job_id"):
            ref = m.actor.reattach.remote(job.id, r.attempt, attempt["provider_job_id"], job.shots)
        else:
            ref = m.actor.attach.remote(job.id, r.attempt)
        r.task = asyncio.get_running_loop().create_task(self._watch(r, ref))

    async def _wait_ready(self) -> None:
        await self._ready.wait()
        if self._start_error is not None:
            raise self._start_error

    # ==== public API (called by clients through Ray) ==========================================
    async def ready(self) -> dict[str, Any]:
        await self._wait_ready()
        return {"data_dir": str(self.settings.data_dir), "store_url": self.settings.resolved_store_url,
                "backends": list(self.members), "started_at": self.started_at,
                "model": getattr(self.predictor, "source", "prior")}

    async def submit(self, job: PreparedJob) -> dict[str, Any]:
        """Store, then queue. Raises NoFeasibleBackend (nothing stored) if no backend could ever run it."""
        await self._wait_ready()
        if job.id in self.queued or job.id in self.running:
            # the same call again (Ray re-sends a call to a restarted allocator, which already
            # recovered the job from the store): answer it, change nothing
            return {"id": job.id, "created": False, "flag": self.flags.get(job.id), "state": self._live_state(job.id)}
        job = compact(job)
        view, p = self._checked_plan(job, [m.view() for m in self.members.values()])
        # Enqueue and run one pass now; if this job starts at once, accept and dispatch it in one
        # commit (the fast path), before the backend is called and before the reply.
        now = time.time()
        entry = self.sched.enqueue(view, p, now)
        res = self._decide(now)
        mine = next((d for d in res.dispatch if d.entry.job.id == job.id), None)
        dispatch_to = None
        if mine is not None:
            dispatch_to = (mine.choice.backend, p.estimates[mine.choice.backend].runtime_s, explain(p, mine.explained))
        job_id, created, attempt = self.store.add_job(job, now=now, dispatch_to=dispatch_to)
        if not created:  # the same idempotency key again: undo this pass's bookkeeping for it
            self.sched.finish(job.id) if mine is not None else self.sched.remove(job.id)
        else:
            q = Queued(job, view, p, now, now)
            if attempt is not None and mine is not None:
                self.choices[job.id] = {"chosen": mine.choice.backend, "reason": mine.choice.reason}
                self._launch(q, mine.choice.backend, attempt)
            else:
                self.queued[job.id] = q
            if entry.flagged:  # hopeless from the start: say so now, not after the deadline
                self._flag(job.id, entry.flagged)
        self._apply(res, skip=job.id)
        return {"id": job_id, "created": created, "flag": self.flags.get(job_id),
                "state": self._live_state(job_id) if created else None}

    def _live_state(self, job_id: str) -> str:
        """State of a job this allocator holds (running or queued), without a store read."""
        return (JobState.RUNNING if job_id in self.running else JobState.QUEUED).value

    async def submit_many(self, jobs: list[PreparedJob]) -> list[dict[str, Any]]:
        """Many jobs in one call and one store transaction. Each job gets its own answer:
        ``{"id", "created"}``, or ``{"error": {...}}`` for a job no backend could run (nothing
        stored for it); the others are accepted regardless."""
        await self._wait_ready()
        answers: list[dict[str, Any]] = []
        good: list[tuple[int, PreparedJob, JobView, Plan]] = []
        views = [m.view() for m in self.members.values()]
        for i, job in enumerate(jobs):
            job = compact(job)
            try:
                view, p = self._checked_plan(job, views)
            except (InvalidJobSpec, NoFeasibleBackend) as exc:
                answers.append({"error": exc.to_dict()})
                continue
            answers.append({})
            good.append((i, job, view, p))
        now = time.time()
        results = self.store.add_jobs([g[1] for g in good], now=now)
        for (i, job, view, p), (job_id, created) in zip(good, results):
            answers[i] = {"id": job_id, "created": created}
            if created:
                self._enqueue(job, view, now, p)
        self._apply(self._decide(time.time()))
        if len(jobs) >= 1000:
            gc.freeze()   # queued jobs are acyclic and long-lived: keep them out of future passes
        return answers

    def _checked_plan(self, job: PreparedJob, views: list[BackendView]) -> tuple[JobView, Plan]:
        unknown = sorted(set(job.backends or ()) - set(self.members))
        if unknown:
            raise InvalidJobSpec(f"field 'backends' names unknown backend(s): {', '.join(unknown)}.",
                                 field="backends", fix=f"use names from the pool: {', '.join(self.members)}.")
        view = self._view(job, frozenset())
        p = plan(view, views, self.predictor, self.filters)
        if _hopeless(p):
            raise NoFeasibleBackend(
                f"no backend of the pool can run job {job.id}: " + _why_not(p),
                fix="reduce the circuit (qubits, operations), relax intent or fidelity_min, or add a backend.",
                explanation=explain(p, None))
        return view, p

    async def status(self, job_id: str) -> dict[str, Any]:
        await self._wait_ready()
        rec = self.store.get(job_id)
        out = rec.public()
        out["attempt_history"] = self.store.attempt_history(job_id)
        return out

    async def wait(self, job_id: str, timeout: float | None = None) -> dict[str, Any]:
        """The job's record once it is finished, or its current record after ``timeout`` seconds."""
        await self._wait_ready()
        known = job_id in self.running or job_id in self.queued
        if not known and job_id in self.finished:
            return self.finished[job_id]
        state = JobState.RUNNING if known else self.store.get(job_id).state
        if not state.terminal and (timeout is None or timeout > 0):
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.waiters.setdefault(job_id, []).append(fut)
            try:
                await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                pass
            finally:
                lst = self.waiters.get(job_id, [])
                if fut in lst:
                    lst.remove(fut)
            if job_id in self.finished:
                return self.finished[job_id]
        rec = self.store.get(job_id)
        out = rec.public()
        out["result"] = rec.result
        out["attempt_history"] = self.store.attempt_history(job_id)
        return out

    async def explain(self, job_id: str) -> dict[str, Any]:
        await self._wait_ready()
        rec = self.store.get(job_id)
        q = self.queued.get(job_id) or self.running.get(job_id)
        if q is not None and rec.explanation is None:   # queued: the plan, and the current choice
            data = explain(q.plan, None)
            if job_id in self.choices:
                data.update(self.choices[job_id])
        else:
            data = rec.explanation or {"job_id": job_id, "chosen": None, "reason": "never placed",
                                       "backends": {}}
        data["state"] = rec.state.value
        data["flag"] = rec.flag
        data["failover_history"] = self.store.attempt_history(job_id)
        return data

    async def cancel(self, job_id: str) -> bool:
        await self._wait_ready()
        if not self.store.cancel(job_id):
            if not self.store.get(job_id):
                raise JobNotFound(f"no job with id {job_id!r}.", field="job_id")
            return False
        self.queued.pop(job_id, None)
        self.sched.remove(job_id)
        self.sched.finish(job_id)
        r = self.running.pop(job_id, None)
        if r is not None:
            if r.task is not None:
                r.task.cancel()
        self._notify(job_id)
        self._kick.set()
        return True

    async def backends(self) -> list[dict[str, Any]]:
        await self._wait_ready()
        return [{"name": m.spec.name, "kind": m.spec.kind, "family": m.spec.family, "method": m.spec.method,
                 "device": m.spec.device, "num_qubits": m.spec.num_qubits, "slots": m.spec.slots,
                 "running": len(self.sched.backends[m.spec.name].runs) if m.spec.name in self.sched.backends else 0,
                 "predicted_wait_s": (self.sched.predicted_wait(m.spec.name, time.time())
                                      if m.spec.name in self.sched.backends else None),
                 "healthy": m.healthy, "node_id": m.node_id,
                 "breaker": ("open" if m.breaker_open else "half-open" if m.cooldown_s else "closed"),
                 "elastic": m.elastic, "started": m.actor is not None,
                 "resource": m.spec.resource_name, "calibration": m.calibration}
                for m in self.members.values()]

    async def stats(self) -> dict[str, Any]:
        import psutil

        await self._wait_ready()
        return {"queued": len(self.queued), "running": len(self.running), "flagged": len(self.flags),
                "draining": self.draining, "startup": self.startup,
                "store": self.store.counts_by_state(), "uptime_s": time.time() - self.started_at,
                "pid": os.getpid(), "rss_bytes": psutil.Process().memory_info().rss}

    async def drain(self, timeout_s: float = 60.0) -> dict[str, int]:
        """Graceful shutdown, step one: start no new runs, wait up to ``timeout_s`` for the
        running ones to finish. Queued (and newly submitted) jobs stay in the store; the next
        allocator to start, or ``resume()``, runs them."""
        await self._wait_ready()
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return {"running": len(self.running), "queued": len(self.queued)}

    async def resume(self) -> None:
        self.draining = False
        self._kick.set()

    async def record_provider_job(self, job_id: str, attempt: int, provider_job_id: str) -> None:
        """Called by a backend actor before it waits on a provider (QPU) job."""
        self.store.set_provider_job_id(job_id, attempt, provider_job_id)

    async def flush_history(self) -> int:
        await self._wait_ready()
        return self._flush_history()

    # ==== queue and dispatch ==================================================================
    def _view(self, job: PreparedJob, blocked: frozenset[str]) -> JobView:
        return JobView(job.id, job.num_qubits, job.ops, job.features, job.shots, job.intent.value,
                       job.priority.value, job.fidelity_min, job.deadline_s, job.tenant, blocked,
                       frozenset(job.backends) if job.backends else None)

    def _enqueue(self, job: PreparedJob, view: JobView, created_at: float, p: Plan | None = None) -> None:
        """Into the queue, keeping its place in line (``created_at``); flag it at once if its
        deadline is already out of reach."""
        if p is None:
            p = plan(view, [m.view() for m in self.members.values()], self.predictor, self.filters)
        self.queued[job.id] = Queued(job, view, p, time.time(), created_at)
        entry = self.sched.enqueue(view, p, created_at)
        if entry.flagged:
            self._flag(job.id, entry.flagged)

    async def _scheduler(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            try:
                self._dispatch_pass()
            except Exception:  # never let the loop die; the next kick retries
                log.exception("dispatch pass failed")

    def _dispatch_pass(self) -> None:
        self._apply(self._decide(time.time()))

    def _decide(self, now: float) -> PassResult:
        """A scheduler pass, or nothing while draining (jobs are still accepted and stored)."""
        return PassResult() if self.draining else self.sched.decide(now)

    def _apply(self, res: PassResult, skip: str | None = None) -> None:
        """Carry out one scheduler pass: start runs, record flags, preempt, give up."""
        for entry in res.unplaceable:
            self.queued.pop(entry.job.id, None)
            self._give_up(entry.job.id, "no feasible backend left: " + _why_not(entry.plan), entry.plan)
        for entry in res.flagged:
            self._flag(entry.job.id, entry.flagged or "deadline at risk")
        for d in res.dispatch:
            if d.entry.job.id == skip:
                continue
            q = self.queued.get(d.entry.job.id)
            if q is None:  # cancelled between enqueue and this pass
                self.sched.finish(d.entry.job.id)
                continue
            self.choices[q.job.id] = {"chosen": d.choice.backend, "reason": d.choice.reason}
            self._dispatch(q, d.explained)
        for run, entry in res.preempt:
            self._preempt(run, entry.job.id)

    def _flag(self, job_id: str, reason: str) -> None:
        """A job that will miss its deadline is flagged (stored, shown in status and explain)."""
        if self.flags.get(job_id) == reason:
            return
        self.flags[job_id] = reason
        self.store.flag(job_id, reason)

    def _preempt(self, run: Run, for_job: str) -> None:
        """Stop a batch simulator run for an emergency job: the run's actor is restarted (an Aer
        run cannot be interrupted in place) and the batch job goes back to the queue, keeping its
        place; nothing is lost."""
        r = self.running.get(run.job_id)
        m = self.members.get(run.backend)
        if r is None or m is None or run.job_id in self._preempting:
            return
        log.warning("preempting batch job %s on %s for emergency job %s", run.job_id, run.backend, for_job)
        self._preempting[run.job_id] = run.backend
        try:
            ray.kill(m.actor, no_restart=False)
        except Exception:  # injected fakes, or the actor is already gone
            if r.task is not None:
                r.task.cancel()

    def _dispatch(self, q: Queued, choice: Any) -> None:
        name = choice.backend
        est = q.plan.estimates[name]
        expl = explain(q.plan, choice)
        attempt = self.store.dispatch(q.job.id, name, predicted_s=est.runtime_s, queued_at=q.enqueued_at,
                                      explanation=expl)
        self.queued.pop(q.job.id, None)
        if attempt is None:  # cancelled meanwhile
            self.sched.finish(q.job.id)
            return
        self._launch(q, name, attempt)

    def _launch(self, q: Queued, name: str, attempt: int) -> None:
        """Call the backend actor; the store already says RUNNING, the scheduler counts the run."""
        m = self.members[name]
        est = q.plan.estimates[name]
        now = time.time()
        r = Running(q.job, q.view, q.plan, name, attempt, now, est.runtime_s, created_at=q.created_at)
        self.running[q.job.id] = r
        ref = m.actor.run.remote(q.job.id, attempt, q.job.payload, q.job.shots)
        r.task = asyncio.get_running_loop().create_task(self._watch(r, ref))

    def _timeout(self, r: Running) -> float:
        return max(self.settings.run_timeout_floor_s, self.settings.run_timeout_factor * r.predicted_s)

    async def _watch(self, r: Running, ref: Any) -> None:
        try:
            elapsed = time.time() - r.started_at
            result = await asyncio.wait_for(_aref(ref), max(self._timeout(r) - elapsed, 1.0))
        except asyncio.CancelledError:
            _cancel(ref)
            raise
        except asyncio.TimeoutError:
            _cancel(ref)
            self._failover(r, "timed_out", f"no result after {self._timeout(r):.0f} s")
            return
        except _ACTOR_GONE as exc:
            self._failover(r, "actor_died", f"{type(exc).__name__}: {str(exc)[:300]}")
            return
        except BackendError as exc:
            self._failover(r, "backend_error", str(exc)[:500])
            return
        except RayTaskError as exc:
            cause = exc.cause if hasattr(exc, "cause") else exc
            kind = "backend_error" if isinstance(cause, BackendError) else "error"
            self._failover(r, kind, f"{type(cause).__name__}: {str(cause)[:500]}")
            return
        except Exception as exc:  # noqa: BLE001 - anything else is this attempt's failure
            self._failover(r, "error", f"{type(exc).__name__}: {str(exc)[:500]}")
            return
        if result is None:  # re-attach found nothing: the run was lost with its actor
            self._failover(r, "lost", "backend actor no longer knew this run", block=False)
            return
        self._complete(r, result)

    def _complete(self, r: Running, result: dict[str, Any]) -> None:
        if self.running.get(r.job.id) is r:
            self.running.pop(r.job.id)
        self._run_succeeded(r.backend)
        self.sched.finish(r.job.id)
        self._preempting.pop(r.job.id, None)
        result = dict(result)
        result["queue_s"] = r.started_at - (r.created_at or r.started_at)
        result["launched_at"] = r.started_at
        recorded = self.store.complete(r.job.id, r.attempt, result)
        if recorded and r.attempt == 1:
            self._remember_final(r, result)
        if recorded:
            self._observe(r, result)
        self._notify(r.job.id)
        self._kick.set()

    def _remember_final(self, r: Running, result: dict[str, Any]) -> None:
        job, now = r.job, time.time()
        self.finished[job.id] = {
            "id": job.id, "tenant": job.tenant, "state": JobState.COMPLETED.value,
            "priority": job.priority.value, "intent": job.intent.value, "shots": job.shots,
            "deadline_s": job.deadline_s, "fidelity_min": job.fidelity_min, "num_qubits": job.num_qubits,
            "created_at": r.created_at, "updated_at": now, "backend": r.backend, "attempts": 1, "error": None,
            "flag": self.flags.get(job.id),
            "result": result,
            "attempt_history": [{"attempt": 1, "backend": r.backend, "outcome": "completed",
                                 "started_at": r.started_at, "finished_at": now, "error": None}],
        }
        while len(self.finished) > _FINISHED_KEEP:
            self.finished.popitem(last=False)

    def _failover(self, r: Running, outcome: str, error: str, *, block: bool = True) -> None:
        if self.running.get(r.job.id) is r:
            self.running.pop(r.job.id)
        self.sched.finish(r.job.id)
        if self._preempting.pop(r.job.id, None) is not None and outcome in ("actor_died", "error"):
            self._requeue_preempted(r)
            return
        log.warning("job %s attempt %d on %s: %s (%s)", r.job.id, r.attempt, r.backend, outcome, error)
        if outcome in ("actor_died", "timed_out"):
            self.members[r.backend].healthy = False  # until its next health check answers
            self.sched.set_health(r.backend, False)
        if outcome in ("actor_died", "timed_out", "backend_error", "error"):
            self._run_failed(r.backend)
        blocked = r.view.blocked | {r.backend} if block else r.view.blocked
        view = JobView(**{**r.view.__dict__, "blocked": blocked})
        if r.attempt >= self.settings.max_attempts:
            self.store.end_attempt(r.job.id, r.attempt, outcome, error, then="fail")
            self._notify(r.job.id)
            return
        if not self.store.end_attempt(r.job.id, r.attempt, outcome, error, then="failover"):
            return  # cancelled or already finished
        p = plan(view, [m.view() for m in self.members.values()], self.predictor, self.filters)
        if _hopeless(p) and outcome == "actor_died" and r.backend not in r.view.blocked:
            # the only backend(s) it may use died: Ray restarts the actor (here or on another
            # node), so the job waits for it instead of failing; max_attempts bounds the retries
            view = r.view
            p = plan(view, [m.view() for m in self.members.values()], self.predictor, self.filters)
        # A backend that is only unhealthy (restarting) stays a candidate once it recovers.
        if _hopeless(p):
            self._give_up(r.job.id, f"attempt {r.attempt} failed on {r.backend} ({outcome}) and no other "
                                    "backend can run it", p)
            return
        self._enqueue(r.job, view, r.created_at, p)
        self._kick.set()

    def _run_failed(self, name: str) -> None:
        """Circuit breaker: after ``breaker_failures`` failed runs in a row the backend gets no
        runs until a health probe succeeds after a cooldown (doubling while it keeps failing),
        so a broken backend does not burn every queued job's attempts."""
        m = self.members.get(name)
        if m is None:
            return
        m.failures += 1
        if m.failures < self.settings.breaker_failures and not m.breaker_open and m.cooldown_s == 0.0:
            return
        s = self.settings
        m.cooldown_s = s.breaker_cooldown_s if m.cooldown_s == 0.0 else min(2 * m.cooldown_s, s.breaker_max_cooldown_s)
        m.open_until = time.time() + m.cooldown_s
        m.healthy = False
        if name in self.sched.backends:
            self.sched.set_health(name, False)
        log.warning("backend %s: breaker open for %.0f s after %d failed runs", name, m.cooldown_s, m.failures)

    def _run_succeeded(self, name: str) -> None:
        m = self.members.get(name)
        if m is not None and (m.failures or m.cooldown_s):
            m.failures, m.cooldown_s, m.open_until = 0, 0.0, 0.0

    def _requeue_preempted(self, r: Running) -> None:
        """Back to the queue (same place in line), not failed over: the backend is fine."""
        if not self.store.end_attempt(r.job.id, r.attempt, "preempted", "stopped for an emergency job",
                                      then="requeue"):
            return
        self._enqueue(r.job, r.view, r.created_at, r.plan)
        self._kick.set()

    def _give_up(self, job_id: str, error: str, p: Plan) -> None:
        self.store.save_explanation(job_id, explain(p, None))
        self.store.fail(job_id, error)
        self._notify(job_id)

    def _notify(self, job_id: str) -> None:
        for fut in self.waiters.pop(job_id, []):
            if not fut.done():
                fut.set_result(None)



    # ==== background loops ====================================================================
    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            await asyncio.gather(*(self._probe(m) for m in self.members.values()), return_exceptions=True)
            if self._injected is None and any(m.elastic for m in self.members.values()):
                try:
                    self._elastic_tick(ray.cluster_resources())
                except Exception:  # never let the health loop die
                    log.exception("elastic backends tick failed")
            self._poll_model()

    def _poll_model(self) -> None:
        """Pick up a newly published model artifact without a restart (new plans use it)."""
        try:
            fresh = self._watcher.poll()
        except Exception:  # a half-written registry must not stop the allocator
            log.exception("model registry poll failed")
            return
        if fresh is not None:
            log.warning("cost model switched to %s", self._watcher.current)
            self.predictor = fresh

    def _observe(self, r: Running, result: dict[str, Any]) -> None:
        """Online correction: tell the model how long the run really took."""
        observe = getattr(self.predictor, "observe", None)
        if observe is None:
            return
        kind = self.members[r.backend].spec.kind
        actual = result.get("qpu_s") if kind == "qpu" else result.get("wall_s")
        if actual:
            observe(r.backend, r.predicted_s, float(actual))

    async def _history_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.history_flush_s)
            try:
                self._flush_history()
            except Exception:  # the store keeps the rows; the next flush retries
                log.exception("history flush failed")

    def _flush_history(self) -> int:
        rows = self.store.unexported_runs()
        if not rows:
            return 0
        self.history.append(rows)
        self.store.mark_exported(r["id"] for r in rows)
        return len(rows)


def pool_names(pool: list[str]) -> list[str]:
    """Expand ``default`` to the registry's default pool, keeping order and dropping repeats."""
    from ray_qalloc.backends.registry import default_pool

    out: list[str] = []
    for name in pool:
        for n in (default_pool() if name == "default" else (name,)):
            if n not in out:
                out.append(n)
    return out


def _reconstructed() -> bool:
    """True when Ray restarted this actor (after a crash or a kill), not on its first start."""
    try:
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # not inside an actor (unit tests)
        return False


def _hopeless(p: Plan) -> bool:
    """No backend can run it and waiting would not help (every filter said 'unresolvable')."""
    return not p.estimates and all(s.code == "unresolvable" for s in p.filtered.values())


def _why_not(p: Plan) -> str:
    """Every filtered backend with its reasons, for error messages."""
    return "; ".join(f"{b}: {', '.join(s.reasons)}" for b, s in p.filtered.items())


def _cancel(ref: Any) -> None:
    if isinstance(ref, ray.ObjectRef):
        ray.cancel(ref)


async def _aref(ref: Any) -> Any:
    """Await an ObjectRef (a coroutine, so asyncio.wait_for can cancel it)."""
    return await ref


def allocator_options(settings: Settings) -> dict[str, Any]:
    return {"name": settings.allocator_name, "namespace": settings.namespace, "lifetime": "detached",
            "get_if_exists": True, "max_restarts": -1, "max_task_retries": -1, "num_cpus": 0,
            "max_concurrency": 10_000}


RemoteAllocator = ray.remote(Allocator)

__all__ = ["Allocator", "RemoteAllocator", "allocator_options"]
