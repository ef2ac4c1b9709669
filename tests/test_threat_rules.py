"""Threat rules on a real allocator (small fake backends): security events stored by the event
store are judged; a rule boosts a tenant (explain names the rule and the event), a rate rule
pauses a tenant only once its count is reached, a template rule submits jobs; a restarted
allocator judges the same events again without acting twice."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ray_qalloc.config import RuleMatch, ThreatRule, ThreatSettings, load_settings
from ray_qalloc.integration import parse_records
from ray_qalloc.integration.eventstore import EventStore
from ray_qalloc.jobs import Priority
from ray_qalloc.threatrules import RuleEngine, matches
from tests.helpers import prepared
from tests.test_allocator_unit import FakeBackend, make, run_async

BELL = 'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2];\ncreg c[2];\nh q[0];\ncx q[0],q[1];\nmeasure q -> c;\n'

RULES = {
    "poll_s": 0.05,
    "rules": [
        {"name": "ransomware", "match": {"severity_min": 5, "message_contains": "ransom"},
         "action": {"kind": "boost", "tenant": "soc", "to": "emergency", "for_s": 600}},
        {"name": "bruteforce", "match": {"message_contains": "failed login"}, "rate": {"count": 5, "window_s": 30},
         "action": {"kind": "pause", "tenant": "$event.tenant", "for_s": 600}},
        {"name": "triage", "match": {"observables": {"ip": ["203.0.113.66"]}},
         "action": {"kind": "submit", "tenant": "soc", "template": "triage"}},
    ],
    "templates": {"triage": {"jobs": [{"qasm": BELL, "shots": 64, "priority": "high"}]}},
}


def cef(i: int, name: str, sev: int, src: str = "198.51.100.7") -> str:
    return f"CEF:0|Acme|IDS|1.0|{100 + i}|{name}|{sev}|src={src} dst=10.0.0.{i % 250 + 1} rt={1_700_000_000_000 + i}"


def put(store: EventStore, tenant: str, *lines: str) -> None:
    events = [e for e in parse_records("\n".join(lines), "application/cef", tenant=tenant) if not hasattr(e, "reason")]
    assert len(events) == len(lines)
    store.add_many(events)


async def until(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def test_rules_turn_events_into_actions_once(tmp_path):
    async def first() -> dict[str, Any]:
        a = FakeBackend("a", delay=0.05)
        alloc = make(tmp_path, [a], cpus=1.0, threat=RULES)
        await alloc.ready()
        store = EventStore(alloc.store.engine)
        soc_job = (await alloc.submit(prepared(tenant="soc", priority=Priority.BATCH)))["id"]
        await asyncio.sleep(0.3)       # the engine has started reading (it starts from now)
        put(store, "sensors", cef(1, "ransom note written by svc.exe", 10))
        await until(lambda: "rule:ransomware:soc" in alloc.threat.actions)
        action = alloc.threat.actions["rule:ransomware:soc"]
        # four failed logins from one tenant: nothing; the fifth pauses it
        put(store, "lab", *[cef(10 + i, "failed login for root", 5) for i in range(4)])
        await asyncio.sleep(0.4)
        paused_early = "rule:bruteforce:lab" in alloc.threat.actions
        put(store, "lab", cef(20, "failed login for root", 5))
        await until(lambda: "rule:bruteforce:lab" in alloc.threat.actions)
        put(store, "sensors", cef(30, "beacon to known C2", 8, src="203.0.113.66"))
        await until(lambda: len([j for j in alloc.d.queued.values() if j.job.tenant == "soc"])
                    + len([r for r in alloc.d.running.values() if r.job.tenant == "soc"]) >= 1
                    and alloc.rule_engine is not None and alloc.rule_engine.fired >= 3)
        return {"action": action, "paused_early": paused_early, "paused": set(alloc.d.paused),
                "explain": (await alloc.explain(soc_job)).get("priority"),
                "fired": alloc.rule_engine.fired}

    out = run_async(first)
    assert out["action"].kind == "boost" and out["action"].tenant == "soc" and out["action"].to == "emergency"
    assert out["action"].rule == "ransomware" and out["action"].event_id
    assert out["paused_early"] is False and out["paused"] == {"lab"}
    if out["explain"] is not None:      # still queued when asked: the boost is named
        assert out["explain"]["changed_by"]["rule"] == "ransomware"

    async def second() -> tuple[int, set[str], int]:
        # a restart judges the same events again: the actions are in force already, the
        # template's jobs exist already (idempotency keys): nothing happens twice
        alloc = make(tmp_path, [FakeBackend("a", delay=0.05)], cpus=1.0, threat=RULES)
        await alloc.ready()
        await until(lambda: alloc.rule_engine is not None and alloc.rule_engine.judged > 0, timeout=10)
        await asyncio.sleep(0.3)
        return len(alloc.threat.actions), set(alloc.d.paused), alloc.rule_engine.judged

    n_actions, paused, judged = run_async(second)
    assert n_actions == 2 and paused == {"lab"} and judged >= 7
    import sqlalchemy as sa

    from ray_qalloc.store import JobStore, jobs_table

    store = JobStore(load_settings(data_dir=tmp_path).resolved_store_url)
    with store.engine.connect() as conn:     # the template's one job, submitted once across the restart
        n = conn.execute(sa.select(sa.func.count()).where(jobs_table.c.tenant == "soc",
                                                          jobs_table.c.shots == 64)).scalar_one()
    assert n == 1


def test_matching_conditions_each_narrow_the_rule():
    class Row:
        tenant, severity_id, category_uid, class_uid, format, message = "soc", 4, 2, 2004, "cef", "Ransom NOTE"

    def rule(**m: Any) -> ThreatRule:
        return ThreatRule(name="r", match=RuleMatch(**m), action={"kind": "pause"})

    ev = {"observables": [{"kind": "ip", "value": "10.1.1.1"}]}
    assert matches(rule(), Row, ev)
    assert matches(rule(severity_min=4, categories=[2], classes=[2004], tenants=["soc"], formats=["cef"],
                        message_contains="ransom", observables={"ip": ["10.1.1.1"]}), Row, ev)
    for bad in ({"severity_min": 5}, {"categories": [1]}, {"classes": [1]}, {"tenants": ["x"]}, {"formats": ["stix"]},
                {"message_contains": "worm"}, {"observables": {"ip": ["10.9.9.9"]}}):
        assert not matches(rule(**bad), Row, ev), bad


def test_a_rule_naming_a_missing_template_is_refused():
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not in threat.templates"):
        ThreatSettings(rules=[{"name": "x", "action": {"kind": "submit", "template": "nope"}}])
    with pytest.raises(ValidationError, match="unique"):
        ThreatSettings(rules=[{"name": "x", "action": {"kind": "pause"}}] * 2)


def test_late_commits_within_the_settle_window_are_judged_once(tmp_path):
    """An event whose received time is older than what was already read (a replica that
    committed late) is still judged, by the next sweep, and only once."""
    from ray_qalloc.store import make_engine

    engine = make_engine(f"sqlite:///{tmp_path}/e.db")
    store = EventStore(engine)
    rules = ThreatSettings(settle_s=0.5, rules=[{"name": "any", "action": {"kind": "pause"}}])
    eng = RuleEngine(engine)
    t0 = time.time()
    assert eng.read(rules, now=t0) == []
    early = [e for e in parse_records(cef(1, "early", 3), "application/cef", tenant="a", received_at=None)]
    put(store, "a", cef(2, "on time", 3))
    assert [f.message for f in eng.read(rules, now=time.time())] == ["on time"]
    # committed now, but received before what was read: the sweep after settle_s finds it
    late = early[0].model_copy(update={"received_at": early[0].received_at.replace(year=early[0].received_at.year)})
    import datetime as dt

    late = late.model_copy(update={"received_at": dt.datetime.fromtimestamp(t0 - 0.1, dt.timezone.utc)})
    store.add_many([late])
    assert eng.read(rules, now=time.time()) == []            # not a sweep yet: new rows only
    fires = eng.read(rules, now=time.time() + 1.0)           # a sweep
    assert [f.message for f in fires] == ["early"]
    assert eng.read(rules, now=time.time() + 2.0) == []      # judged once
