"""Which online-learning policy the allocator runs, and how its predictor stack is built.

Two policies, one switch (``Settings.learning.policy``):

* ``correction`` (today's): the model's per-backend EWMA bias of log residuals plus a small
  fixed exploration rate (``LearnedPredictor.observe`` / ``_explore``), under run memory;
* ``bandit``: the same model and run memory, with the model's own correction and exploration
  switched off and ``costmodel.bandit`` on top (Thompson draws on a backend level plus a pooled
  per-bucket offset, budgeted; change detection on remembered circuits moves run memory's
  answers after a backend drifts). Both would otherwise correct the same residual twice.

``wrap`` is the one place that builds the stack, at start-up and on every model swap: run
memory and the bandit's state carry over a swap; on a fresh start the bandit is restored from
the store (``BanditStore``), so neither a restart nor a new model forgets what was learned.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class RetrainSettings(BaseModel):
    """The unattended retraining loop (``costmodel.retrain``)."""

    model_config = ConfigDict(frozen=True)

    enabled: bool = Field(False, description="Retrain the cost model on the live history by itself.")
    check_s: float = Field(300.0, gt=0, description="How often the loop looks at the history and the drift.")
    min_new_rows: int = Field(500, ge=1, description="Retrain once this many history rows arrived since the "
                              "model in service was trained.")
    drift_window: int = Field(50, ge=5, description="Completed runs over which prediction drift is measured.")
    drift_threshold: float = Field(1.0, gt=0, description="Retrain when the mean |log(actual/predicted)| over "
                                   "the window passes this (1.0: off by ×2.7 on average).")
    num_samples: int = Field(4, ge=1, description="Ray Tune trials per retraining.")
    max_rounds: int = Field(120, ge=5, description="Most boosting rounds per trial.")
    max_concurrent_trials: int = Field(1, ge=1, description="Trials at once: cores retraining may hold (it "
                                       "runs at batch priority, beside the jobs).")
    holdout_share: float = Field(0.2, gt=0, lt=1, description="Share of circuit families held out of "
                                 "training to validate the candidate on.")
    recent_rows: int = Field(200, ge=1, description="Newest history rows held out to validate on.")
    min_improvement: float = Field(0.02, ge=0, description="Relative error reduction a candidate must show "
                                   "(on held-out families or recent history, and in shadow) to be promoted.")
    shadow_runs: int = Field(30, ge=1, description="Completed simulator runs the candidate predicts in shadow "
                             "beside the model in service before it may be promoted.")
    cooldown_s: float = Field(3600.0, ge=0, description="Least time between two retrainings.")


class LearningSettings(BaseModel):
    """How the allocator learns online from completed runs (issue #13)."""

    model_config = ConfigDict(frozen=True)

    policy: Literal["correction", "bandit"] = Field(
        "correction", description="'correction': the model's per-backend running bias and a fixed exploration "
        "rate; 'bandit': Thompson sampling on the model's residuals per (backend, feature bucket).")
    discount: float = Field(0.99, gt=0, le=1, description="Bandit: confidence an idle arm keeps per observation "
                            "elsewhere (its belief stays; an arm left alone is retried). Drift itself is followed "
                            "by each backend's level and by change detection on remembered circuits.")
    budget_per_job: float = Field(0.05, ge=0, description="Bandit: expected extra log-objective exploration may "
                                  "cost per planned job (0.05 ≈ 5 % runtime).")
    budget_burst: float = Field(2.0, ge=0, description="Bandit: exploration budget available up front.")
    swap_keep: float = Field(0.5, ge=0, le=1, description="Bandit: share of evidence kept over a model swap.")
    save_s: float = Field(30.0, gt=0, description="Bandit: how often its state is saved to the store.")
    retrain: RetrainSettings = Field(default_factory=RetrainSettings)


def bandit_config(learning: LearningSettings, explore_factor: float, seed: int = 0) -> Any:
    from ray_qalloc.costmodel.bandit import BanditConfig

    return BanditConfig(discount=learning.discount, explore_factor=explore_factor,
                        budget_per_job=learning.budget_per_job, budget_burst=learning.budget_burst,
                        swap_keep=learning.swap_keep, seed=seed)


def switch_off_correction(predictor: Any) -> None:
    """The bandit learns the residual; the model's EWMA and fixed-rate exploration must not
    learn it too (through the wrappers, down to the learned model)."""
    p = predictor
    for _ in range(4):
        own = vars(p) if hasattr(p, "__dict__") else {}
        if "exploration_rate" in own and "alpha" in own:   # not hasattr: wrappers forward reads
            p.exploration_rate = 0.0
            p.alpha = 0.0
            return
        p = getattr(p, "base", None)
        if p is None:
            return


def wrap(fresh: Any, previous: Any = None, *, learning: LearningSettings | None = None,
         explore_factor: float = 4.0, weights: Any = None, restore: Any = None) -> Any:
    """The allocator's predictor: ``fresh`` under run memory (kept from ``previous``), and under
    the bandit when the policy says so (its state kept from ``previous``, else ``restore()``'d)."""
    from ray_qalloc import overruns
    from ray_qalloc.costmodel.bandit import BanditPredictor, ResidualBandit

    learning = learning or LearningSettings()
    inner_prev = previous.base if isinstance(previous, BanditPredictor) else previous
    if isinstance(fresh, BanditPredictor):
        return fresh
    stack = overruns.wrap_predictor(fresh, inner_prev)
    if learning.policy != "bandit":
        return stack
    switch_off_correction(stack)
    if isinstance(previous, BanditPredictor):
        bandit = previous.bandit
        bandit.on_model_swap()
    else:
        bandit = ResidualBandit(bandit_config(learning, explore_factor))
        snap = restore() if restore is not None else None
        if snap:
            bandit.restore(snap)
    return BanditPredictor(stack, bandit, weights)


def bandit_of(predictor: Any) -> Any:
    """The ResidualBandit inside a predictor stack, or None (policy 'correction')."""
    from ray_qalloc.costmodel.bandit import BanditPredictor

    return predictor.bandit if isinstance(predictor, BanditPredictor) else None


__all__ = ["LearningSettings", "RetrainSettings", "bandit_config", "bandit_of", "switch_off_correction", "wrap"]
