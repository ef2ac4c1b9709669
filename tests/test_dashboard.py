"""The operators' dashboard in a real headless browser: Debian's Chromium driven by Selenium
against the real service (Ray Serve, the allocator, the Aer pool and emulated QPUs).

It signs in with an admin token, waits for live data in every panel — both charts drawn with
series, the job it just ran among the recent decisions with its reason, a row per QPU in the
calibration table, the pool's node — and keeps a screenshot in ``out/test-artifacts/``. A
user's token is refused at the sign-in, and the data route refuses it too.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from pathlib import Path
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
    text = {pid: browser.execute_script(f"return document.getElementById('{pid}').innerText")
            for pid in ("cards", "alerts", "decisions", "calibration", "nodes")}
    assert "running" in text["cards"] and "alerts firing" in text["cards"]
    assert job.id in text["decisions"], text["decisions"]
    assert "no alert is firing" in text["alerts"] or "since" in text["alerts"]
    qpus = sorted(b["name"] for b in qa.backends() if b["kind"] == "qpu")
    assert qpus and all(q in text["calibration"] for q in qpus), text["calibration"]
    assert "µs" in text["calibration"]
    assert "cpu-" in text["nodes"] and "GiB" in text["nodes"], text["nodes"]
    traces = browser.execute_script(
        "return Array.from(document.querySelectorAll('#utilisation-chart .legendtext')).map(e => e.textContent)")
    assert any(t.startswith("cpu-") for t in traces) and any(t in traces for t in qpus), traces
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
