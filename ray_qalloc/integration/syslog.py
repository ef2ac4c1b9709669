"""Syslog (RFC 5424 and RFC 3164) → ``SecurityEvent``.

The header is split by ``syslog_header`` (grammar and leniencies are documented there).
When MSG is itself a CEF or LEEF record, that record is parsed and the syslog header is
kept in ``SecurityEvent.syslog``: the event is the CEF/LEEF event (``format`` "cef"/"leef").
Otherwise the event is the syslog message itself:

- ``time``: the header time stamp (NILVALUE: receipt time); ``severity`` from the syslog
  severity (``events.severity_from_syslog``);
- ``product.name``: APP-NAME (or the BSD tag), ``event_code``: MSGID, ``message``: MSG;
- observables: HOSTNAME (``hostname``, or ``ip`` when it is an address), APP-NAME as
  ``process``, PROCID as ``pid`` when numeric;
- ``extensions``: the structured data, ``{"SD-ID": {"PARAM": "value"}}`` (also in
  ``syslog.structured_data``).
"""

from __future__ import annotations

import datetime as dt

from ray_qalloc.integration.cef import event_from_cef, split_cef
from ray_qalloc.integration.events import (SEVERITY_NAMES, Observable, Product, SecurityEvent,
                                           event_id, severity_from_syslog, utc_now)
from ray_qalloc.integration.fields import host_observable, observable
from ray_qalloc.integration.leef import event_from_leef, split_leef
from ray_qalloc.integration.syslog_header import split_syslog

FMT = "syslog"


def parse_syslog(text: str, *, tenant: str = "default",
                 received_at: dt.datetime | None = None) -> SecurityEvent:
    """Parse one syslog line (RFC 5424 or 3164, ``<PRI>`` required); ``InvalidEvent`` if bad."""
    now = received_at or utc_now()
    line = text.rstrip("\r\n")
    info, msg = split_syslog(line, now)
    if msg.startswith("CEF:"):
        return event_from_cef(split_cef(msg), text, syslog=info, tenant=tenant, received_at=now)
    if msg.startswith("LEEF:"):
        return event_from_leef(*split_leef(msg), text, syslog=info, tenant=tenant,
                               received_at=now)
    observables: list[Observable] = []
    host = info.hostname
    if host:
        observables.append(host_observable(host, "syslog.hostname"))
    if info.app_name:
        observables.append(observable("process", info.app_name, "syslog.app_name"))
    if info.procid and info.procid.isascii() and info.procid.isdigit():
        observables.append(observable("pid", info.procid, "syslog.procid"))
    sid = severity_from_syslog(info.severity)  # type: ignore[arg-type]  # PRI is required here
    return SecurityEvent.fast(
        id=event_id(text), tenant=tenant, time=info.timestamp or now, received_at=now,
        severity_id=sid, severity=SEVERITY_NAMES[sid], message=msg, event_code=info.msgid,
        product=Product.of(None, info.app_name, None), observables=observables, format=FMT,
        syslog=info, raw=text, extensions=dict(info.structured_data))
