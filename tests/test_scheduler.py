"""The pure queue/dispatch state machine: order, reservation, preemption, deadlines, aging,
congestion, shared cores — each on a small hand-made pool."""

from __future__ import annotations

import pytest

from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.placement.model import Estimate, JobView, Plan
from ray_qalloc.placement import scheduler as scheduler_module
from ray_qalloc.placement.invariants import InvariantViolation
from ray_qalloc.placement.scheduler import Scheduler, SchedulerConfig


def sim(name: str, slots: int = 1, threads: int = 0) -> BackendSpec:
    return BackendSpec(name, "simulator", "aer", 30, slots=slots, method="statevector", threads=threads)


def qpu(name: str) -> BackendSpec:
    return BackendSpec(name, "qpu", "fake_qpu", 127, device=name, noisy=True)


def job(i: str, priority: str = "normal", deadline_s: float | None = None, intent: str = "auto",
        fidelity_min: float | None = None) -> JobView:
    return JobView(i, 3, frozenset({"h", "cx"}), {}, 100, intent=intent, priority=priority,
                   deadline_s=deadline_s, fidelity_min=fidelity_min)


def plan_for(j: JobView, runtimes: dict[str, float], fidelity: dict[str, float] | None = None) -> Plan:
    fid = fidelity or {}
    return Plan(j.id, {b: Estimate(b, t, fid.get(b, 1.0), 0.0) for b, t in runtimes.items()})


def sched(*specs: BackendSpec, **cfg) -> Scheduler:
    s = Scheduler(SchedulerConfig(check_invariants=True, **cfg), node_cpus={"local": 64})
    for spec in specs:
        s.add_backend(spec)
    return s


def started(result) -> list[tuple[str, str]]:
    return [(d.entry.job.id, d.choice.backend) for d in result.dispatch]


def test_classes_in_order_and_earliest_deadline_first_within_a_class():
    s = sched(sim("a"))
    for j, arrival in [(job("n1"), 0.0), (job("b1", "batch"), 0.1), (job("h1", "high"), 0.2),
                       (job("n2", deadline_s=5.0), 0.3), (job("e1", "emergency"), 0.4)]:
        s.enqueue(j, plan_for(j, {"a": 1.0}), arrival)
    order = []
    now = 1.0
    while s.entries:
        res = s.decide(now)
        assert len(res.dispatch) == 1
        jid, backend = started(res)[0]
        order.append(jid)
        s.finish(jid)
        now += 1.0
    assert order == ["e1", "h1", "n2", "n1", "b1"]


def test_reserved_slots_are_kept_for_emergency():
    s = sched(sim("a", slots=2), reserved={"a": 1})
    n1, n2 = job("n1"), job("n2")
    s.enqueue(n1, plan_for(n1, {"a": 1.0}), 0.0)
    s.enqueue(n2, plan_for(n2, {"a": 1.0}), 0.0)
    assert started(s.decide(0.0)) == [("n1", "a")]          # the second slot is reserved
    e = job("e", "emergency")
    s.enqueue(e, plan_for(e, {"a": 1.0}), 0.1)
    assert started(s.decide(0.1)) == [("e", "a")]
    assert "n2" in s.entries


def test_emergency_preempts_a_long_batch_simulator_run():
    s = sched(sim("a"), preempt_min_remaining_s=5.0)
    b = job("b", "batch")
    s.enqueue(b, plan_for(b, {"a": 100.0}), 0.0)
    assert started(s.decide(0.0)) == [("b", "a")]
    e = job("e", "emergency")
    s.enqueue(e, plan_for(e, {"a": 1.0}), 1.0)
    res = s.decide(1.0)
    assert res.dispatch == [] and [(r.job_id, en.job.id) for r, en in res.preempt] == [("b", "e")]
    run = res.preempt[0][0]
    s.requeue(run, b, plan_for(b, {"a": 100.0}), arrival=0.0)   # the caller stopped it: back in line
    assert started(s.decide(1.1)) == [("e", "a")]
    s.finish("e")
    assert started(s.decide(2.5)) == [("b", "a")]               # not lost


@pytest.mark.parametrize("priority, remaining, expect", [("normal", 100.0, False), ("batch", 2.0, False),
                                                          ("batch", 100.0, True)])
def test_only_long_batch_runs_are_preempted(priority, remaining, expect):
    s = sched(sim("a"), preempt_min_remaining_s=5.0)
    v = job("v", priority)
    s.enqueue(v, plan_for(v, {"a": remaining}), 0.0)
    s.decide(0.0)
    e = job("e", "emergency")
    s.enqueue(e, plan_for(e, {"a": 1.0}), 0.0)
    assert bool(s.decide(0.0).preempt) is expect


def test_emergency_preempts_only_when_that_beats_waiting_and_rechecks_later():
    # e would rather wait 1.5 s for the busy fast backend than run 5 s on "slow", so the batch
    # run that takes "slow" is left alone; once "fast" overruns badly, "slow" wins: preempted
    s = sched(sim("fast"), sim("slow"), preempt_min_remaining_s=5.0)
    n = job("n")
    s.enqueue(n, plan_for(n, {"fast": 2.0}), 0.0)
    assert started(s.decide(0.0)) == [("n", "fast")]
    e = job("e", "emergency")
    s.enqueue(e, plan_for(e, {"fast": 0.1, "slow": 5.0}), 0.5)
    res = s.decide(0.5)
    assert res.dispatch == [] and res.preempt == []
    b = job("b", "batch")
    s.enqueue(b, plan_for(b, {"slow": 100.0}), 0.6)
    res = s.decide(0.6)
    assert started(res) == [("b", "slow")] and res.preempt == []
    res = s.decide(30.0)     # n still running: 28 s past its predicted end
    assert [(r.job_id, en.job.id) for r, en in res.preempt] == [("b", "e")]


def test_preemption_candidates_do_not_grow_with_passes():
    s = sched(sim("a"), preempt_min_remaining_s=5.0)
    n = job("n")
    s.enqueue(n, plan_for(n, {"a": 100.0}), 0.0)
    s.decide(0.0)
    e = job("e", "emergency")
    s.enqueue(e, plan_for(e, {"a": 1.0}), 0.0)
    assert s.decide(0.0).preempt == []      # no batch victim: waits, looked at again later
    for t in (0.1, 0.2, 0.3):
        assert s.decide(t).preempt == [] and s._preempt.new == set()
    assert list(s._preempt.waiting) == ["e"]


def test_qpu_runs_are_never_preempted():
    s = sched(qpu("q"))
    b = job("b", "batch")
    s.enqueue(b, plan_for(b, {"q": 100.0}), 0.0)
    s.decide(0.0)
    e = job("e", "emergency")
    s.enqueue(e, plan_for(e, {"q": 1.0}), 0.0)
    assert s.decide(0.0).preempt == []


def test_a_job_that_cannot_meet_its_deadline_is_flagged_once():
    s = sched(sim("a"))
    long = job("long")
    s.enqueue(long, plan_for(long, {"a": 50.0}), 0.0)
    s.decide(0.0)
    d = job("d", deadline_s=10.0)
    entry = s.enqueue(d, plan_for(d, {"a": 1.0}), 0.0)      # flagged at enqueue: a is busy for 50 s
    assert entry.flagged and "after its deadline" in entry.flagged
    assert s.decide(2.0).flagged == []                       # once
    late = job("late", deadline_s=60.0)
    s.enqueue(late, plan_for(late, {"a": 1.0}), 0.0)         # fine now ...
    assert s.entries["late"].flagged is None
    s.finish("long")
    blocker = job("blocker", "high")
    s.enqueue(blocker, plan_for(blocker, {"a": 100.0}), 0.0)
    res = s.decide(3.0)                                       # ... until a long high job takes the backend
    assert "blocker" in [d.entry.job.id for d in res.dispatch]
    assert s.decide(58.0).flagged == []                       # could still start on time
    res = s.decide(60.0)                                      # latest start was 59 s
    assert [e.job.id for e in res.flagged] == ["late"] and "latest start" in s.entries["late"].flagged
    ok = job("ok", deadline_s=100.0)
    s.enqueue(ok, plan_for(ok, {"a": 1.0}), 2.0)
    assert s.decide(2.0).flagged == []


def test_batch_ages_into_normal():
    s = sched(sim("a"), aging_s=10.0)
    b = job("b", "batch")
    s.enqueue(b, plan_for(b, {"a": 1.0}), 0.0)
    busy = job("busy")
    s.enqueue(busy, plan_for(busy, {"a": 30.0}), 0.0)
    assert started(s.decide(0.0)) == [("busy", "a")]
    n = job("n")
    s.enqueue(n, plan_for(n, {"a": 1.0}), 5.0)
    s.finish("busy")
    assert started(s.decide(20.0)) == [("b", "a")]     # waited 20 s ≥ aging: ahead of the younger normal job


def test_congested_qpu_sends_auto_jobs_to_a_simulator_and_back():
    s = sched(qpu("q"), sim("a"), qpu_wait_high_s=50.0, qpu_wait_low_s=10.0)
    hog = job("hog", intent="quantum")
    s.enqueue(hog, plan_for(hog, {"q": 100.0}, {"q": 0.9}), 0.0)
    s.decide(0.0)
    auto = job("auto", fidelity_min=0.5)
    s.enqueue(auto, plan_for(auto, {"q": 1.0, "a": 30.0}, {"q": 0.95, "a": 1.0}), 0.0)
    res = s.decide(0.0)
    assert started(res) == [("auto", "a")] and s.backends["q"].congested
    s.finish("hog")
    s.decide(1.0)
    assert not s.backends["q"].congested


def test_simulators_share_their_node_cores():
    s = Scheduler(SchedulerConfig(check_invariants=True), node_cpus={"n1": 1})
    s.add_backend(sim("a", threads=1), node="n1")
    s.add_backend(sim("b", threads=1), node="n1")
    ja, jb = job("ja"), job("jb")
    s.enqueue(ja, plan_for(ja, {"a": 1.0}), 0.0)
    s.enqueue(jb, plan_for(jb, {"b": 1.0}), 0.0)
    assert len(s.decide(0.0).dispatch) == 1       # one core: one run at a time, whatever the method
    live = s.live(0.5)
    assert not live["a"].can_start and not live["b"].can_start and live["b"].wait_s == pytest.approx(0.5)


def test_unplaceable_jobs_are_reported_and_removed():
    s = sched(sim("a"))
    j = job("j")
    s.enqueue(j, Plan("j"), 0.0)
    res = s.decide(0.0)
    assert [e.job.id for e in res.unplaceable] == ["j"] and not s.entries


def test_queue_wait_counts_queued_work_for_the_preferred_backend():
    s = sched(sim("a"), sim("b"))
    for i in range(3):
        j = job(f"j{i}")
        s.enqueue(j, plan_for(j, {"a": 2.0, "b": 10.0}), 0.0)
    assert s.live(0.0)["a"].wait_s == pytest.approx(6.0 / 1) or s.live(0.0)["a"].can_start
    assert s.backends["a"].queued_work_s == pytest.approx(6.0)
    s.decide(0.0)
    assert s.backends["a"].queued_work_s < 6.0


def test_a_run_past_its_predicted_end_is_not_a_free_slot():
    s = sched(sim("a"), sim("b"))
    hog = job("hog")
    s.enqueue(hog, plan_for(hog, {"a": 1.0}), 0.0)
    s.decide(0.0)
    j = job("j")
    s.enqueue(j, plan_for(j, {"a": 1.0, "b": 3.0}), 5.0)     # 'hog' overran its 1 s by 4 s
    live = s.live(5.0)
    assert not live["a"].can_start and live["a"].wait_s == pytest.approx(5.0)   # as long again as it ran
    assert started(s.decide(5.0)) == [("j", "b")]


def pool(cores: int, *variants: tuple[str, int], name: str = "p", **cfg) -> Scheduler:
    """A scheduler with one simulator pool: each (method, threads) candidate has the pool's cores as slots."""
    s = Scheduler(SchedulerConfig(check_invariants=True, **cfg), node_cpus={name: cores})
    for method, threads in variants:
        s.add_backend(BackendSpec(f"{name}/{method}@{threads}", "simulator", "aer", 30, slots=cores,
                                  method=method, threads=threads, pool=name), node=name)
    return s


def enqueue(s: Scheduler, jid: str, runtimes: dict[str, float], arrival: float = 0.0, **kw) -> JobView:
    j = job(jid, **kw)
    s.enqueue(j, plan_for(j, runtimes), arrival)
    return j


# ---- invariants -------------------------------------------------------------------------------
def test_validate_state_names_a_cache_that_drifted():
    s = sched(sim("a", slots=2), sim("b"))
    enqueue(s, "j", {"a": 1.0, "b": 2.0})
    s.validate_state()
    s.backends["a"].queued_work_s += 1.0
    with pytest.raises(InvariantViolation, match="queued work"):
        s.validate_state()
    s.backends["a"].queued_work_s -= 1.0
    s.decide(0.0)
    s.backends["a"].can_start = False           # stale load: a slot is free
    with pytest.raises(InvariantViolation, match="cached load"):
        s.validate_state()


def test_check_invariants_runs_after_every_mutating_call_and_is_off_by_default(monkeypatch):
    monkeypatch.setattr(scheduler_module, "_CHECK_FROM_ENV", False)   # as without the variable (conftest sets it)
    plain = Scheduler()
    assert "decide" not in vars(plain) and "enqueue" not in vars(plain)   # no wrapper: nothing to pay
    s = sched(sim("a"))
    enqueue(s, "j", {"a": 1.0})
    s._index["a"].clear()                        # a queued job the pass could never find
    with pytest.raises(InvariantViolation, match="not in the index"):
        s.remove("nobody")
    monkeypatch.setattr(scheduler_module, "_CHECK_FROM_ENV", True)   # RAY_QALLOC_CHECK_INVARIANTS=1
    assert "decide" in vars(Scheduler())
    assert scheduler_module.CHECK_INVARIANTS_ENV == "RAY_QALLOC_CHECK_INVARIANTS"


def test_writing_node_cpus_refreshes_the_cached_load():
    s = Scheduler(SchedulerConfig(check_invariants=True), node_cpus={"n": 1})
    s.add_backend(sim("a", slots=2, threads=1), node="n")
    enqueue(s, "j1", {"a": 1.0})
    enqueue(s, "j2", {"a": 1.0})
    assert started(s.decide(0.0)) == [("j1", "a")]
    s.node_cpus["n"] = 2.0                       # the node reported more cores: usable at once
    assert s.live(0.0)["a"].can_start
    assert started(s.decide(0.0)) == [("j2", "a")]


# ---- reservations per pool --------------------------------------------------------------------
def test_pool_reserved_cores_are_kept_for_emergency_jobs_and_their_runs_count_against_them():
    s = pool(3, ("statevector", 1), ("mps", 1), reserved={"p": 1})
    for i in range(3):
        enqueue(s, f"n{i}", {"p/statevector@1": 5.0, "p/mps@1": 5.0})
    assert len(s.decide(0.0).dispatch) == 2                     # the third core is held
    assert not s.live(0.0)["p/mps@1"].can_start and s.live(0.0, emergency=True)["p/mps@1"].can_start
    enqueue(s, "e1", {"p/mps@1": 1.0}, priority="emergency")
    assert started(s.decide(0.0)) == [("e1", "p/mps@1")]        # any method may use the held core
    s.finish("n0")                                              # a core frees while e1 holds the reservation
    assert [j for j, _ in started(s.decide(1.0))] == ["n2"]
    s.finish("e1")                                              # held again: nobody but emergencies
    assert s.decide(2.0).dispatch == [] and not s.live(2.0)["p/statevector@1"].can_start


def test_backend_reservations_still_work_beside_pool_ones():
    s = pool(2, ("statevector", 1), reserved={"p/statevector@1": 1})
    enqueue(s, "n1", {"p/statevector@1": 1.0})
    enqueue(s, "n2", {"p/statevector@1": 1.0})
    assert started(s.decide(0.0)) == [("n1", "p/statevector@1")]


# ---- place in line ----------------------------------------------------------------------------
def test_a_requeued_job_keeps_its_place_without_its_old_seq():
    s = sched(sim("a"), preempt_min_remaining_s=0.0)
    b1 = enqueue(s, "b1", {"a": 10.0}, priority="batch")
    assert started(s.decide(0.0)) == [("b1", "a")]
    enqueue(s, "b2", {"a": 1.0}, arrival=1.0, priority="batch")
    enqueue(s, "e", {"a": 1.0}, arrival=2.0, priority="emergency")
    res = s.decide(2.0)
    s.requeue(res.preempt[0][0], b1, plan_for(b1, {"a": 10.0}), arrival=0.0)   # no seq passed
    assert started(s.decide(2.0)) == [("e", "a")]
    s.finish("e")
    assert started(s.decide(3.0)) == [("b1", "a")]          # arrived first: ahead of b2, enqueued before it


def test_a_job_queued_again_is_not_served_by_its_earlier_index_items():
    # regression (found by the reference comparison): index items of a job's earlier entry
    # were taken for the new entry's (both had version 0), so it was served at its old key
    s = sched(sim("a"))
    j2 = enqueue(s, "j2", {"a": 1.0}, arrival=0.0)
    assert started(s.decide(0.0)) == [("j2", "a")]           # a is full: j2's item stays in a's heap
    enqueue(s, "j3", {"a": 1.0}, arrival=0.0)
    s.requeue(s.runs["j2"], j2, plan_for(j2, {"a": 1.0}), arrival=5.0)   # queued again, later
    assert started(s.decide(5.0)) == [("j3", "a")]


def test_aging_follows_arrival_even_for_jobs_queued_again():
    # regression: the aging queue was in enqueue order, so a re-queued old batch job waited
    # behind younger ones before it aged
    s = sched(sim("a"), aging_s=10.0, preemption=False)
    old = enqueue(s, "old", {"a": 100.0}, priority="batch")
    assert started(s.decide(0.0)) == [("old", "a")]
    enqueue(s, "young", {"a": 1.0}, arrival=8.0, priority="batch")
    s.requeue(s.runs["old"], old, plan_for(old, {"a": 100.0}), arrival=0.0)   # failed over at 9 s
    enqueue(s, "n", {"a": 1.0}, arrival=11.0)
    assert started(s.decide(12.0)) == [("old", "a")]     # waited 12 s: served as normal, ahead of n


# ---- regressions found by the reference and the property tests -------------------------------
def test_an_emergency_job_sees_no_wait_on_a_reserved_free_slot():
    s = sched(sim("a", slots=2), reserved={"a": 1})
    enqueue(s, "n", {"a": 100.0})
    s.decide(0.0)
    assert s.live(1.0, emergency=True)["a"].wait_s == 0.0 and s.live(1.0)["a"].wait_s == pytest.approx(99.0)


def test_a_core_bound_overrun_is_judged_from_its_start():
    s = pool(1, ("statevector", 1), ("mps", 1))
    enqueue(s, "hog", {"p/statevector@1": 1.0})
    s.decide(0.0)
    s.finish("hog")
    s.start("hog", "p/statevector@1", 100.0, 1.0)              # started at 100, due at 101, still running at 105
    # the mps candidate waits for a core: as long again as the run has run, not as long as "now"
    assert s.live(105.0)["p/mps@1"].wait_s == pytest.approx(5.0)


def test_nobody_waits_for_a_slot_that_only_emergency_jobs_may_ever_use():
    s = sched(sim("a"), qpu("q"), reserved={"q": 1}, preemption=False)
    enqueue(s, "e", {"q": 1.0}, priority="emergency", intent="quantum")
    s.decide(0.0)
    enqueue(s, "n", {"q": 0.5, "a": 3.0}, fidelity_min=None)
    assert s.live(0.0)["q"].wait_s == float("inf")
    assert started(s.decide(0.0)) == [("n", "a")]


def test_a_congested_qpu_is_not_skipped_for_a_simulator_that_is_down():
    # regression: the auto job dropped the congested QPU for a simulator that was down, was
    # left with nothing and given up as unplaceable
    s = Scheduler(SchedulerConfig(check_invariants=True, qpu_wait_high_s=5.0, qpu_wait_low_s=1.0),
                  node_cpus={"local": 64})
    s.add_backend(BackendSpec("q", "qpu", "fake_qpu", 127, slots=2, threads=0, noisy=True))
    s.add_backend(sim("a"))
    enqueue(s, "w", {"q": 100.0}, intent="quantum")
    s.decide(0.0)
    s.set_health("a", False)
    enqueue(s, "auto", {"q": 1.0, "a": 1.0}, arrival=2.0)
    res = s.decide(2.0)
    assert s.backends["q"].congested and res.unplaceable == [] and started(res) == [("auto", "q")]


def test_preemption_victims_go_to_the_most_urgent_emergency_job_first():
    s = sched(sim("a"), preempt_min_remaining_s=0.0)
    enqueue(s, "b", {"a": 100.0}, priority="batch")
    s.decide(0.0)
    enqueue(s, "late", {"a": 1.0}, arrival=1.0, priority="emergency", deadline_s=50.0)
    enqueue(s, "soon", {"a": 1.0}, arrival=1.0, priority="emergency", deadline_s=5.0)
    assert [(r.job_id, e.job.id) for r, e in s.decide(1.0).preempt] == [("b", "soon")]


def test_a_stale_unplaceable_entry_does_not_drop_the_job_queued_again():
    s = sched(sim("a"))
    j = job("j")
    s.enqueue(j, Plan("j"), 0.0)                 # nothing feasible: reported at the next pass ...
    s.remove("j")
    enqueue(s, "j", {"a": 1.0}, arrival=0.5)     # ... but it was withdrawn and queued again, placeable
    assert started(s.decide(1.0)) == [("j", "a")]


def test_emergency_preempts_a_batch_run_of_another_method_on_its_pool():
    """A pool's variants share its cores: a long batch MPS run holding the only core is stopped for
    an emergency job that only the pool's statevector can run (the old per-method view could not
    see that the MPS run held the core)."""
    from ray_qalloc.backends.pools import pool_candidate_specs

    specs = [sp for sp in pool_candidate_specs("cpu-p", cores=1, memory_bytes=2**33) if sp.threads == 1]
    s = Scheduler(SchedulerConfig(preempt_min_remaining_s=1.0, check_invariants=True), node_cpus={"cpu-p": 1.0})
    for sp in specs:
        s.add_backend(sp, node="cpu-p")
    s.add_backend(specs[0], node="cpu-p")          # twice: listed once
    assert s._nodes["cpu-p"].count(specs[0].name) == 1
    batch = job("b", "batch")
    s.enqueue(batch, plan_for(batch, {"cpu-p/mps": 100.0}), 0.0)
    assert started(s.decide(0.0)) == [("b", "cpu-p/mps")]
    urgent = job("e", "emergency")
    s.enqueue(urgent, plan_for(urgent, {"cpu-p/statevector": 1.0}), 1.0)
    res = s.decide(1.0)
    assert [(run.job_id, run.backend, e.job.id) for run, e in res.preempt] == [("b", "cpu-p/mps", "e")]


def test_a_removed_backend_leaves_no_trace_and_its_queued_jobs_can_be_planned_again():
    s = sched(sim("a"), sim("b"))
    enqueue(s, "j", {"a": 1.0, "b": 2.0})
    s.remove_backend("a")
    assert "a" not in s.backends and "a" not in s._nodes.get("local", [])
    s.validate_state()
    s.remove("j")
    enqueue(s, "j", {"b": 2.0})
    assert started(s.decide(0.0)) == [("j", "b")]
    with pytest.raises(ValueError, match="still has runs"):
        s.remove_backend("b")
