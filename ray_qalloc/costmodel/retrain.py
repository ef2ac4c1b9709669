"""Retraining without a person: trigger, train (Ray Tune), validate, shadow, promote.

The loop (``RetrainLoop.tick``, called by the allocator every ``retrain.check_s``) is a small
state machine, so every step is visible (``status``) and each can be tested on its own:

1. **trigger** — the mean |log(actual / predicted)| of the last ``drift_window`` completed runs
   passed ``drift_threshold``, or ``min_new_rows`` history rows arrived since the model in
   service was trained; never within ``cooldown_s`` of the last attempt, and only while no
   emergency or high-priority job waits (``busy``).
2. **train** — a Ray task (``num_cpus=0``: it only drives Tune) reads the live run history,
   holds out a share of the circuit families and the newest rows, and runs
   ``tuning.train`` with at most ``max_concurrent_trials`` one-CPU trials, so it takes at most
   that many cores from the jobs (batch priority). The candidate is written under
   ``models/.candidates/``, where the registry does not look.
3. **validate** — in the same task: candidate and model in service are scored (RMSE of log
   runtime, uncensored rows) on the held-out families and on the recent rows; the candidate
   goes on only if it is no worse on either and better by ``min_improvement`` on one.
4. **shadow** — the candidate predicts every completed simulator run beside the model in
   service (neither the online correction nor memory: the two models as trained) until
   ``shadow_runs`` have been seen; it must have the lower mean |log error| by
   ``min_improvement``.
5. **promote** — ``versions.promote``: one rename into the registry (the allocator's watcher
   swaps the model within seconds), audited in the admin state, announced as an informational
   alert. A rejected candidate stays under ``.candidates/`` with its evidence.

Rollback is ``qalloc model rollback`` (``versions.rollback``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

log = logging.getLogger(__name__)

IDLE, TRAINING, SHADOW = "idle", "training", "shadow"


class DriftMonitor:
    """Rolling mean |log residual| of what placement was told versus what ran."""

    def __init__(self, window: int, threshold: float) -> None:
        self.window = deque(maxlen=int(window))
        self.threshold = float(threshold)

    def observe(self, predicted_s: float, actual_s: float) -> None:
        if predicted_s > 0 and actual_s > 0 and math.isfinite(predicted_s) and math.isfinite(actual_s):
            self.window.append(abs(math.log(actual_s / predicted_s)))

    @property
    def level(self) -> float | None:
        return statistics.fmean(self.window) if self.window else None

    def drifted(self) -> bool:
        return len(self.window) == self.window.maxlen and (self.level or 0.0) > self.threshold

    def reset(self) -> None:
        self.window.clear()


# ---------------------------------------------------------------------------------------------
# Training and validation (run inside a Ray task)
# ---------------------------------------------------------------------------------------------

def split(table: Any, holdout_share: float, recent_rows: int) -> tuple[Any, Any, Any, list[str]]:
    """(train, held-out families, recent rows, the held-out families). Recent = the newest
    ``recent_rows`` rows in append order; families are held out by a stable hash (the same
    families every time for the same set), at least one when there are two or more."""
    import numpy as np
    import pyarrow as pa

    n = table.num_rows
    recent_mask = np.zeros(n, dtype=bool)
    recent_mask[max(n - int(recent_rows), 0):] = True
    fams = table.column("family").to_pylist() if "family" in table.column_names else [None] * n
    names = sorted({f for f in fams if f})
    ranked = sorted(names, key=lambda f: hashlib.sha256(f.encode()).hexdigest())
    k = max(1, round(holdout_share * len(ranked))) if len(ranked) >= 2 else 0
    held = set(ranked[:k])
    hold_mask = np.array([f in held for f in fams], dtype=bool) & ~recent_mask
    train_mask = ~recent_mask & ~hold_mask
    take = lambda m: table.filter(pa.array(m))  # noqa: E731
    return take(train_mask), take(hold_mask), take(recent_mask), sorted(held)


def score(model: Any, table: Any) -> float | None:
    """RMSE of log runtime on ``table``'s uncensored simulator rows: the artifact's model, or
    the analytic anchor (the prior) when ``model`` is None. None: no row to score."""
    from ray_qalloc.costmodel.model import anchor_log_runtime, runtime_data, runtime_metrics

    if table is None or table.num_rows == 0:
        return None
    try:
        data = runtime_data(table)
    except Exception:  # noqa: BLE001 - no simulator rows
        return None
    if data.n_rows == 0 or int((~data.censored).sum()) == 0:
        return None
    pred = model.predict_log_runtime(data.X) if model is not None else anchor_log_runtime(data.X)
    value = runtime_metrics(pred, data).get("rmse_log")
    return None if value is None or not math.isfinite(value) else float(value)


def better(candidate: float | None, current: float | None, min_improvement: float) -> bool | None:
    """True: clearly better; False: worse; None: no evidence either way (or as good)."""
    if candidate is None or current is None:
        return None
    if candidate <= current * (1.0 - min_improvement):
        return True
    if candidate > current * (1.0 + min_improvement):
        return False
    return None


def train_and_validate(history_dir: str, candidates_dir: str, current: str | None,
                       options: Mapping[str, Any]) -> dict[str, Any]:
    """Split, tune on the training part, score candidate and current on the held-out parts."""
    from ray_qalloc.costmodel.history import RunHistory
    from ray_qalloc.costmodel.model import CostModel
    from ray_qalloc.costmodel.tuning import train

    table = RunHistory(history_dir).read()
    tr, hold, recent, families = split(table, options["holdout_share"], options["recent_rows"])
    t0 = time.time()
    path = train(tr, candidates_dir, num_samples=options["num_samples"], max_rounds=options["max_rounds"],
                 folds=options.get("folds", 3), seed=options.get("seed", 0),
                 max_concurrent_trials=options["max_concurrent_trials"])
    cand = CostModel.load(path)
    cur = CostModel.load(current) if current else None
    v = {"rows": table.num_rows, "train_rows": tr.num_rows, "holdout_rows": hold.num_rows,
         "recent_rows": recent.num_rows, "holdout_families": families, "train_s": round(time.time() - t0, 2),
         "holdout": {"candidate": score(cand, hold), "current": score(cur, hold)},
         "recent": {"candidate": score(cand, recent), "current": score(cur, recent)},
         "current": Path(current).name if current else "prior"}
    verdicts = [better(v[p]["candidate"], v[p]["current"], options["min_improvement"]) for p in ("holdout", "recent")]
    v["passed"] = False not in verdicts and True in verdicts
    meta_path = Path(path) / "validation.json"
    meta_path.write_text(json.dumps(v, indent=2, sort_keys=True))
    return {"candidate": str(path), "validation": v}


# ---------------------------------------------------------------------------------------------
# Shadow
# ---------------------------------------------------------------------------------------------

@dataclass
class Shadow:
    """The candidate beside the model in service, on every completed simulator run."""

    candidate: Any             # LearnedPredictor (no correction, no exploration)
    current: Any               # the same for the model in service (or the prior)
    errors: dict[str, list[float]] = field(default_factory=lambda: {"candidate": [], "current": []})

    def observe(self, view: Any, backend_view: Any, actual_s: float) -> None:
        if not actual_s > 0:
            return
        for name, p in (("candidate", self.candidate), ("current", self.current)):
            est = p.predict(view, [backend_view])[0]
            self.errors[name].append(abs(math.log(actual_s / max(est.runtime_s, 1e-9))))

    @property
    def runs(self) -> int:
        return len(self.errors["candidate"])

    def summary(self) -> dict[str, Any]:
        return {k: (round(statistics.fmean(v), 4) if v else None) for k, v in self.errors.items()} | {"runs": self.runs}


def _quiet_predictor(path: str | None) -> Any:
    from ray_qalloc.costmodel.model import CostModel, LearnedPredictor
    from ray_qalloc.costmodel.prior import HeuristicPrior

    if path is None:
        return HeuristicPrior()
    return LearnedPredictor(CostModel.load(path), exploration_rate=0.0, ewma_alpha=0.0)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

class RetrainLoop:
    """See the module doc. ``tick`` never blocks: training runs as a Ray task it polls."""

    def __init__(self, settings: Any, history_dir: Path, models_dir: Path, *, admin: Any = None,
                 outbox: Any = None, busy: Callable[[], bool] = lambda: False,
                 clock: Callable[[], float] = time.time) -> None:
        self.s = settings                      # RetrainSettings
        self.history_dir = Path(history_dir)
        self.models_dir = Path(models_dir)
        self.admin, self.outbox, self.busy, self.clock = admin, outbox, busy, clock
        self.state = IDLE
        self.drift = DriftMonitor(settings.drift_window, settings.drift_threshold)
        self.ref: Any = None
        self.candidate: Path | None = None
        self.validation: dict[str, Any] | None = None
        self.shadow: Shadow | None = None
        self.last_attempt = -math.inf
        self.last: dict[str, Any] = {}          # the last attempt's outcome (status, explain)
        self.promotions = 0
        self._served: tuple[Path | None, Any] | None = None
        self._served_at = -math.inf
        self.rows_at_last_attempt = 0

    # -- inputs ---------------------------------------------------------------------------------
    def observe(self, view: Any, spec: Any, predicted_s: float, actual_s: float) -> None:
        """A completed run (``RunLife.learn``): drift of the *model in service* (its own
        prediction, not what the online layers made of it: those hide a model gone stale), and
        the shadow comparison."""
        if spec.kind != "simulator":
            self.drift.observe(predicted_s, actual_s)
            return
        from ray_qalloc.placement.model import BackendView

        try:
            bv = BackendView(spec)
            self.drift.observe(self._model().predict(view, [bv])[0].runtime_s, actual_s)
            if self.shadow is not None:
                self.shadow.observe(view, bv, actual_s)
        except Exception:  # noqa: BLE001 - learning must never disturb the allocator
            log.exception("drift/shadow prediction failed")

    def _model(self) -> Any:
        """The model in service without online layers (reloaded when the registry changed)."""
        now = time.monotonic()
        if self._served is not None and now - self._served_at < 5.0:   # a registry listing costs ms
            return self._served[1]
        self._served_at = now
        current = self.current_artifact()
        if self._served is None or self._served[0] != current:
            self._served = (current, _quiet_predictor(str(current) if current else None))
        return self._served[1]

    # -- the state machine ---------------------------------------------------------------------
    def current_artifact(self) -> Path | None:
        from ray_qalloc.costmodel.registry import PACKAGED_DIR, latest_artifact

        return latest_artifact(self.models_dir) or latest_artifact(PACKAGED_DIR)

    def new_rows(self) -> int:
        from ray_qalloc.costmodel.history import RunHistory
        from ray_qalloc.costmodel.model import read_meta

        rows = RunHistory(self.history_dir).read().num_rows
        cur = latest_artifact_in(self.models_dir)
        trained = int(read_meta(cur).get("n_rows") or 0) if cur is not None else 0
        # a model trained here saw the history up to its start (less what validation held out)
        return max(rows - max(trained, self.rows_at_last_attempt), 0)

    def why_train(self) -> str | None:
        if self.drift.drifted():
            return f"drift: mean |log residual| {self.drift.level:.2f} > {self.s.drift_threshold}"
        fresh = self.new_rows()
        if fresh >= self.s.min_new_rows:
            return f"{fresh} new history rows (>= {self.s.min_new_rows})"
        return None

    def tick(self, force: bool = False) -> str:
        """One step; returns the state after it."""
        now = self.clock()
        if self.state == IDLE:
            if self.busy() or (not force and now - self.last_attempt < self.s.cooldown_s):
                return self.state
            why = "forced" if force else self.why_train()
            if why is not None:
                self._start(why, now)
        elif self.state == TRAINING:
            self._poll_training()
        elif self.state == SHADOW:
            self._judge_shadow()
        return self.state

    def _start(self, why: str, now: float) -> None:
        import ray

        from ray_qalloc.costmodel.versions import CANDIDATES

        from ray_qalloc.costmodel.history import RunHistory

        self.rows_at_last_attempt = RunHistory(self.history_dir).read().num_rows
        current = self.current_artifact()
        opts = {k: getattr(self.s, k) for k in ("num_samples", "max_rounds", "max_concurrent_trials",
                                                 "holdout_share", "recent_rows", "min_improvement")}
        task = ray.remote(num_cpus=0, max_retries=0)(train_and_validate)
        self.ref = task.remote(str(self.history_dir), str(self.models_dir / CANDIDATES),
                               str(current) if current else None, opts)
        self.state, self.last_attempt = TRAINING, now
        self.last = {"started_at": now, "why": why, "current": current.name if current else "prior"}
        log.warning("cost model retraining started (%s)", why)

    def _poll_training(self) -> None:
        import ray

        ready, _ = ray.wait([self.ref], timeout=0)
        if not ready:
            return
        ref, self.ref = self.ref, None
        try:
            out = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - a failed training leaves the model in service
            self._end("failed", f"{type(exc).__name__}: {str(exc)[:500]}")
            return
        self.candidate, self.validation = Path(out["candidate"]), out["validation"]
        if not self.validation.get("passed"):
            self._end("rejected", "validation: not better on held-out families / recent history")
            return
        current = self.current_artifact()
        self.shadow = Shadow(_quiet_predictor(str(self.candidate)), _quiet_predictor(str(current) if current else None))
        self.state = SHADOW

    def _judge_shadow(self) -> None:
        assert self.shadow is not None
        if self.shadow.runs < self.s.shadow_runs:
            return
        sh = self.shadow.summary()
        verdict = better(sh["candidate"], sh["current"], self.s.min_improvement)
        if verdict is not True:
            self._end("rejected", f"shadow: mean |log error| {sh['candidate']} vs {sh['current']} in service")
            return
        from ray_qalloc.costmodel.versions import promote

        evidence = {"validation": self.validation, "shadow": sh, "why": self.last.get("why")}
        assert self.candidate is not None
        final = promote(self.models_dir, self.candidate, actor="retrain-loop", admin=self.admin, outbox=self.outbox,
                        detail=f"{self.last.get('why')}; shadow {sh}", evidence=evidence)
        _annotate(final, evidence)
        self.promotions += 1
        self.drift.reset()
        self._end("promoted", final.name)

    def _end(self, outcome: str, detail: str) -> None:
        self.last.update({"outcome": outcome, "detail": detail, "ended_at": self.clock(),
                          "candidate": self.candidate.name if self.candidate else None,
                          "validation": self.validation,
                          "shadow": self.shadow.summary() if self.shadow is not None else None})
        if self.candidate is not None and outcome == "rejected" and self.candidate.exists():
            _annotate(self.candidate, {"rejected": detail, "validation": self.validation,
                                       "shadow": self.last["shadow"]})
        log.warning("cost model retraining %s: %s", outcome, detail)
        self.state, self.shadow, self.candidate, self.validation = IDLE, None, None, None

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "drift_level": self.drift.level, "drift_runs": len(self.drift.window),
                "shadow": self.shadow.summary() if self.shadow is not None else None,
                "promotions": self.promotions, "last": self.last}


def latest_artifact_in(models_dir: Path) -> Path | None:
    from ray_qalloc.costmodel.registry import PACKAGED_DIR, latest_artifact

    return latest_artifact(models_dir) or latest_artifact(PACKAGED_DIR)


def _annotate(path: Path, what: Mapping[str, Any]) -> None:
    """Evidence beside an artifact (``promotion.json``; meta.json stays as training wrote it)."""
    try:
        (Path(path) / "promotion.json").write_text(json.dumps(dict(what), indent=2, sort_keys=True, default=str))
    except OSError:
        log.exception("could not write %s/promotion.json", path)


__all__ = ["DriftMonitor", "RetrainLoop", "Shadow", "better", "score", "split", "train_and_validate"]
