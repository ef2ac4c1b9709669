"""Maintenance on the real service: a real Ray Serve, the real allocator, Aer pool and emulated
QPUs. An emulated QPU is drained under load over HTTP and with the CLI: every job completes
exactly once, none starts on the QPU after the drain, and explain says why."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
from typer.testing import CliRunner

from ray_qalloc.cli import app
from ray_qalloc.client import Client
from ray_qalloc.exceptions import Forbidden, UnknownBackend
from tests.serve_fixtures import BELL

GHZ3 = ('OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[3];\ncreg c[3];\nh q[0];\ncx q[0],q[1];\ncx q[1],q[2];\n'
        "measure q -> c;\n")


def tenant() -> str:
    return f"ops{uuid.uuid4().hex[:8]}"


@pytest.fixture
def admin(server) -> Client:
    with Client(server.url, server.token(tenant(), admin=True)) as c:
        yield c


def _qpus(c: Client) -> list[str]:
    return sorted(b["name"] for b in c.backends() if b["kind"] == "qpu")


def test_draining_a_qpu_under_load_moves_its_queue_and_loses_nothing(server, admin):
    qpus = _qpus(admin)
    assert len(qpus) >= 2, qpus
    target = qpus[0]
    with Client(server.url, server.token(tenant())) as user:
        # quantum jobs only run on QPUs: they queue on the emulators, the drained one among them
        jobs = [user.submit(GHZ3 if i % 2 else BELL, shots=200, intent="quantum", backends=qpus) for i in range(12)]
        jobs += [user.submit(BELL, shots=100, intent="auto") for _ in range(4)]
        try:
            t0 = time.monotonic()
            st = admin.drain(target, reason="recalibration", wait_s=60)
            drain_s = time.monotonic() - t0
            drained_at = time.time()
            assert st["drained"] and st["backends"][0]["backend"] == target and st["backends"][0]["draining"]
            after = user.submit(BELL, shots=100, intent="quantum", backends=qpus)   # placed during the drain
            jobs.append(after)
            results = [j.result(timeout=120) for j in jobs]
            histories = [user.job(j.id).status() for j in jobs]
            explains = [j.explain() for j in jobs]
        finally:
            admin.uncordon(target)
    assert drain_s < 60
    for j, res, ex in zip(jobs, results, explains):
        hist = ex["failover_history"]
        assert [h["outcome"] for h in hist].count("completed") == 1, hist
        for h in hist:
            assert not (h["backend"] == target and (h["started_at"] or 0) > drained_at), h
        if j.id in {x.id for x in jobs[:12]}:
            assert res.backend in qpus
    moved = [ex for ex, res in zip(explains[:12], results[:12]) if res.backend != target]
    assert moved, "no quantum job went to another QPU"
    # the job placed during the drain went elsewhere, and its explanation says why
    assert results[-1].backend != target
    assert "draining by" in explains[-1]["backends"][target]["maintenance"]
    assert all(h["state"] == "completed" for h in histories)
    audit = admin.audit("maintenance", limit=5)
    assert [a["action"] for a in audit[:2]] == ["uncordon", "drain"]


def test_admin_routes_refuse_users_and_unknown_names(server, admin):
    with Client(server.url, server.token(tenant())) as user:
        with pytest.raises(Forbidden):
            user.cordon(_qpus(admin)[0])
    with pytest.raises(UnknownBackend, match="no backend, pool or QPU named 'qpu_nowhere'"):
        admin.cordon("qpu_nowhere")
    r = httpx.post(f"{server.url}/v1/admin/backends/{_qpus(admin)[0]}/windows",
                   headers={"Authorization": admin._http.headers["Authorization"]},
                   json={"start": time.time() + 10, "end": time.time()})
    assert r.status_code == 422 and "end" in r.text


def test_cli_cordons_and_uncordons_over_the_api(server, admin, monkeypatch):
    target = _qpus(admin)[-1]
    monkeypatch.setenv("QALLOC_URL", server.url)
    monkeypatch.setenv("QALLOC_TOKEN", server.token(tenant(), admin=True))
    runner = CliRunner()
    try:
        out = runner.invoke(app, ["-o", "json", "backend", "cordon", target, "--reason", "cli test"])
        assert out.exit_code == 0, out.output
        assert '"cordoned": true' in out.output
        shown = runner.invoke(app, ["backend", "status"])
        assert shown.exit_code == 0 and target in shown.output and "cordoned" in shown.output
        win = runner.invoke(app, ["backend", "window", target, "--start", "+1h", "--end", "+2h", "--reason", "vendor"])
        assert win.exit_code == 0, win.output
    finally:
        assert runner.invoke(app, ["backend", "window", target, "--start", "0", "--end", "0", "--clear"]).exit_code == 0
        back = runner.invoke(app, ["backend", "uncordon", target])
        assert back.exit_code == 0, back.output
    audit = runner.invoke(app, ["-o", "json", "audit", "--key", "maintenance", "--limit", "4"])
    assert audit.exit_code == 0 and '"uncordon"' in audit.output and '"cordon"' in audit.output
