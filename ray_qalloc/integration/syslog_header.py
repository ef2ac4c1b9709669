"""Splitting a syslog line into its header and MSG (RFC 5424 and RFC 3164 / BSD).

Why apart from ``syslog.py``: CEF and LEEF arrive behind a syslog header as often as bare,
so ``cef.py`` and ``leef.py`` need the header split too, and ``syslog.py`` needs them (a
MSG that is itself CEF or LEEF is parsed as such). Keeping the header here breaks the cycle.

No maintained Python syslog *parser* exists on PyPI (the packages there are logging
handlers, or parsers untouched since 2019), so this is our own, after the RFCs' grammars.

RFC 5424 (``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD [MSG]``): field lengths and
characters are checked as the RFC's ABNF says; ``-`` is NILVALUE (None); in PARAM-VALUE
``\\"``, ``\\\\`` and ``\\]`` are escapes and any other backslash is kept as is (§6.3.3);
a BOM at the start of MSG is removed (§6.4). The same SD-ID twice in one message is refused
(§6.3.2).

RFC 3164 (``<PRI>Mmm dd hh:mm:ss HOST TAG[PID]: MSG``): the day may be space-padded, a
year or fraction after the time and an ISO time stamp in its place are accepted (rsyslog's
and Cisco's variants); the year is inferred (see ``times``) and the zone is UTC. A header
without HOST (``<13>Jan  5 10:00:00 sshd[7]: ...``) is recognised by its tag.
"""

from __future__ import annotations

import datetime as dt
import re

from ray_qalloc.integration import times
from ray_qalloc.integration.errors import clip, invalid
from ray_qalloc.integration.events import SyslogInfo, construct

_PRI = re.compile(r"<(\d{1,3})>")
_V5424 = re.compile(r"(\d{1,2}) (\S+) ([!-~]{1,255}) ([!-~]{1,48}) ([!-~]{1,128}) ([!-~]{1,32}) ")
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|[+-]\d{2}:\d{2})")
_SD_ELEMENT = re.compile(r'\[([^ =\]"]{1,32})((?: [^ =\]"]{1,32}="(?:[^"\\]|\\.)*")*)\]', re.S)
_SD_PARAM = re.compile(r'([^ =\]"]{1,32})="((?:[^"\\]|\\.)*)"', re.S)
_SD_ESC = re.compile(r'\\(["\\\]])')
_BSD_TIME = re.compile(r"([A-Z][a-z]{2}) {1,2}(\d{1,2})(?: (\d{4}))? (\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))?"
                       r"(?: (UTC|GMT):)? ")
_ISO_TIME = re.compile(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|[+-]\d{2}:?\d{2})?) ")
_TAG = re.compile(r"([^\s\[\]:]{1,48})(?:\[([^\]\s]{1,128})\])?:(?: |$)")
_EMBEDDED = ("CEF:", "LEEF:")

FMT = "syslog"


def split_syslog(text: str, received_at: dt.datetime, *, require_pri: bool = True
                 ) -> tuple[SyslogInfo, str]:
    """``(header, MSG)`` of one syslog line; raises ``InvalidEvent`` naming the bad field.

    ``require_pri=False`` accepts a 3164 header without ``<PRI>`` (``Mmm dd hh:mm:ss host``),
    the form CEF/LEEF relays often emit.
    """
    m = _PRI.match(text)
    if m is None:
        if require_pri:
            raise invalid(FMT, "pri", f"the line does not start with <PRI> (got {clip(text, 20)})",
                          "send '<PRI>' (facility*8+severity, 0-191) first, as RFC 5424/3164 require.")
        return _bsd(text, 0, None, received_at)
    pri = int(m.group(1))
    if pri > 191:
        raise invalid(FMT, "pri", f"PRI {pri} is above 191",
                      "send facility*8+severity with facility 0-23 and severity 0-7.")
    pos = m.end()
    v = _V5424.match(text, pos)
    if v is not None:
        return _rfc5424(text, v, pri)
    return _bsd(text, pos, pri, received_at)


def _rfc5424(text: str, v: re.Match[str], pri: int) -> tuple[SyslogInfo, str]:
    version, ts, host, app, procid, msgid = v.groups()
    if version != "1":
        raise invalid(FMT, "version", f"syslog VERSION {version} is not supported",
                      "send RFC 5424 messages with VERSION 1.")
    when: dt.datetime | None = None
    if ts != "-":
        if not _RFC3339.fullmatch(ts):
            raise invalid(FMT, "timestamp", f"{clip(ts)} is not an RFC 3339 time stamp",
                          "send e.g. 2024-05-01T12:00:00.000Z, or '-'.")
        try:
            when = times.parse_rfc3339(ts)   # _RFC3339 matched: the strict form it reads
        except ValueError as exc:
            raise invalid(FMT, "timestamp", str(exc), "send a valid RFC 3339 time stamp, or '-'.") from None
    pos = v.end()
    sd: dict[str, dict[str, str | list[str]]] = {}
    if text.startswith("-", pos):
        pos += 1
    else:
        if not text.startswith("[", pos):
            raise invalid(FMT, "structured_data", f"expected '-' or '[' at {clip(text[pos:], 20)}",
                          "send '-' when there is no structured data.")
        while text.startswith("[", pos):
            e = _SD_ELEMENT.match(text, pos)
            if e is None:
                raise invalid(FMT, "structured_data",
                              f"malformed SD-ELEMENT at {clip(text[pos:], 40)}",
                              'write [id name="value" ...] with \\", \\\\ and \\] escaped in values.')
            sd_id = e.group(1)
            if sd_id in sd:
                raise invalid(FMT, "structured_data", f"SD-ID {sd_id!r} occurs twice",
                              "merge the two elements into one (RFC 5424 §6.3.2).")
            params: dict[str, str | list[str]] = {}
            for name, raw_value in _SD_PARAM.findall(e.group(2)):
                value = _SD_ESC.sub(r"\1", raw_value) if "\\" in raw_value else raw_value
                old = params.get(name)
                if old is None:
                    params[name] = value
                elif isinstance(old, list):
                    old.append(value)
                else:
                    params[name] = [old, value]
            sd[sd_id] = params
            pos = e.end()
    if pos == len(text):
        msg = ""
    elif text[pos] == " ":
        msg = text[pos + 1:]
        if msg.startswith("\ufeff"):
            msg = msg[1:]
    else:
        raise invalid(FMT, "structured_data", f"unexpected {clip(text[pos:], 20)} after it",
                      "separate MSG from the structured data by one space.")
    info = construct(SyslogInfo, {
        "rfc": "5424", "facility": pri >> 3, "severity": pri & 7, "timestamp": when,
        "hostname": None if host == "-" else host, "app_name": None if app == "-" else app,
        "procid": None if procid == "-" else procid, "msgid": None if msgid == "-" else msgid,
        "structured_data": sd})
    return info, msg


def _bsd(text: str, pos: int, pri: int | None, received_at: dt.datetime) -> tuple[SyslogInfo, str]:
    t = _BSD_TIME.match(text, pos)
    if t is not None:
        mon, day, year, hh, mm, ss, frac, zn = t.groups()
        try:
            month = times.MONTHS[mon]
            micro = int(frac.ljust(6, "0")) if frac else 0
            tz = times.zone(zn) if zn else times.UTC
            if year is None:
                when = times.infer_year(month, int(day), int(hh), int(mm), int(ss), micro, tz,
                                        received_at)
            else:
                when = dt.datetime(int(year), month, int(day), int(hh), int(mm), int(ss), micro,
                                   tzinfo=tz).astimezone(times.UTC)
        except (KeyError, ValueError) as exc:
            raise invalid(FMT, "timestamp", f"{clip(t.group(0).strip())}: {exc}",
                          "send 'Mmm dd hh:mm:ss' with a real date (RFC 3164 §4.1.2).") from None
    else:
        t = _ISO_TIME.match(text, pos)
        if t is None:
            raise invalid(FMT, "timestamp", f"no RFC 3164 or RFC 3339 time stamp at {clip(text[pos:], 24)}",
                          "send 'Mmm dd hh:mm:ss' (RFC 3164) or '1 <RFC 3339 time>' (RFC 5424) after <PRI>.")
        try:
            when = times.parse_iso(t.group(1))
        except ValueError as exc:
            raise invalid(FMT, "timestamp", str(exc), "send a valid date and time.") from None
    pos = t.end()
    host: str | None = None
    if not text.startswith(_EMBEDDED, pos):
        end = text.find(" ", pos)
        token = text[pos:] if end < 0 else text[pos:end]
        if token and not token.endswith(":") and "[" not in token:
            host = token
            pos = len(text) if end < 0 else end + 1
    app: str | None = None
    procid: str | None = None
    if not text.startswith(_EMBEDDED, pos):
        g = _TAG.match(text, pos)
        if g is not None:
            app, procid = g.group(1), g.group(2)
            pos = g.end()
    info = construct(SyslogInfo, {
        "rfc": "3164", "facility": None if pri is None else pri >> 3,
        "severity": None if pri is None else pri & 7, "timestamp": when, "hostname": host,
        "app_name": app, "procid": procid, "msgid": None, "structured_data": {}})
    return info, text[pos:]
