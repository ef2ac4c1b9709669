"""The demand forecaster (ray_qalloc.forecast): a known lagged relation is recovered, events are
dropped where they do not lead jobs, forecasts are never negative, seasonality is kept when real,
and the target window offset by a boot is what the forecast aims at."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_qalloc.forecast import DAY_S, Forecaster, _block_sums, _window_ahead, wape


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


# ---- the target window and the lag blocks against plain loops ----------------------------------------
@settings(max_examples=60, deadline=None)
@given(x=st.lists(st.integers(0, 20), min_size=1, max_size=40), h=st.integers(1, 6), lead=st.integers(0, 6))
def test_window_ahead_is_the_sum_of_the_bins_after_the_lead(x, h, lead):
    arr = np.asarray(x, dtype=float)
    ref = [sum(x[t + lead + 1: t + lead + h + 1]) for t in range(len(x))]
    assert _window_ahead(arr, h, lead).tolist() == ref


@settings(max_examples=60, deadline=None)
@given(x=st.lists(st.integers(0, 20), min_size=1, max_size=40), width=st.integers(1, 5), blocks=st.integers(1, 5))
def test_block_sums_are_the_sums_of_the_blocks_before(x, width, blocks):
    out = _block_sums(np.asarray(x, dtype=float), width, blocks)
    for t in range(len(x)):
        for j in range(blocks):
            lo, hi = max(t - (j + 1) * width + 1, 0), max(t - j * width + 1, 0)
            assert out[t, j] == sum(x[lo:hi])


def test_actual_series_with_a_lead_is_the_window_a_node_serves():
    f = Forecaster(bin_s=10, horizon_s=30, lead_s=50)      # L = 5 bins, h = 3 bins
    jobs = np.arange(20, dtype=float)
    actual = f.actual_series(jobs)
    assert actual[0] == 6 + 7 + 8                           # bins 6..8: after the 5 bins of the boot
    assert np.isnan(actual[-8:]).all() and not np.isnan(actual[-9])


def test_the_offset_window_sees_a_led_burst_a_boot_earlier():
    """Events (6 bins) lead job bursts (12 bins) by 12 bins; a node takes 9 bins to boot. At the
    end of an event burst the unshifted forecast (jobs in the next 9 bins) sees only the burst's
    first 3 bins, the offset one (bins 10..18: what a node asked for then can serve) 9 of them,
    and each forecast is close to its own truth."""
    rng = np.random.default_rng(8)
    n = 12_000
    jobs = rng.poisson(0.5, n).astype(float)
    events = np.column_stack([rng.poisson(8, n), rng.poisson(1, n), rng.poisson(0.2, n)]).astype(float)
    starts = np.arange(100, n - 60, 170) + rng.integers(0, 40, len(np.arange(100, n - 60, 170)))
    for e in starts:
        size = rng.uniform(5, 25)
        events[e:e + 6, 2] += rng.poisson(size / 3, 6)
        jobs[e + 12:e + 24] += rng.poisson(size, 12)
    shifted = Forecaster(bin_s=10, horizon_s=90, lead_s=90, lookback_s=360, lags=12)
    plain = Forecaster(bin_s=10, horizon_s=90, lead_s=0, lookback_s=360, lags=12)
    assert shifted.fit(jobs[:9000], events[:9000]).groups[:2] == ("jobs", "events")
    plain.fit(jobs[:9000], events[:9000])
    ps, pp = shifted.predict_series(jobs, events), plain.predict_series(jobs, events)
    ends = np.array([e + 5 for e in starts if e > 9000])
    truth_s = np.array([jobs[t + 10:t + 19].sum() for t in ends])
    truth_p = np.array([jobs[t + 1:t + 10].sum() for t in ends])
    assert len(ends) >= 10 and truth_s.mean() > 2 * truth_p.mean()
    assert ps[ends].mean() > 2 * pp[ends].mean(), (ps[ends], pp[ends])
    assert wape(ps[ends], truth_s) < 0.35 and wape(pp[ends], truth_p) < 0.5


def test_a_negative_lead_is_refused():
    with pytest.raises(ValueError):
        Forecaster(lead_s=-1)
