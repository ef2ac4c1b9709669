"""Live configuration: validated whole like start-up, nothing half-applied, audited, durable across a
restart, in force on the running allocator; and over HTTP with the CLI on the real service."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from typer.testing import CliRunner

from ray_qalloc.cli import app
from ray_qalloc.config import load_settings
from ray_qalloc.exceptions import ConfigError
from ray_qalloc.liveconfig import apply_overrides, mask
from tests.helpers import prepared
from tests.test_allocator_unit import FakeBackend, make
from tests.cliout import command_output


# ---- the decision ----------------------------------------------------------------------------------
def test_a_change_is_validated_by_the_start_up_model(tmp_path):
    s = load_settings(data_dir=tmp_path)
    new = apply_overrides(s, {"placement.coherence_budget": 2.5, "scheduler.reserved": {"qpu_fez": 1},
                              "tenant_backends.lab": ["kind:qpu"]})
    assert new.placement.coherence_budget == 2.5 and new.scheduler["reserved"] == {"qpu_fez": 1}
    assert new.tenant_backends == {"lab": ["kind:qpu"]}
    assert s.placement.coherence_budget == 1.0          # the old settings are untouched


@pytest.mark.parametrize("changes, field, words", [
    ({"placement.coherence_budget": -1}, "placement.coherence_budget", "greater than 0"),
    ({"placement.explore_factor": 50}, "placement.explore_factor", "less than or equal to 10"),
    ({"scheduler.bogus": 1}, "scheduler", "unknown scheduler setting"),
    ({"placement.no_such_knob": 1}, "placement.no_such_knob", "Extra inputs|no setting"),
    ({"data_dir": "/tmp/x"}, "data_dir", "cannot change on a running allocator"),
    ({"nonsense": 1}, "nonsense", "there is no setting"),
    ({"alerts.rules": [{"name": "x", "kind": "nope"}]}, None, "kind"),
    ({"alerts.sinks": {"hook": {"type": "webhook", "url": "ftp://x", "secret": "s" * 16}}}, None, "http"),
])
def test_a_bad_change_names_the_field_and_why(tmp_path, changes, field, words):
    import re

    with pytest.raises(ConfigError) as info:
        apply_overrides(load_settings(data_dir=tmp_path), changes)
    assert re.search(words, str(info.value)), str(info.value)
    if field is not None:
        assert info.value.field is not None and info.value.field.startswith(field.split(".")[0])


def test_secrets_are_masked_wherever_they_sit():
    shown = mask({"alerts": {"sinks": {"hook": {"url": "http://x", "secret": "s3cr3t-s3cr3t-s3cr3t"}}},
                  "token": "", "n": 1})
    assert shown == {"alerts": {"sinks": {"hook": {"url": "http://x", "secret": "***"}}}, "token": "", "n": 1}


# ---- on the allocator ------------------------------------------------------------------------------
def test_changes_apply_at_once_are_audited_and_survive_a_restart(tmp_path):
    a, b = FakeBackend("b1"), FakeBackend("b2")

    async def first() -> tuple[Any, ...]:
        alloc = make(tmp_path, [a, b])
        await alloc.ready()
        # the tenant may use b2 only from now on: its next job goes there
        out = await alloc.set_config({"tenant_backends.t1": ["b2"], "placement.explore_factor": 1.0},
                                     actor="ops-alice")
        rec = await alloc.submit(prepared(tenant="t1"))
        done = await alloc.wait(rec["id"], timeout=10)
        with pytest.raises(ConfigError):
            await alloc.set_config({"tenant_backends.t1": ["b2"], "max_attempts": 0}, actor="ops-bob")
        audit = await alloc.audit("config")
        return out, done, alloc.settings, audit

    out, done, s1, audit = asyncio.run(asyncio.wait_for(first(), 30))
    assert out["changed"]["tenant_backends.t1"] == {"old": None, "new": ["b2"]}
    assert done["result"]["backend"] == "b2"
    assert s1.max_attempts == 5                        # the refused change applied nothing
    assert [(r["actor"], r["action"]) for r in audit] == [("ops-alice", "config.set")]
    assert audit[0]["new"] == {"tenant_backends.t1": ["b2"], "placement.explore_factor": 1.0}

    async def again() -> tuple[Any, ...]:
        alloc = make(tmp_path, [a, b])
        await alloc.ready()
        view = await alloc.config()
        reset = await alloc.set_config({}, actor="ops-alice", unset=["tenant_backends"])
        return view, reset, alloc.settings

    view, reset, s2 = asyncio.run(asyncio.wait_for(again(), 30))
    assert view["overrides"] == {"tenant_backends.t1": ["b2"], "placement.explore_factor": 1.0}
    assert view["settings"]["tenant_backends"] == {"t1": ["b2"]}
    assert reset["changed"]["tenant_backends"]["new"] == {}
    assert s2.tenant_backends == {} and s2.placement.explore_factor == 1.0


def test_a_queued_job_is_planned_again_under_new_permissions(tmp_path):
    hold, other = FakeBackend("b1", behaviour="hang"), FakeBackend("b2", behaviour="hang")

    async def main() -> tuple[Any, ...]:
        alloc = make(tmp_path, [hold, other], cpus=1.0)
        await alloc.ready()
        await alloc.set_config({"tenant_backends.t1": ["b1"]}, actor="ops")
        first = await alloc.submit(prepared(tenant="t1"))          # takes b1 and hangs
        waiting = await alloc.submit(prepared(tenant="t1"))        # waits for b1
        await asyncio.sleep(0.3)
        before = sorted(alloc.d.queued[waiting["id"]].plan.estimates)
        await alloc.set_config({"tenant_backends.t1": ["b2"]}, actor="ops")
        after = sorted(alloc.d.queued[waiting["id"]].plan.estimates) if waiting["id"] in alloc.d.queued else None
        for f in (hold, other):
            f.hang.set()
        return first, before, after

    first, before, after = asyncio.run(asyncio.wait_for(main(), 30))
    assert before == ["b1"] and after in (["b2"], None)    # None: it already started on b2


# ---- over HTTP with the CLI -------------------------------------------------------------------------
def test_the_cli_reads_and_changes_the_running_service(server, monkeypatch):
    monkeypatch.setenv("QALLOC_URL", server.url)
    monkeypatch.setenv("QALLOC_TOKEN", server.token(f"ops{uuid.uuid4().hex[:8]}", admin=True))
    runner = CliRunner()
    try:
        out = runner.invoke(app, ["config", "set", "placement.coherence_budget", "2.5"])
        assert out.exit_code == 0 and "1.0 → 2.5" in out.output, out.output
        got = runner.invoke(app, ["-o", "json", "config", "get", "placement.coherence_budget"])
        assert got.exit_code == 0 and json.loads(command_output(got.output))["value"] == 2.5, got.output
        bad = runner.invoke(app, ["config", "set", "placement.coherence_budget", "-3"])
        assert bad.exit_code != 0 and "placement.coherence_budget" in bad.output, bad.output
        frozen = runner.invoke(app, ["config", "set", "namespace", "other"])
        assert frozen.exit_code != 0 and "restart" in frozen.output, frozen.output
        table = runner.invoke(app, ["config", "get"])
        assert table.exit_code == 0 and "placement" in table.output and "yes" in table.output
    finally:
        back = runner.invoke(app, ["config", "unset", "placement.coherence_budget"])
        assert back.exit_code == 0, back.output
    audit = runner.invoke(app, ["-o", "json", "audit", "--key", "config", "--limit", "2"])
    rows = json.loads(command_output(audit.output))
    assert rows[0]["new"] == {} and rows[1]["new"] == {"placement.coherence_budget": 2.5}


def test_pool_membership_changes_on_the_running_service(server, monkeypatch):
    """A QPU and a method leave the pool with the CLI and come back: gone from placement (a job
    naming them is refused as unknown), back serving after the reset, nothing restarted."""
    import time

    from ray_qalloc.client import Client
    from ray_qalloc.exceptions import QAllocError

    monkeypatch.setenv("QALLOC_URL", server.url)
    admin_token = server.token(f"ops{uuid.uuid4().hex[:8]}", admin=True)
    monkeypatch.setenv("QALLOC_TOKEN", admin_token)
    runner = CliRunner()
    smaller = ["statevector", "matrix_product_state", "stabilizer", "qpu_torino", "qpu_fez"]
    bell = 'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2];\ncreg c[2];\nh q[0];\ncx q[0],q[1];\nmeasure q -> c;\n'

    def names(c: Client) -> set[str]:
        return {b["name"] for b in c.backends()}

    def wait_until(cond, what: str, limit: float = 60.0) -> None:
        end = time.monotonic() + limit
        while not cond():
            assert time.monotonic() < end, f"timed out waiting for {what}"
            time.sleep(0.25)

    with Client(server.url, admin_token) as c:
        before = names(c)
        assert "qpu_sherbrooke" in before and any(n.endswith("/density_matrix") for n in before), before
        try:
            out = runner.invoke(app, ["config", "set", "pool", json.dumps(smaller)])
            assert out.exit_code == 0, out.output
            wait_until(lambda: "qpu_sherbrooke" not in names(c)
                       and not any(n.endswith("/density_matrix") for n in names(c)), "the leavers to go")
            with pytest.raises(QAllocError, match="unknown backend"):
                c.submit(bell, shots=10, backends=["qpu_sherbrooke"])
            # what stays serves as before
            assert c.submit(bell, shots=10, backends=["qpu_fez"]).result(timeout=60).backend == "qpu_fez"
            bad = runner.invoke(app, ["config", "set", "pool", json.dumps(smaller + ["qpu_atlantis"])])
            assert bad.exit_code != 0 and "qpu_atlantis" in bad.output, bad.output
        finally:
            back = runner.invoke(app, ["config", "unset", "pool"])
            assert back.exit_code == 0, back.output
        wait_until(lambda: any(b["name"] == "qpu_sherbrooke" and b["healthy"] for b in c.backends()),
                   "qpu_sherbrooke back and healthy")
        assert any(n.endswith("/density_matrix") for n in names(c))
        r = c.submit(bell, shots=10, backends=["qpu_sherbrooke"]).result(timeout=60)
        assert r.backend == "qpu_sherbrooke"
        assert names(c) == before


def test_a_live_explore_factor_reaches_the_model_under_its_wrappers():
    """Wrappers forward reads, so the factor used to land on the wrapper where nothing reads it."""
    from ray_qalloc.costmodel.memory import MemoryPredictor
    from ray_qalloc.liveconfig import _explore

    class Model:
        def __init__(self) -> None:
            self.explore_factor = 4.0

    model = Model()
    wrapped = MemoryPredictor(MemoryPredictor(model))
    _explore(wrapped, 2.5)
    assert model.explore_factor == 2.5
    assert "explore_factor" not in vars(wrapped) and "explore_factor" not in vars(wrapped.base)
    assert wrapped.explore_factor == 2.5          # what the wrappers read through
    _explore(object(), 3.0)                       # a predictor without exploration: nothing to set
