"""The scheduler's shortcuts against the slower code they stand in for, on random inputs.

Each shortcut of the dispatch hot path keeps the slow path it replaced, and these tests use
it as the oracle:

* ``backend_load``'s free-slot answer against ``backend_load_full`` (the whole formula);
* ``first_core_run``'s loop (and the refresh's copy over cached rows) against ``min`` by
  ``(ends, started)``;
* the pass with qalloc's own selector (``LiveView.weigh_free`` inline, a waiting job's
  threshold read on the same walk, the node refresh's inline free-variant case) against the
  same pass through the ``Policy`` interface (``select`` over the view, ``_latest_end``
  walking the plan again): with the production defaults (holds, declined backends, explain)
  both must dispatch, flag, give up and preempt exactly the same jobs, weigh the same number
  of jobs, and explain the same scores, pass by pass. Invariants are checked after every
  call (``conftest`` sets ``RAY_QALLOC_CHECK_INVARIANTS``; ``check_invariants`` here too),
  which compares the refreshed cache with ``backend_load``.

Both schedulers live in one process, so their sets iterate in the same order.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.placement.load import BackendSlotState, LiveView, Run, _Without, backend_load, backend_load_full
from ray_qalloc.placement.load import first_core_run
from ray_qalloc.placement.loadcache import _first_core_run
from ray_qalloc.placement.model import JobView, LiveState, Plan
from ray_qalloc.placement.pipeline import Choice, select
from ray_qalloc.placement.scheduler import Entry, QallocPolicy, Scheduler, SchedulerConfig
from tests.test_scheduler_reference import CONFIG_KNOBS, STEPS, Topology, jobs_and_plans, topologies

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TIMES = st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 3.0, 8.0])


@st.composite
def runs_on(draw: Any, backend: str = "b") -> list[Run]:
    return [Run(f"r{i}", backend, draw(st.sampled_from(["emergency", "high", "normal", "batch"])),
                draw(TIMES), draw(TIMES)) for i in range(draw(st.integers(0, 4)))]


@SETTINGS
@given(slots=st.integers(1, 4), runs=runs_on(), reserved=st.integers(0, 3), short=st.booleans(),
       short_e=st.booleans(), first=st.one_of(st.none(), runs_on().map(lambda r: r[0] if r else None)),
       never=st.booleans(), healthy=st.booleans(), as_values=st.booleans())
def test_backend_load_shortcut_matches_the_whole_formula(slots: int, runs: list[Run], reserved: int, short: bool,
                                                         short_e: bool, first: Run | None, never: bool,
                                                         healthy: bool, as_values: bool) -> None:
    """Whatever the inputs (a core shortage implies the emergency one only in the scheduler;
    here any mix is tried), the free-slot shortcut answers as the formula does."""
    spec = BackendSpec("b", "simulator", "aer", 20, slots=slots)
    given_runs: Any = {r.job_id: r for r in runs}.values() if as_values else runs
    want = backend_load_full(spec, healthy, list(runs), reserved, short, short_e, first, never)
    assert backend_load(spec, healthy, given_runs, reserved, short, short_e, first, never) == want


@SETTINGS
@given(per_backend=st.lists(st.tuples(st.integers(0, 2), runs_on()), max_size=4))
def test_first_core_run_is_the_min_by_end_then_start(per_backend: list[tuple[int, list[Run]]]) -> None:
    backends = []
    for i, (threads, runs) in enumerate(per_backend):
        b = BackendSlotState(BackendSpec(f"b{i}", "simulator", "aer", 20, slots=8, threads=threads))
        b.runs = {f"{i}-{r.job_id}": r for r in runs}
        backends.append(b)
    want = min((r for b in backends if b.spec.threads > 0 for r in b.runs.values()),
               key=lambda r: (r.ends, r.started), default=None)
    assert first_core_run(backends) is want
    rows = tuple((b.spec.name, b, b.spec.threads, b.spec.slots) for b in backends)
    assert _first_core_run(rows) is want        # the refresh's copy, over a node's cached rows


class SlowQalloc(QallocPolicy):
    """qalloc's objective through the ``Policy`` interface: ``select`` over a mapping of the
    live view. Not ``QallocPolicy.choose`` itself, so the pass takes its general path (no inline
    weighing, a waiting job's threshold from ``_latest_end``, explain scores from ``select``)."""

    def choose(self, entry: Entry, live: Mapping[str, LiveState], now: float) -> Choice:
        view = live if not entry.excluded else _Without(live, entry.excluded)
        return select(entry.job, entry.plan, view)


class CheckedFast(Scheduler):
    """The fast pass, asserting at each hold that the threshold it read on the weighing walk
    equals the one ``_latest_end`` computes by walking the plan again."""

    def _waits(self, entry: Entry, choice: Choice, live: LiveView, now: float, ahead: dict[str, float],
               kept: list[Any], free: tuple[float, float, float] | None = None) -> None:
        if free is not None and choice.backend in entry.plan.estimates:
            fast = self._latest_end_from(*free, choice.backend, live, now)
            slow = self._latest_end(entry, choice.backend, live, now)
            assert fast == slow or (math.isnan(fast) and math.isnan(slow)), (entry.job.id, fast, slow)
        super()._waits(entry, choice, live, now, ahead, kept, free)


def build(top: Topology, cfg: SchedulerConfig, cls: type[Scheduler], policy: Any) -> Scheduler:
    s = cls(cfg, policy, node_cpus=top.cores)
    for name, spec in top.specs.items():
        s.add_backend(spec, node=top.node[name])
    return s


def outcome(s: Scheduler, now: float) -> dict[str, Any]:
    before = s.examined
    res = s.decide(now)
    # explain through a policy scores the backends the pass excluded too (congested QPUs,
    # maintenance); the inline path keeps only those it weighed: compared on those
    return {"dispatch": [(d.entry.job.id, d.choice.backend, d.choice.can_start,
                          sorted((b, sorted(row.items())) for b, row in d.explained.scores.items()
                                 if b not in d.entry.excluded))
                         for d in res.dispatch],
            "flagged": [(e.job.id, e.flagged) for e in res.flagged],
            "unplaceable": [e.job.id for e in res.unplaceable],
            "preempt": [(r.job_id, e.job.id) for r, e in res.preempt],
            "examined": s.examined - before}


@SETTINGS
@given(top=topologies(), knobs=CONFIG_KNOBS, data=st.data())
def test_fast_pass_decides_as_the_policy_path(top: Topology, knobs: dict[str, Any], data: Any) -> None:
    cfg = SchedulerConfig(reserved=top.reserved, qpu_wait_low_s=knobs["qpu_wait_high_s"] / 2,
                          check_invariants=True, **knobs)
    fast, slow = build(top, cfg, CheckedFast, QallocPolicy()), build(top, cfg, Scheduler, SlowQalloc())
    both = (fast, slow)
    now, n = 0.0, 0
    views: dict[str, tuple[JobView, Plan, float]] = {}
    for _ in range(data.draw(st.integers(5, 50))):
        kind = data.draw(st.sampled_from(["enqueue"] * 4 + ["decide"] * 5 + ["finish"] * 3
                                         + ["cancel", "health", "fail", "external"]))
        running, queued = sorted(fast.runs), sorted(fast.entries)
        assert running == sorted(slow.runs) and queued == sorted(slow.entries)
        if kind == "enqueue":
            for _ in range(data.draw(st.integers(1, 5))):
                job, plan = jobs_and_plans(data.draw, top, n)
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
        elif kind == "external":
            b, wait = data.draw(st.sampled_from(sorted(top.specs))), data.draw(st.sampled_from([0.0, 1.0, 5.0]))
            for s in both:
                s.set_external_wait(b, wait)
        elif kind == "fail" and running:
            jid = data.draw(st.sampled_from(running))
            job, plan, arrival = views[jid]
            for s in both:
                s.requeue(s.runs[jid], job, Plan(plan.job_id, dict(plan.estimates)), arrival)
        elif kind == "decide":
            now += data.draw(st.sampled_from(STEPS))
            got, want = outcome(fast, now), outcome(slow, now)
            assert got == want, f"at t={now}: fast pass {got} != policy path {want}"
            for victim, _ in got["preempt"]:
                job, plan, arrival = views[victim]
                for s in both:
                    s.requeue(s.runs[victim], job, Plan(plan.job_id, dict(plan.estimates)), arrival)
    assert outcome(fast, now + 1.0) == outcome(slow, now + 1.0)


@SETTINGS
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "remove", "move", "start", "finish", "cores"]),
                              st.integers(0, 5), st.sampled_from(["n0", "n1", "n2"])), max_size=40))
def test_node_rows_follow_backends_joining_leaving_and_moving(ops: list[tuple[str, int, str]]) -> None:
    """The per-node rows a refresh reads (``_node_rows``) are never stale: after any sequence of
    pool changes each cached row set equals a fresh ``_rows_of`` (and invariants hold)."""
    s = Scheduler(SchedulerConfig(check_invariants=True), node_cpus={"n0": 2.0, "n1": 4.0})
    k = 0
    for op, i, node in ops:
        name = f"b{i}"
        if op == "add":
            s.add_backend(BackendSpec(name, "simulator", "aer", 20, slots=2, threads=1 + i % 2), node=node)
        elif op == "remove" and name in s.backends and not s.backends[name].runs:
            s.remove_backend(name)
        elif op == "move" and name in s.backends:
            s.set_node(name, node)
        elif op == "start" and name in s.backends:
            s.start(f"r{k}", name, float(k), 1.0 + i)
            k += 1
        elif op == "finish" and s.runs:
            s.finish(sorted(s.runs)[i % len(s.runs)])
        elif op == "cores":
            s.node_cpus[node] = float(1 + i)
        for n, rows in s._node_rows.items():
            assert rows == s._rows_of(n), n
