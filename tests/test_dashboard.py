"""The operators' dashboard in a real headless browser: Debian's Chromium driven by Selenium
against the real service (Ray Serve, the allocator, the Aer pool and emulated QPUs).

It signs in with an admin token, waits for live data in every panel — both charts drawn with
series, the job it just ran among the recent decisions with its reason, a row per QPU in the
calibration table and a calibration heatmap per QPU, the pool's node — and keeps a screenshot
in ``out/test-artifacts/``. A user's token is refused at the sign-in, and the data route
refuses it too. The heatmap's payload (normalisation, nulls, drift marks) is also checked
without a browser or Ray, on a fake monitor.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import httpx
import pytest

from tests.serve_fixtures import BELL

ARTIFACTS = Path(__file__).resolve().parents[1] / "out" / "test-artifacts"
CHROMIUM = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium") if p and Path(p).exists()), None)
DRIVER = next((p for p in (shutil.which("chromedriver"), "/usr/bin/chromedriver") if p and Path(p).exists()), None)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra")
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="qalloc-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", f"--user-data-dir={profile}", "--window-size=1440,1800"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _wait(driver: Any, script: str, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = driver.execute_script(script)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"the page never satisfied: {script}")
        time.sleep(0.25)


def _sign_in(driver: Any, token: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.ID, "sign-in").click()


def test_an_operator_sees_every_panel_with_live_data(qa, server, browser):
    job = qa.submit(BELL, shots=128)
    job.result(timeout=120)
    browser.get(server.url + "/dashboard")
    _wait(browser, "return !document.getElementById('login').hidden")
    _sign_in(browser, server.token(f"user{uuid.uuid4().hex[:6]}"))            # not an admin
    _wait(browser, "return document.getElementById('login-error').textContent.includes('admin')")

    _sign_in(browser, server.token(f"ops{uuid.uuid4().hex[:6]}", admin=True))
    _wait(browser, "return document.getElementById('updated').textContent.startsWith('updated')")
    # the charts need two operation rounds (5 s apart) to draw a line
    _wait(browser, "return document.querySelectorAll('#utilisation-chart .scatterlayer .trace').length > 0 && "
                   "document.querySelectorAll('#queue-chart .scatterlayer .trace').length > 0", 90)
    qpus = sorted(b["name"] for b in qa.backends() if b["kind"] == "qpu")
    # plotly draws a heatmap as one <image> in .heatmaplayer .hm; the y ticks name the rows
    _wait(browser, f"return {json.dumps(qpus)}.every(q => {{ const el = document.getElementById('heatmap-' + q); "
                   "return el && el.classList.contains('heatmap') && el.querySelector('.heatmaplayer .hm image') && "
                   "el.querySelector('.ytick') !== null; })", 60)
    for q in qpus:
        ticks = browser.execute_script(
            f"return Array.from(document.querySelectorAll({json.dumps('#heatmap-' + q + ' .ytick text')}))"
            ".map(e => e.textContent)")
        assert ticks == ["drift", "T1 (µs)", "T2 (µs)", "readout error"], (q, ticks)
    text = {pid: browser.execute_script(f"return document.getElementById('{pid}').innerText")
            for pid in ("cards", "alerts", "decisions", "calibration", "nodes")}
    assert "running" in text["cards"] and "alerts firing" in text["cards"]
    assert job.id in text["decisions"], text["decisions"]
    assert "no alert is firing" in text["alerts"] or "since" in text["alerts"]
    assert qpus and all(q in text["calibration"] for q in qpus), text["calibration"]
    assert "µs" in text["calibration"]
    assert "cpu-" in text["nodes"] and "GiB" in text["nodes"], text["nodes"]
    traces = browser.execute_script(
        "return Array.from(document.querySelectorAll('#utilisation-chart .legendtext')).map(e => e.textContent)")
    assert any(t.startswith("cpu-") for t in traces) and any(t in traces for t in qpus), traces
    admin = server.headers(f"ops{uuid.uuid4().hex[:6]}", admin=True)
    rows = {c["device"]: c for c in httpx.get(server.url + "/v1/admin/dashboard", headers=admin).json()["calibration"]}
    for q in qpus:
        hm = rows[q]["heatmap"]
        assert hm is not None and hm["qubits"] == min(rows[q]["qubits"], 1024) > 0 and not hm["truncated"], (q, hm)
        assert [r["quantity"] for r in hm["rows"]] == ["t1", "t2", "readout_error"]
        for r in hm["rows"]:
            assert len(r["values"]) == len(r["badness"]) == hm["qubits"], (q, r["quantity"])
            assert any(v is not None for v in r["values"]), (q, r["quantity"])
            assert all(b is None or 0.0 <= b <= 1.0 for b in r["badness"])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000


def test_the_data_route_is_for_admin_tokens_only(server):
    assert httpx.get(server.url + "/v1/admin/dashboard").status_code == 401
    user = httpx.get(server.url + "/v1/admin/dashboard", headers=server.headers(f"u{uuid.uuid4().hex[:6]}"))
    assert user.status_code == 403
    page = httpx.get(server.url + "/dashboard")
    assert page.status_code == 200 and "ray-qalloc" in page.text and "frame-ancestors 'none'" in \
        page.headers["content-security-policy"]
    js = httpx.get(server.url + "/dashboard/plotly.min.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")


def _fake_alloc(snapshot: Any, alarms: dict[Any, Any], qubits: int) -> Any:
    """Just what ``dashboard.calibration`` reads: one QPU host, its member, the calibration watch."""
    from ray_qalloc.exceptions import UnknownBackend

    class Monitor:
        def current(self, name: str) -> Any:
            if name != "qpu-a":
                raise UnknownBackend(f"not watched: {name}")
            return snapshot

        def alarms(self, name: str) -> dict[Any, Any]:
            return alarms if name == "qpu-a" else {}

    def member(name: str) -> Any:
        return SimpleNamespace(spec=SimpleNamespace(kind="qpu"), calibration={"qubits": float(qubits)},
                               qubits=None, calibration_taken_at=1000.0)

    hosts = {n: SimpleNamespace(name=n, members=[n]) for n in ("qpu-a", "qpu-b")}
    return SimpleNamespace(fleet=SimpleNamespace(hosts=hosts, members={n: member(n) for n in hosts}),
                           calwatch=SimpleNamespace(monitor=Monitor(), status=lambda: []))


def test_the_heatmap_payload_colours_worse_the_same_way_and_marks_drift():
    from ray_qalloc import dashboard
    from ray_qalloc.monitor.calseries import Snapshot
    from ray_qalloc.monitor.detect import DriftScore
    from ray_qalloc.monitor.keys import SeriesKey

    values = {SeriesKey("t1", (0,)): 200e-6, SeriesKey("t1", (1,)): 20e-6, SeriesKey("t1", (2,)): 100e-6,
              SeriesKey("t2", (0,)): 150e-6, SeriesKey("t2", (1,)): math.nan, SeriesKey("t2", (2,)): 50e-6,
              SeriesKey("readout_error", (0,)): 0.01, SeriesKey("readout_error", (1,)): 0.02,
              SeriesKey("readout_error", (2,)): 0.4}
    alarms = {SeriesKey("t1", (1,)): DriftScore(z=-5.0, cusum=2.0, alarm=-1, since=900.0, factor=0.4),
              SeriesKey("gate_2q_error", (2, 3)): DriftScore(z=4.0, cusum=1.5, alarm=1, since=950.0, factor=2.5)}
    # the calibration has 4 qubits; qubit 3 has no value at all (it still gets a column)
    rows = dashboard.calibration(_fake_alloc(Snapshot("qpu-a", 1000.0, values), alarms, 4))
    by_device = {r["device"]: r for r in rows}
    assert by_device["qpu-b"]["heatmap"] is None          # the monitor has not recorded it
    hm = by_device["qpu-a"]["heatmap"]
    json.dumps(hm, allow_nan=False)                        # what the API sends must be plain JSON
    assert hm["qubits"] == 4 and not hm["truncated"] and hm["taken_at"] == 1000.0
    t1, t2, ro = (next(r for r in hm["rows"] if r["quantity"] == q) for q in ("t1", "t2", "readout_error"))
    assert t1["unit"] == t2["unit"] == "µs" and ro["unit"] == ""
    assert t1["values"] == [200.0, 20.0, 100.0, None] and ro["values"] == [0.01, 0.02, 0.4, None]
    # coherence: the shortest is the worst (1), the longest the best (0); error: the highest is worst
    assert t1["badness"][1] == 1.0 and t1["badness"][0] == 0.0 and 0.0 < t1["badness"][2] < 1.0
    assert ro["badness"][2] == 1.0 and ro["badness"][0] == 0.0 and 0.0 < ro["badness"][1] < 1.0
    assert t2["values"][1] is None and t2["badness"][1] is None and t2["badness"][3] is None    # NaN -> null
    assert t2["badness"][0] == 0.0 and t2["badness"][2] == 1.0
    # the T1 alarm marks its cell; the coupler's marks no cell but both of its qubits
    assert t1["drift"] == [1] and t2["drift"] == [] and ro["drift"] == []
    drifted = {d["qubit"]: d["why"] for d in hm["drifted"]}
    assert sorted(drifted) == [1, 2, 3]
    assert any("T1" in w and "dropped" in w for w in drifted[1])
    assert all(any("q2-q3" in w and "rose" in w for w in drifted[q]) for q in (2, 3))


def test_the_heatmap_payload_is_bounded():
    from ray_qalloc import dashboard
    from ray_qalloc.monitor.calseries import Snapshot
    from ray_qalloc.monitor.detect import DriftScore
    from ray_qalloc.monitor.keys import SeriesKey

    values = {SeriesKey("t1", (q,)): 100e-6 for q in range(2000)}
    alarm = DriftScore(z=5.0, cusum=2.0, alarm=1, since=1.0, factor=3.0)
    hm = dashboard.heatmap(Snapshot("big", 1.0, values), {SeriesKey("readout_error", (1500,)): alarm}, 2000,
                           max_qubits=1024)
    assert hm is not None and hm["qubits"] == 1024 and hm["truncated"]
    assert all(len(r["values"]) == len(r["badness"]) == 1024 for r in hm["rows"])
    assert hm["rows"][0]["badness"] == [0.0] * 1024          # a flat row: nothing in it is worse
    assert hm["drifted"] == [] and all(r["drift"] == [] for r in hm["rows"])   # beyond the columns shown
    assert dashboard.heatmap(None, {}, 5) is None
