"""IBM QRadar LEEF 1.0 / 2.0 → ``SecurityEvent``.

``LEEF:1.0|Vendor|Product|Version|EventID|attr=value<TAB>attr=value...``
``LEEF:2.0|Vendor|Product|Version|EventID|DelimiterChar|attr=value<DELIM>attr=value...``

Our own parser (no maintained one exists). What it accepts:

- header: ``\\|`` and ``\\\\`` are escapes in header fields (any other backslash is kept as
  text: LEEF defines no header escapes and Windows paths in them are common);
- LEEF 2.0 delimiter: one character, or its hex code as ``xHH`` / ``0xHH`` (``x09`` = tab,
  ``x5E`` = ``^``); empty means tab. ``|`` cannot be a delimiter;
- attributes: split on the delimiter; empty segments (a trailing tab) are skipped; each
  segment is ``key=value`` split at its first ``=`` (values may hold ``=``); a segment
  without ``=`` or with an empty key is an error, as is a key given twice. LEEF has no
  escapes in values, so a value cannot contain the delimiter;
- ``sev`` 0–10 (see ``events.severity_from_leef``; absent: Unknown); ``devTime`` read with
  ``devTimeFormat`` (a Java date pattern) when given, else as epoch milliseconds,
  ``Mmm dd yyyy HH:mm:ss`` or ISO 8601;
- a syslog header in front, as for CEF.

Typed attributes (IPs, ports) are checked as in ``cef``; ``extensions`` holds every attribute.
"""

from __future__ import annotations

import datetime as dt
import re

from ray_qalloc.integration import times
from ray_qalloc.integration.errors import clip, invalid
from ray_qalloc.integration.events import (SEVERITY_NAMES, Product, SecurityEvent, SeverityId,
                                           SyslogInfo, event_id, severity_from_leef, utc_now)
from ray_qalloc.integration.fields import host_observable, observables_from
from ray_qalloc.integration.syslog_header import split_syslog

FMT = "leef"
_F = r"([^\\|]*(?:\\.[^\\|]*)*)\|"
_HEADER_1 = re.compile(r"LEEF:(1\.0)\|" + _F * 4 + r"?", re.S)
_HEADER_2 = re.compile(r"LEEF:(2\.0)\|" + _F * 5, re.S)
_HDR_ESC = re.compile(r"\\([\\|])")
_HEX_DELIM = re.compile(r"(?:0x|x|\\x)([0-9A-Fa-f]{1,4})")
_HEADER_NAMES = ("vendor", "product", "version", "event_id")

#: LEEF predefined attribute → observable kind.
OBSERVABLE_KEYS: dict[str, str] = {
    "src": "ip", "dst": "ip", "srcPreNAT": "ip", "dstPreNAT": "ip", "srcPostNAT": "ip",
    "dstPostNAT": "ip", "identSrc": "ip", "vSrc": "ip",
    "srcPort": "port", "dstPort": "port", "srcPreNATPort": "port", "dstPreNATPort": "port",
    "srcPostNATPort": "port", "dstPostNATPort": "port",
    "usrName": "user", "accountName": "user",
    "srcMAC": "mac", "dstMAC": "mac", "identMAC": "mac",
    "identHostName": "hostname", "srcHostName": "hostname", "dstHostName": "hostname",
    "url": "url",
}


def _delimiter(field: str) -> str:
    if field == "":
        return "\t"
    if len(field) == 1:
        if field == "|":
            raise invalid(FMT, "delimiter", "'|' cannot delimit attributes",
                          "use a tab (x09) or '^' (x5E) as the LEEF 2.0 delimiter.")
        return field
    m = _HEX_DELIM.fullmatch(field)
    if m is None:
        raise invalid(FMT, "delimiter", f"{clip(field)} is neither one character nor a hex code",
                      "send one character, or its code as xHH / 0xHH (x09 for tab).")
    ch = chr(int(m.group(1), 16))
    if ch in "|=" or ch == "":
        raise invalid(FMT, "delimiter", f"{ch!r} cannot delimit attributes",
                      "use a tab (x09) or '^' (x5E).")
    return ch


def split_leef(text: str) -> tuple[str, tuple[str, ...], dict[str, str]]:
    """``(version, (vendor, product, version, event_id), attributes)`` of a bare LEEF record."""
    if text.startswith("LEEF:2"):
        m = _HEADER_2.match(text)
        if m is None:
            raise invalid(FMT, "header", "LEEF 2.0 needs 6 '|'-ended fields (version, vendor, "
                          "product, version, event id, delimiter)",
                          "send 'LEEF:2.0|Vendor|Product|Version|EventID|Delimiter|attributes'.")
        delim = _delimiter(m.group(6))
        header = m.groups()[1:5]
    elif text.startswith("LEEF:1"):
        m = _HEADER_1.match(text)
        if m is None or m.group(5) is None:
            raise invalid(FMT, "header", "LEEF 1.0 needs 5 '|'-separated fields (version, vendor, "
                          "product, version, event id)",
                          "send 'LEEF:1.0|Vendor|Product|Version|EventID|attributes'.")
        delim = "\t"
        header = m.groups()[1:5]
        if not m.group(0).endswith("|") and ("\t" in m.group(5) or "=" in m.group(5)):
            raise invalid(FMT, "event_id", f"{clip(m.group(5), 30)} runs into the attributes",
                          "end the EventID with '|' before the attributes.")
    else:
        raise invalid(FMT, "version", f"the record does not start with 'LEEF:1.0|' or 'LEEF:2.0|' "
                      f"(got {clip(text, 20)})", "send 'LEEF:1.0|...' or 'LEEF:2.0|...'.")
    if "\\" in m.group(0):
        header = tuple(_HDR_ESC.sub(r"\1", h) for h in header)
    attrs: dict[str, str] = {}
    body = text[m.end():]
    if body:
        for i, seg in enumerate(body.split(delim)):
            if not seg:
                continue
            key, eq, value = seg.partition("=")
            if not eq or not key.strip():
                raise invalid(FMT, "attributes", f"attribute {i} ({clip(seg, 30)}) is not key=value",
                              f"send attributes as key=value separated by {delim!r}, with no "
                              f"{delim!r} inside values.")
            key = key.strip()
            if key in attrs:
                raise invalid(FMT, f"attributes.{key}", "the key occurs twice",
                              "send each attribute once.")
            attrs[key] = value
    return m.group(1), header, attrs


def _severity(attrs: dict[str, str]) -> SeverityId:
    sev = attrs.get("sev")
    if sev is None or sev == "":
        return SeverityId.UNKNOWN   # the enum, as validation makes it (a bare 0 warned on model_dump)
    if not (sev.isascii() and sev.isdigit() and len(sev) <= 2 and int(sev) <= 10):
        raise invalid(FMT, "attributes.sev", f"{clip(sev)} is not 0-10",
                      "send sev as a whole number from 1 to 10.")
    return severity_from_leef(int(sev))


def _time(attrs: dict[str, str], fallback: dt.datetime, ref: dt.datetime) -> dt.datetime:
    value = attrs.get("devTime")
    if not value:
        return fallback
    fmt = attrs.get("devTimeFormat")
    try:
        if fmt:
            return times.parse_java(value, fmt)
        return times.parse_time(value, ref)
    except ValueError as exc:
        raise invalid(FMT, "attributes.devTime", str(exc),
                      "send devTime as epoch milliseconds, or with a devTimeFormat it matches "
                      "(e.g. 'MMM dd yyyy HH:mm:ss z').") from None


def event_from_leef(version: str, header: tuple[str, ...], attrs: dict[str, str], raw: str, *,
                    syslog: SyslogInfo | None = None, tenant: str = "default",
                    received_at: dt.datetime | None = None) -> SecurityEvent:
    """Build the event for a split LEEF record (``raw``: the whole line as received)."""
    now = received_at or utc_now()
    sid = _severity(attrs)
    observables = observables_from(attrs, OBSERVABLE_KEYS, FMT, prefix="attributes")
    fallback = syslog.timestamp if syslog is not None and syslog.timestamp else now
    if syslog is not None and syslog.hostname:
        observables.append(host_observable(syslog.hostname, "syslog.hostname"))
    vendor, product, pversion, event_code = header
    return SecurityEvent.fast(
        id=event_id(raw), tenant=tenant, time=_time(attrs, fallback, now), received_at=now,
        severity_id=sid, severity=SEVERITY_NAMES[sid],
        activity_name=attrs.get("cat") or None, message=attrs.get("msg") or event_code,
        event_code=event_code, product=Product.of(vendor, product, pversion),
        observables=observables, format=FMT, syslog=syslog, raw=raw,
        extensions=attrs)


def parse_leef(text: str, *, tenant: str = "default",
               received_at: dt.datetime | None = None) -> SecurityEvent:
    """Parse one LEEF 1.0/2.0 record, bare or behind a syslog header; ``InvalidEvent`` if bad."""
    line = text.rstrip("\r\n")
    if line.startswith("LEEF:"):
        return event_from_leef(*split_leef(line), text, tenant=tenant, received_at=received_at)
    if "LEEF:" not in line:
        raise invalid(FMT, "version", f"no 'LEEF:' in the record (got {clip(line, 20)})",
                      "send 'LEEF:2.0|...' alone or after a syslog header.")
    now = received_at or utc_now()
    info, msg = split_syslog(line, now, require_pri=False)
    if not msg.startswith("LEEF:"):
        raise invalid(FMT, "version", f"the syslog MSG does not start with 'LEEF:' (got {clip(msg, 20)})",
                      "put the LEEF record right after the syslog header.")
    return event_from_leef(*split_leef(msg), text, syslog=info, tenant=tenant, received_at=now)
