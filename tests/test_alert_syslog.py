"""The syslog sink against a real rsyslogd (tests/rsyslog.py), and RFC 5424 formatting on its own.

What is asserted is what rsyslog wrote with its RFC 5424 template, parsed back: PRI
(facility × 8 + severity), header fields, structured data with escapes, and the message.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_qalloc.alerts import (
    AlertEngine, DeliveryError, Dispatcher, MemoryUsage, Observations, Outbox, SyslogConfig, SyslogSink,
    format_rfc5424, load_rules,
)
from ray_qalloc.alerts.engine import AlertEvent
from ray_qalloc.alerts.rules import Severity
from ray_qalloc.alerts.sinks import octet_frame, syslog_severity

pytest.register_assert_rewrite("tests.rsyslog")   # imported here before pytest loads it as a plugin
from tests.rsyslog import Rsyslog, parse_rfc5424  # noqa: E402

pytest_plugins = ["tests.rsyslog"]   # the fixture, and its line in the terminal summary

AT = 1_767_225_600.123456   # 2026-01-01T00:00:00.123456Z


def event(status: str = "firing", severity: str = "error", summary: str = "node n1 memory 95% used",
          labels: dict[str, str] | None = None, key: str = "k-1", **extra: Any) -> dict[str, Any]:
    return AlertEvent(key=key, status=status, rule="mem", kind="node_memory", severity=Severity(severity),  # type: ignore[arg-type]
                      fingerprint="f" * 32, labels=labels if labels is not None else {"node": "n1"},
                      summary=summary, at=AT, active_since=AT - 30, fired_at=AT, value=0.95, threshold=0.9,
                      **extra).to_dict()


def sink(server: Rsyslog, transport: str, **cfg: Any) -> SyslogSink:
    port = server.tcp_port if transport == "tcp" else server.udp_port
    return SyslogSink("syslog", SyslogConfig(host="127.0.0.1", port=port, transport=transport,
                                             hostname="qalloc-head", **cfg))


# ---- formatting alone (no daemon needed) ------------------------------------------------------------
def test_format_has_every_rfc5424_field() -> None:
    line = format_rfc5424(event(labels={"node": "n1", "team": "hpc"}), facility=16, hostname="h1",
                          procid="42", bom=True).decode()
    m = parse_rfc5424(line)
    assert (m.pri, m.version, m.timestamp, m.hostname, m.app_name, m.procid, m.msgid) == (
        16 * 8 + 3, 1, "2026-01-01T00:00:00.123456Z", "h1", "ray-qalloc", "42", "alert-firing")
    assert m.sd["alert@32473"] == {"status": "firing", "rule": "mem", "kind": "node_memory", "severity": "error",
                                   "fingerprint": "f" * 32, "key": "k-1", "value": "0.95", "threshold": "0.9",
                                   "active_since": "2025-12-31T23:59:30.123456Z",
                                   "fired_at": "2026-01-01T00:00:00.123456Z"}
    assert m.sd["labels@32473"] == {"node": "n1", "team": "hpc"}
    assert line.split("] ", 2)[-1].startswith("\ufeff") and m.msg == "node n1 memory 95% used"
    assert octet_frame(line.encode()).startswith(f"{len(line.encode())} <".encode())


@pytest.mark.parametrize(("status", "severity", "expected"), [
    ("firing", "critical", 2), ("firing", "error", 3), ("firing", "warning", 4), ("firing", "notice", 5),
    ("firing", "info", 6), ("resolved", "critical", 6), ("suppressed", "notice", 5)])
def test_severity_mapping(status: str, severity: str, expected: int) -> None:
    assert syslog_severity(event(status=status, severity=severity)) == expected


sd_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufeff"), max_size=40)


@settings(max_examples=200, deadline=None)
@given(labels=st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_]{0,31}", fullmatch=True), sd_text, max_size=4),
       summary=sd_text)
def test_structured_data_escaping_round_trips(labels: dict[str, str], summary: str) -> None:
    m = parse_rfc5424(format_rfc5424(event(labels=labels, summary=summary), max_bytes=65_000).decode())
    assert m.sd.get("labels@32473", {}) == labels
    assert m.msg == re.sub(r"[\x00-\x1f\x7f]+", " ", summary).strip()


def test_message_is_one_line_and_cut_to_fit_on_a_character_boundary() -> None:
    raw = format_rfc5424(event(summary="line one\nline two\t" + "é" * 2000), max_bytes=600)
    assert len(raw) <= 600 and b"\n" not in raw
    m = parse_rfc5424(raw.decode("utf-8"))   # would raise on half a character
    assert m.msg.startswith("line one line two ") and set(m.msg[18:]) == {"é"}
    with pytest.raises(DeliveryError) as err:
        format_rfc5424(event(labels={f"k{i}": "v" * 200 for i in range(10)}), max_bytes=600)
    assert err.value.permanent


def test_a_closed_port_is_a_retryable_delivery_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tcp = SyslogSink("s", SyslogConfig(port=port, transport="tcp", timeout_s=1))
    with pytest.raises(DeliveryError) as err:
        tcp.send(event())
    assert not err.value.permanent and "Connection refused" in str(err.value)


# ---- through rsyslog ------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_rsyslog_receives_severity_structured_data_and_message(rsyslog: Rsyslog, transport: str) -> None:
    s = sink(rsyslog, transport, facility="local3")
    tricky = {"node": "n1", "team": 'q"uo]te\\back', "site": "Zürich μ"}
    sent = [event(status="firing", severity=sev, key=f"{transport}-{sev}", labels=tricky,
                  summary=f"{sev} alert über {transport}") for sev in ("critical", "error", "warning")]
    sent.append(event(status="resolved", severity="critical", key=f"{transport}-resolved", labels=tricky,
                      summary="cleared"))
    sent.append(event(status="suppressed", severity="notice", key=f"{transport}-sum", labels={},
                      summary="rule mem: 7 notifications held back",
                      details={"suppressed": 7, "by_status": {"firing": 5, "resolved": 2}}))
    try:
        for e in sent:
            s.send(e)
    finally:
        s.close()
    keys = {e["key"] for e in sent}
    got = rsyslog.wait_for(lambda m: m.sd.get("alert@32473", {}).get("key") in keys, count=len(sent))
    by_key = {m.sd["alert@32473"]["key"]: m for m in got}
    assert set(by_key) == keys and len(got) == len(sent)     # each exactly once
    for e in sent:
        m = by_key[e["key"]]
        assert m.facility == 19 and m.severity == syslog_severity(e)
        assert (m.hostname, m.app_name, m.procid, m.msgid) == ("qalloc-head", "ray-qalloc", str(os.getpid()),
                                                               f"alert-{e['status']}")
        assert dt.datetime.fromisoformat(m.timestamp.replace("Z", "+00:00")).timestamp() == pytest.approx(AT)
        assert m.sd["alert@32473"]["status"] == e["status"] and m.sd["alert@32473"]["rule"] == "mem"
        assert m.msg == e["summary"]
        if e["labels"]:
            assert m.sd["labels@32473"] == tricky
    assert [by_key[f"{transport}-{s}"].severity for s in ("critical", "error", "warning", "resolved", "sum")] == [
        2, 3, 4, 6, 5]
    assert by_key[f"{transport}-sum"].sd["summary@32473"] == {"suppressed": "7", "firing": "5", "resolved": "2"}


def test_alerts_flow_from_engine_through_the_outbox_to_rsyslog(rsyslog: Rsyslog, tmp_path: Path) -> None:
    outbox = Outbox(f"sqlite:///{tmp_path / 'alerts.db'}", ["tcp", "udp"])
    sinks = {"tcp": sink(rsyslog, "tcp"), "udp": sink(rsyslog, "udp")}
    engine = AlertEngine(load_rules([{"name": "pressure", "kind": "node_memory", "severity": "critical",
                                      "labels": {"team": "flow-test"}}]))
    obs = Observations(node_memory={f"w{i}": MemoryUsage(97, 100) for i in range(5)})
    fired = engine.step(obs, commit=outbox.enqueue).events
    resolved = engine.step(Observations(), commit=outbox.enqueue).events
    report = Dispatcher(outbox, sinks).deliver_due()
    for s in sinks.values():
        s.close()
    outbox.close()
    assert report.delivered == {"tcp": 10, "udp": 10}
    got = rsyslog.wait_for(lambda m: m.sd.get("labels@32473", {}).get("team") == "flow-test", count=20)
    keys = [m.sd["alert@32473"]["key"] for m in got]
    assert sorted(keys) == sorted(2 * [e.key for e in (*fired, *resolved)])   # each key once per transport
    severities = {(m.sd["alert@32473"]["status"], m.severity) for m in got}
    assert severities == {("firing", 2), ("resolved", 6)}
