"""Property tests for the security-event parsers: (a) random valid records, written by a small
formatter independent of the parsers, parse back to the same values; (b) arbitrary text or
bytes never raise anything but ``InvalidEvent``."""

from __future__ import annotations

import datetime as dt
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_qalloc.exceptions import InvalidEvent
from ray_qalloc.integration import (RecordError, SecurityEvent, parse_cef, parse_leef, parse_ocsf,
                                    parse_records, parse_stix, parse_syslog)
from ray_qalloc.integration.events import SEVERITY_NAMES, severity_from_cef

NOW = dt.datetime(2024, 6, 15, 12, 0, tzinfo=dt.timezone.utc)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
line_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=40)
# keys the parsers do not type-check (typed keys get valid values below)
plain_key = st.from_regex(r"x[A-Za-z0-9_.\[\]]{0,10}", fullmatch=True)


# ------------------------------------------------------------- (a) CEF round trip

def cef_header(v: str) -> str:
    return v.replace("\\", "\\\\").replace("|", "\\|")


def cef_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace("=", "\\=").replace("\n", "\\n").replace("\r", "\\r")


@FAST
@given(header=st.tuples(text, text, text, text, text), sev=st.integers(0, 10),
       ext=st.dictionaries(plain_key, text, max_size=6),
       src=st.none() | st.ip_addresses().map(str), dpt=st.none() | st.integers(0, 65535),
       syslog=st.booleans())
def test_cef_round_trip(header, sev, ext, src, dpt, syslog):
    typed = {**({"src": src} if src else {}), **({"dpt": str(dpt)} if dpt is not None else {})}
    pairs = {**ext, **typed}
    line = ("CEF:0|" + "|".join(cef_header(h) for h in header) + f"|{sev}|"
            + " ".join(f"{k}={cef_value(v)}" for k, v in pairs.items()))
    if syslog:
        line = "<134>1 2024-05-01T12:00:00Z host app - - - " + line
    e = parse_cef(line, received_at=NOW)
    assert (e.product.vendor_name, e.product.name, e.product.version, e.event_code, e.message) == header
    assert e.extensions == pairs
    assert e.severity_id == severity_from_cef(sev) and e.severity == SEVERITY_NAMES[e.severity_id]
    if src:
        assert ("ip", src) in {(o.kind, o.value) for o in e.observables}
    assert e.raw == line


# ------------------------------------------------------------- (a) LEEF round trip

leef_key = st.from_regex(r"x[A-Za-z0-9_]{0,10}", fullmatch=True)


@FAST
@given(data=st.data(), delim=st.sampled_from(["^", "\t", "x09", "0x5E", "|x"]),
       sev=st.none() | st.integers(1, 10))
def test_leef_round_trip(data, delim, sev):
    ch = {"x09": "\t", "0x5E": "^", "|x": "|"}.get(delim, delim)
    if ch == "|":
        delim, ch = "~", "~"
    value = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n" + ch), max_size=30)
    hdr = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=20)
    header = data.draw(st.tuples(hdr, hdr, hdr, hdr))
    attrs = data.draw(st.dictionaries(leef_key, value, max_size=6))
    if sev is not None:
        attrs["sev"] = str(sev)
    line = ("LEEF:2.0|" + "|".join(cef_header(h) for h in header) + f"|{delim}|"
            + ch.join(f"{k}={v}" for k, v in attrs.items()))
    e = parse_leef(line, received_at=NOW)
    assert (e.product.vendor_name, e.product.name, e.product.version, e.event_code) == header
    assert e.extensions == attrs


# ------------------------------------------------------------- (a) syslog round trip

printus = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20)
sd_name = st.text(st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters='= ]"'),
                  min_size=1, max_size=12)
msg_text = line_text.filter(lambda m: not m.startswith(("CEF:", "LEEF:", "\ufeff")))


def sd_value(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


@FAST
@given(pri=st.integers(0, 191), when=st.datetimes(dt.datetime(1971, 1, 1), dt.datetime(2200, 1, 1)),
       host=printus, app=printus, procid=printus, msgid=printus,
       sd=st.dictionaries(sd_name, st.dictionaries(sd_name, text, max_size=3), max_size=3),
       msg=msg_text)
def test_rfc5424_round_trip(pri, when, host, app, procid, msgid, sd, msg):
    nil = lambda v: v if v != "-" else None  # noqa: E731
    sd_text = "".join(f"[{i}" + "".join(f' {k}="{sd_value(v)}"' for k, v in ps.items()) + "]"
                      for i, ps in sd.items()) or "-"
    line = f"<{pri}>1 {when.strftime('%Y-%m-%dT%H:%M:%S.%f')}Z {host} {app} {procid} {msgid} {sd_text}"
    line += f" {msg}" if msg else ""
    e = parse_syslog(line, received_at=NOW)
    s = e.syslog
    assert (s.facility, s.severity) == (pri >> 3, pri & 7)
    assert e.time == when.replace(tzinfo=dt.timezone.utc)
    assert (s.hostname, s.app_name, s.procid, s.msgid) == tuple(nil(v) for v in (host, app, procid, msgid))
    assert s.structured_data == sd and e.message == msg


@FAST
@given(pri=st.integers(0, 191),
       when=st.datetimes(dt.datetime(2024, 1, 1), dt.datetime(2024, 6, 20)).map(lambda t: t.replace(microsecond=0)),
       host=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9.-]{0,20}", fullmatch=True),
       tag=st.from_regex(r"[A-Za-z][A-Za-z0-9_/-]{0,15}", fullmatch=True),
       pid=st.none() | st.integers(1, 99999), msg=msg_text)
def test_rfc3164_round_trip(pri, when, host, tag, pid, msg):
    stamp = f"{when:%b} {when.day:>2} {when:%H:%M:%S}"
    line = f"<{pri}>{stamp} {host} {tag}{f'[{pid}]' if pid else ''}: {msg}"
    e = parse_syslog(line, received_at=NOW)
    assert e.time == when.replace(tzinfo=dt.timezone.utc)
    assert (e.syslog.hostname, e.syslog.app_name, e.syslog.procid) == (host, tag, str(pid) if pid else None)
    assert e.message == msg


# ------------------------------------------------------------- (a) OCSF round trip

json_scalar = st.none() | st.booleans() | st.integers(-10**6, 10**6) | text
extra_key = st.from_regex(r"x_[a-z_]{1,10}", fullmatch=True)


@FAST
@given(class_uid=st.sampled_from([0, 1007, 2004, 3002, 4001, 6003]),
       ms=st.integers(0, 253402300799000), sev=st.sampled_from(sorted(SEVERITY_NAMES)),
       message=st.none() | text, product=text, vendor=st.none() | text,
       extras=st.dictionaries(extra_key, json_scalar | st.lists(json_scalar, max_size=3), max_size=4),
       as_list=st.booleans())
def test_ocsf_round_trip(class_uid, ms, sev, message, product, vendor, extras, as_list):
    doc = {"class_uid": class_uid, "time": ms, "severity_id": sev, "message": message,
           "metadata": {"version": "1.3.0", "product": {"name": product, "vendor_name": vendor}}, **extras}
    body = json.dumps([doc] if as_list else doc)
    [e] = parse_ocsf(body, received_at=NOW)
    assert (e.class_uid, e.category_uid, e.severity_id, e.message) == (class_uid, class_uid // 1000, sev, message)
    assert e.time == dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(milliseconds=ms)
    assert (e.product.name, e.product.vendor_name) == (product, vendor)
    assert extras.items() <= e.extensions.items()


# ------------------------------------------------------------- (a) STIX round trip

def stix_literal(v: str) -> str:
    return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"


@SLOW
@given(ip=st.ip_addresses(v=4).map(str),
       url=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30),
       name=text.filter(str.strip), uuid=st.uuids(version=4))
def test_stix_round_trip(ip, url, name, uuid):
    ind = {"type": "indicator", "spec_version": "2.1", "id": f"indicator--{uuid}",
           "created": "2024-05-01T12:00:00Z", "modified": "2024-05-01T12:00:00Z", "name": name,
           "pattern_type": "stix", "valid_from": "2024-05-01T12:00:00Z",
           "pattern": f"[ipv4-addr:value = {stix_literal(ip)}] OR [url:value = {stix_literal(url)}]"}
    bundle = {"type": "bundle", "id": f"bundle--{uuid}", "objects": [ind]}
    [e] = parse_stix(json.dumps(bundle), received_at=NOW)
    assert e.message == name and e.event_code == ind["id"]
    assert {("ip", ip), ("url", url)} <= {(o.kind, o.value) for o in e.observables}


# ------------------------------------------------------------- (b) nothing but InvalidEvent

prefixes = st.sampled_from(["", "CEF:0|", "CEF:0|a|b|c|d|e|5|", "LEEF:1.0|", "LEEF:2.0|a|b|c|d|x", "<13>1 ",
                            "<13>1 - - - - - [", "<13>Jan  1 00:00:00 ", "<13>", "{", '{"type":"bundle",',
                            '{"class_uid":', "["])
junk = st.text(st.characters(blacklist_categories=("Cs",)), max_size=80) | st.text(
    st.sampled_from(list('|\\=" []<>:-^\t\nabcCEFLEF0129{}')), max_size=80)


def only_invalid_event(fn, s: str) -> str:
    """``refused`` (an InvalidEvent naming its field) or ``parsed`` (events only); any other
    exception propagates and fails the test."""
    try:
        out = fn(s, received_at=NOW)
    except InvalidEvent as exc:
        assert exc.field and exc.code == "invalid_event"
        return "refused"
    items = out if isinstance(out, list) else [out]
    assert all(isinstance(i, SecurityEvent) for i in items)
    return "parsed"


@FAST
@given(prefix=prefixes, body=junk)
def test_line_parsers_raise_only_invalid_event(prefix, body):
    outcomes = {only_invalid_event(fn, prefix + body) for fn in (parse_cef, parse_leef, parse_syslog)}
    assert outcomes <= {"refused", "parsed"}


@FAST
@given(prefix=prefixes, body=junk)
def test_ocsf_raises_only_invalid_event(prefix, body):
    assert only_invalid_event(parse_ocsf, prefix + body) in ("refused", "parsed")


@SLOW
@given(prefix=prefixes, body=junk, obj=st.none() | st.dictionaries(st.sampled_from(
    ["type", "id", "spec_version", "objects", "pattern", "created", "modified"]), json_scalar, max_size=7))
def test_stix_raises_only_invalid_event(prefix, body, obj):
    only_invalid_event(parse_stix, prefix + body)
    if obj is not None:
        bundle = {"type": "bundle", "id": "bundle--5d0092c5-5f74-4287-9642-33f4c354e56d", "objects": [obj]}
        only_invalid_event(parse_stix, json.dumps(bundle))


@FAST
@given(payload=st.binary(max_size=200) | junk.map(str.encode),
       ct=st.sampled_from([None, "text/plain", "application/cef", "application/leef", "text/syslog",
                           "application/ocsf+json", "application/json"]))
def test_parse_records_never_raises_on_bytes(payload, ct):
    try:
        out = parse_records(payload, ct, received_at=NOW)
    except InvalidEvent as exc:
        assert exc.field == "payload"    # JSON that is not UTF-8
        return
    assert all(isinstance(r, (SecurityEvent, RecordError)) for r in out)
