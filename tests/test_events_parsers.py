"""Security-event parsers (issue #12, "in"): real-world shaped samples per format, every
error path naming its field, and the batch entry point ``parse_records``."""

from __future__ import annotations

import copy
import datetime as dt
import json
import subprocess
import sys
import time

import pytest

from ray_qalloc.exceptions import ConfigError, IntakeError, InvalidEvent, LimitExceeded
from ray_qalloc.integration import (IntakeLimits, RecordError, SecurityEvent, SeverityId,
                                    parse_cef, parse_leef, parse_ocsf, parse_records,
                                    parse_stix, parse_syslog)
from ray_qalloc.integration.events import event_id

NOW = dt.datetime(2024, 6, 15, 12, 0, tzinfo=dt.timezone.utc)
UTC = dt.timezone.utc


def obs(e: SecurityEvent) -> set[tuple[str, str]]:
    return {(o.kind, o.value) for o in e.observables}


# ---------------------------------------------------------------- CEF

CEF_FW = ("CEF:0|Palo Alto Networks|PAN-OS|10.2.4|spyware|Suspicious DNS Query (generic:evil.example)|8|"
          "rt=May 01 2024 12:00:00 UTC src=10.1.2.3 dst=198.51.100.7 spt=51515 dpt=53 proto=UDP "
          r"suser=corp\\alice act=sinkhole request=http://evil.example/a?b=c cs1Label=Rule "
          r"cs1=outbound dns msg=line1\nline2 with \= equals")
CEF_IDS = (r"CEF:0|Trend Micro|Deep Security Agent|20.0|1001250|Pipe \| in name \\ and backslash|Very-High|"
           "cn1=1 cn1Label=Host ID dvchost=web01.corp dvc=2001:db8::10 shost=attacker.example "
           "fileHash=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855 "
           "smac=00:0c:29:aa:bb:cc end=1714564800123")

CEF_CASES = [
    # (line, vendor, name, severity_id, time, observables subset, extensions subset)
    (CEF_FW, "Palo Alto Networks", "Suspicious DNS Query (generic:evil.example)", SeverityId.HIGH,
     dt.datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
     {("ip", "10.1.2.3"), ("ip", "198.51.100.7"), ("port", "53"), ("user", "corp\\alice"),
      ("url", "http://evil.example/a?b=c")},
     {"cs1": "outbound dns", "msg": "line1\nline2 with = equals", "act": "sinkhole"}),
    (CEF_IDS, "Trend Micro", "Pipe | in name \\ and backslash", SeverityId.CRITICAL,
     dt.datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=UTC),
     {("hostname", "web01.corp"), ("ip", "2001:db8::10"), ("hostname", "attacker.example"),
      ("sha256", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
      ("mac", "00:0c:29:aa:bb:cc")},
     {"cn1Label": "Host ID"}),
    ("CEF:0|Fortinet|FortiGate|7.2|0419016384|ips|3|", "Fortinet", "ips", SeverityId.LOW, NOW, set(), {}),
]


@pytest.mark.parametrize("line, vendor, name, sev, when, observables, ext", CEF_CASES)
def test_cef_samples(line, vendor, name, sev, when, observables, ext):
    e = parse_cef(line, received_at=NOW, tenant="soc")
    assert (e.format, e.product.vendor, e.message, e.severity_id, e.time, e.tenant) == (
        "cef", vendor, name, sev, when, "soc")
    assert e.severity == sev.name.capitalize()
    assert observables <= obs(e)
    assert ext.items() <= e.extensions.items()
    assert e.raw == line and e.id == event_id(line)


@pytest.mark.parametrize("prefix, rfc, host", [
    ("<134>1 2024-05-01T12:00:00.123Z fw01.example.com PAN-OS - THREAT - ", "5424", "fw01.example.com"),
    ("<134>May  1 12:00:00 fw01 ", "3164", "fw01"),
    ("May  1 12:00:00 fw01 ", "3164", "fw01"),           # relay dropped <PRI>
    ("<134>May  1 12:00:00 fw01 panos: ", "3164", "fw01"),
])
def test_cef_behind_syslog_header(prefix, rfc, host):
    for parse in (parse_cef, parse_syslog):
        if parse is parse_syslog and not prefix.startswith("<"):
            continue
        e = parse(prefix + CEF_FW, received_at=NOW)
        assert e.format == "cef" and e.syslog is not None and e.syslog.rfc == rfc
        assert e.syslog.hostname == host and ("hostname", host) in obs(e)
        assert e.extensions["cs1"] == "outbound dns"
        assert e.time == dt.datetime(2024, 5, 1, 12, 0, tzinfo=UTC)   # rt wins over the header


CEF_ERRORS = [
    ("CEF:0|a|b|c|d|e", "header"),
    ("CEF:x|a|b|c|d|e|1|", "version"),
    ("CEF:2|a|b|c|d|e|1|", "version"),
    ("cef:0|a|b|c|d|e|1|", "version"),
    ("hello world", "version"),
    (r"CEF:0|a\x|b|c|d|e|1|", "device_vendor"),
    (r"CEF:0|a|b|c|d|na\me|1|", "name"),
    ("CEF:0|a|b|c|d|e|11|", "severity"),
    ("CEF:0|a|b|c|d|e|severe|", "severity"),
    ("CEF:0|a|b|c|d|e|1|garbage src=1.2.3.4", "extension"),
    ("CEF:0|a|b|c|d|e|1|a=1 a=2", "extension.a"),
    (r"CEF:0|a|b|c|d|e|1|msg=bad \q escape", "extension.msg"),
    ("CEF:0|a|b|c|d|e|1|msg=trailing \\", "extension.msg"),
    ("CEF:0|a|b|c|d|e|1|src=999.1.1.1", "extension.src"),
    ("CEF:0|a|b|c|d|e|1|dpt=70000", "extension.dpt"),
    ("CEF:0|a|b|c|d|e|1|rt=yesterday", "extension.rt"),
    ("CEF:0|a|b|c|d|e|1|rt=May 01 2024 12:00:00 IST", "extension.rt"),
    ("<999>1 - - - - - - CEF:0|a|b|c|d|e|1|", "pri"),
    ("<13>Jan 99 10:00:00 host CEF:0|a|b|c|d|e|1|", "timestamp"),
    ("<13>1 2024-05-01T12:00:00Z h a - - - hello CEF:0|a|b|c|d|e|1|", "version"),
]


@pytest.mark.parametrize("line, field", CEF_ERRORS)
def test_cef_errors_name_the_field(line, field):
    with pytest.raises(InvalidEvent) as ei:
        parse_cef(line, received_at=NOW)
    assert ei.value.field == field
    assert ei.value.code == "invalid_event" and isinstance(ei.value, IntakeError)
    assert "To fix:" in str(ei.value) and ei.value.to_dict()["field"] == field


def test_cef_unescaped_equals_in_url_is_text_and_spaces_survive():
    e = parse_cef("CEF:0|v|p|1|id|n|5|request=http://h/p?a=b&c=d msg=two  spaces  k=v", received_at=NOW)
    assert e.extensions == {"request": "http://h/p?a=b&c=d", "msg": "two  spaces ", "k": "v"}


# ---------------------------------------------------------------- LEEF

LEEF_CASES = [
    ("<13>Jan 18 11:07:53 192.168.1.1 LEEF:1.0|Microsoft|MSExchange|4.0 SP1|15345|"
     "src=192.0.2.10\tdst=172.50.123.1\tsev=5\tcat=anomaly\tsrcPort=81\tdstPort=21\t"
     "usrName=joe.black\tdevTime=1714564800000\t",
     "Microsoft", "15345", SeverityId.MEDIUM, dt.datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
     {("ip", "192.0.2.10"), ("port", "21"), ("user", "joe.black"), ("ip", "192.168.1.1")}),
    ("LEEF:2.0|Lancope|StealthWatch|1.0|41|^|src=10.0.1.8^dst=10.0.0.5^sev=9^srcPort=81^dstPort=21^"
     "devTime=May 01 2024 12:00:00.000 UTC^devTimeFormat=MMM dd yyyy HH:mm:ss.SSS z^cat=Exploit^"
     "url=http://x/?q=1",
     "Lancope", "41", SeverityId.CRITICAL, dt.datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
     {("ip", "10.0.1.8"), ("url", "http://x/?q=1")}),
    ("LEEF:2.0|IBM|QRadar|7.5|Login Failed|x09|src=10.0.0.1\tusrName=root\tsev=1",
     "IBM", "Login Failed", SeverityId.LOW, NOW, {("user", "root")}),
    ("LEEF:2.0|Check Point|FW|R81|Drop|0x5E|src=10.0.0.1^sev=0",
     "Check Point", "Drop", SeverityId.UNKNOWN, NOW, {("ip", "10.0.0.1")}),
    ("LEEF:1.0|V|P|1|Evt", "V", "Evt", SeverityId.UNKNOWN, NOW, set()),
]


@pytest.mark.parametrize("line, vendor, code, sev, when, observables", LEEF_CASES)
def test_leef_samples(line, vendor, code, sev, when, observables):
    e = parse_leef(line, received_at=NOW)
    assert (e.format, e.product.vendor_name, e.event_code, e.severity_id, e.time) == (
        "leef", vendor, code, sev, when)
    assert observables <= obs(e)


LEEF_ERRORS = [
    ("LEEF:1.0|V|P", "header"),
    ("LEEF:2.0|V|P|1|E", "header"),
    ("LEEF:3.0|V|P|1|E|", "version"),
    ("LEEF:2.0|V|P|1|E|xZZ|a=b", "delimiter"),
    ("LEEF:2.0|V|P|1|E|x3D|a=b", "delimiter"),
    ("LEEF:1.0|V|P|1|E|a=b\tnovalue", "attributes"),
    ("LEEF:1.0|V|P|1|E|a=b\ta=c", "attributes.a"),
    ("LEEF:1.0|V|P|1|E|sev=12", "attributes.sev"),
    ("LEEF:1.0|V|P|1|E|src=not-an-ip", "attributes.src"),
    ("LEEF:1.0|V|P|1|E|devTime=31/12/2024\tdevTimeFormat=yyyy-MM-dd", "attributes.devTime"),
    ("LEEF:1.0|V|P|1|E\tsrc=1.2.3.4", "event_id"),
    ("no leef here", "version"),
]


@pytest.mark.parametrize("line, field", LEEF_ERRORS)
def test_leef_errors_name_the_field(line, field):
    with pytest.raises(InvalidEvent) as ei:
        parse_leef(line, received_at=NOW)
    assert ei.value.field == field and "To fix:" in str(ei.value)


# ---------------------------------------------------------------- syslog

RFC5424_SD = ('<165>1 2024-05-01T12:00:00.003+02:00 mymachine.example.com evntslog 4242 ID47 '
              '[exampleSDID@32473 iut="3" eventSource="Application \\"x\\" \\\\ \\]" eventID="1011"]'
              '[examplePriority@32473 class="high" class="urgent"] \ufeffAn application event log entry...')


def test_rfc5424_with_structured_data():
    e = parse_syslog(RFC5424_SD, received_at=NOW)
    assert e.format == "syslog" and e.syslog is not None and e.syslog.rfc == "5424"
    assert (e.syslog.facility, e.syslog.severity) == (20, 5)
    assert e.time == dt.datetime(2024, 5, 1, 10, 0, 0, 3000, tzinfo=UTC)
    assert e.syslog.structured_data == {
        "exampleSDID@32473": {"iut": "3", "eventSource": 'Application "x" \\ ]', "eventID": "1011"},
        "examplePriority@32473": {"class": ["high", "urgent"]}}
    assert e.extensions == e.syslog.structured_data
    assert e.message == "An application event log entry..."       # BOM removed
    assert (e.event_code, e.product.name, e.severity_id) == ("ID47", "evntslog", SeverityId.LOW)
    assert {("hostname", "mymachine.example.com"), ("process", "evntslog"), ("pid", "4242")} <= obs(e)


@pytest.mark.parametrize("line, when, host, app, pid, msg, sev", [
    ("<34>Oct 11 22:14:15 mymachine su: 'su root' failed for lonvick on /dev/pts/8",
     dt.datetime(2023, 10, 11, 22, 14, 15, tzinfo=UTC), "mymachine", "su", None,
     "'su root' failed for lonvick on /dev/pts/8", SeverityId.CRITICAL),
    ("<38>Jun  5 07:01:02 10.0.0.9 sshd[1234]: Failed password for root from 203.0.113.5",
     dt.datetime(2024, 6, 5, 7, 1, 2, tzinfo=UTC), "10.0.0.9", "sshd", "1234",
     "Failed password for root from 203.0.113.5", SeverityId.INFORMATIONAL),
    ("<13>Jun 20 00:00:00 host msg without tag", dt.datetime(2024, 6, 20, tzinfo=UTC), "host",
     None, None, "msg without tag", SeverityId.LOW),                  # 5 days ahead: skew
    ("<13>Jun 30 00:00:00 host app: x", dt.datetime(2023, 6, 30, tzinfo=UTC), "host", "app", None,
     "x", SeverityId.LOW),                                           # 15 days ahead: last year
    ("<11>2024-05-01T12:00:00.5Z gw kernel: drop", dt.datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=UTC),
     "gw", "kernel", None, "drop", SeverityId.HIGH),
    ("<8>Feb 29 01:02:03 h t: leap", dt.datetime(2024, 2, 29, 1, 2, 3, tzinfo=UTC), "h", "t", None,
     "leap", SeverityId.FATAL),
    ("<8>1 - - - - - -", NOW, None, None, None, "", SeverityId.FATAL),
])
def test_rfc3164_and_nil_values(line, when, host, app, pid, msg, sev):
    e = parse_syslog(line, received_at=NOW)
    assert (e.time, e.syslog.hostname, e.syslog.app_name, e.syslog.procid, e.message, e.severity_id) == (
        when, host, app, pid, msg, sev)


def test_syslog_leef_inside():
    e = parse_syslog("<13>1 2024-05-01T12:00:00Z qradar-src LEEF - - - LEEF:2.0|V|P|1|E|^|src=10.0.0.1^sev=7",
                     received_at=NOW)
    assert e.format == "leef" and e.syslog.app_name == "LEEF" and e.severity_id == SeverityId.HIGH


SYSLOG_ERRORS = [
    ("no pri", "pri"),
    ("<192>1 - - - - - -", "pri"),
    ("<13>2 - - - - - -", "version"),
    ("<13>1 2024-05-01 h a - - -", "timestamp"),
    ("<13>1 2024-13-01T00:00:00Z h a - - -", "timestamp"),
    ("<13>1 - h a - - x", "structured_data"),
    ('<13>1 - h a - - [id a="1"', "structured_data"),
    ('<13>1 - h a - - [id a="1"][id b="2"]', "structured_data"),
    ('<13>1 - h a - - [id a="1"]x', "structured_data"),
    ('<13>1 - h a - - [id a="unterminated\\"]', "structured_data"),
    ("<13>Foo 11 22:14:15 host x", "timestamp"),
    ("<13>Feb 30 22:14:15 host x", "timestamp"),
    ("<13>1 - - - - - - CEF:0|a|b|c|d|e|12|", "severity"),
]


@pytest.mark.parametrize("line, field", SYSLOG_ERRORS)
def test_syslog_errors_name_the_field(line, field):
    with pytest.raises(InvalidEvent) as ei:
        parse_syslog(line, received_at=NOW)
    assert ei.value.field == field and "To fix:" in str(ei.value)


# ---------------------------------------------------------------- OCSF

DETECTION_FINDING = {
    "class_uid": 2004, "class_name": "Detection Finding", "category_uid": 2, "category_name": "Findings",
    "activity_id": 1, "activity_name": "Create", "type_uid": 200401,
    "time": 1714564800123, "severity_id": 4, "severity": "High",
    "message": "Possible credential dumping via LSASS access",
    "metadata": {"version": "1.3.0", "event_code": "LSASS-ACCESS",
                 "product": {"name": "Defender for Endpoint", "vendor_name": "Microsoft", "version": "4.18"}},
    "finding_info": {"uid": "f-123", "title": "LSASS memory access"},
    "evidences": [{"process": {"name": "mimikatz.exe"},
                   "file": {"name": "mimikatz.exe", "hashes": [{"algorithm_id": 3, "value": "a" * 64}]},
                   "src_endpoint": {"ip": "10.0.0.5", "hostname": "ws-042"}}],
    "observables": [{"name": "device.ip", "type_id": 2, "type": "IP Address", "value": "10.0.0.5"},
                    {"name": "actor.user", "type_id": 21, "value": "x"}],
    "device": {"hostname": "ws-042.corp", "ip": "10.0.0.5"},
    "actor": {"user": {"name": "CORP\\bob"}},
    "x_vendor_field": {"kept": True},
}


def test_ocsf_detection_finding():
    text = json.dumps(DETECTION_FINDING)
    [e] = parse_ocsf(text, received_at=NOW)
    assert (e.class_uid, e.class_name, e.category_uid, e.severity_id, e.activity_name, e.event_code) == (
        2004, "Detection Finding", 2, SeverityId.HIGH, "Create", "LSASS-ACCESS")
    assert e.time == dt.datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=UTC)
    assert (e.product.vendor_name, e.product.name) == ("Microsoft", "Defender for Endpoint")
    assert {("ip", "10.0.0.5"), ("hostname", "ws-042.corp"), ("user", "CORP\\bob"),
            ("sha256", "a" * 64), ("process", "mimikatz.exe"), ("hostname", "ws-042")} <= obs(e)
    assert e.extensions["x_vendor_field"] == {"kept": True} and e.extensions["type_uid"] == 200401
    assert e.extensions["observables"] == [{"name": "actor.user", "type_id": 21, "value": "x"}]
    assert e.raw == text


def test_ocsf_list_and_defaults():
    minimal = {"class_uid": 4001, "time": 0, "severity_id": 99,
               "metadata": {"version": "1.1.0", "product": {"vendor_name": "Zeek"}}}
    a, b = parse_ocsf(json.dumps([minimal, DETECTION_FINDING]), received_at=NOW)
    assert (a.class_name, a.category_uid, a.category_name, a.severity) == (
        "Network Activity", 4, "Network Activity", "Other")
    assert b.class_uid == 2004 and a.id != b.id


def _without(path: str) -> dict:
    doc = copy.deepcopy(DETECTION_FINDING)
    *head, last = path.split(".")
    target = doc
    for k in head:
        target = target[k]
    del target[last]
    return doc


OCSF_ERRORS = [
    (_without("class_uid"), "class_uid"),
    (_without("time"), "time"),
    (_without("severity_id"), "severity_id"),
    (_without("metadata.product"), "metadata.product"),
    (_without("metadata.version"), "metadata.version"),
    ({**DETECTION_FINDING, "severity_id": 7}, "severity_id"),
    ({**DETECTION_FINDING, "severity_id": True}, "severity_id"),
    ({**DETECTION_FINDING, "time": "yesterday"}, "time"),
    ({**DETECTION_FINDING, "time": 10 ** 20}, "time"),
    ({**DETECTION_FINDING, "class_uid": "2004"}, "class_uid"),
    ({**DETECTION_FINDING, "category_uid": 4}, "category_uid"),
    ({**DETECTION_FINDING, "metadata": {"version": "1.3.0", "product": {}}}, "metadata.product"),
    ({**DETECTION_FINDING, "observables": [1]}, "observables.0"),
    ([1], "event"),
]


@pytest.mark.parametrize("doc, field", OCSF_ERRORS)
def test_ocsf_errors_name_the_field(doc, field):
    with pytest.raises(InvalidEvent) as ei:
        parse_ocsf(json.dumps(doc), received_at=NOW)
    assert ei.value.field == field and "To fix:" in str(ei.value)


@pytest.mark.parametrize("text", ["", "{", "NaN", "[" * 100_000, '"str"', "1" * 5000])
def test_ocsf_not_json(text):
    with pytest.raises(InvalidEvent) as ei:
        parse_ocsf(text)
    assert ei.value.field == "json"


# ---------------------------------------------------------------- STIX

IDENT = "identity--f431f809-377b-45e0-aa1c-6a4751cae5ff"
IND = "indicator--8e2e2d2b-17d4-4cbf-938f-98ee46b3cd3f"
MAL = "malware--31b940d4-6f7f-459a-80ea-9c1f17b5891b"
SIG = "sighting--ee20065d-2555-424f-ad9e-0f8428623c75"
OD = "observed-data--b67d30ff-02ac-498a-92f9-32f845f448cf"
IP = "ipv4-addr--ff26c055-6336-5bc5-b98d-13d6226742dd"
TS = "2024-05-01T12:00:00.000Z"
SHA = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
BUNDLE = {"type": "bundle", "id": "bundle--5d0092c5-5f74-4287-9642-33f4c354e56d", "objects": [
    {"type": "identity", "spec_version": "2.1", "id": IDENT, "created": TS, "modified": TS,
     "name": "ACME CERT", "identity_class": "organization"},
    {"type": "indicator", "spec_version": "2.1", "id": IND, "created": TS, "modified": TS,
     "created_by_ref": IDENT, "name": "Emotet C2", "indicator_types": ["malicious-activity"],
     "pattern_type": "stix", "valid_from": TS, "confidence": 85,
     "pattern": "[ipv4-addr:value = '203.0.113.9'] OR [domain-name:value = 'c2.evil.example'] OR "
                f"[file:hashes.'SHA-256' = '{SHA}'] OR [url:value = 'http://c2.evil.example/it\\'s'] OR "
                "[network-traffic:dst_port IN (443, 8443)]"},
    {"type": "malware", "spec_version": "2.1", "id": MAL, "created": TS, "modified": TS,
     "name": "Emotet", "is_family": True, "malware_types": ["trojan"]},
    {"type": "relationship", "spec_version": "2.1",
     "id": "relationship--44298a74-ba52-4f0c-87a3-1824e67d7fad", "created": TS, "modified": TS,
     "relationship_type": "indicates", "source_ref": IND, "target_ref": MAL},
    {"type": "ipv4-addr", "spec_version": "2.1", "id": IP, "value": "10.20.30.40"},
    {"type": "observed-data", "spec_version": "2.1", "id": OD, "created": TS, "modified": TS,
     "first_observed": TS, "last_observed": "2024-05-01T12:05:00Z", "number_observed": 3,
     "object_refs": [IP]},
    {"type": "sighting", "spec_version": "2.1", "id": SIG, "created": TS, "modified": TS,
     "first_seen": TS, "last_seen": "2024-05-01T12:06:00Z", "count": 3, "sighting_of_ref": IND,
     "observed_data_refs": [OD], "where_sighted_refs": [IDENT]},
]}


def test_stix_bundle_indicator_sighting_malware():
    events = {e.activity_name: e for e in parse_stix(json.dumps(BUNDLE), received_at=NOW)}
    assert set(events) == {"indicator", "malware", "observed-data", "sighting"}
    ind, sig, mal = events["indicator"], events["sighting"], events["malware"]
    pattern_obs = {("ip", "203.0.113.9"), ("domain", "c2.evil.example"), ("sha256", SHA),
                   ("url", "http://c2.evil.example/it's"), ("port", "443"), ("port", "8443")}
    assert pattern_obs <= obs(ind)
    assert (ind.severity_id, ind.class_uid, ind.message, ind.product.vendor_name, ind.event_code) == (
        SeverityId.MEDIUM, 0, "Emotet C2", "ACME CERT", IND)
    assert ind.extensions["confidence"] == 85
    assert ind.extensions["relationships"][0]["target_name"] == "Emotet"
    assert (sig.class_uid, sig.class_name, sig.severity_id) == (2004, "Detection Finding", SeverityId.HIGH)
    assert sig.time == dt.datetime(2024, 5, 1, 12, 6, tzinfo=UTC)
    assert pattern_obs | {("ip", "10.20.30.40")} <= obs(sig)
    assert sig.message == "Sighting of Emotet C2"
    assert (mal.severity_id, mal.message) == (SeverityId.LOW, "Emotet")
    assert ("ip", "10.20.30.40") in obs(events["observed-data"])
    # an object keeps its id in another bundle
    again = parse_stix(json.dumps({**BUNDLE, "id": "bundle--6d0092c5-5f74-4287-9642-33f4c354e56d",
                                   "objects": list(reversed(BUNDLE["objects"]))}), received_at=NOW)
    assert {e.id for e in again} == {e.id for e in events.values()}


def _bundle_with(obj: dict) -> str:
    return json.dumps({**BUNDLE, "objects": BUNDLE["objects"][:1] + [obj]})


STIX_ERRORS = [
    ("[]", "type"),
    ("{}", "type"),
    ('{"type": "bundle", "id": "bundle--x", "objects": {}}', "objects"),
    ('{"type": "bundle", "objects": []}', "id"),
    ("not json", "json"),
    (_bundle_with({"type": "indicator", "id": "nope"}), "objects[1]"),
    (_bundle_with({**BUNDLE["objects"][1], "pattern": "[ipv4-addr:value = "}), "objects[1].pattern"),
    (_bundle_with({k: v for k, v in BUNDLE["objects"][6].items() if k != "sighting_of_ref"}),
     "objects[1].sighting_of_ref"),
    (_bundle_with({**BUNDLE["objects"][2], "created": "yesterday"}), "objects[1].created"),
]


@pytest.mark.parametrize("text, field", STIX_ERRORS)
def test_stix_errors_name_the_field(text, field):
    with pytest.raises(InvalidEvent) as ei:
        parse_stix(text, received_at=NOW)
    assert ei.value.field == field and "To fix:" in str(ei.value)


def test_missing_siem_extra_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "stix2", None)
    with pytest.raises(ConfigError) as ei:
        parse_stix(json.dumps(BUNDLE))
    assert "pip install 'ray-qalloc[siem]'" in str(ei.value)


def test_core_import_does_not_load_stix2():
    code = ("import sys, ray_qalloc, ray_qalloc.integration as i; "
            "i.parse_records('CEF:0|a|b|c|d|e|1|', None); assert 'stix2' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------- fast construction is sound

@pytest.mark.parametrize("event", [
    lambda: parse_cef("<134>1 2024-05-01T12:00:00Z h a - - [x@1 a=\"b\"] " + CEF_FW, received_at=NOW),
    lambda: parse_leef(LEEF_CASES[0][0], received_at=NOW),
    lambda: parse_syslog(RFC5424_SD, received_at=NOW),
    lambda: parse_ocsf(json.dumps(DETECTION_FINDING), received_at=NOW)[0],
    lambda: parse_stix(json.dumps(BUNDLE), received_at=NOW)[-1],
])
def test_fast_constructed_events_equal_validated_ones(event):
    e = event()
    again = SecurityEvent.model_validate(e.model_dump())
    assert again == e
    assert SecurityEvent.model_validate_json(e.model_dump_json()).model_dump() == e.model_dump()


# ---------------------------------------------------------------- parse_records

def test_batch_keeps_good_records_and_reports_bad_ones():
    payload = "\n".join([CEF_FW, "", "garbage", LEEF_CASES[1][0], "CEF:0|a|b|c|d|e|11|",
                         RFC5424_SD, "   ", "<13>Jun  5 07:01:02 h sshd[1]: x"]) + "\r\n"
    out = parse_records(payload.encode(), "text/plain; charset=utf-8", tenant="t1", received_at=NOW)
    kinds = [r.format if isinstance(r, SecurityEvent) else ("error", r.field) for r in out]
    assert kinds == ["cef", ("error", "format"), "leef", ("error", "severity"), "syslog", "syslog"]
    errs = [r for r in out if isinstance(r, RecordError)]
    assert [(e.index, e.line) for e in errs] == [(1, 3), (3, 5)]
    assert errs[1].format == "cef" and errs[1].fix and errs[0].format is None
    assert all(r.tenant == "t1" for r in out if isinstance(r, SecurityEvent))


@pytest.mark.parametrize("content_type, payload, formats", [
    ("application/cef", CEF_FW, ["cef"]),
    ("application/leef", LEEF_CASES[0][0], ["leef"]),
    ("text/syslog", RFC5424_SD, ["syslog"]),
    ("application/syslog", "<134>May  1 12:00:00 fw01 " + CEF_FW, ["cef"]),
    ("application/ocsf+json", json.dumps([DETECTION_FINDING] * 2), ["ocsf", "ocsf"]),
    ("application/ocsf+json", json.dumps(DETECTION_FINDING) + "\n" + json.dumps(DETECTION_FINDING), ["ocsf", "ocsf"]),
    ("application/stix+json;version=2.1", json.dumps(BUNDLE), ["stix"] * 4),
    ("application/json", json.dumps(BUNDLE), ["stix"] * 4),
    ("application/json", json.dumps(DETECTION_FINDING), ["ocsf"]),
    (None, "\ufeff" + json.dumps(DETECTION_FINDING), ["ocsf"]),
    (None, CEF_FW + "\n" + LEEF_CASES[1][0], ["cef", "leef"]),
])
def test_content_types(content_type, payload, formats):
    out = parse_records(payload, content_type, received_at=NOW)
    assert [r.format for r in out] == formats
    assert all(isinstance(r, SecurityEvent) for r in out)


def test_declared_format_is_not_sniffed():
    [err] = parse_records(LEEF_CASES[1][0], "application/cef", received_at=NOW)
    assert isinstance(err, RecordError) and err.format == "cef" and err.field == "version"


def test_json_element_errors_keep_the_rest():
    bad = {**DETECTION_FINDING, "severity_id": 42}
    out = parse_records(json.dumps([DETECTION_FINDING, bad, DETECTION_FINDING]), "application/ocsf+json")
    assert [type(r).__name__ for r in out] == ["SecurityEvent", "RecordError", "SecurityEvent"]
    assert (out[1].index, out[1].field, out[1].format) == (1, "severity_id", "ocsf")
    bundle = {**BUNDLE, "objects": BUNDLE["objects"] + [{"type": "malware", "id": "malware--bad"}]}
    out = parse_records(json.dumps(bundle), "application/stix+json")
    assert sum(isinstance(r, RecordError) for r in out) == 1 and len(out) == 5
    [err] = parse_records("{not json", "application/json")
    assert err.field == "json"


def test_unknown_content_type_and_charset_are_refused():
    for ct in ("image/png", "text/plain; charset=latin-1"):
        with pytest.raises(InvalidEvent) as ei:
            parse_records("x", ct)
        assert ei.value.field == "content_type"


def test_limits():
    limits = IntakeLimits(max_payload_bytes=1000, max_record_bytes=100, max_records=3)
    with pytest.raises(LimitExceeded) as ei:
        parse_records("x" * 1001, None, limits=limits)
    assert ei.value.field == "payload"
    with pytest.raises(LimitExceeded):
        parse_records("é" * 600, None, limits=limits)      # 1200 UTF-8 bytes
    with pytest.raises(LimitExceeded) as ei:
        parse_records("\n".join(["CEF:0|a|b|c|d|e|1|"] * 4), None, limits=limits)
    assert ei.value.field == "records"
    out = parse_records("CEF:0|a|b|c|d|e|1|msg=" + "x" * 100 + "\nCEF:0|a|b|c|d|e|1|", None, limits=limits)
    assert isinstance(out[0], RecordError) and out[0].code == "limit_exceeded" and out[0].field == "record"
    assert isinstance(out[1], SecurityEvent)


def test_bad_utf8_line_is_one_error():
    out = parse_records(b"CEF:0|a|b|c|d|e|1|msg=\xff\xfe\nCEF:0|a|b|c|d|e|1|", "application/cef")
    assert isinstance(out[0], RecordError) and out[0].field == "encoding"
    assert isinstance(out[1], SecurityEvent)


@pytest.mark.parametrize("parse, text", [
    (parse_cef, "CEF:0|" + "\\" * 50_001),
    (parse_cef, "CEF:0|a|b|c|d|e|1|" + "k=v " * 20_000 + "=" * 20_000),
    (parse_cef, "CEF:0|" + "a|" * 30_000),
    (parse_leef, "LEEF:2.0|" + "\\|" * 30_000),
    (parse_syslog, '<1>1 - - - - - [a ' + 'b="' * 20_000),
    (parse_syslog, '<1>1 - - - - - ' + '[a b="\\"]' * 20_000),
    (parse_syslog, "<1>Jan  1 00:00:00 " + "h[" * 30_000),
])
def test_pathological_input_is_fast(parse, text):
    t0 = time.perf_counter()
    try:
        parse(text, received_at=NOW)
    except InvalidEvent:
        pass
    assert time.perf_counter() - t0 < 1.0


def test_a_pretty_printed_json_document_is_one_record_and_ndjson_is_one_per_line():
    """A multi-line OCSF object (as a person pastes it) is one document; NDJSON stays per line."""
    import json as _json

    from ray_qalloc.integration import parse_records

    doc = {"class_uid": 2004, "category_uid": 2, "activity_id": 1, "severity_id": 5, "time": 1796544000000,
           "metadata": {"version": "1.3.0", "product": {"name": "Sentinel", "vendor_name": "Microsoft"}},
           "finding_info": {"uid": "f-1", "title": "Credential dumping"}, "message": "lsass read"}
    pretty = parse_records(_json.dumps(doc, indent=2), "application/ocsf+json", tenant="t")
    assert len(pretty) == 1 and not hasattr(pretty[0], "reason"), pretty
    lines = parse_records(_json.dumps(doc) + "\n" + _json.dumps({**doc, "message": "again"}),
                          "application/ocsf+json", tenant="t")
    assert [e.message for e in lines] == ["lsass read", "again"]
