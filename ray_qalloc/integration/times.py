"""Reading the time stamps SIEM formats use, all to timezone-aware UTC datetimes.

Why a module of its own: CEF ``rt``, LEEF ``devTime`` and BSD syslog share the same odd
forms (epoch milliseconds, ``Mmm dd [yyyy] HH:mm:ss[.SSS] [zone]``, no year at all), and
every parser must treat them alike. Functions raise ``ValueError`` with a reason; the
calling parser turns it into an ``InvalidEvent`` naming its own field.

Rules:
- a time without a zone is taken as UTC (senders are told to send UTC or an offset);
- a zone abbreviation is accepted only from a small table of unambiguous ones (UTC, GMT,
  Z and the North-American and Central-European ones); anything else is refused rather than
  guessed (``IST`` is India, Israel or Ireland);
- a time without a year gets the year that puts it nearest before the receipt time,
  allowing 7 days of clock skew into the future (a 31 Dec record read on 1 Jan is last year's).
"""

from __future__ import annotations

import datetime as dt
import functools
import re

UTC = dt.timezone.utc

MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}

ZONES: dict[str, dt.timezone] = {
    "UTC": UTC, "GMT": UTC, "Z": UTC,
    "EST": dt.timezone(dt.timedelta(hours=-5)), "EDT": dt.timezone(dt.timedelta(hours=-4)),
    "CST": dt.timezone(dt.timedelta(hours=-6)), "CDT": dt.timezone(dt.timedelta(hours=-5)),
    "MST": dt.timezone(dt.timedelta(hours=-7)), "MDT": dt.timezone(dt.timedelta(hours=-6)),
    "PST": dt.timezone(dt.timedelta(hours=-8)), "PDT": dt.timezone(dt.timedelta(hours=-7)),
    "CET": dt.timezone(dt.timedelta(hours=1)), "CEST": dt.timezone(dt.timedelta(hours=2)),
}

_SKEW = dt.timedelta(days=7)
_MIN_MS = -62135596800000          # 0001-01-01
_MAX_MS = 253402300799999          # 9999-12-31T23:59:59.999

# "Mmm dd [yyyy] HH:mm:ss[.SSS][ zone]" (ArcSight's rt forms, also QRadar's default devTime)
_MDY = re.compile(r"([A-Z][a-z]{2}) {1,2}(\d{1,2}) (?:(\d{4}) )?(\d{2}):(\d{2}):(\d{2})"
                  r"(?:\.(\d{1,6}))?(?: ?([A-Za-z]{1,5}|[+-]\d{2}:?\d{2}))?")
_ISO = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d{1,9})?(?:Z|z|[+-]\d{2}:?\d{2})?")
_DIGITS = re.compile(r"-?\d{1,16}(?:\.\d+)?")


def from_epoch_ms(ms: float) -> dt.datetime:
    """Milliseconds since the Unix epoch → UTC datetime."""
    if not (_MIN_MS <= ms <= _MAX_MS):
        raise ValueError(f"{ms} ms since 1970 is outside years 1-9999")
    return dt.datetime(1970, 1, 1, tzinfo=UTC) + dt.timedelta(milliseconds=ms)


def zone(text: str) -> dt.timezone:
    """A zone abbreviation or numeric offset (``+0100``, ``-05:00``) → timezone."""
    if text[0] in "+-":
        digits = text[1:].replace(":", "")
        h, m = int(digits[:2]), int(digits[2:])
        if h > 23 or m > 59:
            raise ValueError(f"offset {text!r} is out of range")
        delta = dt.timedelta(hours=h, minutes=m)
        return dt.timezone(-delta if text[0] == "-" else delta)
    tz = ZONES.get(text.upper())
    if tz is None:
        raise ValueError(f"time zone {text!r} is ambiguous or unknown (use UTC or an offset like +01:00)")
    return tz


def infer_year(month: int, day: int, hour: int, minute: int, second: int, micro: int,
               tz: dt.tzinfo, ref: dt.datetime) -> dt.datetime:
    """The datetime for a year-less stamp: this year, or last year if that is > 7 days ahead."""
    for year in (ref.year + 1, ref.year, ref.year - 1, ref.year - 2, ref.year - 3, ref.year - 4):
        try:
            cand = dt.datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
        except ValueError:
            continue  # 29 Feb in a common year
        if cand - ref <= _SKEW:
            return cand.astimezone(UTC)
    raise ValueError(f"no year makes {month:02d}-{day:02d} a valid date")


def parse_mdy(m: re.Match[str], ref: dt.datetime) -> dt.datetime:
    """A match of ``_MDY`` → UTC datetime."""
    mon, day, year, hh, mm, ss, frac, zn = m.groups()
    month = MONTHS.get(mon)
    if month is None:
        raise ValueError(f"{mon!r} is not a month abbreviation")
    micro = int(frac.ljust(6, "0")) if frac else 0
    tz = zone(zn) if zn else UTC
    if year is None:
        return infer_year(month, int(day), int(hh), int(mm), int(ss), micro, tz, ref)
    return dt.datetime(int(year), month, int(day), int(hh), int(mm), int(ss), micro,
                       tzinfo=tz).astimezone(UTC)


def parse_iso(text: str) -> dt.datetime:
    """ISO 8601 / RFC 3339 date-time → UTC (no zone: UTC)."""
    if not _ISO.fullmatch(text):
        raise ValueError(f"{text[:40]!r} is not an ISO 8601 date-time")
    text = text.replace(",", ".").replace("z", "Z")
    if "." in text:
        text = _trim_fraction(text)
    t = dt.datetime.fromisoformat(text)
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def parse_rfc3339(text: str) -> dt.datetime:
    """An RFC 3339 time stamp that already matched a strict pattern (``T``, at most 6 fraction
    digits, ``Z`` or ``±hh:mm``; the syslog header's) → UTC. What ``parse_iso`` gives for such
    text, without its checks and rewrites (separators, lower-case ``z``, long fractions), which
    that text never needs: a syslog line's time costs half as much."""
    return dt.datetime.fromisoformat(text).astimezone(UTC)


def _trim_fraction(text: str) -> str:
    """Python reads at most 6 fraction digits; RFC 3339 allows more: drop the extra ones."""
    head, _, tail = text.partition(".")
    i = 0
    while i < len(tail) and tail[i].isdigit():
        i += 1
    return f"{head}.{tail[:min(i, 6)]}{tail[i:]}"


def parse_time(text: str, ref: dt.datetime) -> dt.datetime:
    """Any of the accepted forms: epoch milliseconds, ``Mmm dd [yyyy] HH:mm:ss...``, ISO 8601."""
    if _DIGITS.fullmatch(text):
        return from_epoch_ms(float(text))
    m = _MDY.fullmatch(text)
    if m is not None:
        return parse_mdy(m, ref)
    return parse_iso(text)


# Java SimpleDateFormat letters (LEEF devTimeFormat) → strptime
_JAVA_TOKENS = [("yyyy", "%Y"), ("yy", "%y"), ("MMMM", "%B"), ("MMM", "%b"), ("MM", "%m"),
                ("dd", "%d"), ("d", "%d"), ("HH", "%H"), ("H", "%H"), ("hh", "%I"), ("h", "%I"),
                ("mm", "%M"), ("ss", "%S"), ("SSS", "%f"), ("a", "%p"), ("XXX", "%z"),
                ("XX", "%z"), ("X", "%z"), ("Z", "%z"), ("z", "%Z"), ("EEE", "%a"),
                ("M", "%m")]
_JAVA_RE = re.compile("|".join(re.escape(t) for t, _ in _JAVA_TOKENS) + r"|'[^']*'|[A-Za-z]|%")


@functools.lru_cache(maxsize=64)
def java_to_strptime(fmt: str) -> str:
    """Translate a Java ``SimpleDateFormat`` pattern (as LEEF's devTimeFormat sends) to strptime."""
    table = dict(_JAVA_TOKENS)

    def sub(m: re.Match[str]) -> str:
        tok = m.group(0)
        if tok in table:
            return table[tok]
        if tok == "%":
            return "%%"
        if tok.startswith("'"):
            return tok[1:-1].replace("%", "%%") or "'"
        raise ValueError(f"pattern letter {tok!r} is not supported")

    return _JAVA_RE.sub(sub, fmt)


def parse_java(text: str, java_fmt: str) -> dt.datetime:
    """A time sent with a Java date pattern → UTC; the ``%Z`` zone must be UTC or GMT."""
    t = dt.datetime.strptime(text, java_to_strptime(java_fmt))
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
