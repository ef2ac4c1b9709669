"""Predictive scaling decisions (ray_qalloc.predictive), the history read from the stores, and a
small run of the scaling benchmark (its keys, not its goals)."""

from __future__ import annotations

import numpy as np
import pytest

from ray_qalloc.forecast_classes import CPU_POOL
from ray_qalloc.predictive import (POOL_RESOURCE, PredictiveController, PredictiveScalingSettings, RequestMerger,
                                   bundles_for, history_from_store, mean_job_seconds, merge_requests, nodes_wanted,
                                   request_size)

BIN = 10.0


def _settings(**kw) -> PredictiveScalingSettings:
    base = dict(enabled=True, bin_s=BIN, horizon_s=90.0, boot_s=90.0, lookback_s=360.0, lags=12, min_history_s=3600.0,
                history_s=86_400.0, max_extra_nodes=3, refit_s=600.0)
    base.update(kw)
    return PredictiveScalingSettings(**base)


def _leading_history(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Job bursts 12 bins after bursts of high-severity events; quiet background otherwise."""
    rng = np.random.default_rng(seed)
    jobs = rng.poisson(0.2, n).astype(float)
    events = np.column_stack([rng.poisson(5, n), rng.poisson(1, n), rng.poisson(0.1, n)]).astype(float)
    for s in range(40, n - 40, 120):
        events[s:s + 3, 2] += 8
        jobs[s + 12:s + 24] += 10
    return jobs, events


class Recorder:
    def __init__(self) -> None:
        self.sent: list[list[dict[str, float]]] = []

    def __call__(self, bundles):
        self.sent.append([dict(b) for b in bundles])


def _controller(settings, rec, **kw):
    clock = {"t": 0.0}
    c = PredictiveController(settings, rec, clock=lambda: clock["t"], node_cores=4, work_per_job_s=20.0, **kw)
    return c, clock


# ---- pure decisions ----------------------------------------------------------------------------------
def test_nodes_wanted_and_request_size():
    assert nodes_wanted(0, 20, 0, 4, 90) == 0
    assert nodes_wanted(18, 20, 0, 4, 90) == 1               # 360 core-s = one node for 90 s
    assert nodes_wanted(19, 20, 0, 4, 90) == 2
    assert nodes_wanted(0, 20, 720, 4, 90) == 2              # queued work counts too
    assert request_size(10, 1, 3) == 4                       # never more than max_extra_nodes above now
    assert request_size(2, 5, 3) == 2                        # the floor falls with the forecast
    assert bundles_for(2) == [{POOL_RESOURCE: 1.0}] * 2


def test_merger_keeps_the_larger_floor_per_shape_and_sends_on_change():
    rec = Recorder()
    m = RequestMerger(rec)
    reactive, predictive = m.part("reactive"), m.part("predictive")
    reactive([{POOL_RESOURCE: 1.0}])
    predictive(bundles_for(3))
    predictive(bundles_for(3))                               # unchanged: nothing sent
    reactive([{POOL_RESOURCE: 1.0}, {"qalloc_backend_x": 1.0}])
    predictive([])
    def canon(bundles):
        return sorted(tuple(sorted(b.items())) for b in bundles)

    assert [canon(b) for b in rec.sent] == [canon(b) for b in (
        [{POOL_RESOURCE: 1.0}], bundles_for(3), bundles_for(3) + [{"qalloc_backend_x": 1.0}],
        [{POOL_RESOURCE: 1.0}, {"qalloc_backend_x": 1.0}])]
    assert merge_requests([[], []]) == []


# ---- the controller ------------------------------------------------------------------------------
def test_requests_ahead_of_a_predicted_burst_and_clears_after():
    rec = Recorder()
    c, clock = _controller(_settings(), rec)
    jobs, events = _leading_history(2400)
    c.seed(jobs, events, t0=0.0)
    reports = c.fit()
    assert reports is not None and "events" in reports[CPU_POOL].groups
    now = 2400 * BIN
    rng = np.random.default_rng(9)
    requested = []
    for k in range(60):                                       # a burst of events at k = 5..7, jobs never come
        now += BIN
        clock["t"] = now
        ev = [5, 1, 8 if 5 <= k < 8 else rng.poisson(0.1)]
        d = c.tick(now, 0, ev, capacity_nodes=1, queued_work_s=0.0)
        requested.append(d.requested_nodes)
    assert max(requested[5:12]) >= 2                          # ahead of the jobs it predicts
    assert max(requested) <= 1 + 3                            # capacity_nodes + max_extra_nodes
    assert requested[-1] <= 1 and (not rec.sent[-1] or len(rec.sent[-1]) <= 1)   # and lets go after
    assert any(len(b) >= 2 for b in rec.sent)


def test_never_exceeds_max_extra_nodes():
    rec = Recorder()
    c, clock = _controller(_settings(max_extra_nodes=2), rec)
    jobs, events = _leading_history(2400)
    c.seed(jobs, events, t0=0.0)
    c.fit()
    d = c.tick(2401 * BIN, 500, [5, 1, 50], capacity_nodes=3, queued_work_s=1e6)
    assert d.wanted_nodes > 5 and d.requested_nodes == 5 and len(rec.sent[-1]) == 5


def test_disabled_does_nothing():
    rec = Recorder()
    c, _ = _controller(_settings(enabled=False), rec)
    jobs, events = _leading_history(2400)
    c.seed(jobs, events, t0=0.0)
    d = c.tick(2401 * BIN, 500, [5, 1, 50], capacity_nodes=1, queued_work_s=1e6)
    assert d.why == "disabled" and d.requested_nodes == 0 and rec.sent == []


def test_no_request_before_min_history_then_a_refit_on_the_clock():
    rec = Recorder()
    c, clock = _controller(_settings(min_history_s=1800.0, refit_s=300.0), rec)
    jobs, events = _leading_history(400)
    now = 0.0
    for k in range(400):
        now += BIN
        clock["t"] = now
        d = c.tick(now, jobs[k], events[k], capacity_nodes=1, queued_work_s=0.0)
        if now < 1800.0:
            assert d.forecast_jobs is None
    assert c.forecaster.fitted and d.forecast_jobs is not None
    assert rec.sent == [] or all(len(b) <= 4 for b in rec.sent)


def test_surge_reservation_only_when_events_lead():
    rec = Recorder()
    c, clock = _controller(_settings(reserve_on_surge=True, reserve_slots=2), rec, reserve_target="cpu-elastic")
    jobs, events = _leading_history(2400)
    c.seed(jobs, events, t0=0.0)
    c.fit()
    now = 2400 * BIN
    got = []
    for k in range(12):                                         # an event burst at k = 2..4, nothing else
        now += BIN
        clock["t"] = now
        d = c.tick(now, 0, [5, 1, 8 if 2 <= k < 5 else 0], capacity_nodes=1, queued_work_s=0.0)
        got += d.reserves
    assert len(got) == 1                                        # one reservation, not one per bin
    action = got[0]
    assert action["kind"] == "reserve" and action["target"] == "cpu-elastic" and "pool:cpu" in action["reason"]
    from ray_qalloc.threatdesk import parse_action

    assert parse_action(action).slots == 2                      # the desk accepts it as it is
    # the same history with the events moved away from the jobs: events dropped, nothing reserved
    rng = np.random.default_rng(3)
    shuffled = events[rng.permutation(len(events))]
    c2, clock2 = _controller(_settings(reserve_on_surge=True), Recorder(), reserve_target="cpu-elastic")
    c2.seed(jobs, shuffled, t0=0.0)
    reports = c2.fit()
    assert reports is not None and "events" not in reports[CPU_POOL].groups
    now = 2400 * BIN
    for k in range(12):
        now += BIN
        clock2["t"] = now
        assert not c2.tick(now, 0, [5, 1, 8 if 2 <= k < 5 else 0], capacity_nodes=1, queued_work_s=0.0).reserves


# ---- history from the stores ------------------------------------------------------------------------
def test_history_from_store(db_url):
    from ray_qalloc.integration.eventstore import EventStore, events_table
    from ray_qalloc.store import JobStore
    from tests.helpers import prepared

    store = JobStore(db_url)
    try:
        since = 1_700_000_000.0
        for at in (since + 1, since + 2, since + 15, since + 39.9, since + 45, since - 5):
            store.add_job(prepared(), now=at)
        ev = EventStore(store.engine)
        rows = []
        for i, (off, sev) in enumerate([(3, 1), (4, 4), (12, 5), (12, 3), (31, 6), (55, 2), (-1, 6)]):
            us = int((since + off) * 1_000_000)
            rows.append({"tenant": "t", "id": f"e{i}", "time": us, "received_at": us, "class_uid": 0,
                         "category_uid": 0, "severity_id": sev, "format": "cef", "message": None,
                         "event": "{}", "raw": "x"})
        with store.engine.begin() as conn:
            conn.execute(events_table.insert(), rows)
        jobs, events = history_from_store(store.engine, since, BIN, until=since + 50)
        assert jobs.tolist() == [2, 1, 0, 1, 1]
        assert events.tolist() == [[1, 0, 1], [0, 1, 1], [0, 0, 0], [0, 0, 1], [0, 0, 0]]
        assert mean_job_seconds(store.engine, since) is None
    finally:
        store.close()


def test_history_from_a_store_without_events(tmp_path):
    from ray_qalloc.store import JobStore
    from tests.helpers import prepared

    store = JobStore(f"sqlite:///{tmp_path / 'j.db'}")
    try:
        store.add_job(prepared(), now=105.0)
        jobs, events = history_from_store(store.engine, 100.0, BIN, until=130.0)
        assert jobs.tolist() == [1, 0, 0] and events.shape == (3, 3) and not events.any()
    finally:
        store.close()


# ---- the benchmark, small --------------------------------------------------------------------------
def test_scaling_benchmark_runs_small():
    from benchmarks.scaling import PoolParams, TraceParams, run

    params = TraceParams(seed=3, train_s=8 * 3600.0, test_s=1800.0, burst_every_s=900.0)
    settings = _settings(min_history_s=3600.0, history_s=86_400.0)
    result = run(params, PoolParams(), settings)
    s = result["summary"]
    for key in ("p95_wait_ratio_predictive", "node_seconds_ratio_control", "forecast_mape"):
        assert key in s and isinstance(s[key], float)
    traces = result["runs"][0]["traces"]
    assert set(traces) == {"predictive", "control"}
    for tr in traces.values():
        cpu = tr["classes"][CPU_POOL]
        assert cpu["reactive"]["jobs"] == cpu["predictive"]["jobs"] > 0
        assert {"pool:cpu", "pool:gpu", "qpu:trapped_ion"} <= set(tr["classes"])
        assert "reservations" in tr["classes"]["qpu:trapped_ion"]


def test_settings_validate():
    with pytest.raises(ValueError):
        PredictiveScalingSettings(bin_s=100, horizon_s=50)
    assert PredictiveScalingSettings().enabled is False
