"""The demand forecaster (ray_qalloc.forecast): a known lagged relation is recovered, events are
dropped where they do not lead jobs, forecasts are never negative, seasonality is kept when real."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ray_qalloc.forecast import DAY_S, Forecaster, wape


def _history(rng: np.random.Generator, n: int, *, leading: bool, lag: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Background jobs; bursts of high-severity events; job bursts ``lag`` bins after them, or at
    independent times (``leading=False``)."""
    jobs = rng.poisson(0.5, n).astype(float)
    events = np.column_stack([rng.poisson(8, n), rng.poisson(1, n), rng.poisson(0.2, n)]).astype(float)
    starts = rng.choice(np.arange(lag, n - 30), size=n // 400, replace=False)
    ev_starts = starts - lag if leading else rng.choice(np.arange(0, n - 30), size=len(starts), replace=False)
    for s, e in zip(starts, ev_starts):
        size = rng.uniform(5, 25)
        events[e:e + 6, 2] += rng.poisson(size / 3, 6)
        jobs[s:s + 12] += rng.poisson(size, 12)
    return jobs, events


def test_recovers_a_lagged_relation_against_a_reference():
    rng = np.random.default_rng(3)
    jobs, events = _history(rng, 12_000, leading=True)
    f = Forecaster(bin_s=10, horizon_s=90, lookback_s=360, lags=12)
    report = f.fit(jobs[:9000], events[:9000])
    assert report.groups == ("jobs", "events")
    pred, actual = f.predict_series(jobs, events), f.actual_series(jobs)
    # reference: the same model without events (what a jobs-only forecaster can do) on the unseen tail
    ref = Forecaster(bin_s=10, horizon_s=90, lookback_s=360, lags=12)
    ref.fit(jobs[:9000], None)
    ref_pred = ref.predict_series(jobs)
    err, err_ref = wape(pred[9000:], actual[9000:]), wape(ref_pred[9000:], actual[9000:])
    assert err < 0.8 * err_ref, (err, err_ref)
    # and it follows the bursts, not just the level
    ok = ~np.isnan(actual[9000:])
    assert np.corrcoef(pred[9000:][ok], actual[9000:][ok])[0, 1] > 0.7


def test_drops_events_on_a_control_history():
    rng = np.random.default_rng(4)
    jobs, events = _history(rng, 12_000, leading=False)
    report = Forecaster(bin_s=10, horizon_s=90).fit(jobs, events)
    assert report.groups == ("jobs",)
    assert "jobs+events" in report.cv_wape_by_set          # offered, and refused on held-out error


def test_forecasts_are_never_negative():
    rng = np.random.default_rng(5)
    jobs = np.zeros(3000)
    jobs[rng.choice(3000, 40, replace=False)] = 30.0        # rare spikes: a linear fit dips below zero after them
    events = rng.poisson(1.0, (3000, 3)).astype(float)
    f = Forecaster(bin_s=10, horizon_s=60, lookback_s=120, lags=4)
    f.fit(jobs, events)
    assert np.nanmin(f.predict_series(jobs, events)) >= 0.0
    assert np.nanmin(f.predict_series(jobs, events * 50)) >= 0.0     # far outside the history, still not < 0
    assert f.predict(jobs, events) >= 0.0


def test_seasonality_is_kept_on_a_periodic_history():
    rng = np.random.default_rng(6)
    bin_s = 300.0
    n = int(4 * DAY_S / bin_s)
    t = np.arange(n) * bin_s
    rate = 2.0 * (1 + 0.9 * np.sin(2 * math.pi * t / DAY_S))
    jobs = rng.poisson(rate).astype(float)
    f = Forecaster(bin_s=bin_s, horizon_s=1800, lookback_s=1800, lags=3)
    report = f.fit(jobs, None, t0=0.0)
    assert "daily" in report.groups
    assert "weekly" not in report.offered                   # 4 days cannot show a week twice


def test_no_seasonality_offered_on_a_short_history():
    rng = np.random.default_rng(7)
    report = Forecaster().fit(rng.poisson(1.0, 4000).astype(float))
    assert report.offered == ("jobs",) and report.groups == ("jobs",)


def test_wape_is_defined_with_zero_actuals_and_nan_without_jobs():
    assert wape(np.array([1.0, 0.0, 2.0]), np.array([0.0, 0.0, 2.0])) == pytest.approx(0.5)
    assert math.isnan(wape(np.array([1.0]), np.array([0.0])))


def test_too_short_a_history_is_refused():
    with pytest.raises(ValueError):
        Forecaster().fit(np.ones(20))
