"""ArcSight CEF (Common Event Format) → ``SecurityEvent``.

``CEF:Version|Device Vendor|Device Product|Device Version|Signature ID|Name|Severity|Extension``

Our own parser: the CEF packages on PyPI are unmaintained and lenient in ways that hide
broken senders. What it accepts, strictly:

- header: exactly seven unescaped ``|`` before the extension; ``\\|`` and ``\\\\`` are the
  only escapes (any other backslash is an error, as the CEF spec requires it escaped);
  version 0 or 1; severity 0–10 or Unknown/Low/Medium/High/Very-High.
- extension: ``key=value`` pairs, keys ``[A-Za-z0-9_.\\[\\]]+``; a pair starts at the
  beginning or after one space with ``key=``; a value runs to the space before the next
  ``key=`` (so values may hold spaces, and a value's own trailing spaces survive); escapes
  ``\\=``, ``\\\\``, ``\\n``, ``\\r`` (and ``\\|``, which some senders add); any other backslash
  is an error. An ``=`` that cannot start a pair (``request=http://h/?a=b``) is kept as
  text, as real senders leave it unescaped in URLs. A key given twice is an error.
- a syslog header (RFC 5424, RFC 3164, or a bare ``Mmm dd hh:mm:ss host``) may come first;
  it is kept in ``SecurityEvent.syslog``.

Typed keys are checked: IP keys must be IP addresses, port keys 0–65535, time keys
(``rt``, ``end``, ``start``) epoch milliseconds or ``Mmm dd [yyyy] HH:mm:ss[.SSS] [zone]``.
``extensions`` holds every extension pair, unescaped (the mapped ones too: rules may match
on the CEF key); ``observables`` and ``time`` are views of them.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import NamedTuple

from ray_qalloc.integration.errors import clip, invalid
from ray_qalloc.integration.events import (CEF_SEVERITY_WORDS, SEVERITY_NAMES, Product,
                                           SecurityEvent, SyslogInfo, event_id, severity_from_cef,
                                           utc_now)
from ray_qalloc.integration.fields import event_time, host_observable, observables_from
from ray_qalloc.integration.syslog_header import split_syslog

FMT = "cef"
_F = r"([^\\|]*(?:\\.[^\\|]*)*)\|"
_HEADER = re.compile(r"CEF:(\d{1,3})\|" + _F * 6, re.S)
_HEADER_NAMES = ("device_vendor", "device_product", "device_version", "signature_id", "name",
                 "severity")
_HDR_ESC = re.compile(r"\\(.?)", re.S)
_KEY = re.compile(r"(?:^| )([A-Za-z0-9_.\[\]]+)=")
_EXT_ESC = re.compile(r"\\(.?)", re.S)
_EXT_UNESC = {"=": "=", "\\": "\\", "n": "\n", "r": "\r", "|": "|"}

#: CEF key (short and full ArcSight names) → observable kind.
OBSERVABLE_KEYS: dict[str, str] = {
    "src": "ip", "dst": "ip", "dvc": "ip", "c6a2": "ip", "c6a3": "ip",
    "sourceAddress": "ip", "destinationAddress": "ip", "deviceAddress": "ip",
    "sourceTranslatedAddress": "ip", "destinationTranslatedAddress": "ip",
    "shost": "hostname", "dhost": "hostname", "dvchost": "hostname",
    "sourceHostName": "hostname", "destinationHostName": "hostname", "deviceHostName": "hostname",
    "sourceDnsDomain": "domain", "destinationDnsDomain": "domain",
    "suser": "user", "duser": "user", "sourceUserName": "user", "destinationUserName": "user",
    "smac": "mac", "dmac": "mac", "dvcmac": "mac", "sourceMacAddress": "mac",
    "destinationMacAddress": "mac",
    "spt": "port", "dpt": "port", "sourcePort": "port", "destinationPort": "port",
    "sproc": "process", "dproc": "process", "sourceProcessName": "process",
    "destinationProcessName": "process",
    "spid": "pid", "dpid": "pid",
    "request": "url", "requestUrl": "url",
    "fname": "file_name", "fileName": "file_name",
    "fileHash": "hash", "oldFileHash": "hash",
}
_TIME_KEYS = ("rt", "deviceReceiptTime", "end", "endTime", "start", "startTime")


class CefRecord(NamedTuple):
    """A CEF record split and unescaped, before it becomes an event."""

    version: int
    vendor: str
    product: str
    product_version: str
    signature_id: str
    name: str
    severity: str
    extensions: dict[str, str]


def _unescape_header(value: str, field: str) -> str:
    def sub(m: re.Match[str]) -> str:
        c = m.group(1)
        if c == "\\" or c == "|":
            return c
        raise invalid(FMT, field, f"'\\{c}' is not a header escape",
                      "escape only '|' as '\\|' and '\\' as '\\\\' in CEF header fields.")
    return _HDR_ESC.sub(sub, value)


def _unescape_ext(value: str, key: str) -> str:
    def sub(m: re.Match[str]) -> str:
        c = m.group(1)
        out = _EXT_UNESC.get(c)
        if out is None:
            raise invalid(FMT, f"extension.{key}", f"'\\{c}' is not a CEF escape",
                          "in extension values escape '=' as '\\=', '\\' as '\\\\', "
                          "newlines as '\\n' and '\\r'.")
        return out
    return _EXT_ESC.sub(sub, value)


def split_cef(text: str) -> CefRecord:
    """Split and unescape a bare CEF record (starting with ``CEF:``); ``InvalidEvent`` if bad."""
    m = _HEADER.match(text)
    if m is None:
        if not text.startswith("CEF:"):
            raise invalid(FMT, "version", f"the record does not start with 'CEF:' (got {clip(text, 20)})",
                          "send 'CEF:0|vendor|product|version|signatureId|name|severity|extension'.")
        if not re.match(r"CEF:\d+\|", text):
            raise invalid(FMT, "version", f"{clip(text[:12])} has no numeric version",
                          "start the record with 'CEF:0|'.")
        parts = len(re.findall(r"(?<!\\)(?:\\\\)*\|", text)) + 1
        raise invalid(FMT, "header", f"found {parts} '|'-separated parts, need 8 "
                      "(version, vendor, product, version, signature id, name, severity, extension)",
                      "send all seven header fields, each ended by '|', escaping '|' inside them as '\\|'.")
    version = int(m.group(1))
    if version > 1:
        raise invalid(FMT, "version", f"CEF version {version} is not supported",
                      "send CEF:0 or CEF:1.")
    fields = m.groups()[1:]
    if "\\" in m.group(0):
        fields = tuple(_unescape_header(g, _HEADER_NAMES[i]) for i, g in enumerate(fields))
    ext_text = text[m.end():]
    ext: dict[str, str] = {}
    if ext_text.strip(" "):
        parts = _KEY.split(ext_text)
        if parts[0]:
            raise invalid(FMT, "extension", f"{clip(parts[0], 30)} is not a key=value pair",
                          "send extensions as 'key=value' separated by spaces; keys are letters, "
                          "digits, '_', '.', '[' or ']'.")
        keys = parts[1::2]
        ext = dict(zip(keys, parts[2::2]))
        if len(ext) != len(keys):
            seen: set[str] = set()
            dup = next(k for k in keys if k in seen or seen.add(k))  # type: ignore[func-returns-value]
            raise invalid(FMT, f"extension.{dup}", "the key occurs twice",
                          "send each extension key once.")
        if "\\" in ext_text:
            for key, value in ext.items():
                if "\\" in value:
                    ext[key] = _unescape_ext(value, key)
    return CefRecord(version, *fields, ext)


def cef_severity(value: str) -> int:
    """CEF severity text → OCSF severity id; ``InvalidEvent`` on anything else."""
    if value.isascii() and value.isdigit() and len(value) <= 2 and int(value) <= 10:
        return severity_from_cef(int(value))
    sid = CEF_SEVERITY_WORDS.get(value.strip().lower())
    if sid is None:
        raise invalid(FMT, "severity", f"{clip(value)} is not 0-10 or Unknown/Low/Medium/High/Very-High",
                      "send the severity as a whole number from 0 to 10.")
    return sid


def event_from_cef(rec: CefRecord, raw: str, *, syslog: SyslogInfo | None = None,
                   tenant: str = "default", received_at: dt.datetime | None = None) -> SecurityEvent:
    """Build the event for a split CEF record (``raw``: the whole line as received)."""
    now = received_at or utc_now()
    sid = cef_severity(rec.severity)
    observables = observables_from(rec.extensions, OBSERVABLE_KEYS, FMT)
    fallback = syslog.timestamp if syslog is not None and syslog.timestamp else now
    if syslog is not None and syslog.hostname:
        observables.append(host_observable(syslog.hostname, "syslog.hostname"))
    return SecurityEvent.fast(
        id=event_id(raw), tenant=tenant,
        time=event_time(rec.extensions, _TIME_KEYS, FMT, fallback, now), received_at=now,
        class_uid=0, class_name="Base Event", category_uid=0, category_name="Uncategorized",
        severity_id=sid, severity=SEVERITY_NAMES[sid],
        activity_name=rec.extensions.get("act") or None, message=rec.name,
        event_code=rec.signature_id,
        product=Product.of(rec.vendor, rec.product, rec.product_version),
        observables=observables, format=FMT, syslog=syslog, raw=raw,
        extensions=rec.extensions)


def parse_cef(text: str, *, tenant: str = "default",
              received_at: dt.datetime | None = None) -> SecurityEvent:
    """Parse one CEF record, bare or behind a syslog header; ``InvalidEvent`` names the bad field."""
    line = text.rstrip("\r\n")
    if line.startswith("CEF:"):
        return event_from_cef(split_cef(line), text, tenant=tenant, received_at=received_at)
    if "CEF:" not in line:
        raise invalid(FMT, "version", f"no 'CEF:' in the record (got {clip(line, 20)})",
                      "send 'CEF:0|...' alone or after a syslog header.")
    now = received_at or utc_now()
    info, msg = split_syslog(line, now, require_pri=False)
    if not msg.startswith("CEF:"):
        raise invalid(FMT, "version", f"the syslog MSG does not start with 'CEF:' (got {clip(msg, 20)})",
                      "put the CEF record right after the syslog header.")
    return event_from_cef(split_cef(msg), text, syslog=info, tenant=tenant, received_at=now)
