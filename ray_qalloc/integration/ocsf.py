"""OCSF 1.x JSON events (one object or a list) → ``SecurityEvent``.

Why our own pydantic model rather than ``py-ocsf-models`` (PyPI, Prowler's, maintained):
it models only the finding classes Prowler emits (Detection, Compliance, Application
Security Posture) plus the base event, pins ``email-validator`` exactly, and refuses or
drops what it does not model — while SIEMs send every class. So we validate the attributes
we use and keep every other attribute, untouched, in ``extensions``.

Checked (OCSF's required base attributes that a rule needs):
- ``class_uid`` (int ≥ 0), ``severity_id`` (0–6 or 99), ``time`` (epoch milliseconds,
  number), ``metadata.version`` (the schema version, string) and ``metadata.product`` with
  a ``name`` or ``vendor_name``;
- ``category_uid`` may be left out (it is ``class_uid // 1000``); when given it must agree;
- ``activity_id`` and ``type_uid`` are not required (many producers omit them); when given
  they stay in ``extensions``.

Mapped: ``message`` (else ``finding_info.title``), ``activity_name``,
``metadata.event_code``, the ``observables`` array (scalar types; other entries stay in
``extensions["observables"]``) and well-known fields — endpoints' ``ip``/``hostname``/
``port``/``mac``/``domain``, ``user.name``, ``actor.user.name``, ``url.url_string``,
``file.name``/``file.hashes``, process names — at the top level and in each ``evidences``
entry (Detection Finding 2004). The event's ``raw`` is the text as sent for a single object,
and the canonical JSON (sorted keys) of each element for a list.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ray_qalloc.exceptions import InvalidEvent
from ray_qalloc.integration import times
from ray_qalloc.integration.errors import clip, invalid
from ray_qalloc.integration.events import (SEVERITY_NAMES, Observable, Product, SecurityEvent,
                                           SeverityId, event_id, hash_kind, utc_now)
from ray_qalloc.integration.jsontext import canonical, load_json

FMT = "ocsf"

CATEGORY_NAMES = {0: "Uncategorized", 1: "System Activity", 2: "Findings",
                  3: "Identity & Access Management", 4: "Network Activity", 5: "Discovery",
                  6: "Application Activity", 7: "Remediation", 8: "Unmanned Systems"}
CLASS_NAMES = {0: "Base Event", 1001: "File System Activity", 1007: "Process Activity",
               2001: "Security Finding", 2002: "Vulnerability Finding",
               2003: "Compliance Finding", 2004: "Detection Finding", 2005: "Incident Finding",
               2006: "Data Security Finding", 3001: "Account Change", 3002: "Authentication",
               3003: "Authorize Session", 4001: "Network Activity", 4002: "HTTP Activity",
               4003: "DNS Activity", 4004: "DHCP Activity", 4005: "RDP Activity",
               4006: "SMB Activity", 4007: "SSH Activity", 4008: "FTP Activity",
               4009: "Email Activity", 6003: "API Activity"}

_TYPE_KIND = {1: "hostname", 2: "ip", 3: "mac", 4: "user", 5: "email", 6: "url", 7: "file_name",
              8: "hash", 9: "process", 11: "port", 15: "pid"}
_HASH_ALGO = {1: "md5", 2: "sha1", 3: "sha256", 4: "sha512"}
_PATHS: tuple[tuple[str, tuple[str, ...], str], ...] = tuple(
    (f"{obj}.{attr}", (obj, attr), kind)
    for obj in ("src_endpoint", "dst_endpoint", "device")
    for attr, kind in (("ip", "ip"), ("hostname", "hostname"), ("port", "port"), ("mac", "mac"),
                       ("domain", "domain"))
) + (("user.name", ("user", "name"), "user"), ("actor.user.name", ("actor", "user", "name"), "user"),
     ("url.url_string", ("url", "url_string"), "url"), ("file.name", ("file", "name"), "file_name"),
     ("process.name", ("process", "name"), "process"),
     ("actor.process.name", ("actor", "process", "name"), "process"))
_MAPPED = frozenset({"class_uid", "class_name", "category_uid", "category_name", "time",
                     "severity_id", "severity", "activity_name", "message", "observables"})


class _Product(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str | None = None
    vendor_name: str | None = None
    version: str | None = None

    @model_validator(mode="after")
    def _named(self) -> _Product:
        if self.name is None and self.vendor_name is None:
            raise ValueError("needs 'name' or 'vendor_name'")
        return self


class _Metadata(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    product: _Product
    version: str = Field(description="OCSF schema version, e.g. '1.3.0'.")
    event_code: str | None = None


class OcsfIn(BaseModel):
    """The OCSF attributes ray-qalloc reads, validated; every other attribute is allowed."""

    model_config = ConfigDict(extra="allow", strict=True)
    class_uid: int = Field(ge=0, le=999999)
    class_name: str | None = None
    category_uid: int | None = Field(None, ge=0, le=99)
    category_name: str | None = None
    time: float = Field(description="Epoch milliseconds (an integer in OCSF; floats are accepted).")
    severity_id: int
    severity: str | None = None
    activity_name: str | None = None
    message: str | None = None
    metadata: _Metadata
    observables: list[dict[str, Any]] | None = None

    @field_validator("severity_id")
    @classmethod
    def _severity(cls, v: int) -> int:
        if v not in SEVERITY_NAMES:
            raise ValueError("must be one of 0-6 or 99")
        return v


_FIX = {
    "class_uid": "send the OCSF class id as a whole number (e.g. 2004 for Detection Finding).",
    "time": "send 'time' as milliseconds since 1970 (a number).",
    "severity_id": "send severity_id as one of 0-6 or 99.",
    "metadata": "send metadata with 'version' (the OCSF schema version) and 'product' "
                "({'name': ..., 'vendor_name': ...}).",
}


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _observables(doc: dict[str, Any], unmapped: list[Any]) -> list[Observable]:
    seen: set[tuple[str, str, str]] = set()
    out: list[Observable] = []

    def add(kind: str, value: Any, name: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
            return
        value = str(value)
        if kind == "hash":
            kind = hash_kind(value)
        if (kind, value, name) not in seen:
            seen.add((kind, value, name))
            out.append(Observable.of(kind, value, name))

    for i, ob in enumerate(doc.get("observables") or ()):
        kind = _TYPE_KIND.get(ob.get("type_id")) if isinstance(ob.get("type_id"), int) else None
        if kind is None or not isinstance(ob.get("value"), str):
            unmapped.append(ob)
            continue
        add(kind, ob["value"], ob.get("name") if isinstance(ob.get("name"), str) else f"observables[{i}]")
    scopes: list[tuple[str, Any]] = [("", doc)]
    evidences = doc.get("evidences")
    if isinstance(evidences, list):
        scopes += [(f"evidences[{i}].", ev) for i, ev in enumerate(evidences)]
    for prefix, scope in scopes:
        for name, path, kind in _PATHS:
            add(kind, _get(scope, path), prefix + name)
        hashes = _get(scope, ("file", "hashes"))
        if isinstance(hashes, list):
            for h in hashes:
                if isinstance(h, dict) and isinstance(h.get("value"), str):
                    add(_HASH_ALGO.get(h.get("algorithm_id"), "hash"), h["value"],  # type: ignore[arg-type]
                        prefix + "file.hashes")
    return out


def event_from_ocsf(doc: Any, raw: str, *, tenant: str = "default",
                    received_at: dt.datetime | None = None) -> SecurityEvent:
    """Validate one OCSF object and build its event; ``InvalidEvent`` names the bad attribute."""
    if not isinstance(doc, dict):
        raise invalid(FMT, "event", f"an OCSF event must be a JSON object, got {type(doc).__name__}",
                      "send each event as a JSON object.")
    try:
        ev = OcsfIn.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "event"
        raise invalid(FMT, where, f"{err['msg']} (got {clip(repr(err.get('input')), 40)})",
                      _FIX.get(where.split(".")[0], "see https://schema.ocsf.io for the attribute.")) from None
    category = ev.class_uid // 1000
    if ev.category_uid is not None and ev.category_uid != category:
        raise invalid(FMT, "category_uid", f"category {ev.category_uid} does not contain class {ev.class_uid}",
                      f"send category_uid {category} (class_uid // 1000), or leave it out.")
    try:
        when = times.from_epoch_ms(ev.time)
    except (ValueError, OverflowError) as exc:
        raise invalid(FMT, "time", str(exc), _FIX["time"]) from None
    now = received_at or utc_now()
    unmapped: list[Any] = []
    observables = _observables(doc, unmapped)
    extensions = {k: v for k, v in doc.items() if k not in _MAPPED}
    if unmapped:
        extensions["observables"] = unmapped
    sid = SeverityId(ev.severity_id)
    p = ev.metadata.product
    title = _get(doc, ("finding_info", "title"))
    return SecurityEvent.fast(
        id=event_id(raw), tenant=tenant, time=when, received_at=now,
        class_uid=ev.class_uid, class_name=ev.class_name or CLASS_NAMES.get(ev.class_uid, f"Class {ev.class_uid}"),
        category_uid=category,
        category_name=ev.category_name or CATEGORY_NAMES.get(category, f"Category {category}"),
        severity_id=sid, severity=ev.severity or SEVERITY_NAMES[sid],
        activity_name=ev.activity_name,
        message=ev.message if ev.message is not None else (title if isinstance(title, str) else None),
        event_code=ev.metadata.event_code, product=Product.of(p.vendor_name, p.name, p.version),
        observables=observables, format=FMT, syslog=None, raw=raw, extensions=extensions)


def iter_ocsf(text: str, *, tenant: str = "default", received_at: dt.datetime | None = None
              ) -> Iterator[SecurityEvent | InvalidEvent]:
    """One event, or the error for it, per object of an OCSF document (object or list).

    A document that is not JSON, or neither an object nor a list, raises ``InvalidEvent``.
    An error for a list element carries ``details.index``.
    """
    doc = load_json(text, FMT)
    now = received_at or utc_now()
    if isinstance(doc, dict):
        try:
            yield event_from_ocsf(doc, text, tenant=tenant, received_at=now)
        except InvalidEvent as exc:
            yield exc
        return
    if not isinstance(doc, list):
        raise invalid(FMT, "json", f"expected an object or a list of objects, got {type(doc).__name__}",
                      "send one OCSF event object or a JSON array of them.")
    for i, item in enumerate(doc):
        try:
            yield event_from_ocsf(item, canonical(item, FMT), tenant=tenant, received_at=now)
        except InvalidEvent as exc:
            exc.details["index"] = i
            yield exc


def parse_ocsf(text: str, *, tenant: str = "default",
               received_at: dt.datetime | None = None) -> list[SecurityEvent]:
    """Parse an OCSF object or list; the first bad object raises ``InvalidEvent``."""
    out: list[SecurityEvent] = []
    for item in iter_ocsf(text, tenant=tenant, received_at=received_at):
        if isinstance(item, InvalidEvent):
            raise item
        out.append(item)
    return out
