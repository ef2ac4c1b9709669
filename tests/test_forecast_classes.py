"""Per-class demand (ray_qalloc.forecast_classes and the controller's per-class decisions): a burst
that events lead on one class scales that class only — its pool's bundle shape, or a reservation
on its QPU class — and a control history, where events lead nothing, does not provision for them."""

from __future__ import annotations

import numpy as np
import pytest

from ray_qalloc.forecast_classes import CPU_POOL, GPU_POOL, ClassForecaster, demand_class, is_pool_class
from ray_qalloc.forecast import Forecaster
from ray_qalloc.predictive import PredictiveController, PredictiveScalingSettings

BIN = 10.0
ION, SC = "qpu:trapped_ion", "qpu:superconducting"
CLASSES = (CPU_POOL, GPU_POOL, ION, SC)
TARGETS = {CPU_POOL: "cpu-elastic", GPU_POOL: "gpu-elastic", ION: "qpu_ion_aria", SC: "qpu_torino"}


@pytest.mark.parametrize("backend, cls", [
    ("cpu-1a2b3c4d/mps", CPU_POOL), ("cpu-elastic/statevector", CPU_POOL), ("gpu-1a2b3c4d/tensornet", GPU_POOL),
    ("aer_mps", CPU_POOL), ("aer_statevector_gpu", GPU_POOL), ("qpu_ion_aria", ION),
    ("qpu_atom_rydberg", "qpu:neutral_atom"), ("qpu_torino", SC), ("ibm_torino", SC), ("braket_sv1", "qpu:other"),
])
def test_demand_class_of_a_backend(backend, cls):
    assert demand_class(backend) == cls
    assert is_pool_class(cls) == cls.startswith("pool:")


def _history(n: int, bursting: str | None, *, leading: bool, seed: int = 1) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Background jobs on every class; job bursts on ``bursting`` alone, 12 bins after bursts of
    high-severity events (``leading``) or with the event bursts at independent times."""
    rng = np.random.default_rng(seed)
    jobs = {c: rng.poisson(0.2, n).astype(float) for c in CLASSES}
    events = np.column_stack([rng.poisson(5, n), rng.poisson(1, n), rng.poisson(0.1, n)]).astype(float)
    starts = np.arange(40, n - 40, 120)
    ev_at = starts if leading else rng.choice(np.arange(0, n - 40), len(starts), replace=False)
    for s, e in zip(starts, ev_at):
        events[e:e + 3, 2] += 8
        if bursting is not None:
            jobs[bursting][s + 12:s + 24] += 10
    return jobs, events


def _settings(**kw: object) -> PredictiveScalingSettings:
    base = dict(enabled=True, bin_s=BIN, horizon_s=90.0, boot_s=90.0, lookback_s=360.0, lags=12,
                min_history_s=3600.0, history_s=86_400.0, max_extra_nodes=8, reserve_on_surge=True, reserve_slots=1)
    base.update(kw)
    return PredictiveScalingSettings(**base)


def _controller(jobs: dict[str, np.ndarray], events: np.ndarray) -> tuple[PredictiveController, list]:
    sent: list = []
    c = PredictiveController(_settings(), lambda b: sent.append([dict(x) for x in b]), clock=lambda: 0.0,
                             node_cores={CPU_POOL: 4, GPU_POOL: 2}, work_per_job_s=20.0, reserve_targets=TARGETS,
                             refit=False)
    c.seed(jobs, events, t0=0.0)
    c.fit()
    return c, sent


def _run(c: PredictiveController, surge: bool, ticks: int = 14) -> list:
    """Quiet ticks, with an event burst at ticks 2..4 when ``surge``; no job arrives."""
    now = c.history_bins * BIN
    out = []
    for k in range(ticks):
        now += BIN
        high = 8.0 if surge and 2 <= k < 5 else 0.0
        out.append(c.tick(now, {cls: 0.0 for cls in CLASSES}, [5, 1, high],
                          {CPU_POOL: 1, GPU_POOL: 1}, {CPU_POOL: 0.0, GPU_POOL: 0.0}))
    return out


def _peak(decisions: list, cls: str) -> int:
    return max(d.per_class[cls].requested_nodes for d in decisions)


def test_a_burst_on_the_cpu_pool_scales_the_cpu_pool_only():
    jobs, events = _history(2400, CPU_POOL, leading=True)
    c, sent = _controller(jobs, events)
    assert "events" in c.reports[CPU_POOL].groups
    assert all("events" not in c.reports[x].groups for x in (GPU_POOL, ION, SC))
    quiet, surge = _run(c, False), _run(_controller(jobs, events)[0], True)
    assert _peak(surge, CPU_POOL) >= _peak(quiet, CPU_POOL) + 2       # pre-warmed for the burst it predicts
    assert _peak(surge, GPU_POOL) == _peak(quiet, GPU_POOL) <= 1      # the GPU pool is not
    shapes = {k for d in surge for b in d.bundles for k in b}
    assert "qalloc_pool_cpu" in shapes
    assert max(sum("qalloc_pool_gpu" in b for b in d.bundles) for d in surge) <= 1
    targets = [r["target"] for d in surge for r in d.reserves]
    assert "qpu_ion_aria" not in targets and "qpu_torino" not in targets


def test_a_burst_on_one_qpu_class_reserves_that_class_only():
    jobs, events = _history(2400, ION, leading=True)
    c, _ = _controller(jobs, events)
    assert "events" in c.reports[ION].groups and "events" not in c.reports[CPU_POOL].groups
    quiet, surge = _run(c, False), _run(_controller(jobs, events)[0], True)
    assert [r["target"] for d in surge for r in d.reserves] == ["qpu_ion_aria"]   # one, held, not one per tick
    assert not [r for d in quiet for r in d.reserves]
    for pool in (CPU_POOL, GPU_POOL):                                 # no node is launched for QPU jobs
        assert _peak(surge, pool) == _peak(quiet, pool) <= 1


def test_a_control_history_does_not_provision_for_events():
    """Events at times independent of the bursts: no class keeps them, and a surge of events
    changes no request and takes no reservation."""
    jobs, events = _history(2400, CPU_POOL, leading=False)
    c, _ = _controller(jobs, events)
    assert all("events" not in r.groups for r in c.reports.values())
    quiet, surge = _run(c, False), _run(_controller(jobs, events)[0], True)
    for cls in (CPU_POOL, GPU_POOL):
        assert [d.per_class[cls].requested_nodes for d in surge] == [d.per_class[cls].requested_nodes for d in quiet]
    assert not [r for d in surge for r in d.reserves]


def test_a_rare_class_gets_no_model():
    rng = np.random.default_rng(2)
    n = 2400
    jobs = {CPU_POOL: rng.poisson(0.5, n).astype(float), GPU_POOL: np.zeros(n)}
    jobs[GPU_POOL][[100, 900]] = 1.0
    cf = ClassForecaster(lambda: Forecaster(bin_s=BIN, horizon_s=90, lead_s=90), min_jobs=20)
    reports = cf.fit(jobs, None, 0.0)
    assert set(reports) == {CPU_POOL} and set(cf.predict(jobs, None, 0.0)) == {CPU_POOL}


def test_a_class_seen_first_mid_history_is_padded():
    c = PredictiveController(_settings(), lambda b: None, clock=lambda: 0.0)
    c.seed({CPU_POOL: np.ones(30)}, None, t0=0.0)
    c.tick(305.0, {GPU_POOL: 2.0}, [0, 0, 0], 1, 0.0)
    c.tick(315.0, {}, [0, 0, 0], 1, 0.0)
    jobs, _ = c._arrays()
    assert len(jobs[CPU_POOL]) == len(jobs[GPU_POOL]) == c.history_bins == 31
    assert jobs[GPU_POOL][-1] == 2.0 and jobs[GPU_POOL][:-1].sum() == 0
