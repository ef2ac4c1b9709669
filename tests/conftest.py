"""Shared fixtures: one local Ray (num_cpus=2) and one ray-qalloc per test session."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Every Scheduler in this session (and in the Ray workers it starts: they inherit the
# environment) checks its invariants after each change (ray_qalloc/placement/invariants.py).
os.environ.setdefault("RAY_QALLOC_CHECK_INVARIANTS", "1")

pytest_plugins = ["tests.dbs", "tests.serve_fixtures"]  # db_url: the store's tests on SQLite and PostgreSQL


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="qalloc-test-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def qa(data_dir):
    """A real local Ray with the default pool; started once, shared by the integration tests."""
    import ray

    from ray_qalloc import connect

    # Ray's unix sockets need a short path.
    ray_tmp = tempfile.mkdtemp(prefix="qr", dir="/tmp")
    # foreign_cpu off: on this one machine every test process (pytest, the other "nodes" of the
    # multi-node tests) is foreign work to the pool; test_capacity switches it on live
    client = connect(data_dir=data_dir, num_cpus=2, ray_temp_dir=ray_tmp, health_interval_s=0.5,
                     history_flush_s=1.0, placement={"foreign_cpu": False})
    yield client
    client.shutdown()
    if ray.is_initialized():
        ray.shutdown()
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("RAY_DEDUP_LOGS", "1")
    for key in [k for k in os.environ if k.startswith("QALLOC_")]:
        monkeypatch.delenv(key, raising=False)
