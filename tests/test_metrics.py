"""ray-qalloc's own metrics: bounded tags, the buffering facade, the generated Grafana dashboard,
and a real Prometheus scraping a local Ray while real jobs run (tests/prometheus.py)."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_qalloc.metrics import BY_NAME, METRICS, OTHER, Metrics
from ray_qalloc.metrics import grafana
from ray_qalloc.metrics.tags import Named

pytest.register_assert_rewrite("tests.prometheus")
from tests import prometheus  # noqa: E402
from tests.serve_fixtures import BELL  # noqa: E402

pytest_plugins = ["tests.prometheus"]   # its line in the terminal summary

ROOT = Path(__file__).resolve().parents[1]


def recorder() -> Metrics:
    return Metrics(require_ray=False, flush_s=None)


def by_name(m: Metrics) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for s in m.pending():
        out.setdefault(s.name, []).append(s)
    return out


# ---- the facade ------------------------------------------------------------------------------------
def test_counters_are_summed_and_gauges_keep_their_last_value():
    m = recorder()
    for _ in range(1000):
        m.decision("placed")
    m.queued("high", "cpu-1a2b3c4d", 5)
    m.queued("high", "cpu-1a2b3c4d", 3)
    got = by_name(m)
    assert [(s.tags, s.value) for s in got["qalloc_decisions_total"]] == [({"outcome": "placed"}, 1000.0)]
    assert [(s.tags, s.value) for s in got["qalloc_queue_depth"]] == [({"priority": "high", "pool": "cpu-1a2b3c4d"},
                                                                        3.0)]


def test_unbounded_values_fold_to_other_and_never_become_series():
    m = recorder()
    m.ran("3f2a9c0d-11aa-4bbb-8ccc-0123456789ab", "statevector", 0.1)     # a job id where a backend goes
    m.api_request("/v1/jobs/3f2a9c0d11aa4bbb8ccc0123456789ab", 200, 0.01)  # a raw path where a template goes
    m.queued("vip", None, 1)                                              # not a priority class
    got = by_name(m)
    assert got["qalloc_run_seconds"][0].tags == {"backend": OTHER, "method": "statevector"}
    assert got["qalloc_api_requests_total"][0].tags == {"route": OTHER, "code": "2xx"}
    assert got["qalloc_queue_depth"][0].tags == {"priority": OTHER, "pool": "none"}


def test_a_named_domain_admits_only_its_cap():
    d = Named(r"[a-z]+", cap=3)
    assert [d.fold(x) for x in ("a", "b", "c", "d", "a")] == ["a", "b", "c", OTHER, "a"]


def test_bad_values_are_dropped_and_counted_never_raised():
    m = recorder()
    m.ran("cpu-1a2b3c4d", "mps", -1.0)
    m.ran("cpu-1a2b3c4d", "mps", math.inf)
    m.prediction_error("cpu-1a2b3c4d", math.nan)
    m.breaker("qpu_torino", "sideways")
    m.node("1a2b3c4d", cpu_ratio=math.nan)
    got = by_name(m)
    assert set(got) == {"qalloc_metrics_dropped_total"}
    assert got["qalloc_metrics_dropped_total"][0].value == 5.0


def test_prediction_error_keeps_its_sign_in_a_tag():
    m = recorder()
    m.prediction_error("cpu-1a2b3c4d/mps@2", math.log(3.0), "matrix_product_state")
    m.prediction_error("qpu_torino", -math.log(2.0), "qpu")
    got = sorted((s.tags["backend"], s.tags["method"], s.tags["direction"], round(s.value, 6))
                 for s in by_name(m)["qalloc_prediction_error_log_ratio"])
    assert got == [("cpu-1a2b3c4d", "mps", "over", round(math.log(3.0), 6)),
                   ("qpu_torino", "qpu", "under", round(math.log(2.0), 6))]


def test_off_means_nothing_is_buffered():
    m = Metrics(enabled=False, require_ray=False, flush_s=None)
    m.decision("placed")
    m.queued("high", None, 1)
    assert m.pending() == []
    on = recorder()
    on.decision("placed")
    on.set_enabled(False)
    assert on.pending() == []


def test_without_ray_a_recording_costs_a_check_and_keeps_nothing():
    m = Metrics(flush_s=None)          # require_ray: this process has no Ray initialised here? then no-op
    import ray

    if ray.is_initialized():
        pytest.skip("Ray is initialised in this process")
    m.decision("placed")
    assert m.pending() == []


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["placed", "held", "failover", "weird"]), st.integers(1, 5)),
                max_size=50))
def test_counter_sums_match_a_plain_tally(calls):
    m = recorder()
    expected: dict[str, float] = {}
    for outcome, n in calls:
        m.decision(outcome, n)
        key = outcome if outcome != "weird" else OTHER
        expected[key] = expected.get(key, 0.0) + n
    got = {s.tags["outcome"]: s.value for s in m.pending() if s.name == "qalloc_decisions_total"}
    assert got == expected


# ---- the dashboard ---------------------------------------------------------------------------------
def test_the_committed_dashboard_is_the_generated_one():
    committed = (ROOT / "ops" / "grafana" / "qalloc.json").read_text(encoding="utf-8")
    assert committed == grafana.render(), "run: python -m ray_qalloc.metrics.grafana --out ops/grafana/qalloc.json"


def test_every_metric_has_a_panel_and_every_panel_plots_a_defined_metric():
    board = grafana.dashboard()
    panels = [p for p in board["panels"] if p["type"] == "timeseries"]
    assert len(panels) == len(METRICS)
    names = re.compile(r"\bray_(qalloc_[a-z0-9_]+?)(?:_bucket|_count|_sum)?\b")
    for p in panels:
        for t in p["targets"]:
            found = names.findall(t["expr"])
            assert found and all(n in BY_NAME for n in found), t["expr"]
            by = re.search(r"by \(([^)]*)\)", t["expr"])
            tags = {k.strip() for k in by.group(1).split(",")} - {"le"} if by else set()
            assert tags <= set(BY_NAME[found[0]].tag_keys), (t["expr"], tags)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


# ---- a real Prometheus against a local Ray ----------------------------------------------------------
@pytest.fixture(scope="module")
def prom(qa):
    import ray

    targets = sorted({f"127.0.0.1:{n['MetricsExportPort']}" for n in ray.nodes() if n.get("Alive")})
    yield from prometheus.start(targets)


def test_prometheus_scrapes_what_the_allocator_and_api_record(qa, server, prom):
    import httpx

    jobs = [qa.submit(BELL, shots=64) for _ in range(3)]
    for j in jobs:
        assert j.result(timeout=120) is not None
    token = server.token("metrics-test")
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}) as http:
        assert http.get("/v1/backends").status_code == 200
        assert http.get("/v1/jobs/does-not-exist").status_code == 404

    finished = prom.wait_for('sum(ray_qalloc_jobs_finished_total{state="completed"})', 90)
    assert finished and float(finished[0]["value"][1]) >= 3
    for expr in ('sum(ray_qalloc_run_seconds_count)', 'sum(ray_qalloc_queue_wait_seconds_count)',
                 'sum(ray_qalloc_decisions_total{outcome="placed"})',
                 'max by (backend) (ray_qalloc_backend_healthy)',
                 'max by (node) (ray_qalloc_node_memory_total_bytes)',
                 'sum by (route, code) (ray_qalloc_api_requests_total{route="/v1/jobs/{job_id}", code="4xx"})',
                 'sum(ray_qalloc_api_request_seconds_count{route="/v1/backends"})'):
        result = prom.wait_for(expr, 60)
        assert result and float(result[0]["value"][1]) > 0, (expr, result)
    healthy = {r["metric"]["backend"]: float(r["value"][1])
               for r in prom.query("max by (backend) (ray_qalloc_backend_healthy)")}
    assert any(v == 1.0 for v in healthy.values()), healthy
    memory = prom.query("max by (node) (ray_qalloc_node_memory_total_bytes)")
    assert 2**28 < float(memory[0]["value"][1]) < 2**45          # a real machine's memory, in bytes
    # a raw id never became a label value
    routes = {r["metric"].get("route") for r in prom.query("sum by (route) (ray_qalloc_api_requests_total)")}
    assert all(r is None or not re.search(r"[0-9a-f]{12,}", r) for r in routes), routes
    # every panel of the shipped dashboard is a query Prometheus accepts
    for panel in grafana.dashboard()["panels"]:
        for t in panel.get("targets", []):
            prom.query(t["expr"].replace("$__rate_interval", "1m"))
    prometheus.STATE.description += f" ({len(prom.targets_up())} Ray target(s) up)"
    print(json.dumps({"prometheus": prometheus.STATE.description, "backends_healthy": healthy}))
