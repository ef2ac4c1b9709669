"""The scheduler against a small, obviously correct reference, on random event sequences.

The reference keeps no caches, no indexes, no heaps: every decision recomputes live load
from the runs, and a pass walks all queued jobs in (class, deadline, arrival) order with the
same policy (``select``) and the same reservation and core-budget rules. With the pure
optimisations switched off (declined-backend TTL, congestion and preemption re-check
intervals) both must dispatch exactly the same (job, backend) pairs, pass by pass. A second
property test keeps the production defaults and checks only what must hold anyway: capacity
(``validate_state``), no job twice, class order on a backend, work conservation.

Times and runtimes are multiples of 1/4, so sums of them are exact in binary and a
threshold cannot flip on rounding between the two implementations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.placement.model import Estimate, JobView, LiveState, Plan
from ray_qalloc.placement.pipeline import select, static_objective
from ray_qalloc.placement.scheduler import Run, Scheduler, SchedulerConfig
from ray_qalloc.priority import CLASSES, RANK

GRID = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0)
STEPS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass
class Topology:
    specs: dict[str, BackendSpec]
    node: dict[str, str]
    cores: dict[str, float]
    reserved: dict[str, int]


def load(top: Topology, runs: dict[str, Run], healthy: dict[str, bool], name: str, now: float,
         emergency: bool, ahead: dict[str, float]) -> LiveState:
    """A backend's load from scratch: free slot and cores (less what is reserved for
    emergency jobs, for other jobs), else when the run that frees them ends."""
    if not healthy[name]:
        return LiveState(math.inf, False)
    spec, node = top.specs[name], top.node[name]
    mine = [r for r in runs.values() if r.backend == name]
    pool = [r for r in runs.values() if top.node[r.backend] == node and top.specs[r.backend].threads > 0]
    busy = sum(top.specs[r.backend].threads for r in pool)
    keep_slots = 0 if emergency else max(top.reserved.get(name, 0) - sum(r.priority == "emergency" for r in mine), 0)
    keep_cores = 0 if emergency else max(top.reserved.get(node, 0) - sum(
        top.specs[r.backend].threads for r in pool if r.priority == "emergency"), 0)
    slot_free = spec.slots - len(mine) - keep_slots > 0
    core_free = spec.threads <= 0 or top.cores[node] - busy - keep_cores >= spec.threads
    extra = ahead.get(name, 0.0) / max(spec.slots, 1)
    if slot_free and core_free:
        return LiveState(extra, True)
    at, started = 0.0, 0.0
    if not slot_free:               # the first run whose end leaves a slot it may use (inf: none will)
        at = math.inf
        for k in range(1, len(mine) + 1):
            left = sorted(mine, key=lambda r: (r.ends, r.started))[k:]
            kept = 0 if emergency else max(top.reserved.get(name, 0) - sum(r.priority == "emergency" for r in left), 0)
            if spec.slots - len(left) - kept > 0:
                at, started = mine_sorted(mine)[k - 1].ends, mine_sorted(mine)[k - 1].started
                break
    if not core_free and not emergency and top.cores[node] - top.reserved.get(node, 0) < spec.threads:
        at = math.inf               # the pool's reserved cores leave too few for it, whatever ends
    if not core_free and pool:      # a core: when the pool's first run ends
        r = min(pool, key=lambda r: (r.ends, r.started))
        if r.ends > at:
            at, started = r.ends, r.started
    wait = at - now
    if wait < 0.0:                  # overrunning: as long again as it has run
        wait = max(1.0 * (now - started), 0.0)
    return LiveState(wait + extra, False)


def mine_sorted(runs: list[Run]) -> list[Run]:
    return sorted(runs, key=lambda r: (r.ends, r.started))


@dataclass
class RJob:
    job: JobView
    plan: Plan
    arrival: float
    seq: int
    cls: str
    flagged: bool = False

    def key(self) -> tuple[int, float, float, int]:
        d = self.job.deadline_s
        return (RANK[self.cls], self.arrival + d if d is not None else math.inf, self.arrival, self.seq)


@dataclass
class Reference:
    cfg: SchedulerConfig
    top: Topology
    healthy: dict[str, bool] = field(default_factory=dict)
    queue: dict[str, RJob] = field(default_factory=dict)
    runs: dict[str, Run] = field(default_factory=dict)
    congested: set[str] = field(default_factory=set)
    asked: set[str] = field(default_factory=set)    # emergency jobs given a victim, not looked at since
    seq: int = 0

    def live(self, now: float, emergency: bool, ahead: dict[str, float] | None = None,
             drop: frozenset[str] = frozenset()) -> dict[str, LiveState]:
        return {b: load(self.top, self.runs, self.healthy, b, now, emergency, ahead or {})
                for b in self.top.specs if b not in drop}

    def room(self, j: RJob, now: float) -> bool:
        """A backend of its plan has a free slot and cores (reserved ones included)."""
        return any(load(self.top, self.runs, self.healthy, b, now, True, {}).can_start for b in j.plan.estimates)

    def flag(self, j: RJob, choice: Any, now: float, out: dict[str, Any]) -> None:
        if j.flagged or j.job.deadline_s is None:
            return
        if now + choice.scores.get(choice.backend or "", {}).get("completion_s", 0.0) > j.arrival + j.job.deadline_s:
            j.flagged = True
            out["flagged"].add(j.job.id)

    def enqueue(self, job: JobView, plan: Plan, arrival: float) -> None:
        self.seq += 1
        j = RJob(job, plan, arrival, self.seq, job.priority)
        self.queue[job.id] = j
        self.asked.discard(job.id)
        if plan.estimates and job.deadline_s is not None:
            self.flag(j, select(job, plan, self.live(arrival, j.cls == "emergency")), arrival, {"flagged": set()})

    def predicted_wait(self, b: str, now: float) -> float:
        if not self.healthy[b]:
            return math.inf
        queued = sum(min(j.plan.estimates.values(), key=lambda e: e.runtime_s).runtime_s for j in self.queue.values()
                     if j.plan.estimates and min(j.plan.estimates.values(), key=lambda e: e.runtime_s).backend == b)
        left = sum(r.remaining(now) for r in self.runs.values() if r.backend == b)
        return (left + queued) / max(self.top.specs[b].slots, 1)

    def decide(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {"dispatch": set(), "flagged": set(), "unplaceable": set(), "preempt": []}
        for b, spec in self.top.specs.items():
            if spec.kind == "qpu":
                w = self.predicted_wait(b, now)
                if b in self.congested and w < self.cfg.qpu_wait_low_s:
                    self.congested.discard(b)
                elif b not in self.congested and w > self.cfg.qpu_wait_high_s:
                    self.congested.add(b)
        for j in self.queue.values():      # can no longer meet its deadline even on its fastest backend
            fastest = min((e.runtime_s for e in j.plan.estimates.values()), default=math.nan)
            if j.job.deadline_s is not None and not j.flagged and j.arrival + j.job.deadline_s - fastest < now:
                j.flagged = True
                out["flagged"].add(j.job.id)
        for j in [j for j in self.queue.values() if not j.plan.estimates]:
            del self.queue[j.job.id]
            out["unplaceable"].add(j.job.id)
        if not self.queue:
            return out
        for j in self.queue.values():
            if j.cls == "batch" and self.cfg.aging_s > 0 and now - j.arrival >= self.cfg.aging_s:
                j.cls = "normal"
        ahead: dict[str, float] = {}
        misses = 0
        for j in sorted(self.queue.values(), key=RJob.key):
            if misses >= self.cfg.lookahead:
                break
            if not self.room(j, now):
                continue
            emergency = j.cls == "emergency"
            floor = j.job.fidelity_min or 0.0
            sims_ok = any(self.top.specs[b].kind == "simulator" and self.healthy[b] and e.fidelity >= floor
                          for b, e in j.plan.estimates.items())
            drop = frozenset(self.congested) if j.job.intent == "auto" and sims_ok else frozenset()
            choice = select(j.job, j.plan, self.live(now, emergency, ahead, drop))
            if choice.backend is None:      # all out of reach for now: it waits
                misses += 1
                self.asked.discard(j.job.id)
                continue
            self.flag(j, choice, now, out)
            if choice.can_start:
                out["dispatch"].add((j.job.id, choice.backend))
                del self.queue[j.job.id]
                self.runs[j.job.id] = Run(j.job.id, choice.backend, j.job.priority, now,
                                          j.plan.estimates[choice.backend].runtime_s)
            else:
                misses += 1
                self.asked.discard(j.job.id)
                ahead[choice.backend] = ahead.get(choice.backend, 0.0) + j.plan.estimates[choice.backend].runtime_s
        if self.cfg.preemption:
            self.preempt(now, out)
        return out

    def preempt(self, now: float, out: dict[str, Any]) -> None:
        """An emergency job with no room anywhere takes the slot of a batch simulator run, if
        that beats its best option as things stand."""
        taken: set[str] = set()
        for j in sorted(self.queue.values(), key=RJob.key):
            if j.cls != "emergency" or j.job.id in self.asked or self.room(j, now):
                continue
            current = select(j.job, j.plan, self.live(now, True))
            if current.backend is None:
                continue
            best_obj, best = current.scores[current.backend]["objective"], None
            static = static_objective(j.plan, j.job.priority, j.job.intent)
            for b, est in j.plan.estimates.items():
                obj = math.log(max(est.runtime_s, 1e-6)) + static[b]
                if self.top.specs[b].kind != "simulator" or not self.healthy[b] or obj >= best_obj:
                    continue
                best = next((r for r in self.runs.values() if r.backend == b and r.priority == "batch"
                             and r.job_id not in taken and r.remaining(now) >= self.cfg.preempt_min_remaining_s),
                            best)
                best_obj = obj if best is not None and best.backend == b else best_obj
            if best is not None:
                taken.add(best.job_id)
                self.asked.add(j.job.id)
                out["preempt"].append((best.job_id, j.job.id))


# ---- random worlds ------------------------------------------------------------------------------
@st.composite
def topologies(draw: Any) -> Topology:
    specs: dict[str, BackendSpec] = {}
    node: dict[str, str] = {}
    cores: dict[str, float] = {}
    reserved: dict[str, int] = {}
    for p in range(draw(st.integers(1, 2))):
        pool, n = f"cpu-{p}", draw(st.integers(1, 3))
        cores[pool] = float(n)
        if draw(st.booleans()):
            reserved[pool] = draw(st.integers(0, n))
        variants = [("statevector", 1), ("mps", 1)] + ([("statevector", n)] if n > 1 else [])
        for method, threads in variants[:draw(st.integers(1, len(variants)))]:
            name = f"{pool}/{method}" + (f"@{threads}" if threads > 1 else "")
            specs[name] = BackendSpec(name, "simulator", "aer", 30, slots=n, method=method, threads=threads, pool=pool)
            node[name] = pool
    for q in range(draw(st.integers(0, 2))):
        name = f"qpu-{q}"
        specs[name] = BackendSpec(name, "qpu", "fake_qpu", 127, slots=draw(st.integers(1, 2)), threads=0, noisy=True)
        node[name] = draw(st.sampled_from(["cpu-0", name]))     # a QPU on a pool's node must not use its cores
        cores.setdefault(node[name], 1.0)
    for name, spec in specs.items():
        if draw(st.integers(0, 4)) == 0:
            reserved[name] = draw(st.integers(1, spec.slots))
    return Topology(specs, node, cores, reserved)


def jobs_and_plans(draw: Any, top: Topology, i: int) -> tuple[JobView, Plan]:
    prio = draw(st.sampled_from(CLASSES))
    deadline = draw(st.sampled_from([None, None, 2.0, 6.0, 20.0]))
    intent = draw(st.sampled_from(["auto", "auto", "quantum", "classical"]))
    floor = draw(st.sampled_from([None, None, 0.7, 0.9]))
    job = JobView(f"j{i}", 3, frozenset({"h", "cx"}), {}, 100, intent=intent, priority=prio,
                  fidelity_min=floor, deadline_s=deadline)
    est = {}
    for b, spec in top.specs.items():
        t = draw(st.sampled_from(GRID + (None,)))      # None: filtered out for this job
        if t is not None:
            fid = 1.0 if spec.kind == "simulator" else draw(st.sampled_from([0.6, 0.8, 0.95]))
            est[b] = Estimate(b, t, fid, 0.0)
    return job, Plan(job.id, est)


CONFIG_KNOBS = st.fixed_dictionaries({
    "aging_s": st.sampled_from([0.0, 2.0, 5.0]), "qpu_wait_high_s": st.sampled_from([2.0, 6.0, 1e9]),
    "lookahead": st.sampled_from([1, 2, 64]), "preempt_min_remaining_s": st.sampled_from([0.0, 1.0, 4.0]),
    "preemption": st.booleans()})


class World:
    """Drives one scheduler (and, optionally, the reference) through the same random events."""

    def __init__(self, sched: Scheduler, ref: Reference | None) -> None:
        self.s, self.ref, self.now, self.n = sched, ref, 0.0, 0
        self.views: dict[str, tuple[JobView, Plan, float]] = {}

    def step(self, data: Any, top: Topology) -> dict[str, Any] | None:
        s, ref = self.s, self.ref
        kind = data.draw(st.sampled_from(["enqueue"] * 4 + ["decide"] * 4 + ["finish"] * 2 + ["cancel", "health", "fail"]))
        running, queued = sorted(s.runs), sorted(s.entries)
        if kind == "enqueue":
            for _ in range(data.draw(st.integers(1, 4))):      # bursts: queues build up
                job, plan = jobs_and_plans(data.draw, top, self.n)
                self.n += 1
                self.views[job.id] = (job, plan, self.now)
                s.enqueue(job, plan, self.now)
                ref and ref.enqueue(job, plan, self.now)
        elif kind == "finish" and running:
            jid = running[data.draw(st.integers(0, len(running) - 1))]
            s.finish(jid)
            ref and ref.runs.pop(jid)
        elif kind == "cancel" and queued:
            jid = queued[data.draw(st.integers(0, len(queued) - 1))]
            s.remove(jid)
            ref and ref.queue.pop(jid)
        elif kind == "health":
            b = data.draw(st.sampled_from(sorted(top.specs)))
            up = data.draw(st.booleans())
            s.set_health(b, up)
            if ref:
                ref.healthy[b] = up
        elif kind == "fail" and running:
            # a failed-over run: back in line at its original arrival, without the backend it failed on
            jid = running[data.draw(st.integers(0, len(running) - 1))]
            job, plan, arrival = self.views[jid]
            dropped = {b: e for b, e in plan.estimates.items() if b != s.runs[jid].backend}
            if dropped and data.draw(st.booleans()):
                plan = Plan(jid, dropped)
                self.views[jid] = (job, plan, arrival)
            self.requeue(jid)
        elif kind == "decide":
            self.now += data.draw(st.sampled_from(STEPS))
            return self.decide(data.draw(st.booleans()))
        return None

    def requeue(self, jid: str) -> None:
        job, plan, arrival = self.views[jid]
        self.s.requeue(self.s.runs[jid], job, plan, arrival)
        if self.ref:
            self.ref.runs.pop(jid)
            self.ref.enqueue(job, plan, arrival)

    def decide(self, apply_preemptions: bool) -> dict[str, Any]:
        res = self.s.decide(self.now)
        got = {"dispatch": {(d.entry.job.id, d.choice.backend) for d in res.dispatch},
               "flagged": {e.job.id for e in res.flagged}, "unplaceable": {e.job.id for e in res.unplaceable},
               "preempt": [(r.job_id, e.job.id) for r, e in res.preempt]}
        if self.ref is not None:
            want = self.ref.decide(self.now)
            assert got == want, f"at t={self.now}: scheduler {got} != reference {want}"
        if apply_preemptions:
            for victim, _ in got["preempt"]:
                self.requeue(victim)
        return got


def exact_config(knobs: dict[str, Any], top: Topology) -> SchedulerConfig:
    return SchedulerConfig(reserved=top.reserved, qpu_wait_low_s=knobs["qpu_wait_high_s"] / 2, explain=False,
                           decline_ttl_s=0.0, congestion_interval_s=0.0, preempt_recheck_s=0.0,
                           preempt_recheck_batch=10**6, check_invariants=True, **knobs)


def build(top: Topology, cfg: SchedulerConfig) -> Scheduler:
    s = Scheduler(cfg, node_cpus=top.cores)
    for name, spec in top.specs.items():
        s.add_backend(spec, node=top.node[name])
    return s


@SETTINGS
@given(top=topologies(), knobs=CONFIG_KNOBS, data=st.data())
def test_scheduler_matches_the_reference_pass_by_pass(top: Topology, knobs: dict[str, Any], data: Any) -> None:
    cfg = exact_config(knobs, top)
    world = World(build(top, cfg), Reference(cfg, top, {b: True for b in top.specs}))
    """Every pass of the real scheduler dispatches, flags, gives up and preempts exactly what the
    reference does (``World.decide`` compares them after each step); the last pass is checked here."""
    for _ in range(data.draw(st.integers(5, 40))):
        world.step(data, top)
    got = world.decide(True)
    assert world.ref is not None
    assert set(got) == {"dispatch", "flagged", "unplaceable", "preempt"}
    assert set(world.s.runs) == set(world.ref.runs), "the two schedulers disagree on what runs"


@SETTINGS
@given(top=topologies(), knobs=CONFIG_KNOBS, data=st.data())
def test_production_defaults_keep_the_safety_properties(top: Topology, knobs: dict[str, Any], data: Any) -> None:
    """Capacity and reservations hold (``check_invariants``); no job starts twice; no job with a
    feasible backend is given up; after a pass nobody whose best choice could start now waits,
    and no job took a backend that a job ahead of it wanted and could start on — except jobs
    whose backends the declined-backend TTL hid from this pass (that optimisation's price)."""
    knobs = {**knobs, "lookahead": 64}          # fewer jobs than that: the bound leaves nobody out
    cfg = SchedulerConfig(reserved=top.reserved, qpu_wait_low_s=knobs["qpu_wait_high_s"] / 2, explain=False,
                          check_invariants=True, **knobs)
    s = build(top, cfg)
    world = World(s, None)
    for _ in range(data.draw(st.integers(5, 40))):
        runs_before, queued_before, declined = dict(s.runs), dict(s.entries), dict(s._declined)
        got = world.step(data, top)
        if got is None:
            continue
        now = world.now
        hidden = {b for b, t in declined.items() if t > now}
        exempt = lambda e: any(b in hidden for b in e.plan.estimates)   # noqa: E731
        started = [j for j, _ in got["dispatch"]]
        assert len(started) == len(set(started)) and not set(started) & set(runs_before), "a job started twice"
        assert all(not queued_before[j].plan.estimates for j in got["unplaceable"]), \
            "a job with feasible backends was given up"
        for jid, c in _choices(s, top, now, s.entries, s.runs).items():
            assert exempt(s.entries[jid]) or not c.can_start, f"{jid} left waiting for free {c.backend} at t={now}"
        wanted = _choices(s, top, now, {j: e for j, e in s.entries.items() if j in queued_before}, runs_before)
        for b_job, backend in got["dispatch"]:
            for jid, c in wanted.items():
                e = s.entries[jid]
                if c.can_start and c.backend == backend and e.key() < queued_before[b_job].key() and not exempt(e):
                    raise AssertionError(f"{b_job} took {backend}, which {jid}, ahead of it, wanted at t={now}")


def _choices(s: Scheduler, top: Topology, now: float, entries: dict[str, Any], runs: dict[str, Run]) -> dict[str, Any]:
    """Each job's pick on the given runs, with the scheduler's health and congestion, from scratch."""
    healthy = {b: x.healthy for b, x in s.backends.items()}
    congested = frozenset(b for b, x in s.backends.items() if x.congested)
    out = {}
    for jid, e in entries.items():
        if not e.plan.estimates:
            continue
        floor = e.job.fidelity_min or 0.0
        sims_ok = any(top.specs[b].kind == "simulator" and healthy[b] and est.fidelity >= floor
                      for b, est in e.plan.estimates.items())
        drop = congested if e.job.intent == "auto" and sims_ok else frozenset()
        live = {b: load(top, runs, healthy, b, now, e.cls == "emergency", {}) for b in top.specs if b not in drop}
        out[jid] = select(e.job, e.plan, live)
    return out
