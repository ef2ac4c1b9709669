"""The queue's index stays bounded (issue #10 §3: nothing in the allocator grows without bound),
and bounding it changes no decision.

Stale index items (jobs started elsewhere, removed, re-keyed) were dropped only when they
reached the head of a heap a pass walked; a backend that is seldom free (a pool's all-core
variant, a busy QPU) kept every job that ever listed it. Each heap is now rebuilt from its
live items past ``2 * live + INDEX_SLACK`` items (``placement/jobqueue.py``); the aging queue
and the deadline heap, which drop stale items only when time reaches them, past
``2 * len(entries) + INDEX_SLACK``. These tests drive
a scheduler with compaction and one without (``_compact_index = False``, a test-only switch)
through the same events and require the same decisions, pass by pass, while the first stays
within the bound and the second does not.
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.backends.pools import pool_candidate_specs
from ray_qalloc.placement import jobqueue
from ray_qalloc.placement import scheduler as scheduler_module
from ray_qalloc.placement.model import Estimate, JobView, Plan
from ray_qalloc.placement.scheduler import Scheduler, SchedulerConfig
from tests.test_scheduler_reference import CONFIG_KNOBS, STEPS, Topology, jobs_and_plans, topologies

PRIORITIES = ("emergency", "high", "normal", "batch")
SETTINGS = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def excess(s: Scheduler) -> int:
    """How far the largest index heap is past its bound (<= 0: within it)."""
    return max(len(h) - 2 * s._live[b] - jobqueue.INDEX_SLACK for b, h in s._index.items())


def excess_queues(s: Scheduler) -> int:
    """How far the aging queue or the deadline heap is past its bound (<= 0: within it)."""
    return max(len(s._aging), len(s._deadlines)) - 2 * len(s.entries) - jobqueue.INDEX_SLACK


def outcome(s: Scheduler, now: float) -> dict[str, Any]:
    """Everything a pass decides, in the order it decided it, and the state that steers the
    next passes (declined backends, held jobs)."""
    before = s.examined
    res = s.decide(now)
    return {"dispatch": [(d.entry.job.id, d.choice.backend) for d in res.dispatch],
            "flagged": [e.job.id for e in res.flagged], "unplaceable": [e.job.id for e in res.unplaceable],
            "preempt": [(r.job_id, e.job.id) for r, e in res.preempt], "examined": s.examined - before,
            "declined": sorted(s._declined.items()), "holding": sorted(s._holds.holding.items())}


@pytest.fixture
def unchecked(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The long run checks invariants every few hundred steps itself: after every call, with
    hundreds of queued jobs, it would take minutes."""
    monkeypatch.setattr(scheduler_module, "_CHECK_FROM_ENV", False)
    yield


def cluster() -> tuple[list[BackendSpec], dict[str, str], dict[str, float]]:
    """The decision-latency benchmark's shape, smaller: two 8-core pools' method variants
    (their all-core variants are seldom free) and four QPUs."""
    specs = pool_candidate_specs("p0", cores=8, memory_bytes=2**34) + pool_candidate_specs("p1", cores=8,
                                                                                           memory_bytes=2**34)
    specs += [BackendSpec(f"qpu{i}", "qpu", "fake_qpu", 127, device=f"d{i}", noisy=True, threads=0) for i in range(4)]
    node = {sp.name: sp.pool or f"qpu:{sp.name}" for sp in specs}
    return specs, node, {"p0": 8.0, "p1": 8.0}


@pytest.mark.parametrize("aging_s", [3.0, 1e9])
def test_a_long_run_stays_bounded_and_decides_as_without_compaction(unchecked: None, aging_s: float) -> None:
    """Aging after 3 s exercises re-keyed items; never aging (as the decision-latency benchmark
    runs) lets stale items of the aging queue pile up behind a live head."""
    specs, node, cores = cluster()
    rng = random.Random(20240610)
    cfg = SchedulerConfig(aging_s=aging_s, lookahead=8, check_invariants=False)
    on, off = Scheduler(cfg, node_cpus=cores), Scheduler(cfg, node_cpus=cores)
    off._compact_index = False
    both = (on, off)
    for s in both:
        for sp in specs:
            s.add_backend(sp, node=node[sp.name])
    views: dict[str, tuple[JobView, Plan, float]] = {}
    ends: dict[str, float] = {}
    now, n, worst_off, worst_off_queues = 0.0, 0, 0, 0
    for step in range(3000):
        for jid in sorted(on.runs):
            if jid not in ends:
                r = on.runs[jid]
                ends[jid] = r.started + r.predicted_s * rng.choice((0.5, 1.0, 1.5, 3.0))
        for jid in sorted((j for j in on.runs if ends[j] <= now), key=lambda j: (ends[j], j)):
            del ends[jid]
            for s in both:
                s.finish(jid)
        for _ in range(rng.choice((0, 1, 1, 2, 3))):
            job = JobView(f"j{n}", 10, frozenset({"h", "cx"}), {}, 1000, priority=rng.choice(PRIORITIES),
                          tenant=rng.choice(("t0", "t1", "t2")), deadline_s=rng.choice((None, None, 2.0, 30.0, 3600.0)))
            n += 1
            plan = Plan(job.id, {sp.name: Estimate(sp.name, 10 ** rng.uniform(-2, 0.3),
                                                   rng.uniform(0.6, 0.95) if sp.kind == "qpu" else 1.0,
                                                   rng.uniform(0, 1)) for sp in rng.sample(specs, 6)})
            views[job.id] = (job, plan, now)
            for s in both:
                s.enqueue(job, Plan(plan.job_id, dict(plan.estimates)), now)
        roll = rng.random()
        if roll < 0.08 and on.entries:
            jid = rng.choice(sorted(on.entries))
            for s in both:
                s.remove(jid)
        elif roll < 0.12 and on.runs:
            jid = rng.choice(sorted(on.runs))         # failed over: back in line at its arrival
            job, plan, arrival = views[jid]
            ends.pop(jid, None)
            for s in both:
                s.requeue(s.runs[jid], job, Plan(plan.job_id, dict(plan.estimates)), arrival)
        elif roll < 0.13:
            tenant, cls = rng.choice(("t0", "t1", "t2")), rng.choice((None, "high", "emergency"))
            assert on.set_class_floor(tenant, cls, now) == off.set_class_floor(tenant, cls, now)
        now = round(now + rng.choice((0.005, 0.01, 0.05)), 6)
        got, want = outcome(on, now), outcome(off, now)
        assert got == want, f"step {step}, t={now}: with compaction {got} != without {want}"
        for victim, _ in got["preempt"]:
            job, plan, arrival = views[victim]
            ends.pop(victim, None)
            for s in both:
                s.requeue(s.runs[victim], job, Plan(plan.job_id, dict(plan.estimates)), arrival)
        assert excess(on) <= 0, f"step {step}: a heap passed its bound by {excess(on)}"
        assert excess_queues(on) <= 0, f"step {step}: the aging or deadline heap passed its bound"
        worst_off = max(worst_off, excess(off))
        worst_off_queues = max(worst_off_queues, excess_queues(off))
        if step % 500 == 0:
            on.validate_state()
            off.validate_state()
    on.validate_state()
    assert on.compactions > 0 and off.compactions == 0
    # without compaction the seldom-walked heaps outgrow the bound: this run tests something
    assert worst_off > 2 * jobqueue.INDEX_SLACK, worst_off
    assert worst_off_queues > 2 * jobqueue.INDEX_SLACK, worst_off_queues


@SETTINGS
@given(top=topologies(), knobs=CONFIG_KNOBS, data=st.data())
def test_compaction_decides_as_without_it_on_random_inputs(top: Topology, knobs: dict[str, Any], data: Any,
                                                           ) -> None:
    """With no slack (every heap is rebuilt as soon as its stale items outnumber its live
    ones) and the production defaults, pass by pass, under every event the pass sees;
    invariants, the bound among them, are checked after every call."""
    saved = jobqueue.INDEX_SLACK
    jobqueue.INDEX_SLACK = 0
    try:
        cfg = SchedulerConfig(reserved=top.reserved, qpu_wait_low_s=knobs["qpu_wait_high_s"] / 2,
                              check_invariants=True, **knobs)
        both = []
        for compact in (True, False):
            s = Scheduler(cfg, node_cpus=top.cores)
            s._compact_index = compact
            for name, spec in top.specs.items():
                s.add_backend(spec, node=top.node[name])
            both.append(s)
        on, off = both
        now, n = 0.0, 0
        views: dict[str, tuple[JobView, Plan, float]] = {}
        for _ in range(data.draw(st.integers(5, 60))):
            kind = data.draw(st.sampled_from(["enqueue"] * 4 + ["decide"] * 5 + ["finish"] * 3
                                             + ["cancel"] * 2 + ["health", "fail", "floor"]))
            running, queued = sorted(on.runs), sorted(on.entries)
            if kind == "enqueue":
                for _ in range(data.draw(st.integers(1, 5))):
                    job, plan = jobs_and_plans(data.draw, top, n)
                    job = JobView(job.id, job.num_qubits, job.ops, job.features, job.shots, intent=job.intent,
                                  priority=job.priority, fidelity_min=job.fidelity_min, deadline_s=job.deadline_s,
                                  tenant=f"t{n % 2}")
                    n += 1
                    views[job.id] = (job, plan, now)
                    for s in both:
                        s.enqueue(job, Plan(plan.job_id, dict(plan.estimates)), now)
            elif kind == "finish" and running:
                jid = data.draw(st.sampled_from(running))
                for s in both:
                    s.finish(jid)
            elif kind == "cancel" and queued:
                jid = data.draw(st.sampled_from(queued))
                for s in both:
                    s.remove(jid)
            elif kind == "health":
                b, up = data.draw(st.sampled_from(sorted(top.specs))), data.draw(st.booleans())
                for s in both:
                    s.set_health(b, up)
            elif kind == "fail" and running:
                jid = data.draw(st.sampled_from(running))
                job, plan, arrival = views[jid]
                for s in both:
                    s.requeue(s.runs[jid], job, Plan(plan.job_id, dict(plan.estimates)), arrival)
            elif kind == "floor":
                tenant, cls = data.draw(st.sampled_from(["t0", "t1"])), data.draw(st.sampled_from([None, "high"]))
                assert on.set_class_floor(tenant, cls, now) == off.set_class_floor(tenant, cls, now)
            elif kind == "decide":
                now += data.draw(st.sampled_from(STEPS))
                got, want = outcome(on, now), outcome(off, now)
                assert got == want, f"at t={now}: with compaction {got} != without {want}"
                for victim, _ in got["preempt"]:
                    job, plan, arrival = views[victim]
                    for s in both:
                        s.requeue(s.runs[victim], job, Plan(plan.job_id, dict(plan.estimates)), arrival)
            assert excess(on) <= 0 and excess_queues(on) <= 0
        assert outcome(on, now + 1.0) == outcome(off, now + 1.0)
    finally:
        jobqueue.INDEX_SLACK = saved


def test_a_removed_and_re_added_backend_counts_only_its_own_items() -> None:
    """A heap made after a job was queued never got that job's item: removing the job must not
    take a live item off the new heap's count (the count would drift, and the bound with it)."""
    s = Scheduler(SchedulerConfig(check_invariants=True), node_cpus={"local": 4})
    for name in ("a", "b"):
        s.add_backend(BackendSpec(name, "simulator", "aer", 20, slots=1))
    jobs = [JobView(f"j{i}", 3, frozenset({"h"}), {}, 100) for i in range(3)]
    for i, j in enumerate(jobs):
        s.enqueue(j, Plan(j.id, {"a": Estimate("a", 1.0, 1.0, 0.0), "b": Estimate("b", 2.0, 1.0, 0.0)}), float(i))
    assert s._live == {"a": 3, "b": 3}
    s.remove_backend("b")
    s.add_backend(BackendSpec("b", "simulator", "aer", 20, slots=1))
    assert s._live == {"a": 3, "b": 0}
    s.remove("j0")                       # validate_state recomputes the counts after each call
    assert s._live == {"a": 2, "b": 0}
