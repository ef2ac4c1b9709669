"""Demand forecasting for predictive scaling: how many jobs arrive while a node asked for now serves.

Why it exists: an elastic node takes a boot time to come up, so a pool that scales on its
queue is always one boot late for a burst. If something observable leads the burst — a surge
of security events that analysts answer with jobs, or the hour of the day — the allocator can
ask for nodes a boot time ahead. Whether something leads is a property of each deployment's
history, not of this code, so the forecaster *learns* it and, just as important, refuses to
use a signal that does not help: on a history where events do not lead jobs it must forecast
as if there were no events, or the pool pays for nodes nobody uses.

Pure numpy, no Ray, no database (``predictive.history_from_store`` reads the tables).

The model, over time bins of ``bin_s`` seconds:

* **target** at bin *t*: the jobs arriving in bins *t+L+1 … t+L+h*, ``L = round(lead_s / bin_s)``,
  ``h = ceil(horizon_s / bin_s)`` — the window a node requested at the end of bin *t* serves:
  it is up ``lead_s`` (its boot time) later and is sized for the ``horizon_s`` after that.
  Why offset, not (t, t+h]: a request made at *t* changes nothing before *t+boot*; jobs arriving
  before then are served by the nodes that are up or already booting (and by the queue's own,
  reactive request), so a target that includes them sizes the node for demand it cannot serve,
  and — the measured failure of the unshifted window — grows only as a burst enters (t, t+boot],
  i.e. a boot too late for the burst's first part. By Little's law the cores busy over the
  serving window are its arrivals × the mean job's core-seconds / the window: that is what
  ``predictive.nodes_wanted`` turns the forecast into. ``lead_s = 0`` is the old target.
* **features** known at the end of bin *t* (groups, kept or dropped as a whole):
  ``jobs`` — arrivals in ``lags`` consecutive blocks covering the last ``lookback_s`` (always in);
  ``events`` — the same blocks of event counts, one set per severity band;
  ``daily`` / ``weekly`` — sin/cos of the phase of the target window in the day / week, offered
  only when the history spans at least two periods (one period cannot tell a season from a trend).
* **fit**: ridge regression (intercept unpenalised, columns scaled to unit variance), the
  penalty chosen from a small grid by the same cross-validation.
* **time-ordered cross-validation**: rolling origin. The valid rows are cut into ``folds + 1``
  contiguous chunks; fold *k* trains on chunks *0 … k-1* and is scored on chunk *k*, with the
  last *L + h* training rows dropped so that no training target overlaps a scored window. Nothing
  is ever scored on data that came before its own training data.
* **the selection rule** (what keeps a control history honest): start from ``jobs`` alone; a
  group is added only if the held-out error falls by at least ``margin`` (relative) *and* the
  error is lower in more than half of the folds; repeat greedily with the groups left. A signal
  that only fits noise in-sample loses out of sample and is dropped.
* **error**: WAPE, Σ|forecast − actual| / Σ actual over the held-out windows — MAPE weighted by
  volume. Unlike per-row MAPE it is defined when some windows see no job (it is undefined only
  if none of the held-out windows sees one; ``nan`` then). ``forecast_mape`` in the benchmark is
  this WAPE.
* forecasts are clipped at 0: fewer than no jobs never arrive.

Refitting is cheap (the cross-validation works on per-fold Gram matrices: one pass over the
rows per fold, then small solves per feature set and penalty), so callers refit every few minutes.
One ``Forecaster`` forecasts one series; ``forecast_classes.ClassForecaster`` keeps one per pool
and QPU class, each with its own selection (events may lead one class and not another).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

DAY_S = 86_400.0
WEEK_S = 7 * DAY_S
SEASONS: dict[str, float] = {"daily": DAY_S, "weekly": WEEK_S}
DEFAULT_ALPHAS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)


@dataclass(frozen=True)
class FitReport:
    """What a fit chose and how well it did on held-out windows."""

    groups: tuple[str, ...]                 # feature groups kept, "jobs" first
    alpha: float                            # ridge penalty (relative to the number of rows)
    cv_wape: float                          # held-out WAPE of the chosen model
    cv_wape_by_set: dict[str, float]        # every set tried: "jobs", "jobs+events", ...
    offered: tuple[str, ...]                # groups that were candidates
    rows: int                               # valid rows (bins with a full lookback and horizon)

    def as_dict(self) -> dict[str, object]:
        return {"groups": list(self.groups), "alpha": self.alpha, "cv_wape": self.cv_wape,
                "cv_wape_by_set": dict(self.cv_wape_by_set), "offered": list(self.offered), "rows": self.rows}


def _block_sums(x: np.ndarray, width: int, blocks: int) -> np.ndarray:
    """``out[t, j]`` = sum of ``x`` over bins ``t-(j+1)·width+1 … t-j·width`` (0 before the start)."""
    n = x.shape[0]
    cs = np.concatenate([[0.0], np.cumsum(x, dtype=float)])
    t = np.arange(n)[:, None]
    j = np.arange(blocks)[None, :]
    return cs[np.clip(t - j * width + 1, 0, n)] - cs[np.clip(t - (j + 1) * width + 1, 0, n)]


def _window_ahead(x: np.ndarray, h: int, lead: int = 0) -> np.ndarray:
    """``y[t]`` = sum of ``x`` over bins ``t+lead+1 … t+lead+h`` (incomplete windows are counted as far as they go)."""
    n = x.shape[0]
    cs = np.concatenate([[0.0], np.cumsum(x, dtype=float)])
    t = np.arange(n)
    return cs[np.clip(t + lead + h + 1, 0, n)] - cs[np.clip(t + lead + 1, 0, n)]


@dataclass
class Forecaster:
    """Ridge forecaster of the jobs arriving in ``(t + lead_s, t + lead_s + horizon_s]`` (see the module docstring).

    ``jobs``: arrivals per bin (a count, or any additive measure of work). ``events``: event counts
    per bin, one column per severity band (or ``None``). ``t0``: Unix time of the start of bin 0
    (the seasonal phases are taken from it)."""

    bin_s: float = 10.0
    horizon_s: float = 90.0
    lead_s: float = 0.0
    lookback_s: float = 360.0
    lags: int = 12
    margin: float = 0.05
    folds: int = 4
    alphas: Sequence[float] = DEFAULT_ALPHAS
    report: FitReport | None = field(default=None, init=False)
    _coef: np.ndarray | None = field(default=None, init=False, repr=False)
    _mean: np.ndarray | None = field(default=None, init=False, repr=False)
    _scale: np.ndarray | None = field(default=None, init=False, repr=False)
    _cols: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if (self.bin_s <= 0 or self.horizon_s <= 0 or self.lookback_s <= 0 or self.lead_s < 0 or self.lags < 1
                or self.folds < 2):
            raise ValueError("bin_s, horizon_s, lookback_s must be > 0, lead_s ≥ 0, lags ≥ 1, folds ≥ 2")

    # ---- shapes ---------------------------------------------------------------------------------
    @property
    def h(self) -> int:
        """Bins in the horizon."""
        return max(1, math.ceil(self.horizon_s / self.bin_s - 1e-9))

    @property
    def lead(self) -> int:
        """Bins between the forecast's origin and its target window (a node's boot)."""
        return max(0, int(round(self.lead_s / self.bin_s)))

    @property
    def ahead(self) -> int:
        """Bins from the origin to the end of the target window."""
        return self.lead + self.h

    @property
    def width(self) -> int:
        """Bins per lag block."""
        return max(1, math.ceil(self.lookback_s / self.bin_s / self.lags - 1e-9))

    @property
    def lookback_bins(self) -> int:
        return self.width * self.lags

    def min_bins(self) -> int:
        """The shortest history ``fit`` accepts: a lookback, a horizon and a few rows per fold."""
        return self.lookback_bins + self.ahead + (self.folds + 1) * max(self.ahead, 8)

    # ---- features -------------------------------------------------------------------------------
    def _features(self, jobs: np.ndarray, events: np.ndarray | None, t0: float,
                  seasons: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """All candidate columns (one matrix) and, per group, the indices of its columns."""
        cols = [_block_sums(jobs, self.width, self.lags)]
        groups: dict[str, list[int]] = {"jobs": list(range(self.lags))}
        k = self.lags
        if events is not None and events.shape[1] > 0:
            for b in range(events.shape[1]):
                cols.append(_block_sums(events[:, b], self.width, self.lags))
            groups["events"] = list(range(k, k + self.lags * events.shape[1]))
            k += self.lags * events.shape[1]
        n = jobs.shape[0]
        # the phase of the middle of the target window: bins t+L+1 … t+L+h
        mid = t0 + (np.arange(n) + 1 + self.lead + self.h / 2.0) * self.bin_s
        for name in seasons:
            ang = 2 * math.pi * (mid % SEASONS[name]) / SEASONS[name]
            cols.append(np.column_stack([np.sin(ang), np.cos(ang), np.sin(2 * ang), np.cos(2 * ang)]))
            groups[name] = list(range(k, k + 4))
            k += 4
        return np.hstack(cols), {g: np.asarray(ix) for g, ix in groups.items()}

    def offered_seasons(self, n_bins: int) -> tuple[str, ...]:
        span = n_bins * self.bin_s
        return tuple(name for name, period in SEASONS.items() if span >= 2 * period)

    @staticmethod
    def _check(jobs: Sequence[float] | np.ndarray, events: np.ndarray | Sequence[Sequence[float]] | None
               ) -> tuple[np.ndarray, np.ndarray | None]:
        j = np.asarray(jobs, dtype=float).reshape(-1)
        if events is None:
            return j, None
        e = np.asarray(events, dtype=float)
        if e.ndim == 1:
            e = e.reshape(-1, 1)
        if e.shape[0] != j.shape[0]:
            raise ValueError(f"jobs has {j.shape[0]} bins, events {e.shape[0]}")
        return j, e

    # ---- fitting --------------------------------------------------------------------------------
    def fit(self, jobs: Sequence[float] | np.ndarray, events: np.ndarray | None = None, t0: float = 0.0) -> FitReport:
        """Choose the feature groups and the penalty by time-ordered CV, then fit on all rows."""
        j, e = self._check(jobs, events)
        if j.shape[0] < self.min_bins():
            raise ValueError(f"history too short: {j.shape[0]} bins, need {self.min_bins()}")
        seasons = self.offered_seasons(j.shape[0])
        X, groups = self._features(j, e, t0, seasons)
        y = _window_ahead(j, self.h, self.lead)
        rows = np.arange(self.lookback_bins - 1, j.shape[0] - self.ahead)   # full lookback and full horizon
        X, y = X[rows], y[rows]
        mean = X.mean(axis=0)
        scale = X.std(axis=0)
        scale[scale <= 1e-12] = 1.0
        Z = np.column_stack([np.ones(len(y)), (X - mean) / scale])      # column 0: the intercept
        folds = self._fold_stats(Z, y)

        def cols(gs: Sequence[str]) -> np.ndarray:
            return np.concatenate([[0]] + [groups[g] + 1 for g in gs])

        def score(gs: Sequence[str]) -> tuple[float, float, np.ndarray]:
            best: tuple[float, float, np.ndarray] | None = None
            for a in self.alphas:
                err = self._cv_errors(folds, cols(gs), a)
                w = float(err[:, 0].sum() / err[:, 1].sum()) if err[:, 1].sum() > 0 else math.nan
                if best is None or (w < best[0]) or (math.isnan(best[0]) and not math.isnan(w)):
                    best = (w, a, err[:, 0])
            assert best is not None
            return best

        chosen = ["jobs"]
        cur_w, cur_a, cur_f = score(chosen)
        by_set = {"jobs": cur_w}
        left = [g for g in groups if g != "jobs"]
        while left:
            trials = []
            for g in left:
                w, a, f = score(chosen + [g])
                by_set["+".join(chosen + [g])] = w
                wins = int((f < cur_f).sum())
                if w <= (1.0 - self.margin) * cur_w and wins * 2 > len(f):
                    trials.append((w, g, a, f))
            if not trials:
                break
            w, g, a, f = min(trials, key=lambda x: x[0])
            chosen.append(g)
            left.remove(g)
            cur_w, cur_a, cur_f = w, a, f
        c = cols(chosen)
        self._coef = self._solve(Z[:, c].T @ Z[:, c], Z[:, c].T @ y, cur_a, len(y))
        self._cols, self._mean, self._scale = c, mean, scale
        self._groups_all = groups
        self._seasons = seasons
        self._has_events = e is not None
        self.report = FitReport(groups=tuple(chosen), alpha=cur_a, cv_wape=cur_w, cv_wape_by_set=by_set,
                                offered=tuple(groups), rows=int(len(y)))
        return self.report

    def _fold_stats(self, Z: np.ndarray, y: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray]]:
        """Per fold: training Gram matrix, Zᵀy, row count, and the held-out rows."""
        n = len(y)
        edges = np.linspace(0, n, self.folds + 2).astype(int)
        out = []
        for k in range(1, self.folds + 1):
            train_end = edges[k] - self.ahead               # no training target overlaps the test rows
            if train_end < 2 or edges[k + 1] <= edges[k]:
                continue
            Zt, yt = Z[:train_end], y[:train_end]
            out.append((Zt.T @ Zt, Zt.T @ yt, train_end, Z[edges[k]:edges[k + 1]], y[edges[k]:edges[k + 1]]))
        if not out:
            raise ValueError("history too short for time-ordered cross-validation")
        return out

    @staticmethod
    def _solve(G: np.ndarray, b: np.ndarray, alpha: float, n: int) -> np.ndarray:
        pen = np.full(G.shape[0], alpha * n)
        pen[0] = 0.0                                        # the intercept is not shrunk
        return np.linalg.solve(G + np.diag(pen) + 1e-9 * np.eye(G.shape[0]), b)

    def _cv_errors(self, folds: list, c: np.ndarray, alpha: float) -> np.ndarray:
        """Per fold: (Σ|error|, Σ actual) on its held-out rows."""
        out = np.empty((len(folds), 2))
        for i, (G, b, n, Zs, ys) in enumerate(folds):
            beta = self._solve(G[np.ix_(c, c)], b[c], alpha, n)
            pred = np.maximum(Zs[:, c] @ beta, 0.0)
            out[i] = (np.abs(pred - ys).sum(), ys.sum())
        return out

    # ---- forecasting ----------------------------------------------------------------------------
    @property
    def fitted(self) -> bool:
        return self._coef is not None

    def predict_series(self, jobs: Sequence[float] | np.ndarray, events: np.ndarray | None = None,
                       t0: float = 0.0) -> np.ndarray:
        """The forecast made at the end of every bin (``nan`` where the lookback is not full)."""
        if self._coef is None or self._cols is None or self._mean is None or self._scale is None:
            raise RuntimeError("fit first")
        j, e = self._check(jobs, events)
        if self._has_events and e is None:
            raise ValueError("the model was fitted with events: pass them")
        X, _ = self._features(j, e if self._has_events else None, t0, self._seasons)
        Z = np.column_stack([np.ones(len(j)), (X - self._mean) / self._scale])
        out = np.maximum(Z[:, self._cols] @ self._coef, 0.0)
        out[: self.lookback_bins - 1] = np.nan
        return out

    def predict(self, jobs: Sequence[float] | np.ndarray, events: np.ndarray | None = None, t0: float = 0.0) -> float:
        """The forecast at the end of the last bin of ``jobs`` (it needs ``lookback_s`` of it)."""
        j, e = self._check(jobs, events)
        k = self.lookback_bins
        if j.shape[0] < k:
            raise ValueError(f"need the last {k} bins")
        start = j.shape[0] - k
        tail_e = None if e is None else e[start:]
        return float(self.predict_series(j[start:], tail_e, t0 + start * self.bin_s)[-1])

    def actual_series(self, jobs: Sequence[float] | np.ndarray) -> np.ndarray:
        """What each forecast of ``predict_series`` is scored against (``nan`` where the horizon runs past the end)."""
        j = np.asarray(jobs, dtype=float).reshape(-1)
        y = _window_ahead(j, self.h, self.lead)
        y[max(0, len(j) - self.ahead):] = np.nan
        return y


def wape(forecast: np.ndarray, actual: np.ndarray) -> float:
    """Σ|forecast − actual| / Σ actual over the rows where both exist; ``nan`` if no job arrived."""
    f, a = np.asarray(forecast, dtype=float), np.asarray(actual, dtype=float)
    ok = ~(np.isnan(f) | np.isnan(a))
    total = float(a[ok].sum())
    return float(np.abs(f[ok] - a[ok]).sum() / total) if total > 0 else math.nan
