"""Dispatch: the queue, the passes that start jobs, and the commits before anything happens.

Every change goes one way: the scheduler *proposes* (a pass marks its starts in its own
books so a concurrent pass cannot double-book a core), the JobStore *commits*, and only then
does anything happen (a run starts, a waiter wakes). When a commit fails, the proposal is
undone — the job goes back to its place in line — so a database blip leaves no run that
holds a slot nobody started (a *phantom run*).

What happens to a run once started — watch, complete, fail over, stop — is ``runlife.py``;
backup attempts (hedges beside overrunning runs, probes on idle cores) are ``backups.py``;
both are mixed into ``Dispatcher`` and share its state. The records they share (a queued
job, a running attempt) are ``inflight.py``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
import math
import time
from typing import Any, Callable

from ray_qalloc.backends.pools import resolve_allowed, unknown_allowed
from ray_qalloc.config import Settings
from ray_qalloc.exceptions import InvalidJobSpec, NoFeasibleBackend
from ray_qalloc.placement.capacity import ForeignLoad
from ray_qalloc.fleet import Fleet, Host, Member
from ray_qalloc.jobs import JobState, PreparedJob, compact
from ray_qalloc.observer import Observer
from ray_qalloc.placement import JobView, Plan, explain, plan
from ray_qalloc.placement.filters import make_filters
from ray_qalloc.placement.scheduler import Decision, Entry, PassResult, Scheduler
from ray_qalloc.store import JobStore
from ray_qalloc.backups import Backups
from ray_qalloc.inflight import Queued, Running, circuit_key
from ray_qalloc.runlife import RunLife, hopeless

log = logging.getLogger("ray_qalloc.dispatch")

class Dispatcher(RunLife, Backups):
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
        self._restarting: dict[str, str] = {}   # job -> why its overrunning run is being stopped to place it again
        self.restarted: set[str] = set()         # live jobs restarted once already (never twice)
        self.restarts = 0
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
        if hopeless(p):
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

    def replan_circuit(self, key: str | None, backend: str | None = None,
                       max_log_ratio: float = math.log(2.0)) -> int:
        """What ran (or overran) changed what memory knows of this circuit: queued jobs of the same
        circuit are planned again now, each keeping its place — so the next one goes elsewhere
        instead of repeating a mistake the first one found.

        With ``backend`` (a completed run there), only when planning one of them again moves its
        estimate there by more than ``max_log_ratio``. Why: re-planning costs ~0.1 ms a job, and
        jobs of one circuit share their estimates; a stream of one circuit (many tenants' Bell
        pairs, each run 2-20 ms on a loaded machine) re-planned its whole queue whenever a run
        was 2× off its own prediction — half the allocator's CPU under HTTP load, O(queue) per
        completion — while memory's answer (a median) had hardly moved."""
        ids = self._by_circuit.get(key or "", ())
        if backend is not None and ids:
            sample = next((self.queued[j] for j in ids if j in self.queued and j not in self._dispatching
                           and j not in self.sched.runs), None)
            old = None if sample is None else sample.plan.estimates.get(backend)
            if old is None:
                return 0
            new = self.plan_for(self.view(sample.job, sample.view.blocked)).estimates.get(backend)
            if new is not None and abs(math.log(max(new.runtime_s, 1e-9) / max(old.runtime_s, 1e-9))) <= max_log_ratio:
                return 0
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


def _log_failure(fut: "concurrent.futures.Future[Any]") -> None:
    exc = fut.exception()
    if exc is not None:
        log.error("store write failed: %s: %s", type(exc).__name__, exc)


def _why_not(p: Plan) -> str:
    """Every filtered backend with its reasons, for error messages."""
    return "; ".join(f"{b}: {', '.join(s.reasons)}" for b, s in p.filtered.items())


__all__ = ["Dispatcher", "Queued", "Running", "circuit_key"]
