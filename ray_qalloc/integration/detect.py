"""One entry point for a batch of security records: pick the format, parse, keep the good ones.

``parse_records(payload, content_type)`` returns, in input order, one ``SecurityEvent`` per
good record (a STIX bundle or OCSF list gives several) and one ``RecordError`` per bad one:
a batch with bad records keeps its good ones, and nothing is dropped without a trace.

Content types (parameters such as ``; charset=utf-8`` are allowed; the text must be UTF-8):

=============================================  ==============================================
``application/cef``, ``text/cef``              CEF, one record a line (syslog header allowed)
``application/leef``, ``text/leef``            LEEF 1.0/2.0, one a line (syslog header allowed)
``application/syslog``, ``text/syslog``        syslog (RFC 5424/3164), one a line; a MSG that is
                                               CEF or LEEF is parsed as such
``application/ocsf+json``                      OCSF: an object, an array, or one object a line
``application/stix+json`` (``;version=2.1``)   STIX 2.1: a bundle (or one bundle a line)
``application/json``, ``application/x-ndjson``  JSON, sniffed: ``"type": "bundle"`` or a STIX
                                               ``id`` → STIX; ``class_uid`` → OCSF
``text/plain``, ``application/octet-stream``,  sniffed: JSON as above if it starts with ``{``/``[``,
none                                           else per line: ``CEF:``/``LEEF:`` anywhere before
                                               the first ``|`` → CEF/LEEF, ``<PRI>`` → syslog
=============================================  ==============================================

Any other content type raises ``InvalidEvent`` (field ``content_type``): refusing is
clearer than guessing. Line formats: one record a line (``\\n``, ``\\r\\n``); blank lines are
skipped; ``index`` counts records, ``line`` is the 1-based line number.

Limits (``IntakeLimits``), checked before parsing: the payload's size (over it:
``LimitExceeded`` for the whole request), each line's size (over it: a ``RecordError``), and
the number of records (over it: ``LimitExceeded``). A JSON document is one payload; its
elements are counted as records, but are not measured one by one.
"""

from __future__ import annotations

import json

import datetime as dt
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ray_qalloc.exceptions import InvalidEvent, LimitExceeded, QAllocError
from ray_qalloc.integration.cef import parse_cef
from ray_qalloc.integration.errors import invalid
from ray_qalloc.integration.events import SecurityEvent, utc_now
from ray_qalloc.integration.leef import parse_leef
from ray_qalloc.integration.ocsf import iter_ocsf
from ray_qalloc.integration.syslog import parse_syslog

Format = Literal["cef", "leef", "syslog", "ocsf", "stix", "json", "sniff"]

#: Content type (lower case, no parameters) → format or "json"/"sniff" (detect).
CONTENT_TYPES: dict[str, Format] = {
    "application/cef": "cef", "text/cef": "cef",
    "application/leef": "leef", "text/leef": "leef",
    "application/syslog": "syslog", "text/syslog": "syslog",
    "application/ocsf+json": "ocsf",
    "application/stix+json": "stix",
    "application/json": "json", "application/x-ndjson": "json", "application/jsonl": "json",
    "text/plain": "sniff", "application/octet-stream": "sniff",
}


class IntakeLimits(BaseModel):
    """Size limits for one batch; the defaults suit a SIEM forwarder's HTTP batches."""

    model_config = ConfigDict(frozen=True)

    max_payload_bytes: int = Field(16 * 1024 * 1024, gt=0, description="Whole request body.")
    max_record_bytes: int = Field(64 * 1024, gt=0, description="One line (UTF-8 bytes).")
    max_records: int = Field(100_000, gt=0, description="Records in one batch.")


class RecordError(BaseModel):
    """Why one record of a batch was refused; the others in the batch were still read."""

    model_config = ConfigDict(frozen=True)

    index: int = Field(description="0-based position of the record in the batch.")
    line: int | None = Field(None, description="1-based line number, for line formats.")
    format: str | None = Field(description="The format it was read as (None: not recognised).")
    code: str = "invalid_event"
    field: str | None
    reason: str
    fix: str | None

    @classmethod
    def of(cls, exc: QAllocError, index: int, line: int | None, fmt: str | None) -> RecordError:
        return cls(index=index, line=line, format=exc.details.get("format", fmt), code=exc.code,
                   field=exc.field, reason=exc.message, fix=exc.fix)


Result = SecurityEvent | RecordError
_LINE_PARSERS: dict[str, Callable[..., SecurityEvent]] = {
    "cef": parse_cef, "leef": parse_leef, "syslog": parse_syslog}


def _media_type(content_type: str | None) -> Format:
    if content_type is None or not content_type.strip():
        return "sniff"
    base = content_type.split(";", 1)[0].strip().lower()
    fmt = CONTENT_TYPES.get(base)
    if fmt is None:
        raise invalid("payload", "content_type", f"{base!r} is not a security event content type",
                      "send one of " + ", ".join(sorted(CONTENT_TYPES)) + ".")
    for param in content_type.split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8", "us-ascii"):
            raise invalid("payload", "content_type", f"charset {value.strip()!r} is not supported",
                          "send UTF-8 and say 'charset=utf-8' (or nothing).")
    return fmt


def parse_line(text: str, *, tenant: str, received_at: dt.datetime) -> SecurityEvent:
    """One line of unknown format — CEF or LEEF, bare or behind any syslog header (with or
    without ``<PRI>``), or a plain syslog message — parsed by what it holds. The one dispatch
    for the HTTP endpoint's undeclared lines and the syslog listener's messages, so both read a
    line the same way. ``InvalidEvent`` names what is missing."""
    use = _sniff_line(text)
    if use is None:
        raise InvalidEvent(f"the record is not CEF, LEEF or syslog (no 'CEF:', 'LEEF:' or '<PRI>'; "
                           f"starts {text[:24]!r}).", field="format", format="syslog",
                           fix="send RFC 5424 or RFC 3164 syslog, or CEF/LEEF records.")
    return _LINE_PARSERS[use](text, tenant=tenant, received_at=received_at)


def _sniff_line(line: str) -> str | None:
    bar = line.find("|")
    head = line if bar < 0 else line[:bar + 1]
    if "CEF:" in head:
        return "cef"
    if "LEEF:" in head:
        return "leef"
    if line.startswith("<"):
        return "syslog"
    return None


def _sniff_json(text: str) -> str:
    """"stix" or "ocsf" for a JSON document, by a cheap look at its first object."""
    probe = text.lstrip()[:4096]
    if '"type"' in probe and ('"bundle"' in probe or '"spec_version"' in probe or '--' in probe):
        return "stix"
    return "ocsf"


def _check_size(n_chars: int, text: str, limit: int) -> int | None:
    """UTF-8 size of ``text`` if it may exceed ``limit``, else None (cheap: chars × 4 first)."""
    if n_chars * 4 <= limit:
        return None
    size = len(text.encode("utf-8", "surrogatepass"))
    return size if size > limit else None


def _lines(payload: str | bytes) -> Iterator[tuple[int, str | None, bytes | None]]:
    """``(line number, text or None, raw bytes if not UTF-8)`` of each non-blank line."""
    if isinstance(payload, bytes):
        for n, raw in enumerate(payload.split(b"\n"), 1):
            raw = raw.rstrip(b"\r")
            if not raw.strip():
                continue
            try:
                yield n, raw.decode("utf-8"), None
            except UnicodeDecodeError:
                yield n, None, raw
    else:
        for n, text in enumerate(payload.split("\n"), 1):
            text = text.rstrip("\r")
            if text.strip():
                yield n, text, None


def _parse_lines(payload: str | bytes, fmt: str, limits: IntakeLimits, tenant: str,
                 now: dt.datetime) -> list[Result]:
    out: list[Result] = []
    for index, (n, text, bad) in enumerate(_lines(payload)):
        if index >= limits.max_records:
            raise LimitExceeded(f"the batch has more than {limits.max_records} records.",
                                field="records", fix="split the batch, or raise max_records.")
        if text is None:
            out.append(RecordError(index=index, line=n, format=None if fmt == "sniff" else fmt,
                                   field="encoding", reason=f"line {n} is not UTF-8 (starts {bad[:20]!r}).",  # type: ignore[index]
                                   fix="send UTF-8 text."))
            continue
        if n == 1 and text.startswith("\ufeff"):
            text = text[1:]
        size = _check_size(len(text), text, limits.max_record_bytes)
        if size is not None:
            out.append(RecordError(
                index=index, line=n, format=None if fmt == "sniff" else fmt, code="limit_exceeded",
                field="record", reason=f"the record is {size} bytes, over the {limits.max_record_bytes}-byte limit.",
                fix="send smaller records, or raise max_record_bytes."))
            continue
        use = fmt if fmt != "sniff" else _sniff_line(text)
        if use is None:
            out.append(RecordError(index=index, line=n, format=None, field="format",
                                   reason="the record is not CEF, LEEF or syslog (no 'CEF:', 'LEEF:' or '<PRI>').",
                                   fix="send a content type naming the format, or one of the supported formats."))
            continue
        try:
            out.append(_LINE_PARSERS[use](text, tenant=tenant, received_at=now))
        except InvalidEvent as exc:
            out.append(RecordError.of(exc, index, n, use))
    return out


def _json_docs(text: str) -> list[tuple[int | None, str]]:
    """The JSON documents of a payload: the whole text, or one per line (NDJSON)."""
    stripped = text.strip()
    if "\n" in stripped and not stripped.startswith("[") and not _one_document(stripped):
        lines = [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
        if len(lines) > 1:
            return lines
    return [(None, text)]


def _one_document(text: str) -> bool:
    """Whether a multi-line text is one (pretty-printed) JSON document rather than NDJSON: the
    first value read ends where the text does."""
    try:
        _, end = json.JSONDecoder().raw_decode(text)
    except (ValueError, RecursionError):
        return False
    return end == len(text)


def _iter_doc(fmt: str, text: str, tenant: str, now: dt.datetime
              ) -> Iterable[SecurityEvent | InvalidEvent]:
    if fmt == "stix":
        from ray_qalloc.integration.stix import iter_stix
        return iter_stix(text, tenant=tenant, received_at=now)
    return iter_ocsf(text, tenant=tenant, received_at=now)


def _parse_json(text: str, fmt: str, limits: IntakeLimits, tenant: str, now: dt.datetime
                ) -> list[Result]:
    out: list[Result] = []
    index = 0
    for n, doc in _json_docs(text):
        use = fmt if fmt in ("stix", "ocsf") else _sniff_json(doc)
        if n is not None:
            size = _check_size(len(doc), doc, limits.max_record_bytes)
            if size is not None:
                out.append(RecordError(index=index, line=n, format=use, code="limit_exceeded",
                                       field="record", reason=f"line {n} is {size} bytes, over the "
                                       f"{limits.max_record_bytes}-byte limit.",
                                       fix="send smaller records, or raise max_record_bytes."))
                index += 1
                continue
        try:
            for item in _iter_doc(use, doc, tenant, now):
                if index >= limits.max_records:
                    raise LimitExceeded(f"the batch has more than {limits.max_records} records.",
                                        field="records", fix="split the batch, or raise max_records.")
                if isinstance(item, InvalidEvent):
                    out.append(RecordError.of(item, index, n, use))
                else:
                    out.append(item)
                index += 1
        except InvalidEvent as exc:  # the document as a whole (not JSON, not a bundle, ...)
            out.append(RecordError.of(exc, index, n, use))
            index += 1
    return out


def parse_records(payload: str | bytes, content_type: str | None = None, *,
                  tenant: str = "default", limits: IntakeLimits | None = None,
                  received_at: dt.datetime | None = None) -> list[Result]:
    """Parse a batch of security records; see the module docstring for formats and limits.

    Raises ``InvalidEvent`` (unknown content type, JSON that is not UTF-8), ``LimitExceeded``
    (payload or record count over the limits) and ``ConfigError`` (STIX without the
    ``siem`` extra); every per-record problem is a ``RecordError`` in the result instead.
    """
    limits = limits or IntakeLimits()
    fmt = _media_type(content_type)
    size = len(payload) if isinstance(payload, bytes) else _check_size(len(payload), payload, limits.max_payload_bytes)
    if size is not None and size > limits.max_payload_bytes:
        raise LimitExceeded(f"the payload is {size} bytes, over the {limits.max_payload_bytes}-byte limit.",
                            field="payload", fix="send smaller batches, or raise max_payload_bytes.")
    now = received_at or utc_now()
    if isinstance(payload, bytes):
        first = payload[:64].removeprefix(b"\xef\xbb\xbf").lstrip()[:1].decode("latin-1")
    else:
        first = payload[:64].lstrip("\ufeff \t\r\n")[:1]
    is_json = fmt in ("ocsf", "stix", "json") or (fmt == "sniff" and first in ("{", "["))
    if not is_json:
        return _parse_lines(payload, fmt, limits, tenant, now)
    if isinstance(payload, bytes):
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise invalid("json", "payload", f"the payload is not UTF-8 (byte {exc.start})",
                          "send JSON as UTF-8 (RFC 8259).") from None
    else:
        text = payload
    text = text.removeprefix("\ufeff")
    return _parse_json(text, fmt, limits, tenant, now)
