"""The bandit over the cost model's residuals (issue #13): what it learns, its bounds, its state.

Pure Python over placement's value objects (no Ray); the model is the shipped artifact (or the
prior), the runtimes are given: what is tested is the policy, not the model.
"""

from __future__ import annotations

import math

import pytest
import sqlalchemy as sa

from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.costmodel.bandit import BanditConfig, BanditPredictor, BanditStore, ResidualBandit, bucket_of
from ray_qalloc.costmodel.policy import LearningSettings, bandit_of, wrap
from ray_qalloc.placement.model import BackendView, Estimate, JobView, LiveState
from ray_qalloc.placement.pipeline import plan, select


class Fixed:
    """A predictor that always says the same (what the model would): A 1 s, B 2 s."""

    def __init__(self, runtimes: dict[str, float], log_sd: float = 0.5) -> None:
        self.runtimes, self.log_sd, self.observed = runtimes, log_sd, []

    def predict(self, job, backends):
        return [Estimate(b.name, self.runtimes[b.name], 1.0, 0.0, 0.0, "model:test", self.log_sd) for b in backends]

    def observe(self, backend, predicted_s, actual_s):
        self.observed.append((backend, predicted_s, actual_s))


VIEWS = [BackendView(BackendSpec(name=n, kind="simulator", family="aer", num_qubits=30, method="statevector"))
         for n in ("A", "B")]
FREE = {v.name: LiveState(0.0, True) for v in VIEWS}


def job(i: int, **kw) -> JobView:
    base = dict(id=f"j{i}", num_qubits=12, ops=frozenset({"h", "cx"}), features={"clifford_fraction": 0.5,
                                                                                  "cut_max": 6.0}, shots=1024)
    return JobView(**{**base, **kw})


def run(pred: BanditPredictor, truth, n: int, start: int = 0, **kw) -> list[str]:
    picks = []
    for i in range(start, start + n):
        p = plan(job(i, **kw), VIEWS, pred)
        pick = select(job(i, **kw), p, FREE).backend
        pred.observe(pick, p.estimates[pick].runtime_s, truth(pick, i))
        picks.append(pick)
    return picks


def test_bandit_learns_a_backend_got_slower_and_moves_away():
    pred = BanditPredictor(Fixed({"A": 1.0, "B": 2.0}), ResidualBandit(BanditConfig(seed=1)))
    truth = lambda b, i: (1.0 if i < 100 else 8.0) if b == "A" else 2.0  # noqa: E731 - A gets 8x slower at 100
    early = run(pred, truth, 100)
    late = run(pred, truth, 100, start=100)
    assert early[-30:].count("A") >= 25
    assert late[-30:].count("B") >= 25           # it left A once A was slower than B
    assert late.index("B") < 30                  # and within a few dozen jobs


def test_no_exploration_for_emergency_or_deadline_jobs_and_draws_are_bounded():
    bandit = ResidualBandit(BanditConfig(seed=3, explore_factor=2.0))
    pred = BanditPredictor(Fixed({"A": 1.0, "B": 1.5}, log_sd=2.0), bandit)
    for kw in ({"priority": "emergency"}, {"deadline_s": 30.0}):
        shown = {e.backend: e.runtime_s for e in pred.predict(job(0, **kw), VIEWS)}
        assert shown == pytest.approx({"A": 1.0, "B": 1.5})          # the posterior mean: no draw
    for i in range(300):
        for e in pred.predict(job(i), VIEWS):
            base = {"A": 1.0, "B": 1.5}[e.backend]
            assert base / 2.0 - 1e-9 <= e.runtime_s <= base * 2.0 + 1e-9   # within explore_factor


def test_exploration_spends_no_more_than_its_budget():
    bandit = ResidualBandit(BanditConfig(seed=5, budget_per_job=0.01, budget_burst=0.2))
    pred = BanditPredictor(Fixed({"A": 1.0, "B": 1.3}, log_sd=1.5), bandit)
    run(pred, lambda b, i: 1.0 if b == "A" else 1.3, 400)
    assert bandit.spent <= 0.2 + 0.01 * bandit.jobs + 1e-9
    assert bandit.explored > 0 and bandit.held_back > 0


def test_buckets_separate_what_the_model_gets_wrong_per_kind_of_circuit():
    bandit = ResidualBandit(BanditConfig(seed=2))
    pred = BanditPredictor(Fixed({"A": 1.0, "B": 1.0}), bandit)
    wide = {"num_qubits": 18}
    narrow = {"num_qubits": 6}
    assert bucket_of(job(0, **wide)) != bucket_of(job(0, **narrow))
    for i in range(60):   # A is 4x slower than predicted on wide circuits only
        for kw in (wide, narrow):
            est = {e.backend: e for e in pred.predict(job(i, **kw), VIEWS)}
            pred.observe("A", est["A"].runtime_s, 4.0 if kw is wide else 1.0)
    post_wide = bandit.posterior("rt", "A", bucket_of(job(0, **wide)), 0.5)
    post_narrow = bandit.posterior("rt", "A", bucket_of(job(0, **narrow)), 0.5)
    assert post_wide.mean == pytest.approx(math.log(4.0), abs=0.25)
    assert abs(post_narrow.mean) < 0.25


def test_state_survives_a_restart_and_a_model_swap(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    store = BanditStore(engine)
    learning = LearningSettings(policy="bandit")
    first = wrap(Fixed({"A": 1.0, "B": 2.0}), learning=learning, restore=store.load)
    run(first, lambda b, i: 3.0, 40)
    store.save(bandit_of(first).snapshot())
    before = bandit_of(first).posterior("rt", "A", bucket_of(job(0)), 0.5)
    # a restarted allocator: a new stack restored from the store
    again = wrap(Fixed({"A": 1.0, "B": 2.0}), learning=learning, restore=BanditStore(engine).load)
    after = bandit_of(again).posterior("rt", "A", bucket_of(job(0)), 0.5)
    assert after.mean == pytest.approx(before.mean) and after.n == pytest.approx(before.n)
    # a new model: the same bandit goes on (its evidence thinned, its means kept), memory too
    swapped = wrap(Fixed({"A": 1.0, "B": 2.0}), again, learning=learning)
    assert bandit_of(swapped) is bandit_of(again)
    assert swapped.base.memory is again.base.memory
    thinned = bandit_of(swapped).posterior("rt", "A", bucket_of(job(0)), 0.5)
    assert thinned.n == pytest.approx(after.n * 0.5)


def test_the_layers_below_learn_against_their_own_numbers():
    inner = Fixed({"A": 1.0, "B": 2.0})
    pred = BanditPredictor(inner, ResidualBandit(BanditConfig(seed=0)))
    est = {e.backend: e for e in pred.predict(job(0), VIEWS)}
    pred.observe("A", est["A"].runtime_s, 1.7)
    assert inner.observed == [("A", 1.0, 1.7)]
    assert est["A"].source.endswith(":ts")


def test_correction_policy_is_todays_stack():
    from ray_qalloc.costmodel.memory import MemoryPredictor

    stack = wrap(Fixed({"A": 1.0, "B": 2.0}), learning=LearningSettings())
    assert isinstance(stack, MemoryPredictor) and bandit_of(stack) is None


def test_bandit_policy_switches_the_models_own_correction_off():
    from ray_qalloc.costmodel.model import LearnedPredictor
    from ray_qalloc.costmodel.registry import load_predictor

    base = load_predictor(None)
    if not isinstance(base, LearnedPredictor):
        pytest.skip("no compatible shipped artifact: the prior has no correction to switch off")
    stack = wrap(base, learning=LearningSettings(policy="bandit"))
    assert base.alpha == 0.0 and base.exploration_rate == 0.0
    assert "alpha" not in vars(stack) and "alpha" not in vars(stack.base)


def test_a_backend_that_slows_down_moves_remembered_circuits_too():
    """Run memory answers most jobs of a workload that repeats circuits; after a change its
    answers are stale. The change detector sees the same circuits run slower, rebases the
    remembered runtimes by the shift, and placement leaves the slowed backend within a few runs."""
    stack = wrap(Fixed({"A": 1.0, "B": 2.0}), learning=LearningSettings(policy="bandit"))
    bandit = bandit_of(stack)
    keys = [f"c{k}" for k in range(5)]

    def one(i: int, slow: float) -> str:
        j = job(i, circuit_key=keys[i % len(keys)])
        p = plan(j, VIEWS, stack)
        pick = select(j, p, FREE).backend
        actual = (1.0 * slow) if pick == "A" else 2.0
        stack.observe(pick, p.estimates[pick].runtime_s, actual)
        stack.remember(j, VIEWS[0 if pick == "A" else 1].spec, actual, predicted_s=p.estimates[pick].runtime_s)
        return pick

    early = [one(i, 1.0) for i in range(60)]
    assert early[-20:].count("A") >= 18 and bandit.changes == 0
    late = [one(i, 8.0) for i in range(60, 100)]
    assert bandit.changes >= 1
    assert bandit.shift("rt", "A") == pytest.approx(math.log(8.0), abs=0.2)
    assert late[5:].count("B") >= 30                  # it left A within a few runs and stayed away


def test_a_model_wrong_by_circuit_is_no_change():
    """Model residuals vary by circuit far more than a drift: they must not fire the detector."""
    bandit = ResidualBandit(BanditConfig(seed=4))
    pred = BanditPredictor(Fixed({"A": 1.0, "B": 50.0}), bandit)
    factors = [0.05, 20.0, 1.0, 3.0, 0.3, 8.0, 0.1]
    for i in range(300):
        j = job(i, num_qubits=6 + 2 * (i % 6))
        est = {e.backend: e for e in pred.predict(j, VIEWS)}
        pred.observe("A", est["A"].runtime_s, factors[i % len(factors)] * (1.0 + 0.5 * (i % 3)))
    assert bandit.changes == 0 and bandit.shift("rt", "A") == 0.0


def test_shifts_survive_a_restart_and_old_snapshots_load(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    bandit = ResidualBandit()
    bandit.shifts[("rt", "A")] = 1.2
    bandit.learn("rt", "A", bucket_of(job(0)), 0.7)
    BanditStore(engine).save(bandit.snapshot())
    again = ResidualBandit()
    again.restore(BanditStore(engine).load())
    assert again.shift("rt", "A") == pytest.approx(1.2)
    assert again.posterior("rt", "A", bucket_of(job(0)), 0.5).mean == pytest.approx(
        bandit.posterior("rt", "A", bucket_of(job(0)), 0.5).mean)
    # a version-1 snapshot (one cell per bucket holding the whole residual) becomes level + offset
    old = ResidualBandit()
    old.restore({"version": 1, "step": 10, "cells": [["rt", "A", "*", 10.0, 0.5, 1.0, 10],
                                                      ["rt", "A", "w<=14:entangling", 10.0, 0.9, 1.0, 10]]})
    assert old.cells[("rt", "A", "w<=14:entangling")].mean == pytest.approx(0.4)


class Sourced(Fixed):
    """A predictor whose estimates for one backend come from run memory's neighbour transfer."""

    def __init__(self, runtimes: dict[str, float], sources: dict[str, str]) -> None:
        super().__init__(runtimes)
        self.sources = sources

    def predict(self, job, backends):
        return [Estimate(b.name, self.runtimes[b.name], 1.0, 0.0, 0.0, self.sources.get(b.name, "model:test"),
                         self.log_sd) for b in backends]


def test_a_neighbours_answer_is_not_corrected_twice():
    """A neighbour's measured ratio already corrects the model: the model's residual the bandit
    learned (A 5x slower than the model says) must not be applied on top of it."""
    inner = Sourced({"A": 1.0, "B": 10.0}, {})
    bandit = ResidualBandit(BanditConfig(seed=6))
    pred = BanditPredictor(inner, bandit)
    for i in range(80):                                   # model-estimated runs of A: 5x slow
        est = {e.backend: e for e in pred.predict(job(i, priority="emergency"), VIEWS)}
        pred.observe("A", est["A"].runtime_s, 5.0)
    inner.sources = {"A": "memory:neighbour"}             # now a neighbour lends its ratio: 5 s
    inner.runtimes = {"A": 5.0, "B": 10.0}
    shown = {e.backend: e.runtime_s for e in pred.predict(job(100, priority="emergency"), VIEWS)}
    assert shown["A"] == pytest.approx(5.0, rel=0.05)     # not 25
    model = {e.backend: e.runtime_s for e in BanditPredictor(Sourced({"A": 1.0, "B": 10.0}, {}), bandit)
             .predict(job(101, priority="emergency"), VIEWS)}
    assert model["A"] == pytest.approx(5.0, rel=0.15)     # the model's own estimate is still corrected


def test_cells_table_reports_posteriors_per_part():
    from ray_qalloc.costmodel.bandit import cells_table

    bandit = ResidualBandit()
    for _ in range(30):
        bandit.learn("rt", "A", bucket_of(job(0)), math.log(3.0))
    rows = {r["part"]: r for r in cells_table(bandit)}
    assert set(rows) == {"level", "offset"}
    assert rows["offset"]["factor"] == pytest.approx(3.0, rel=0.1)   # level + offset: what placement applies
