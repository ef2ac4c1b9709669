"""Dispatch and transitions: the queue, runs, completion, failover, hedges, stops.

Every change goes one way: the scheduler *proposes* (a pass marks its starts in its own
books so a concurrent pass cannot double-book a core), the JobStore *commits*, and only then
does anything happen (a run starts, a waiter wakes). When a commit fails, the proposal is
undone — the job goes back to its place in line — so a database blip leaves no run that
holds a slot nobody started (a *phantom run*).

Failover follows SkyPilot: an attempt that dies with its actor, times out or raises a
backend error is placed again with that backend blocked; the attempts table keeps the
history. Hedging: a simulator run that overruns its prediction may get one backup attempt
on another method or pool; the first result wins and the other run is stopped.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from ray_qalloc.backends.pools import resolve_allowed, unknown_allowed
from ray_qalloc.config import Settings
from ray_qalloc.exceptions import BackendError, InvalidJobSpec, NoFeasibleBackend
from ray_qalloc.placement.capacity import ForeignLoad
from ray_qalloc.fleet import ACTOR_GONE, Fleet, Host, Member
from ray_qalloc.jobs import JobState, PreparedJob, compact
from ray_qalloc.observer import Observer
from ray_qalloc.placement import JobView, Plan, explain, plan
from ray_qalloc.placement.filters import make_filters
from ray_qalloc.placement.scheduler import Decision, Entry, PassResult, Run, Scheduler
from ray_qalloc.store import JobStore

log = logging.getLogger("ray_qalloc.dispatch")

_FINISHED_KEEP = 10_000
# A run off its prediction by more than this factor (either way) re-plans the queued jobs of
# its circuit: memory now knows better than the plans they were given.
_REPLAN_LOG_RATIO = math.log(2.0)
_HEDGE_SUFFIX = "#backup"


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
    sched_id: str = ""                 # the scheduler's key of this run (a backup has its own)
    backup: "Running | None" = None    # the hedge of this run, while it runs
    primary: "Running | None" = None   # set on a backup: the run it hedges
    overrun_noted: bool = False
    probe: bool = False                # a backup raced on an idle core (stopped when a job waits)
    backup_pending: bool = False       # a backup's commit is in flight (no second one meanwhile)
    accepted_at: float = 0.0           # the submit call reached the allocator (fast path only)
    committed_at: float = 0.0          # its accept+dispatch commit returned

    def __post_init__(self) -> None:
        if not self.sched_id:
            self.sched_id = self.job.id


def circuit_key(job: PreparedJob) -> str:
    """Content hash of the circuit and its shots: what "the same circuit again" means."""
    return hashlib.blake2b(job.payload, digest_size=12).hexdigest() + f":{job.shots}"


class Dispatcher:
    """Queue, runs and every job transition of one allocator (see the module docstring)."""

    def __init__(self, settings: Settings, store: JobStore, fleet: Fleet, sched: Scheduler,
                 predictor: Any, kick: Callable[[], None]) -> None:
        self.settings = settings
        self.store = store
        self.fleet = fleet
        self.sched = sched
        self.predictor = predictor
        self.kick = kick
        self.filters = make_filters(settings.tenant_backends, settings.max_calibration_age_s, health=False,
                                    coherence_budget=settings.placement.coherence_budget)
        self.weights = settings.placement.table()
        self.queued: dict[str, Queued] = {}
        self.running: dict[str, Running] = {}
        self.waiters: dict[str, list[asyncio.Future[None]]] = {}
        # Both hold live jobs only: an entry leaves when its job ends (the store keeps the rest).
        self.choices: dict[str, dict[str, Any]] = {}
        self.flags: dict[str, str] = {}
        # Final records of recently completed single-attempt jobs: a waiter is answered from
        # memory instead of two store reads (the store has the same data, committed first).
        self.finished: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self._preempting: dict[str, str] = {}   # job -> backend whose run is being stopped for an emergency
        self._stopping: set[tuple[str, int]] = set()   # (job, attempt) stopped on purpose
        self._by_circuit: dict[str, set[str]] = {}   # circuit key -> its queued jobs
        # Every store call runs on one thread of its own, in the order made: a slow database
        # (a PostgreSQL across the network) must not stall health pings or other jobs' events.
        self._db_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qalloc-store")
        self._dispatching: dict[str, bool] = {}   # job -> cancelled while its dispatch was committing
        self.draining = False
        # backends an operator took out of service (maintenance.py): unavailable to new starts
        # whatever their health; ``maintenance_why`` says why, for explain
        self.cordoned: set[str] = set()
        # members leaving the pool (membership.py): out of service like a cordon, then forgotten
        self.retiring: set[str] = set()
        self.foreign = ForeignLoad()             # foreign CPU load per pool (placement/capacity.py)
        self.maintenance_why: Callable[[str], str | None] = lambda name: None
        # tenants paused by a threat rule or a SOAR playbook (threatdesk.py): their queued jobs
        # stay stored and in ``queued`` but out of the scheduler, so no pass weighs them
        self.paused: frozenset[str] = frozenset()
        # why a job is served above its own class, for explain (threatdesk.py)
        self.class_reason: Callable[[str], dict[str, Any] | None] = lambda job_id: None
        self.hedges = 0
        self.overruns_noted = 0
        self.probes = 0
        self._backup_seq = 0
        self.commit_failures = 0
        self.observer = Observer()   # what metrics and alerts read (observer.py)

    # ==== the store, off the event loop ===========================================================
    async def db(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Run one store call on the store thread and wait for it (the loop serves others meanwhile)."""
        return await asyncio.get_running_loop().run_in_executor(self._db_thread, functools.partial(fn, *args, **kw))

    def db_later(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> None:
        """A store write nobody waits on (a flag): queued behind the writes before it."""
        fut = self._db_thread.submit(fn, *args, **kw)
        fut.add_done_callback(_log_failure)

    # ==== fleet events (FleetListener) ==========================================================
    def member_health(self, name: str, healthy: bool) -> None:
        if name in self.sched.backends:
            self.sched.set_health(name, healthy and not self.out_of_service(name))
        if healthy:
            self.kick()

    def member_external_wait(self, name: str, seconds: float) -> None:
        """A QPU provider's queue ahead of the device's next job (fleet.py): placement adds it
        to the device's wait; a change lets the waiting jobs weigh it at the next pass."""
        b = self.sched.backends.get(name)
        if b is not None and b.external_wait_s != seconds:
            self.sched.set_external_wait(name, seconds)
            self.kick()

    def pool_measured(self, pool: str, cores: float, busy: float | None) -> None:
        """A pool's node reading (fleet.py): plan new starts and waits on the cores that are
        free of foreign work (placement/capacity.py); a change plans the queue again."""
        p = self.settings.placement
        self.foreign.slack = p.foreign_cpu_slack
        target = self.foreign.update(pool, cores, busy if p.foreign_cpu else None, self.sched.busy_threads(pool))
        if pool in self.sched.node_cpus and self.sched.node_cpus[pool] != target:
            self.sched.node_cpus[pool] = target
            if self.queued:
                self.replan_queued()
            self.kick()

    def out_of_service(self, name: str) -> bool:
        """No new run starts here: cordoned by an operator, or retiring from the pool."""
        return name in self.cordoned or name in self.retiring

    def annotated(self, explanation: dict[str, Any]) -> dict[str, Any]:
        """An explanation with each backend's maintenance state, where it has one, and the
        action (threat rule or SOAR) that raised the job's class, if one did."""
        raised = self.class_reason(str(explanation.get("job_id", "")))
        if raised is not None:
            explanation["priority"] = raised
        for name, row in explanation.get("backends", {}).items():
            why = self.maintenance_why(name)
            if why is None and name in self.retiring:
                why = "retiring: taken out of the pool (runs there finish, no new ones start)"
            if why is not None:
                row["maintenance"] = why
        return explanation

    def members_added(self, members: list[Member]) -> None:
        for m in members:
            self.fleet.members[m.spec.name] = m
            healthy = m.healthy and not self.out_of_service(m.spec.name)
            if m.spec.name in self.sched.backends:   # came back (a pool restarted): known already
                self.sched.set_health(m.spec.name, healthy)
                continue
            self.sched.node_cpus[self.fleet.sched_node(m)] = self.fleet.sched_cores(m)
            self.sched.add_backend(m.spec, node=self.fleet.sched_node(m), healthy=healthy)
        if members and self.queued:
            self.replan_queued()
        self.kick()

    def members_removed(self, names: list[str]) -> None:
        """Candidates that left for good (their node is gone): out of the scheduler; queued jobs
        are planned again over what exists (a job allowed only there now finds nothing and is
        failed with the reason, instead of waiting for a node id that never returns)."""
        for name in names:
            self.sched.remove_backend(name)
        if names and self.queued:
            self.replan_queued()

    def host_unreachable(self, host: Host, why: str) -> None:
        """Runs on a pool that stopped answering are placed again without waiting for Ray to
        declare its node dead (tens of seconds). A simulation is idempotent and a late result
        of the abandoned attempt is ignored (completion is exactly-once per job)."""
        for r in [r for r in self._all_runs() if r.backend in host.members]:
            if r.task is not None:
                r.task.cancel()
            asyncio.ensure_future(self._ended(r, "unreachable", why, block=False))

    def _all_runs(self) -> list[Running]:
        out = []
        for r in self.running.values():
            out.append(r)
            if r.backup is not None:
                out.append(r.backup)
        return out

    # ==== intake ================================================================================
    def view(self, job: PreparedJob, blocked: frozenset[str]) -> JobView:
        allowed = resolve_allowed(job.backends, self.fleet.members) if job.backends else None
        return JobView(job.id, job.num_qubits, job.ops, job.features, job.shots, job.intent.value,
                       job.priority.value, job.fidelity_min, job.deadline_s, job.tenant, blocked, allowed,
                       circuit_key(job))

    def plan_for(self, view: JobView) -> Plan:
        return plan(view, self.fleet.views(), self.predictor, self.filters, self.weights)

    def checked_plan(self, job: PreparedJob) -> tuple[JobView, Plan]:
        if job.backends:
            names = list(self.fleet.members) + list(self.fleet.hosts)
            unknown = unknown_allowed(job.backends, names)
            if unknown:
                raise InvalidJobSpec(
                    f"field 'backends' names unknown backend(s): {', '.join(unknown)}.", field="backends",
                    fix=f"use pool, method or backend names: {', '.join(sorted(self.fleet.hosts))}, "
                        "statevector, mps, stabilizer, density_matrix, or names from `qalloc backends`.")
        view = self.view(job, frozenset())
        p = self.plan_for(view)
        if _hopeless(p):
            raise NoFeasibleBackend(
                f"no backend of the pool can run job {job.id}: " + _why_not(p),
                fix="reduce the circuit (qubits, operations), relax intent or fidelity_min, or add a backend.",
                explanation=explain(p, None))
        return view, p

    def enqueue(self, job: PreparedJob, view: JobView, created_at: float, p: Plan | None = None) -> None:
        """Into the queue, keeping its place in line (``created_at``); flag it at once if its
        deadline is already out of reach."""
        if p is None:
            p = self.plan_for(view)
        self._put(Queued(job, view, p, time.time(), created_at))
        entry = self._schedule(view, p, created_at)
        if entry is not None and entry.flagged:
            self.flag(job.id, entry.flagged)

    def _schedule(self, view: JobView, p: Plan, arrival: float, seq: int | None = None) -> Entry | None:
        """Into the scheduler — unless the job's tenant is paused (threatdesk.py): then it stays
        stored and in ``queued``, out of every pass, until ``set_paused`` lets it in."""
        if view.tenant in self.paused:
            return None
        return self.sched.enqueue(view, p, arrival, seq)

    def _put(self, q: Queued) -> None:
        self.queued[q.job.id] = q
        key = q.view.circuit_key
        if key is not None:
            self._by_circuit.setdefault(key, set()).add(q.job.id)

    def take(self, job_id: str) -> Queued | None:
        """A job leaves the queue (started, cancelled, given up)."""
        q = self.queued.pop(job_id, None)
        if q is not None and q.view.circuit_key is not None:
            same = self._by_circuit.get(q.view.circuit_key)
            if same is not None:
                same.discard(job_id)
                if not same:
                    del self._by_circuit[q.view.circuit_key]
        return q

    def replan_circuit(self, key: str | None) -> int:
        """What ran (or overran) changed what memory knows of this circuit: queued jobs of the same
        circuit are planned again now, each keeping its place — so the next one goes elsewhere
        instead of repeating a mistake the first one found."""
        ids = self._by_circuit.get(key or "", ())
        for job_id in list(ids):
            q = self.queued.get(job_id)
            if q is not None:
                self._replan(q)
        return len(ids)

    def _replan(self, q: Queued) -> None:
        # being started — committing, or started by a pass whose commit is still pending (a
        # submit's pass awaits the store while other runs complete): its plan no longer matters
        if q.job.id in self._dispatching or q.job.id in self.sched.runs:
            return
        self.sched.remove(q.job.id)
        view = self.view(q.job, q.view.blocked)
        p = self.plan_for(view)
        q.view, q.plan = view, p
        entry = self._schedule(view, p, q.created_at)
        if entry is not None and entry.flagged and q.job.id not in self.flags:   # a flag, once raised, keeps its first reason
            self.flag(q.job.id, entry.flagged)

    def set_paused(self, tenants: frozenset[str]) -> None:
        """Pause and resume tenants: a paused tenant's queued jobs leave the scheduler (stored,
        still queued, none started; running ones finish); a resumed tenant's go back, each in its
        place (arrival)."""
        newly, resumed = tenants - self.paused, self.paused - tenants
        self.paused = frozenset(tenants)
        for q in list(self.queued.values()):
            if q.job.id in self._dispatching or q.job.id in self.sched.runs:
                continue
            if q.job.tenant in newly:
                self.sched.remove(q.job.id)
            elif q.job.tenant in resumed and q.job.id not in self.sched.entries:
                entry = self._schedule(q.view, q.plan, q.created_at)
                if entry is not None and entry.flagged and q.job.id not in self.flags:
                    self.flag(q.job.id, entry.flagged)
        if resumed:
            self.kick()

    def replan_queued(self) -> None:
        """The pool changed (a node joined or left): queued jobs are planned again over what
        exists now, each keeping its place in line."""
        for q in list(self.queued.values()):
            self._replan(q)
        self.kick()

    async def submit(self, job: PreparedJob) -> dict[str, Any]:
        """Store, then queue. The fast path: when this job starts at once it is accepted and
        dispatched in ONE commit, before the backend is called and before the reply."""
        if job.id in self.queued or job.id in self.running:
            # the same call again (Ray re-sends a call to a restarted allocator, which already
            # recovered the job from the store): answer it, change nothing
            return {"id": job.id, "created": False, "flag": self.flags.get(job.id), "state": self.live_state(job.id)}
        accepted_at = time.time()
        job = compact(job)
        view, p = self.checked_plan(job)
        now = time.time()
        if job.tenant in self.paused:      # accepted and stored; it waits for the tenant's resume
            job_id, created, _ = await self.db(self.store.add_job, job, now=now)
            if created:
                self._put(Queued(job, view, p, now, now))
            return {"id": job_id, "created": created, "flag": None, "state": JobState.QUEUED.value if created else None}
        entry = self.sched.enqueue(view, p, now)
        res = self.decide(now)
        mine = next((d for d in res.dispatch if d.entry.job.id == job.id), None)
        dispatch_to = None
        if mine is not None:
            dispatch_to = (mine.choice.backend, p.estimates[mine.choice.backend].runtime_s,
                           self.annotated(explain(p, mine.explained)))
        try:
            job_id, created, attempt = await self.db(self.store.add_job, job, now=now, dispatch_to=dispatch_to)
        except BaseException:
            # nothing was committed: nothing may have changed — undo the whole pass
            self.undo(res)
            self.sched.remove(job.id)
            raise
        if not created:  # the same idempotency key again: undo this pass's bookkeeping for it
            self.sched.finish(job.id) if mine is not None else self.sched.remove(job.id)
        else:
            q = Queued(job, view, p, now, now)
            if attempt is not None and mine is not None:
                self.choices[job.id] = {"chosen": mine.choice.backend, "reason": mine.choice.reason}
                committed_at = time.time()
                r = self.launch(q, mine.choice.backend, attempt)
                r.accepted_at, r.committed_at = accepted_at, committed_at
            else:
                self._put(q)
            if entry.flagged:  # hopeless from the start: say so now, not after the deadline
                self.flag(job.id, entry.flagged)
        await self.apply(res, skip=job.id)
        return {"id": job_id, "created": created, "flag": self.flags.get(job_id),
                "state": self.live_state(job_id) if created else None}

    async def submit_many(self, jobs: list[PreparedJob]) -> list[dict[str, Any]]:
        """Many jobs, one store transaction; each job answered on its own (``error`` for a job no
        backend could run: nothing stored for it)."""
        answers: list[dict[str, Any]] = []
        good: list[tuple[int, PreparedJob, JobView, Plan]] = []
        for i, job in enumerate(jobs):
            job = compact(job)
            try:
                view, p = self.checked_plan(job)
            except (InvalidJobSpec, NoFeasibleBackend) as exc:
                answers.append({"error": exc.to_dict()})
                continue
            answers.append({})
            good.append((i, job, view, p))
        now = time.time()
        results = await self.db(self.store.add_jobs, [g[1] for g in good], now=now)
        for (i, job, view, p), (job_id, created) in zip(good, results):
            answers[i] = {"id": job_id, "created": created}
            if created:
                self.enqueue(job, view, now, p)
        await self.apply(self.decide(time.time()))
        return answers

    def live_state(self, job_id: str) -> str:
        return (JobState.RUNNING if job_id in self.running else JobState.QUEUED).value

    # ==== passes =================================================================================
    def decide(self, now: float) -> PassResult:
        """A scheduler pass, or nothing while draining (jobs are still accepted and stored)."""
        return PassResult() if self.draining else self.sched.decide(now)

    def undo(self, res: PassResult) -> None:
        """Take back a pass that could not be committed: its starts go back to the queue, each
        in its own place (arrival and sequence number), and jobs it found unplaceable too (the
        next pass finds them again)."""
        for d in res.dispatch:
            self._undo_start(d)
        for e in res.unplaceable:
            if e.job.id in self.queued and e.job.id not in self.sched.entries:
                self._schedule(e.job, e.plan, e.arrival, e.seq)

    def _undo_start(self, d: Decision) -> None:
        self.sched.finish(d.entry.job.id)
        if d.entry.job.id in self.queued:
            self._schedule(d.entry.job, d.entry.plan, d.entry.arrival, d.entry.seq)

    async def apply(self, res: PassResult, skip: str | None = None) -> None:
        """Carry out one pass: commit each start, then start it; flags, preemptions, give-ups."""
        obs = self.observer
        for entry in res.unplaceable:
            if self.take(entry.job.id) is not None:
                obs.on_decision("unplaceable")
                await self.give_up(entry.job.id, "no feasible backend left: " + _why_not(entry.plan), entry.plan,
                                   job=entry.job)
        for entry in res.flagged:
            if self.flags.get(entry.job.id) is None:
                obs.on_decision("deadline_at_risk")
            self.flag(entry.job.id, entry.flagged or "deadline at risk")
        failed = False
        for d in res.dispatch:
            if d.entry.job.id == skip:
                continue
            q = self.queued.get(d.entry.job.id)
            if q is None:  # cancelled between enqueue and this pass
                self.sched.finish(d.entry.job.id)
                continue
            if failed:   # the store is failing: do not hammer it; the next pass retries
                self._undo_start(d)
                continue
            try:
                await self._dispatch(q, d)
            except Exception:
                log.exception("dispatch of job %s not committed; it keeps its place in line", q.job.id)
                self.commit_failures += 1
                self._undo_start(d)
                failed = True
        for run, entry in res.preempt:
            obs.on_decision("preempted")
            self.preempt(run, entry.job.id)
        if self.settings.hedge.probe_idle and not self.draining:
            if self.sched.entries:
                await self.stop_probes()
            elif self.running:
                from ray_qalloc import overruns

                await overruns.probe(self, self.settings, time.time())
        if failed:
            asyncio.get_running_loop().call_later(1.0, self.kick)

    async def _dispatch(self, q: Queued, d: Decision) -> None:
        name = d.choice.backend
        assert name is not None
        est = q.plan.estimates[name]
        self._dispatching[q.job.id] = False
        try:
            attempt = await self.db(self.store.dispatch, q.job.id, name, predicted_s=est.runtime_s,
                                    queued_at=q.enqueued_at,
                                    explanation=self.annotated(explain(q.plan, d.explained)))
        finally:
            cancelled = self._dispatching.pop(q.job.id, False)
        self.take(q.job.id)
        if attempt is None or cancelled:  # cancelled meanwhile (before or after the commit)
            self.sched.finish(q.job.id)
            return
        self.choices[q.job.id] = {"chosen": name, "reason": d.choice.reason}
        self.launch(q, name, attempt)

    def flag(self, job_id: str, reason: str) -> None:
        """A job that will miss its deadline is flagged (stored, shown in status and explain)."""
        if self.flags.get(job_id) == reason:
            return
        self.flags[job_id] = reason
        self.db_later(self.store.flag, job_id, reason)

    def cancelled(self, job_id: str) -> None:
        """A cancel committed: a dispatch of this job being committed right now must not start it."""
        if job_id in self._dispatching:
            self._dispatching[job_id] = True

    # ==== runs ===================================================================================
    def launch(self, q: Queued, name: str, attempt: int, *, started_at: float | None = None,
               predicted_s: float | None = None, primary: Running | None = None,
               sched_id: str = "") -> Running:
        """Call the executor; the store already says RUNNING, the scheduler counts the run."""
        m = self.fleet.members[name]
        est = q.plan.estimates.get(name)
        predicted = predicted_s if predicted_s is not None else (est.runtime_s if est is not None else 1.0)
        r = Running(q.job, q.view, q.plan, name, attempt, started_at or time.time(), predicted,
                    created_at=q.created_at, sched_id=sched_id,
                    primary=primary)
        if primary is None:
            self.running[q.job.id] = r
            self.observer.on_decision("placed")
            self.observer.on_started(q.job.priority.value, name, r.started_at - q.created_at, job_id=q.job.id,
                                     reason=self.choices.get(q.job.id, {}).get("reason"))
        else:
            primary.backup = r
        try:
            ref = self.fleet.actor_of(name).run.remote(q.job.id, attempt, q.job.payload, q.job.shots,
                                                       **m.run_kwargs)
        except Exception as exc:  # no actor (gone, elastic and stopped), a bad call: this attempt failed
            r.task = None
            outcome = "actor_died" if self.fleet.actor_of(name) is None else "error"
            asyncio.ensure_future(self._ended(r, outcome, f"{type(exc).__name__}: {exc}"))
            return r
        r.task = asyncio.get_running_loop().create_task(self._watch(r, ref))
        return r

    def attach(self, r: Running, ref: Any) -> None:
        """Watch a run started before a restart (re-attached by the caller)."""
        self.running[r.job.id] = r
        r.task = asyncio.get_running_loop().create_task(self._watch(r, ref))

    def _timeout(self, r: Running) -> float:
        """The last line of defence (hedging is the first): a run that never ends is failed over."""
        return max(self.settings.run_timeout_floor_s, self.settings.run_timeout_factor * r.predicted_s)

    async def _watch(self, r: Running, ref: Any) -> None:
        try:
            elapsed = time.time() - r.started_at
            result = await asyncio.wait_for(_aref(ref), max(self._timeout(r) - elapsed, 1.0))
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError:
            self.stop(r)
            await self._ended(r, "timed_out", f"no result after {self._timeout(r):.0f} s")
            return
        except Exception as exc:  # noqa: BLE001 - classified: every failure ends this attempt
            outcome, error = _classify(exc)
            await self._ended(r, outcome, error)
            return
        if result is None:  # re-attach found nothing: the run was lost with its actor
            await self._ended(r, "lost", "the executor no longer knew this run", block=False)
            return
        await self.complete(r, result)

    async def _ended(self, r: Running, outcome: str, error: str, *, block: bool = True) -> None:
        """An attempt ended without a result. A run stopped on purpose is only closed; a run whose
        twin (hedge) still runs is closed and the twin goes on; otherwise the job fails over."""
        if not self._is_live(r):   # already handled (an unreachable pool, then the run's own error)
            return
        key = (r.job.id, r.attempt)
        if key in self._stopping:
            self._stopping.discard(key)
            if r.job.id in self._preempting and r.primary is None:
                self._preempting.pop(r.job.id, None)
                self._forget(r)
                await self.requeue_preempted(r)
                return
            self._forget(r)
            return
        if outcome == "stopped":   # stopped, but not by us (a pool restarting): place it again
            block = False
        twin = r.backup if r.primary is None else r.primary
        if twin is not None and self._is_live(twin):
            log.warning("job %s attempt %d on %s: %s (%s); its other attempt goes on",
                        r.job.id, r.attempt, r.backend, outcome, error)
            self._count_failure(r.backend, outcome)
            self._forget(r)
            await self.db(self.store.close_attempt, r.job.id, r.attempt, outcome, error)
            return
        await self.failover(r, outcome, error, block=block)

    def _is_live(self, r: Running) -> bool:
        main = self.running.get(r.job.id)
        return main is r or (main is not None and main.backup is r)

    def _forget(self, r: Running) -> None:
        """Drop a run from memory and the scheduler's books (its store row is handled by the caller)."""
        main = self.running.get(r.job.id)
        if r.primary is not None:          # a backup
            if r.primary.backup is r:
                r.primary.backup = None
        elif main is r:
            if r.backup is not None:       # the backup becomes the job's run
                b = r.backup
                b.primary = None
                self.running[r.job.id] = b
            else:
                self.running.pop(r.job.id)
        self.sched.finish(r.sched_id)

    def _count_failure(self, backend: str, outcome: str) -> None:
        if outcome in ("actor_died", "timed_out"):
            self.fleet.mark_unhealthy(backend)
        if outcome in ("actor_died", "timed_out", "backend_error", "error"):
            self.fleet.run_failed(backend)

    async def complete(self, r: Running, result: dict[str, Any]) -> None:
        arrived = time.time()
        twin = r.backup if r.primary is None else r.primary
        self._forget(r)
        if twin is not None and self._is_live(twin):   # the first result wins; stop the other run
            self.stop(twin)
            self._forget(twin)
        self.running.pop(r.job.id, None)
        self.fleet.run_succeeded(r.backend)
        self._preempting.pop(r.job.id, None)
        self._stopping.discard((r.job.id, r.attempt))
        result = dict(result)
        result["queue_s"] = r.started_at - (r.created_at or r.started_at)
        result["launched_at"] = r.started_at
        result.setdefault("backend", r.backend)
        meta = result["metadata"] = dict(result.get("metadata") or {})
        # where the time went, per hop (the overhead benchmark reads it): wall-clock stamps of one
        # machine's clock, so hops across processes on one node compare
        meta["timeline"] = {"accepted_at": r.accepted_at or None, "committed_at": r.committed_at or None,
                              "launched_at": r.started_at, "run_started_at": meta.get("received_at"),
                              "run_finished_at": meta.get("finished_at"), "result_at_allocator": arrived}
        recorded = await self.db(self.store.complete, r.job.id, r.attempt, result)
        if twin is not None:
            await self.db(self.store.close_attempt, r.job.id, twin.attempt, "hedge_lost",
                          f"attempt {r.attempt} on {r.backend} finished first")
            self._remember_bound(twin, time.time() - twin.started_at)
        if recorded and r.attempt == 1:
            meta["timeline"]["completed_at"] = time.time()
            self._remember_final(r, result)
        if recorded:
            self.learn(r, result)
            self.observer.on_finished(r.job.priority.value, "completed", deadline_s=r.job.deadline_s,
                                      created_at=r.created_at)
        self._done(r.job.id)
        self.kick()

    def learn(self, r: Running, result: dict[str, Any]) -> None:
        """Online correction: tell the model how long the run really took."""
        m = self.fleet.members.get(r.backend)
        if m is None:
            return
        actual = result.get("qpu_s") if m.spec.kind == "qpu" else result.get("wall_s")
        if not actual:
            return
        self.observer.on_completed(r.backend, m.spec.method or m.spec.kind, r.predicted_s, float(actual))
        observe = getattr(self.predictor, "observe", None)
        if observe is not None:
            observe(r.backend, r.predicted_s, float(actual))
        remember = getattr(self.predictor, "remember", None)
        if remember is not None and m.spec.kind == "simulator":
            remember(r.view, m.spec, float(actual), censored=False, predicted_s=r.predicted_s)
            if abs(math.log(max(float(actual), 1e-6) / max(r.predicted_s, 1e-6))) > _REPLAN_LOG_RATIO:
                self.replan_circuit(r.view.circuit_key)

    def _remember_bound(self, r: Running, elapsed_s: float) -> None:
        """A run that lost its race took longer than the winner: remembered as a lower bound, so
        the next job of the circuit is planned with it (and not probed there again)."""
        remember = getattr(self.predictor, "remember", None)
        m = self.fleet.members.get(r.backend)
        if remember is not None and m is not None and m.spec.kind == "simulator" and elapsed_s > 0:
            remember(r.view, m.spec, elapsed_s, censored=True, predicted_s=r.predicted_s)

    async def stop_probes(self) -> int:
        """A job waits: every probe gives its core back (nothing is learned from a cut-short probe)."""
        stopped = 0
        for r in list(self.running.values()):
            b = r.backup
            if b is not None and b.probe and self._is_live(b):
                self.stop(b)
                self._forget(b)
                await self.db(self.store.close_attempt, b.job.id, b.attempt, "probe_stopped",
                              "a queued job needed the core")
                stopped += 1
        if stopped:
            self.kick()
        return stopped

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

    async def failover(self, r: Running, outcome: str, error: str, *, block: bool = True) -> None:
        self._forget(r)
        if self._preempting.pop(r.job.id, None) is not None and outcome in ("actor_died", "error"):
            await self.requeue_preempted(r)
            return
        log.warning("job %s attempt %d on %s: %s (%s)", r.job.id, r.attempt, r.backend, outcome, error)
        self._count_failure(r.backend, outcome)
        self.observer.on_attempt_failed(r.backend, outcome)
        self.observer.on_decision("failover")
        blocked = r.view.blocked | {r.backend} if block else r.view.blocked
        view = replace(r.view, blocked=blocked)
        if r.attempt >= self.settings.max_attempts:
            await self.db(self.store.end_attempt, r.job.id, r.attempt, outcome, error, then="fail")
            self.observer.on_finished(r.job.priority.value, "failed", deadline_s=r.job.deadline_s,
                                      created_at=r.created_at)
            self._done(r.job.id)
            return
        if not await self.db(self.store.end_attempt, r.job.id, r.attempt, outcome, error, then="failover"):
            return  # cancelled or already finished
        p = self.plan_for(view)
        if _hopeless(p) and outcome == "actor_died" and r.backend not in r.view.blocked:
            # the only backend(s) it may use died: Ray restarts the actor (here or on another
            # node), so the job waits for it instead of failing; max_attempts bounds the retries
            view = r.view
            p = self.plan_for(view)
        if _hopeless(p):
            await self.give_up(r.job.id, f"attempt {r.attempt} failed on {r.backend} ({outcome}) and no other "
                                         "backend can run it", p, job=r.job, created_at=r.created_at)
            return
        self.enqueue(r.job, view, r.created_at, p)
        self.kick()

    async def requeue_preempted(self, r: Running) -> None:
        """Back to the queue (same place in line), not failed over: the backend is fine."""
        if not await self.db(self.store.end_attempt, r.job.id, r.attempt, "preempted",
                             "stopped for an emergency job", then="requeue"):
            return
        self.enqueue(r.job, r.view, r.created_at, r.plan)
        self.kick()

    async def give_up(self, job_id: str, error: str, p: Plan, *, job: PreparedJob | None = None,
                      created_at: float | None = None) -> None:
        await self.db(self.store.save_explanation, job_id, self.annotated(explain(p, None)))
        await self.db(self.store.fail, job_id, error)
        if job is not None:
            self.observer.on_finished(job.priority.value, "failed", deadline_s=job.deadline_s,
                                      created_at=created_at)
        self._done(job_id)

    def _done(self, job_id: str) -> None:
        """The job ended: wake its waiters; forget what only live jobs need."""
        self.choices.pop(job_id, None)
        self.flags.pop(job_id, None)
        for fut in self.waiters.pop(job_id, []):
            if not fut.done():
                fut.set_result(None)

    def notify(self, job_id: str) -> None:
        self._done(job_id)

    # ==== stopping runs =========================================================================
    def stop(self, r: Running) -> None:
        """Stop a run where it runs: a pool kills the run's worker (its cores free at once); a QPU
        run is left to finish (it is not stopped, and its late result is ignored)."""
        if r.task is not None and not r.task.done() and r.task is not asyncio.current_task():
            r.task.cancel()
        m = self.fleet.members.get(r.backend)
        actor = self.fleet.actor_of(r.backend)
        if m is None or actor is None or m.spec.pool is None:
            return
        try:
            actor.stop.remote(r.job.id, r.attempt)
        except Exception:  # the pool is gone: its runs went with it
            pass

    def cancel_running(self, job_id: str) -> None:
        r = self.running.pop(job_id, None)
        if r is None:
            return
        for run in (r, r.backup):
            if run is not None:
                self.stop(run)
                self.sched.finish(run.sched_id)
        self._done(job_id)

    def preempt(self, run: Run, for_job: str) -> None:
        """Stop a batch simulator run for an emergency job; the batch job goes back to the queue
        keeping its place (nothing is lost). Only the run is stopped, not its pool."""
        r = self.running.get(run.job_id)
        if r is None or run.job_id in self._preempting or r.backend != run.backend:
            return
        log.warning("preempting batch job %s on %s for emergency job %s", run.job_id, run.backend, for_job)
        self._preempting[run.job_id] = run.backend
        m = self.fleet.members.get(r.backend)
        if m is not None and m.spec.pool is not None and self.fleet.actor_of(r.backend) is not None:
            self._stopping.add((r.job.id, r.attempt))
            actor = self.fleet.actor_of(r.backend)
            try:
                actor.stop.remote(r.job.id, r.attempt)
                return
            except Exception:
                pass
        if r.task is not None:   # injected fakes: end the watch; the job is requeued
            r.task.cancel()
            self._preempting.pop(r.job.id, None)
            self._forget(r)
            asyncio.ensure_future(self.requeue_preempted(r))

    # ==== hedging ===============================================================================
    async def hedge_tick(self, now: float, decide: Callable[..., list[Any]] | None, note_overrun: Callable[..., None] | None,
                   k: float, min_elapsed_s: float = 0.0) -> int:
        """Runs past ``k``× their prediction (and ``min_elapsed_s``): remember the overrun at once
        (so the next job of that circuit goes elsewhere), and start one backup where ``decide``
        says it pays."""
        started = 0
        overrunning = [r for r in self.running.values() if r.backup is None and not r.backup_pending
                       and now - r.started_at > max(k * r.predicted_s, min_elapsed_s)]
        if not overrunning:
            return 0
        for r in overrunning:
            if note_overrun is not None and not r.overrun_noted:
                r.overrun_noted = True
                note_overrun(r, now)
        if decide is None or self.draining:
            return 0
        for job_id, backend in decide(overrunning, now):
            r = self.running.get(job_id)
            if r is None or r.backup is not None or backend == r.backend:
                continue
            if await self.start_backup(r, backend):
                started += 1
        return started

    async def start_backup(self, r: Running, backend: str, *, probe: bool = False) -> bool:
        est = r.plan.estimates.get(backend)
        if est is None or backend not in self.fleet.members or r.backup is not None or r.backup_pending:
            return False
        r.backup_pending = True   # set before the first await: a concurrent pass or tick sees it
        try:
            return await self._start_backup(r, backend, est, probe)
        finally:
            r.backup_pending = False

    async def _start_backup(self, r: Running, backend: str, est: Any, probe: bool) -> bool:
        # the backup's core is taken in the scheduler's books before the commit (no pass may give
        # it away meanwhile), and given back if the commit says the job is no longer running
        now = time.time()
        # its own scheduler key: a job may have had a backup before (one promoted to its run
        # still holds the earlier key)
        self._backup_seq += 1
        sid = f"{r.job.id}{_HEDGE_SUFFIX}{self._backup_seq}"
        self.sched.start(sid, backend, now, est.runtime_s, r.job.priority.value)
        try:
            attempt = await self.db(self.store.hedge, r.job.id, backend, predicted_s=est.runtime_s)
        except Exception:
            self.sched.finish(sid)
            raise
        if attempt is None or not self._is_live(r) or r.backup is not None:
            self.sched.finish(sid)
            if attempt is not None:
                await self.db(self.store.close_attempt, r.job.id, attempt, "superseded", "the job ended meanwhile")
            return False
        q = Queued(r.job, r.view, r.plan, now, r.created_at)
        self.launch(q, backend, attempt, primary=r, sched_id=sid).probe = probe
        if probe:
            self.probes += 1
            log.info("job %s: probe on %s (idle core) beside %s", r.job.id, backend, r.backend)
            return True
        self.hedges += 1
        log.warning("job %s overran %.3g s on %s (predicted %.3g s): backup attempt %d on %s",
                    r.job.id, now - r.started_at, r.backend, r.predicted_s, attempt, backend)
        return True


def _log_failure(fut: "concurrent.futures.Future[Any]") -> None:
    exc = fut.exception()
    if exc is not None:
        log.error("store write failed: %s: %s", type(exc).__name__, exc)


def _classify(exc: BaseException) -> tuple[str, str]:
    """(outcome, error) of an attempt that raised. Ray re-raises a remote exception as a class
    deriving from both RayTaskError and the cause, so the cause decides."""
    from ray_qalloc.backends.pool_actor import RunStopped

    cause = getattr(exc, "cause", None) or exc
    text = f"{type(cause).__name__}: {str(cause)[:500]}"
    if isinstance(exc, ACTOR_GONE):
        return "actor_died", f"{type(exc).__name__}: {str(exc)[:300]}"
    if isinstance(cause, RunStopped) or isinstance(exc, RunStopped):
        return "stopped", text
    if isinstance(cause, BackendError) or isinstance(exc, BackendError):
        return "backend_error", str(cause)[:500]
    return "error", text


def _hopeless(p: Plan) -> bool:
    """No backend can run it and waiting would not help (every filter said 'unresolvable')."""
    return not p.estimates and all(s.code == "unresolvable" for s in p.filtered.values())


def _why_not(p: Plan) -> str:
    """Every filtered backend with its reasons, for error messages."""
    return "; ".join(f"{b}: {', '.join(s.reasons)}" for b, s in p.filtered.items())


async def _aref(ref: Any) -> Any:
    return await ref

__all__ = ["Dispatcher", "Queued", "Running", "circuit_key"]
