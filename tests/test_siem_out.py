"""Alerts (and job / audit records) in a SIEM's own formats: OCSF 1.3 and CEF, and the sinks' ``format``.

OCSF output is checked against the attributes the 1.3 schema requires of each class (base
event + class), with their types; CEF output is read back by a small CEF reader written
here from the CEF rules, independent of the formatter (and of ``integration.cef``), over
arbitrary text.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_qalloc.alerts.engine import AlertEvent
from ray_qalloc.alerts.rules import Severity
from ray_qalloc.alerts.sinks import (
    SplunkHecConfig, SyslogConfig, SyslogSink, WebhookConfig, WebhookSink, canonical_body, verify_signature,
)
from ray_qalloc.config import load_settings
from ray_qalloc.exceptions import ConfigError
from ray_qalloc.integration.cef_out import alert_cef, escape_extension, escape_header
from ray_qalloc.integration.formats import SOURCETYPES, render_alert
from ray_qalloc.integration.ocsf_out import api_activity, detection_finding, scheduled_job_activity

AT = 1_767_225_600.123456   # 2026-01-01T00:00:00.123456Z
SECRET = "s3cret-for-tests-only-0123456789"


def event(status: str = "firing", severity: str = "error", summary: str = "node n1 memory 95% used",
          labels: dict[str, str] | None = None, key: str = "k-1", rule: str = "mem", **extra: Any) -> dict[str, Any]:
    return AlertEvent(key=key, status=status, rule=rule, kind="node_memory", severity=Severity(severity),  # type: ignore[arg-type]
                      fingerprint="f" * 32, labels=labels if labels is not None else {"node": "n1"},
                      summary=summary, at=AT, active_since=AT - 30, fired_at=AT, value=0.95, threshold=0.9,
                      **extra).to_dict()


# ---- a CEF reader, from the CEF rules alone ------------------------------------------------------
def read_cef(line: str) -> tuple[list[str], dict[str, str]]:
    """(the 7 header fields after "CEF:0", the extension as key → value), escapes undone."""
    assert line.startswith("CEF:0|"), line
    header: list[str] = []
    cur, i = [], len("CEF:0|")
    while len(header) < 6:
        c = line[i]
        if c == "\\" and line[i + 1] in "\\|":
            cur.append(line[i + 1])
            i += 2
        elif c == "|":
            header.append("".join(cur))
            cur = []
            i += 1
        else:
            assert c not in "\r\n", "a header may not span lines"
            cur.append(c)
            i += 1
    ext = line[i:]
    # tokens: (character, escaped?) — a key ends at an unescaped "=", which values never hold
    toks: list[tuple[str, bool]] = []
    j = 0
    escapes = {"\\": "\\", "=": "=", "n": "\n", "r": "\r"}
    while j < len(ext):
        if ext[j] == "\\" and j + 1 < len(ext) and ext[j + 1] in escapes:
            toks.append((escapes[ext[j + 1]], True))
            j += 2
        else:
            assert ext[j] not in "\r\n", "a raw line break in the extension"
            toks.append((ext[j], False))
            j += 1
    eqs = [k for k, (c, esc) in enumerate(toks) if c == "=" and not esc]
    starts = []   # (key start, "=" position)
    for q in eqs:
        s = q
        while s > 0 and not (toks[s - 1] == (" ", False)):
            s -= 1
        starts.append((s, q))
    values: dict[str, str] = {}
    for n, (s, q) in enumerate(starts):
        key = "".join(c for c, _ in toks[s:q])
        assert re.fullmatch(r"[A-Za-z0-9_]+", key), key
        end = starts[n + 1][0] - 1 if n + 1 < len(starts) else len(toks)
        values[key] = "".join(c for c, _ in toks[q + 1:end])
    return header, values


# ---- OCSF: shapes ---------------------------------------------------------------------------------
INT, STR, DICT, LIST, BOOL = int, str, dict, list, bool
BASE_REQUIRED = {"class_uid": INT, "category_uid": INT, "activity_id": INT, "type_uid": INT, "time": INT,
                 "severity_id": INT, "metadata": DICT}
CLASS_REQUIRED = {2004: {"finding_info": DICT}, 1006: {"job": DICT, "actor": DICT, "device": DICT},
                  6003: {"actor": DICT, "api": DICT, "src_endpoint": DICT}}


def check_ocsf(rec: dict[str, Any], class_uid: int, category_uid: int) -> None:
    for name, kind in {**BASE_REQUIRED, **CLASS_REQUIRED[class_uid]}.items():
        assert name in rec, f"required attribute {name} missing"
        assert isinstance(rec[name], kind) and not (kind is INT and isinstance(rec[name], bool)), name
    assert rec["class_uid"] == class_uid and rec["category_uid"] == category_uid
    assert rec["type_uid"] == class_uid * 100 + rec["activity_id"]
    assert rec["type_name"].endswith(": " + rec["activity_name"])
    assert rec["severity_id"] in (0, 1, 2, 3, 4, 5, 6, 99)
    md = rec["metadata"]
    assert md["version"] == "1.3.0" and isinstance(md["uid"], str) and md["uid"]
    assert md["product"]["name"] == "ray-qalloc" and md["product"]["vendor_name"] and md["product"]["version"]
    assert "null" not in json.dumps(rec, allow_nan=False)   # unknown attributes are left out, not null
    for obs in rec.get("observables", []):
        assert isinstance(obs["name"], str) and isinstance(obs["type_id"], int)
        # an observable names the attribute it points at: that attribute holds the value
        m = re.fullmatch(r"resources\[(\d+)\]\.uid", obs["name"])
        assert m and rec["resources"][int(m.group(1))]["uid"] == obs["value"]


def test_detection_finding_create_close_and_summary() -> None:
    labels = {"backend": "ibm_fez", "tenant": "acme", "team": "qc"}
    fire = detection_finding(event(labels=labels))
    check_ocsf(fire, 2004, 2)
    assert (fire["activity_id"], fire["type_uid"], fire["is_alert"], fire["status_id"]) == (1, 200401, True, 1)
    assert fire["time"] == 1_767_225_600_123 and fire["start_time"] == 1_767_225_570_123
    fi = fire["finding_info"]
    assert fi["uid"] == "f" * 32 and fi["title"] == "mem on backend ibm_fez, tenant acme"
    assert fi["desc"] == "node n1 memory 95% used" and fi["created_time"] == fire["time"]
    assert fi["analytic"] == {"name": "mem", "uid": "mem", "type_id": 1, "type": "Rule", "category": "node_memory"}
    assert fire["metadata"]["uid"] == "k-1" and fire["metadata"]["tenant_uid"] == "acme"
    assert [(r["type"], r["uid"]) for r in fire["resources"]] == [("backend", "ibm_fez"), ("tenant", "acme")]
    assert {o["type_id"] for o in fire["observables"]} == {10}
    assert fire["unmapped"]["labels"] == labels and fire["unmapped"]["value"] == 0.95

    close = detection_finding(event(status="resolved", labels=labels, key="k-2"))
    check_ocsf(close, 2004, 2)
    assert (close["activity_id"], close["type_uid"], close["is_alert"], close["status_id"]) == (3, 200403, False, 4)
    assert close["finding_info"]["uid"] == fi["uid"]            # the SIEM pairs Close with Create
    assert close["severity_id"] == fire["severity_id"] == 4 and close["end_time"] == close["time"]

    summary = detection_finding(event(status="suppressed", severity="notice", labels={}, key="k-3",
                                      details={"suppressed": 7, "by_status": {"firing": 7}}))
    check_ocsf(summary, 2004, 2)
    assert (summary["activity_id"], summary["activity_name"], summary["is_alert"]) == (99, "Rate-limit summary", False)
    assert "resources" not in summary and summary["unmapped"]["details"]["suppressed"] == 7


@pytest.mark.parametrize(("severity", "expected"), [("critical", 5), ("error", 4), ("warning", 3), ("notice", 2),
                                                    ("info", 1)])
def test_ocsf_severity_mapping(severity: str, expected: int) -> None:
    assert detection_finding(event(severity=severity))["severity_id"] == expected


def test_non_finite_values_travel_as_absent() -> None:
    e = event()
    e["value"] = float("inf")   # to_dict() already nulls these; a hand-made dict may not
    assert "value" not in detection_finding(e)["unmapped"]


JOB = {"job_id": "j-42", "tenant": "acme", "from_state": "queued", "to_state": "running", "backend": "aer-cpu",
       "time": AT, "reason": "placed: fastest expected"}


@pytest.mark.parametrize(("from_state", "to_state", "activity", "run_state", "status_id"), [
    (None, "queued", 1, 2, 1), ("queued", "running", 6, 3, 1), ("running", "queued", 2, 2, 1),
    ("running", "completed", 2, 4, 1), ("running", "failed", 2, 4, 2), ("queued", "cancelled", 3, 4, 1)])
def test_scheduled_job_activity(from_state: str | None, to_state: str, activity: int, run_state: int,
                                status_id: int) -> None:
    rec = scheduled_job_activity({**JOB, "from_state": from_state, "to_state": to_state}, host="head-1")
    check_ocsf(rec, 1006, 1)
    assert rec["activity_id"] == activity and rec["type_uid"] == 100600 + activity
    job = rec["job"]
    assert (job["name"], job["run_state_id"], job["user"]["name"]) == ("j-42", run_state, "acme")
    assert job["file"]["name"] == "j-42.qasm" and isinstance(job["file"]["type_id"], int)   # required by OCSF
    assert rec["status_id"] == status_id and rec["device"]["hostname"] == "head-1"
    assert rec["metadata"]["tenant_uid"] == "acme" and rec["unmapped"]["backend"] == "aer-cpu"


def test_job_record_uid_is_deterministic_and_overridable() -> None:
    a, b = scheduled_job_activity(JOB), scheduled_job_activity(dict(JOB))
    assert a["metadata"]["uid"] == b["metadata"]["uid"] and len(a["metadata"]["uid"]) == 32
    assert scheduled_job_activity({**JOB, "to_state": "failed"})["metadata"]["uid"] != a["metadata"]["uid"]
    assert scheduled_job_activity({**JOB, "uid": "tx-9"})["metadata"]["uid"] == "tx-9"


AUDIT = {"actor": "alice", "action": "config.set", "key": "alerts.interval_s", "old": 5, "new": 10, "time": AT,
         "outcome": "success", "src_ip": "10.0.0.7"}


@pytest.mark.parametrize(("action", "activity"), [("config.set", 3), ("config.unset", 3), ("tenant.create", 1),
                                                  ("config.get", 2), ("token.delete", 4), ("backend.drain", 99)])
def test_api_activity(action: str, activity: int) -> None:
    rec = api_activity({**AUDIT, "action": action})
    check_ocsf(rec, 6003, 6)
    assert rec["activity_id"] == activity and rec["type_uid"] == 600300 + activity
    assert rec["api"]["operation"] == action and rec["actor"]["user"]["name"] == "alice"
    assert rec["resources"] == [{"uid": "alerts.interval_s", "name": "alerts.interval_s", "type": "config",
                                 "data": {"old": 5, "new": 10}}]
    assert rec["src_endpoint"] == {"ip": "10.0.0.7"} and rec["status_id"] == 1
    if activity == 99:
        assert rec["activity_name"] == action


def test_refused_change_is_a_failure_and_bad_records_name_the_field() -> None:
    rec = api_activity({**AUDIT, "outcome": "failure", "reason": "value out of range", "src_ip": None})
    assert (rec["status_id"], rec["status"], rec["status_detail"]) == (2, "Failure", "value out of range")
    assert rec["src_endpoint"] == {"name": "unknown"}
    with pytest.raises(ValueError, match=r"field 'outcome'.*To fix"):
        api_activity({**AUDIT, "outcome": "maybe"})
    with pytest.raises(ValueError, match=r"job transition: field 'job_id'.*To fix"):
        scheduled_job_activity({k: v for k, v in JOB.items() if k != "job_id"})


# ---- CEF ----------------------------------------------------------------------------------------
def test_cef_line_fields_and_severity() -> None:
    line = alert_cef(event(labels={"backend": "ibm_fez", "tenant": "acme", "node": "n1"}), host="head-1",
                     device_id="qalloc-prod")
    header, ext = read_cef(line)
    assert header == ["ray-qalloc", "ray-qalloc", "0.1.0", "mem", "mem on backend ibm_fez, node n1, tenant acme", "8"]
    assert ext["rt"] == "1767225600123" and ext["start"] == "1767225570123" and "end" not in ext
    assert (ext["act"], ext["externalId"], ext["dvchost"], ext["deviceExternalId"]) == (
        "firing", "k-1", "head-1", "qalloc-prod")
    assert (ext["cs1Label"], ext["cs1"], ext["cs2"], ext["cs3"], ext["cs4"], ext["cs5"]) == (
        "fingerprint", "f" * 32, "error", "ibm_fez", "acme", "n1")
    assert json.loads(ext["cs6"]) == {"backend": "ibm_fez", "tenant": "acme", "node": "n1"}
    assert (ext["cfp1"], ext["cfp2"]) == ("0.95", "0.9")
    assert read_cef(alert_cef(event(status="resolved")))[0][5] == "1"
    assert read_cef(alert_cef(event(severity="critical")))[0][5] == "10"


def test_cef_escaping_examples() -> None:
    assert escape_header("a|b\\c\nd") == "a\\|b\\\\c d"
    assert escape_extension("x=1\\2\r\n|") == "x\\=1\\\\2\\r\\n|"


any_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
tricky = st.text(st.sampled_from(list("|=\\\r\n ab=é∑ ")), max_size=20)
text = st.one_of(any_text, tricky)


@settings(max_examples=300, deadline=None)
@given(summary=text, backend=text, tenant=text, rule=text, extra=text)
def test_cef_round_trips_arbitrary_text(summary: str, backend: str, tenant: str, rule: str, extra: str) -> None:
    labels = {"backend": backend, "tenant": tenant, "x": extra}
    header, ext = read_cef(alert_cef(event(summary=summary, labels=labels, rule=rule or "r", key=extra or "k")))
    flat = re.sub(r"\r\n|\r|\n", " ", rule or "r")
    assert header[3] == flat and header[4].startswith(flat)        # header: only line breaks are flattened
    assert ext.get("msg", "") == summary                           # extension: exact
    assert (ext["cs3"], ext["cs4"], ext["externalId"]) == (backend, tenant, extra or "k")
    assert json.loads(ext["cs6"]) == labels


# ---- the sinks' format option -------------------------------------------------------------------
def _capture() -> tuple[httpx.Client, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    return httpx.Client(transport=httpx.MockTransport(handler)), seen


@pytest.mark.parametrize("fmt", ["json", "ocsf", "cef"])
def test_webhook_body_is_the_formatted_record_and_stays_signed(fmt: str) -> None:
    client, seen = _capture()
    kw = {} if fmt == "json" else {"format": fmt}
    sink = WebhookSink("hook", WebhookConfig(url="http://hooks.test/x", secret=SECRET, **kw), client=client)
    e = event()
    sink.send(e)
    req = seen[0]
    body = req.content
    assert verify_signature(SECRET, body, req.headers["X-Qalloc-Timestamp"], req.headers["X-Qalloc-Signature"])
    assert req.headers["Idempotency-Key"] == "k-1"
    if fmt == "json":
        assert body == canonical_body(e) and req.headers["Content-Type"] == "application/json"
    elif fmt == "ocsf":
        assert json.loads(body) == detection_finding(e) and req.headers["Content-Type"] == "application/json"
    else:
        assert body.decode() == alert_cef(e) and req.headers["Content-Type"].startswith("text/plain")


def test_syslog_msg_is_the_record_and_a_record_is_never_cut() -> None:
    from tests.rsyslog import parse_rfc5424

    e = event()
    for fmt in ("ocsf", "cef"):
        m = parse_rfc5424(SyslogSink("s", SyslogConfig(format=fmt, hostname="h1")).format(e).decode())
        assert m.msg == (json.dumps(detection_finding(e), sort_keys=True, separators=(",", ":"))
                         if fmt == "ocsf" else alert_cef(e, host="h1"))
        assert m.sd["alert@32473"]["key"] == "k-1"                       # structured data as before
    assert SyslogConfig(format="ocsf").message_limit == 8192            # TCP: room for a record
    assert SyslogConfig(format="ocsf", max_message_bytes=600).message_limit == 600
    assert SyslogConfig(format="cef", transport="udp").message_limit == 2048
    assert SyslogConfig().message_limit == 2048                          # json: unchanged
    with pytest.raises(Exception) as err:
        SyslogSink("s", SyslogConfig(format="ocsf", max_message_bytes=600)).format(e)
    assert getattr(err.value, "permanent", False) and "To fix" in str(err.value)


def test_sinks_load_from_the_environment_with_format_and_splunk_hec() -> None:
    raw = {"sinks": {
        "splunk": {"type": "splunk_hec", "url": "https://splunk:8088", "token": "0b1c-tok", "index": "qalloc",
                   "format": "ocsf"},
        "arcsight": {"type": "syslog", "host": "10.0.0.5", "format": "cef"},
        "pager": {"type": "webhook", "url": "https://hooks.example/q", "secret": SECRET}}}
    settings_ = load_settings({"QALLOC_ALERTS": json.dumps(raw)})
    configs = settings_.alerts.sink_configs()
    hec = configs["splunk"]
    assert isinstance(hec, SplunkHecConfig) and hec.endpoint == "https://splunk:8088/services/collector/event"
    assert hec.effective_sourcetype == "ocsf:detection_finding" and "0b1c-tok" not in repr(hec)
    assert configs["arcsight"].format == "cef" and configs["pager"].format == "json"
    from ray_qalloc.liveconfig import mask

    assert mask(raw)["sinks"]["splunk"]["token"] == "***"     # `qalloc config get` does not show it
    assert SplunkHecConfig(url="https://s:8088/services/collector/event/", token="t").endpoint.endswith(
        "8088/services/collector/event")
    assert {f: SplunkHecConfig(url="http://s", token="t", format=f).effective_sourcetype for f in SOURCETYPES} == {
        "json": "_json", "ocsf": "ocsf:detection_finding", "cef": "cef"}
    for bad, needle in [({"type": "splunk"}, "type must be one of 'webhook', 'syslog', 'splunk_hec'"),
                        ({"type": "splunk_hec", "url": "https://s"}, "token"),
                        ({"type": "splunk_hec", "url": "ftp://s", "token": "t"}, "url"),
                        ({"type": "syslog", "format": "leef"}, "format")]:
        with pytest.raises((ConfigError, ValueError)) as err:
            load_settings({"QALLOC_ALERTS": json.dumps({"sinks": {"x": bad}})})
        assert needle in str(err.value)


def test_render_alert_json_is_the_event_unchanged() -> None:
    from typing import get_args

    from ray_qalloc.alerts.sinks import SinkFormat
    from ray_qalloc.integration.formats import FORMATS

    assert get_args(SinkFormat) == FORMATS      # the sinks' option and the renderers agree
    e = event()
    assert render_alert(e) == e and render_alert(e, "json") is not e
    with pytest.raises(ValueError, match="To fix"):
        render_alert(e, "leef")
