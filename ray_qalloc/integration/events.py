"""One internal model for every security event, aligned with OCSF 1.x (https://schema.ocsf.io).

Why one model: threat rules (later) should be written once, against ``SecurityEvent``, not
once per SIEM dialect. Every parser (CEF, LEEF, syslog, OCSF JSON, STIX 2.1) ends in this
model; what a format carries beyond it stays in ``extensions`` (never dropped), and the
record itself stays in ``raw``, verbatim, for audit and re-parsing.

Attribute names follow OCSF where OCSF has one (``class_uid``, ``category_uid``,
``severity_id``, ``activity_name``, ``message``, ``product.vendor_name``, ``observables``
with OCSF ``type_id``, ``metadata.event_code`` → ``event_code``), so that an OCSF consumer
reads it without a table.

Severity: each source scale is mapped onto OCSF ``severity_id`` by the functions below; the
mapping and its reason are in each function's docstring.

Speed: parsers construct events with ``SecurityEvent.fast`` (pydantic ``model_construct``)
after checking every value themselves, because full validation of a nested model costs
more than parsing a CEF line. The OCSF and STIX parsers, which read untrusted JSON shapes,
validate their input first (a pydantic model of the OCSF attributes used; ``stix2``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from enum import IntEnum
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

_M = TypeVar("_M", bound=BaseModel)

EventFormat = Literal["cef", "leef", "syslog", "ocsf", "stix"]


class SeverityId(IntEnum):
    """OCSF ``severity_id``."""

    UNKNOWN = 0
    INFORMATIONAL = 1
    LOW = 2
    MEDIUM = 3
    HIGH = 4
    CRITICAL = 5
    FATAL = 6
    OTHER = 99


SEVERITY_NAMES: dict[int, str] = {
    0: "Unknown", 1: "Informational", 2: "Low", 3: "Medium", 4: "High", 5: "Critical",
    6: "Fatal", 99: "Other",
}


class ObservableType(IntEnum):
    """OCSF observable ``type_id`` (the scalar types of OCSF 1.x's observable object)."""

    UNKNOWN = 0
    HOSTNAME = 1          # OCSF: "a device's name or a domain name"; domains map here too
    IP_ADDRESS = 2
    MAC_ADDRESS = 3
    USER_NAME = 4
    EMAIL_ADDRESS = 5
    URL_STRING = 6
    FILE_NAME = 7
    HASH = 8
    PROCESS_NAME = 9
    RESOURCE_UID = 10
    PORT = 11
    SUBNET = 12
    COMMAND_LINE = 13
    PROCESS_ID = 15
    OTHER = 99


ObservableKind = Literal["ip", "hostname", "domain", "user", "email", "url", "mac", "port",
                         "process", "pid", "file_name", "md5", "sha1", "sha256", "sha512",
                         "hash"]

#: Our finer kind (what a rule matches on) → the OCSF type it is reported as. OCSF has one
#: "Hash" type for every algorithm and one "Hostname" type for hosts and domains; ``kind``
#: keeps the distinction.
KIND_TYPE: dict[str, ObservableType] = {
    "ip": ObservableType.IP_ADDRESS, "hostname": ObservableType.HOSTNAME,
    "domain": ObservableType.HOSTNAME, "user": ObservableType.USER_NAME,
    "email": ObservableType.EMAIL_ADDRESS, "url": ObservableType.URL_STRING,
    "mac": ObservableType.MAC_ADDRESS, "port": ObservableType.PORT,
    "process": ObservableType.PROCESS_NAME, "pid": ObservableType.PROCESS_ID,
    "file_name": ObservableType.FILE_NAME, "md5": ObservableType.HASH,
    "sha1": ObservableType.HASH, "sha256": ObservableType.HASH, "sha512": ObservableType.HASH,
    "hash": ObservableType.HASH,
}

_TYPE_NAMES: dict[int, str] = {
    0: "Unknown", 1: "Hostname", 2: "IP Address", 3: "MAC Address", 4: "User Name",
    5: "Email Address", 6: "URL String", 7: "File Name", 8: "Hash", 9: "Process Name",
    10: "Resource UID", 11: "Port", 12: "Subnet", 13: "Command Line", 15: "Process ID",
    99: "Other",
}

_HASH_BY_LEN = {32: "md5", 40: "sha1", 64: "sha256", 128: "sha512"}


def hash_kind(value: str) -> str:
    """The algorithm a hex digest most likely comes from, by its length ("hash" if unsure)."""
    return _HASH_BY_LEN.get(len(value), "hash")


def construct(cls: type[_M], values: dict[str, Any]) -> _M:
    """An instance of a pydantic model from already-checked values, without validation.

    Does what ``model_construct`` does minus its per-field default and alias handling, which
    costs ~6 µs per object (measured) — more than parsing a CEF line. ``values`` must hold
    every field. Tests compare such instances with validated ones, so a pydantic upgrade
    that changes instance layout fails loudly there.
    """
    obj = cls.__new__(cls)
    _set = object.__setattr__
    _set(obj, "__dict__", values)
    _set(obj, "__pydantic_fields_set__", set(values))
    _set(obj, "__pydantic_extra__", None)
    _set(obj, "__pydantic_private__", None)
    return obj


class Observable(BaseModel):
    """A pivot value found in the event (OCSF ``observable``): what threat rules match on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: ObservableKind
    type_id: ObservableType
    type: str = Field(description="OCSF caption of type_id.")
    name: str = Field(description="Where in the source record the value was found, e.g. 'src'.")
    value: str

    @classmethod
    def of(cls, kind: str, value: str, name: str) -> Observable:
        """Build without validation; ``kind`` must be a key of ``KIND_TYPE`` (KeyError if not)."""
        tid = KIND_TYPE[kind]
        return construct(cls, {"kind": kind, "type_id": tid, "type": _TYPE_NAMES[tid],
                               "name": name, "value": value})


class Product(BaseModel):
    """The product that reported the event (OCSF ``metadata.product``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vendor_name: str | None = None
    name: str | None = None
    version: str | None = None

    @property
    def vendor(self) -> str | None:
        """Short alias of ``vendor_name``."""
        return self.vendor_name

    @classmethod
    def of(cls, vendor_name: str | None, name: str | None, version: str | None) -> Product:
        """Build without validation (the caller passes strings or None). Shared while it repeats
        (a stream comes from a handful of products, and the instance is frozen): at most
        ``_PRODUCTS_MAX`` kept, emptied when full, short names only."""
        key = (vendor_name, name, version)
        product = _PRODUCTS.get(key)
        if product is None:
            product = construct(cls, {"vendor_name": vendor_name, "name": name, "version": version})
            if sum(len(x) for x in key if x is not None) <= 256:
                if len(_PRODUCTS) >= _PRODUCTS_MAX:
                    _PRODUCTS.clear()
                _PRODUCTS[key] = product
        return product


_PRODUCTS: dict[tuple[str | None, str | None, str | None], Product] = {}
_PRODUCTS_MAX = 1_024


class SyslogInfo(BaseModel):
    """The syslog header an event arrived in (RFC 5424 or RFC 3164), kept beside the event.

    ``structured_data`` maps SD-ID → PARAM-NAME → value; a PARAM-NAME that occurs more than
    once in one element (RFC 5424 allows it) gives a list of its values in order.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    rfc: Literal["5424", "3164"] = Field(description="Which header form.")
    facility: int | None = Field(None, description="None where the header had no <PRI>.")
    severity: int | None = None
    timestamp: dt.datetime | None = None
    hostname: str | None = None
    app_name: str | None = None
    procid: str | None = None
    msgid: str | None = None
    structured_data: dict[str, dict[str, str | list[str]]] = Field(default_factory=dict)


class SecurityEvent(BaseModel):
    """A normalized security event (OCSF-aligned); see the module docstring.

    ``id`` is a hash of ``raw`` (see ``event_id``): ingesting the same record twice gives
    the same id, so a store can drop the duplicate.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    tenant: str = "default"
    time: dt.datetime = Field(description="When it happened, UTC (source time; else receipt).")
    received_at: dt.datetime = Field(description="When ray-qalloc read it, UTC.")
    class_uid: int = 0
    class_name: str = "Base Event"
    category_uid: int = 0
    category_name: str = "Uncategorized"
    severity_id: SeverityId = SeverityId.UNKNOWN
    severity: str = "Unknown"
    activity_name: str | None = None
    message: str | None = None
    event_code: str | None = Field(None, description="The source's event type id (OCSF "
                                   "metadata.event_code): CEF signatureId, LEEF EventID, syslog MSGID.")
    product: Product = Field(default_factory=Product)
    observables: list[Observable] = Field(default_factory=list)
    format: EventFormat
    syslog: SyslogInfo | None = None
    raw: str
    extensions: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def fast(cls, **fields: Any) -> SecurityEvent:
        """Construct without validation: for parsers that checked every value themselves.

        Fields left out take their defaults; ``product``, ``observables``, ``syslog`` and
        ``extensions`` must be given (their defaults are mutable).
        """
        values = _EVENT_DEFAULTS.copy()
        values.update(fields)  # keeps the fields' declared order, as validation would
        return construct(cls, values)


#: Every field in declared order, with its default (None for required ones).
_EVENT_DEFAULTS: dict[str, Any] = {
    name: (None if f.is_required() or f.default_factory is not None else f.default)
    for name, f in SecurityEvent.model_fields.items()
}


def event_id(raw: str) -> str:
    """Stable id of a record: the first 128 bits of SHA-256 over its UTF-8 bytes, in hex.

    128 bits make an accidental collision across any realistic event volume negligible;
    the full digest would only make ids longer.
    """
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def severity_from_cef(value: int) -> SeverityId:
    """CEF severity 0–10 → OCSF.

    ArcSight bands its own 0–10 scale as Low 0–3, Medium 4–6, High 7–8, Very-High 9–10;
    we keep those bands (Very-High → Critical) so that an analyst sees the same word in
    ArcSight and here. OCSF Fatal (6) is kept for syslog's "system unusable".
    """
    if value <= 3:
        return SeverityId.LOW
    if value <= 6:
        return SeverityId.MEDIUM
    if value <= 8:
        return SeverityId.HIGH
    return SeverityId.CRITICAL


#: CEF also allows severity words instead of a number.
CEF_SEVERITY_WORDS: dict[str, SeverityId] = {
    "unknown": SeverityId.UNKNOWN, "low": SeverityId.LOW, "medium": SeverityId.MEDIUM,
    "high": SeverityId.HIGH, "very-high": SeverityId.CRITICAL,
}


def severity_from_leef(value: int) -> SeverityId:
    """LEEF ``sev`` 1–10 (QRadar's scale) → OCSF; 0 (sent by some sources for "none") → Unknown.

    Same bands as CEF (1–3 Low, 4–6 Medium, 7–8 High, 9–10 Critical) because QRadar and
    ArcSight describe the same 10-point scale and a rule should not care which SIEM sent it.
    """
    if value == 0:
        return SeverityId.UNKNOWN
    return severity_from_cef(value)


_SYSLOG_SEVERITY = (SeverityId.FATAL, SeverityId.CRITICAL, SeverityId.CRITICAL, SeverityId.HIGH,
                    SeverityId.MEDIUM, SeverityId.LOW, SeverityId.INFORMATIONAL,
                    SeverityId.INFORMATIONAL)


def severity_from_syslog(value: int) -> SeverityId:
    """Syslog severity 0–7 (RFC 5424 §6.2.1) → OCSF.

    0 Emergency ("system is unusable") → Fatal; 1 Alert ("action must be taken
    immediately") and 2 Critical → Critical; 3 Error → High; 4 Warning → Medium;
    5 Notice → Low; 6 Informational and 7 Debug → Informational. Syslog's scale is about the
    sender's health, not threat; this keeps its order and puts "act now" at Critical.
    """
    return _SYSLOG_SEVERITY[value]


#: STIX 2.1 has no severity property; the object's type says how actionable it is.
STIX_SEVERITY: dict[str, SeverityId] = {
    "sighting": SeverityId.HIGH,
    "indicator": SeverityId.MEDIUM,
    "malware": SeverityId.LOW,
    "attack-pattern": SeverityId.LOW,
    "threat-actor": SeverityId.LOW,
    "intrusion-set": SeverityId.LOW,
    "campaign": SeverityId.LOW,
    "tool": SeverityId.LOW,
    "vulnerability": SeverityId.LOW,
    "infrastructure": SeverityId.LOW,
    "observed-data": SeverityId.INFORMATIONAL,
    "report": SeverityId.INFORMATIONAL,
}


def severity_from_stix(stix_type: str) -> SeverityId:
    """STIX object type → OCSF severity.

    A *sighting* says a threat was seen in someone's environment: High, the most actionable
    thing STIX says. An *indicator* is a detectable threat not (yet) seen here: Medium.
    Knowledge objects (malware, attack-pattern, threat-actor, intrusion-set, campaign, tool,
    vulnerability, infrastructure) are context for rules: Low. *observed-data* (raw
    observations, not a verdict) and *report* (a container of the above): Informational.
    STIX ``confidence`` (0–100) measures certainty, not harm, so it does not change the
    severity; it is kept in ``extensions``.
    """
    return STIX_SEVERITY.get(stix_type, SeverityId.UNKNOWN)
