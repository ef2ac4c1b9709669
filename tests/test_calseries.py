"""Calibration time series on a real database: appends, retention, latest, series, trends."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_qalloc.backends.fake_qpu import FakeQPUBackend
from ray_qalloc.exceptions import StoreError
from ray_qalloc.monitor.calseries import (CalibrationSeries, Retention, SeriesKey, least_squares_slopes,
                                          samples_from_calibration)

T1_0 = SeriesKey("t1", (0,))
E01 = SeriesKey("gate_2q_error", (0, 1))


def values(t1: float, t2: float = 80e-6, e2: float = 0.01) -> dict[SeriesKey, float]:
    return {T1_0: t1, SeriesKey("t1", (1,)): 2 * t1, SeriesKey("t2", (0,)): t2, E01: e2}


@pytest.fixture
def series(tmp_path) -> CalibrationSeries:
    s = CalibrationSeries(f"sqlite:///{tmp_path / 'cal.db'}",
                          retention=Retention(max_age_s=None, max_samples=None))
    yield s
    s.close()


def test_append_latest_series_and_duplicates(db_url: str) -> None:
    s = CalibrationSeries(db_url, retention=Retention(max_age_s=None, max_samples=None))
    try:
        assert s.latest("qpu_a") is None and s.last_taken_at("qpu_a") is None
        for i in range(5):
            assert s.append("qpu_a", 100.0 * i, values(100e-6 + i * 1e-6)) == 4
        assert s.append("qpu_a", 200.0, values(1.0)) == 0        # the same refresh polled again
        s.append("qpu_b", 50.0, {T1_0: 7e-6, SeriesKey("t1", (3,)): float("nan")})
        latest = s.latest("qpu_a")
        assert latest.taken_at == 400.0 and latest.get("t1", 0) == pytest.approx(104e-6)
        assert latest.get("gate_2q_error", 0, 1) == 0.01 and latest.num_qubits == 2
        one = s.series("qpu_a", T1_0)
        np.testing.assert_allclose(one.at, [0, 100, 200, 300, 400])
        np.testing.assert_allclose(one.values, [100e-6 + i * 1e-6 for i in range(5)])
        assert len(s.series("qpu_a", T1_0, since=150.0, until=300.0)) == 2
        assert s.devices() == ["qpu_a", "qpu_b"]
        assert s.latest("qpu_b").values == {T1_0: 7e-6}          # NaN is not stored
        history = s.history("qpu_a", since=300.0)
        assert [at for at, _ in history] == [300.0, 400.0] and history[1][1] == latest.values
        # a second writer on the same database sees the same series
        again = CalibrationSeries(db_url)
        assert again.latest("qpu_a") == latest
        again.close()
    finally:
        s.close()


def test_retention_by_age_and_count(db_url: str) -> None:
    s = CalibrationSeries(db_url, retention=Retention(max_age_s=1000.0, max_samples=3, prune_every=1000))
    try:
        for i in range(10):
            s.append("qpu_a", 200.0 * i, values(1e-4))
            s.append("qpu_b", 200.0 * i, values(2e-4))
        assert len(s.series("qpu_a", T1_0)) == 10
        deleted = s.prune(devices=["qpu_a"])
        kept = s.series("qpu_a", T1_0)
        np.testing.assert_allclose(kept.at, [1400, 1600, 1800])   # the newest 3 (age alone keeps 6)
        assert deleted == 7 * 4
        assert s.snapshot_times("qpu_a") == [1400.0, 1600.0, 1800.0]
        assert len(s.series("qpu_b", T1_0)) == 10                  # another device is left alone
        s.retention = Retention(max_age_s=500.0, max_samples=None)
        s.prune(now=2200.0)                                        # age measured from a given now
        np.testing.assert_allclose(s.series("qpu_b", T1_0).at, [1800])
        assert s.snapshot_times("qpu_b") == [1800.0]
    finally:
        s.close()


def test_retention_runs_on_its_own_every_few_appends(series: CalibrationSeries) -> None:
    series.retention = Retention(max_age_s=None, max_samples=4, prune_every=5)
    for i in range(12):
        series.append("qpu_a", float(i), values(1e-4))
    at = series.series("qpu_a", T1_0).at
    assert len(at) <= 4 + 5 and at[-1] == 11.0 and at[0] >= 5.0


def test_trend_of_a_decaying_t1(series: CalibrationSeries) -> None:
    for i in range(24):                       # T1 halves over 24 refreshes of 15 min
        series.append("qpu_a", 900.0 * i, values(100e-6 * 0.5 ** (i / 24), e2=0.01))
    window = 6 * 3600.0
    trend = series.trend("qpu_a", T1_0, window)
    assert trend.n == 24 and trend.slope_per_s < 0
    assert trend.log_slope_per_s == pytest.approx(math.log(0.5) / (24 * 900.0), rel=1e-6)
    assert trend.arrow() == "↓"
    flat = series.trends("qpu_a", window)
    assert flat[E01].arrow() == "→" and flat[E01].slope_per_s == pytest.approx(0.0, abs=1e-15)
    assert flat[T1_0].log_slope_per_s == pytest.approx(trend.log_slope_per_s)
    short = series.trend("qpu_a", T1_0, 1000.0)   # two samples in the window
    assert short.n == 2
    assert series.trend("qpu_a", T1_0, 100.0) is None
    assert series.trends("nobody", window) == {}


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(st.tuples(st.floats(-1e4, 1e4), st.floats(-1e3, 1e3)), min_size=0, max_size=8),
                min_size=1, max_size=5))
def test_grouped_slopes_match_numpy_polyfit(groups: list[list[tuple[float, float]]]) -> None:
    group = np.array([g for g, pts in enumerate(groups) for _ in pts], dtype=np.intp)
    x = np.array([p[0] for pts in groups for p in pts], dtype=float)
    y = np.array([p[1] for pts in groups for p in pts], dtype=float)
    slopes = least_squares_slopes(group, x, y, len(groups))
    for g, pts in enumerate(groups):
        xs = np.array([p[0] for p in pts])
        if len(pts) < 2 or np.ptp(xs) < 1e-3:
            if len(pts) < 2 or np.ptp(xs) == 0:
                assert math.isnan(slopes[g])
            continue
        reference = np.polyfit(xs, [p[1] for p in pts], 1)[0]
        assert slopes[g] == pytest.approx(reference, rel=1e-6, abs=1e-6)


def test_samples_from_a_real_calibration() -> None:
    backend = FakeQPUBackend("fake_manila_v2")
    cal = backend.calibration()
    samples = samples_from_calibration(cal, backend.qubit_gate_errors())
    assert {k.quantity for k in samples} == {"t1", "t2", "readout_error", "sx_error", "x_error", "gate_2q_error"}
    assert samples[SeriesKey("t1", (3,))] == cal.t1_s[3]
    couplers = sorted(k.qubits for k in samples if k.quantity == "gate_2q_error")
    assert couplers == [(0, 1), (1, 2), (2, 3), (3, 4)]           # both directions fold into one
    assert samples[SeriesKey("gate_2q_error", (0, 1))] == min(cal.edge_error[(0, 1)], cal.edge_error[(1, 0)])


def test_unusable_url_is_a_store_error(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="To fix"):
        CalibrationSeries(f"sqlite:///{blocker / 'sub' / 'cal.db'}")
