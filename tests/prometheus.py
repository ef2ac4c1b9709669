"""A real Prometheus for the metrics test: ``prometheus_server`` starts one scraping a local Ray.

The server is the machine's own ``prometheus`` (Debian's package, which ``.ci/run`` installs),
run as the current user with a configuration of our own: one job scraping the given Ray
metrics endpoints every second, its database in a temporary folder, its web API on a free
loopback port. It is ready when ``/-/ready`` answers. When it cannot be started the test
skips and says why in the terminal summary, as PostgreSQL and rsyslog do (``tests/dbs.py``,
``tests/rsyslog.py``), so a skipped run is never taken for a passed one.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import httpx
import pytest


@dataclass
class _PromState:
    skip_reason: str | None = None
    description: str = ""


STATE = _PromState()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    """One line saying whether the Prometheus test ran, and on what; visible even with -q."""
    if STATE.skip_reason is not None:
        terminalreporter.write_line(f"Prometheus metrics test SKIPPED: {STATE.skip_reason}", yellow=True, bold=True)
    elif STATE.description:
        terminalreporter.write_line(f"Prometheus metrics test ran on {STATE.description}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Prometheus:
    """A running server: ``query`` is PromQL over its HTTP API."""

    url: str
    process: subprocess.Popen[bytes]
    folder: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus refused {expr!r}: {body.get('errorType')}: {body.get('error')}")
        return list(body["data"]["result"])

    def wait_for(self, expr: str, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Poll ``expr`` until it returns a series (Ray exports every few seconds, we scrape each)."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(1.0)

    def targets_up(self) -> list[str]:
        body = httpx.get(f"{self.url}/api/v1/targets", timeout=10).json()
        return [t["scrapeUrl"] for t in body["data"]["activeTargets"] if t["health"] == "up"]


def start(targets: Sequence[str]) -> Iterator[Prometheus]:
    """Start a Prometheus scraping ``targets`` (host:port each); skip the test when none can run."""
    binary = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    if binary is None:
        STATE.skip_reason = "no prometheus binary (Debian package 'prometheus'; .ci/run installs it)"
        pytest.skip(STATE.skip_reason)
    folder = Path(tempfile.mkdtemp(prefix="qalloc-prom-"))
    config = folder / "prometheus.yml"
    listed = ", ".join(f"'{t}'" for t in targets)
    config.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                      "scrape_configs:\n  - job_name: ray\n    scrape_interval: 1s\n"
                      f"    static_configs:\n      - targets: [{listed}]\n", encoding="utf-8")
    port = _free_port()
    log = open(folder / "prometheus.log", "wb")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    try:
        while True:
            if proc.poll() is not None:
                STATE.skip_reason = f"prometheus exited at start: {(folder / 'prometheus.log').read_text()[-300:]}"
                pytest.skip(STATE.skip_reason)
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                STATE.skip_reason = "prometheus did not become ready in 30 s"
                pytest.skip(STATE.skip_reason)
            time.sleep(0.2)
        version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.splitlines()
        STATE.description = (version[0] if version else "prometheus") + f" on {url}"
        yield Prometheus(url, proc, folder)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)
