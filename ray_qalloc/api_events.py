"""Security events in over HTTP: ``POST /v1/events`` (a batch in any supported format) and
``GET /v1/events`` (the caller's stored events).

Kept apart from ``api.create_app`` (jobs, tenants, health) so that each concern stays small;
``create_app`` mounts these routes with one call, handing over its auth dependency.

Why the answer is 200 / 207 / 422: a SIEM forwarder sends batches of records from many
sources, and one malformed line must not cost it the other 9,999. So a batch with bad
records keeps its good ones and says which were refused and why; the status says at a
glance whether anything needs a look: **200** every record is stored (or was already: a
duplicate), **207 Multi-Status** some were refused, **422** none was usable (nothing
stored). The body has the same shape in all three (on 422 with the usual ``error`` beside
it). "Accepted" is said only after the events are committed to the store.

Why events are tenant-scoped: the tenant is the token's; a tenant reads only its own events,
and the same record sent by two tenants is two events.

Rate limit: a token bucket per tenant (``events.rate_per_s``, ``events.burst``), charged one
token per record (good or bad: each costs parsing), held by each API replica in its memory:
with N replicas a tenant may send up to N times the rate. Over it: 429 with ``Retry-After``
and nothing stored.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import threading
import time
from typing import Annotated, Any, Callable

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ray_qalloc.config import EventSettings
from ray_qalloc.exceptions import (IdempotencyKeyReused, InvalidEvent, InvalidRequest, LimitExceeded,
                                   QAllocError, QuotaExceeded)
from ray_qalloc.integration.detect import CONTENT_TYPES, IntakeLimits, RecordError, parse_records
from ray_qalloc.integration.events import SEVERITY_NAMES, SecurityEvent
from ray_qalloc.integration.eventstore import EventPage, EventStore, StoredAnswer, body_digest, count_events
from ray_qalloc.integration.gcpause import paused_gc
from ray_qalloc.integration.ocsf import CATEGORY_NAMES

__all__ = ["add_event_routes", "TokenBucket", "EventsResult", "EventIntake", "severity_of", "category_of"]


# ---- bodies ----------------------------------------------------------------------------------
class RecordErrorOut(BaseModel):
    """Why one record of the batch was refused (the others were still read)."""

    index: int = Field(description="0-based position of the record in the batch.")
    line: int | None = Field(None, description="1-based line number, for line formats.")
    format: str | None = Field(None, description="The format it was read as (null: not recognised).")
    code: str = Field(description="Stable error code, e.g. invalid_event, limit_exceeded.")
    field: str | None = Field(None, description="The part of the record at fault.")
    reason: str
    hint: str | None = Field(None, description="What to change.")


class EventsResult(BaseModel):
    """What became of a batch: accepted + duplicates + rejected = records in the batch."""

    accepted: int = Field(description="Records stored now (committed before this answer).")
    duplicates: int = Field(description="Good records whose event was stored already (same record sent "
                                        "before, or twice in this batch): not stored again, not an error.")
    rejected: int = Field(description="Records refused; each is in `errors`.")
    errors: list[RecordErrorOut] = Field(default_factory=list)
    ids: list[str] = Field(default_factory=list, description="The event id of every good record, in batch "
                                                             "order (a duplicate's id names the stored event).")


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None
    hint: str | None = None
    details: dict[str, Any] | None = None


class EventsRefused(BaseModel):
    """422: the usual error, and for a batch that was read but had no usable record, the same
    fields as a 200/207 answer (`accepted` 0, every record in `errors`)."""

    error: ErrorBody
    accepted: int | None = None
    duplicates: int | None = None
    rejected: int | None = None
    errors: list[RecordErrorOut] | None = None
    ids: list[str] | None = None


class EventOut(SecurityEvent):
    """A stored event: the normalized SecurityEvent; `raw` only with `?raw=true`."""

    raw: str | None = Field(None, description="The record verbatim (only with ?raw=true).")  # type: ignore[assignment]


class EventPageOut(BaseModel):
    events: list[EventOut]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; null at the end.")


# ---- request body in OpenAPI: one entry per media type ------------------------------------------
_CEF = ("CEF:0|Acme|IDS|2.1|4001|Port scan detected|7|src=10.0.0.5 dst=192.168.1.20 dpt=22 "
        "suser=alice msg=scan of 1024 ports")
_LEEF = "LEEF:2.0|Acme|Firewall|1.0|deny|^|src=10.0.0.5^dst=192.168.1.20^sev=6^proto=TCP"
_SYSLOG = "<34>1 2025-06-01T12:00:00Z fw1 sshd 4123 AUTHFAIL - Failed password for root from 203.0.113.9"
_OCSF = {"class_uid": 2004, "category_uid": 2, "severity_id": 4, "time": 1748779200000,
         "message": "Malware detected on host-7", "metadata": {"version": "1.3.0", "product": {"vendor_name": "Acme", "name": "EDR"}}}
_STIX = {"type": "bundle", "id": "bundle--5d0092c5-5f74-4287-9642-33f4c354e56d", "objects": [{
    "type": "indicator", "spec_version": "2.1", "id": "indicator--8e2e2d2b-17d4-4cbf-938f-98ee46b3cd3f",
    "created": "2025-06-01T12:00:00.000Z", "modified": "2025-06-01T12:00:00.000Z", "name": "Known C2 address",
    "pattern": "[ipv4-addr:value = '198.51.100.7']", "pattern_type": "stix",
    "valid_from": "2025-06-01T12:00:00Z"}]}
_TEXT = {"type": "string", "minLength": 1, "description": "One record a line."}
_JSON_DOC = {"oneOf": [{"type": "object", "minProperties": 1},
                       {"type": "array", "minItems": 1, "items": {"type": "object", "minProperties": 1}}]}
REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "description": "One record or many. The content type declares the format; `text/plain` (or "
                   "`application/json`) lets the server detect it per line (per document). Line formats: "
                   "one record a line, blank lines skipped. UTF-8 only.",
    "content": {
        "application/cef": {"schema": _TEXT, "example": _CEF},
        "application/leef": {"schema": _TEXT, "example": _LEEF},
        "application/syslog": {"schema": {**_TEXT, "description": "RFC 5424 or 3164, one a line; CEF or "
                                          "LEEF inside is read as such."}, "example": _SYSLOG},
        "application/ocsf+json": {"schema": _JSON_DOC, "example": _OCSF},
        "application/stix+json": {"schema": {"type": "object", "required": ["type", "objects"],
                                             "properties": {"type": {"const": "bundle"},
                                                            "objects": {"type": "array", "minItems": 1,
                                                                        "items": {"type": "object"}}}},
                                  "example": _STIX},
        "application/json": {"schema": _JSON_DOC, "example": _OCSF},
        "text/plain": {"schema": _TEXT, "example": _CEF + "\n" + _SYSLOG},
    },
}


# ---- severity and category by id or name ---------------------------------------------------------
def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_SEVERITY_BY_NAME = {_norm(n): i for i, n in SEVERITY_NAMES.items()} | {"info": 1, "crit": 5}
_CATEGORY_BY_NAME = {_norm(n): i for i, n in CATEGORY_NAMES.items()} | {"iam": 3, "identityaccess": 3}


def _names_pattern(names: Any, separators: str) -> str:
    """A regular expression for exactly the spellings ``_norm`` maps to one of ``names``: any
    case, with any of ``separators`` between letters. Why spelled out: JSON Schema's patterns
    have no case-insensitive flag, and the document must not allow a name the server refuses."""
    sep = f"[{separators}]*"   # "-" last: a literal in a class, in Python and ECMA regexes alike
    words = sorted(set(names), key=lambda n: (-len(n), n))
    alts = [sep + "".join((f"[{c}{c.upper()}]" if c.isalpha() else re.escape(c)) + sep for c in n) for n in words]
    return "|".join(alts)


# what severity_of / category_of read, as the document says it
SEVERITY_PATTERN = "^(0?[0-6]|99|" + _names_pattern(_SEVERITY_BY_NAME, "_ -") + ")$"
CATEGORY_PATTERN = "^([0-9]{1,5}|" + _names_pattern(_CATEGORY_BY_NAME, "&_ -") + ")$"


def severity_of(value: str) -> int:
    """An OCSF severity_id, given as the number or its name (``high``, ``Critical``, ``info``)."""
    if value.isdigit() and int(value) in SEVERITY_NAMES:
        return int(value)
    sid = _SEVERITY_BY_NAME.get(_norm(value))
    if sid is None:
        raise InvalidEvent(f"severity {value!r} is not an OCSF severity.", field="severity",
                           fix="give a severity_id (0-6, 99) or a name: " + ", ".join(SEVERITY_NAMES.values()) + ".")
    return sid


def category_of(value: str) -> int:
    """An OCSF category_uid, given as the number or its name (``findings``, ``Network Activity``)."""
    if value.isdigit():
        return int(value)
    uid = _CATEGORY_BY_NAME.get(_norm(value))
    if uid is None:
        raise InvalidEvent(f"category {value!r} is not an OCSF category.", field="category",
                           fix="give a category_uid or a name: " + ", ".join(CATEGORY_NAMES.values()) + ".")
    return uid


# ---- the rate limit ----------------------------------------------------------------------------
class TokenBucket:
    """``rate`` tokens a second up to ``burst``; ``take(n)`` charges n or says how long to wait."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.at = burst, now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now

    def take(self, n: float, now: float) -> float:
        """0.0 when ``n`` tokens were taken; else the seconds until they would be there (none taken)."""
        self._refill(now)
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate


class RateLimiter:
    """One bucket per tenant, in this process (see the module docstring)."""

    def __init__(self, settings: EventSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def check(self, tenant: str, n: int) -> None:
        """Charge ``n`` records to ``tenant``; QuotaExceeded (429 + Retry-After) when over."""
        s = self.settings
        if n > s.burst:
            raise LimitExceeded(f"the batch has {n} records, more than the {s.burst} a tenant may send at once.",
                                field="records", fix="send smaller batches (events.burst).", limit=s.burst)
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(tenant)
            if bucket is None:
                bucket = self._buckets[tenant] = TokenBucket(s.rate_per_s, float(s.burst), now)
            wait = bucket.take(n, now)
        if wait > 0:
            raise QuotaExceeded(f"tenant {tenant!r} is sending events faster than {s.rate_per_s:g}/s "
                                f"(burst {s.burst}); nothing of this batch was stored.", field="events",
                                fix=f"retry after {math.ceil(wait)} s, or spread the batches out.",
                                retry_after_s=wait)


# ---- intake (no HTTP in here: the listener-free core the route and the tests share) --------------
class EventIntake:
    """Parse, rate-check and store one batch for a tenant; the answer's status and body."""

    def __init__(self, settings: EventSettings, store_of: Callable[[], EventStore],
                 max_payload_bytes: Callable[[], int]) -> None:
        self.settings = settings
        self.limiter = RateLimiter(settings)
        self._store_of = store_of
        self._store: EventStore | None = None
        self._max_payload = max_payload_bytes

    @property
    def store(self) -> EventStore:
        if self._store is None:
            self._store = self._store_of()
        return self._store

    def limits(self) -> IntakeLimits:
        s = self.settings
        return IntakeLimits(max_payload_bytes=self._max_payload(), max_record_bytes=s.max_record_bytes,
                            max_records=s.max_batch_records)

    def ingest(self, tenant: str, body: bytes, content_type: str | None,
               key: str | None, digest: str | None) -> tuple[int, dict[str, Any]]:
        """Blocking: runs in a worker thread (parsing 10,000 lines takes ~0.4 s of CPU). The
        cyclic garbage collector is paused meanwhile (``gcpause``: the batch's objects all
        survive it, so its passes would only cost time)."""
        with paused_gc():
            return self._ingest(tenant, body, content_type, key, digest)

    def _ingest(self, tenant: str, body: bytes, content_type: str | None,
                key: str | None, digest: str | None) -> tuple[int, dict[str, Any]]:
        results = parse_records(body, content_type, tenant=tenant, limits=self.limits())
        if not results:
            raise InvalidEvent("the batch has no records (the body is empty or only blank lines).", field="body",
                               fix="send at least one record.")
        self.limiter.check(tenant, len(results))
        events = [r for r in results if isinstance(r, SecurityEvent)]
        errors = [r for r in results if isinstance(r, RecordError)]

        def answer(stored: int, duplicates: int) -> tuple[int, dict[str, Any]]:
            body = {"accepted": stored, "duplicates": duplicates, "rejected": len(errors),
                    "errors": [_error_out(e) for e in errors], "ids": [e.id for e in events]}
            if not events:
                first = errors[0]
                body = {"error": {"code": "invalid_event", "message": f"none of the {len(errors)} record(s) could "
                                  f"be read; the first: {first.reason}", "field": first.field,
                                  "hint": first.fix or "see `errors` for each record."}, **body}
                return 422, body
            return (207 if errors else 200), body

        if key is not None and digest is not None:
            stored_answer, fresh = self.store.add_batch(events, tenant=tenant, key=key, body_sha256=digest,
                                                        answer=answer)
            if not fresh:
                return _replay(stored_answer, digest, key)
            status, out = stored_answer.status, stored_answer.answer
            new, dups = out["accepted"], out["duplicates"]
        else:
            new, dups = self.store.add_many(events)
            status, out = answer(new, dups)
        count_events(events, dups, "http", rejected_formats=[e.format for e in errors])
        return status, out


def _error_out(e: RecordError) -> dict[str, Any]:
    return {"index": e.index, "line": e.line, "format": e.format, "code": e.code, "field": e.field,
            "reason": e.reason, "hint": e.fix}


def _replay(prior: StoredAnswer, digest: str, key: str) -> tuple[int, dict[str, Any]]:
    if prior.body_sha256 != digest:
        raise IdempotencyKeyReused(f"Idempotency-Key {key!r} was already used for a different batch of events.",
                                   field="Idempotency-Key", fix="use a new key for a new batch.")
    return prior.status, prior.answer




# ---- routes ------------------------------------------------------------------------------------
def _media_ok(content_type: str | None) -> bool:
    if content_type is None or not content_type.strip():
        return True
    return content_type.split(";", 1)[0].strip().lower() in CONTENT_TYPES


def add_event_routes(app: FastAPI, state: Any, principal: Callable[..., Any], responses: dict[int, Any]) -> None:
    """Mount the event routes on ``app``. ``state`` is the app's ``AppState`` (settings, the job
    store whose engine the events share, the API's live limits); ``principal`` the auth
    dependency; ``responses`` the error models the app documents for every route. Routes go on
    the app itself (see ``api_admin.add_admin_routes`` for why not a router)."""
    settings: EventSettings = state.settings.events
    intake = EventIntake(settings, lambda: EventStore(state.store.engine, settings),
                         lambda: state.api.current.max_body_bytes)
    app.state.events = intake
    err = responses[422]

    @app.post("/v1/events", response_model=EventsResult, tags=["events"], openapi_extra={"requestBody": REQUEST_BODY},
              responses={200: {"description": "Every record was stored (or was already: `duplicates`)."},
                         207: {"model": EventsResult, "description": "Multi-Status: some records were refused "
                               "(each in `errors`); the others are stored."},
                         409: err, 413: err, 415: err,
                         422: {"model": EventsRefused, "description": "No record was usable (nothing stored; "
                               "each record in `errors`), or the batch was refused whole (a limit, an empty body)."},
                         429: {**err, "description": "Over the tenant's event rate; see Retry-After. Nothing stored."}})
    async def post_events(request: Request, p: Any = Depends(principal),
                          idempotency_key: Annotated[str | None, Header(max_length=200, description=(
                              "The same key with the same body answers the same result (nothing stored twice); "
                              "with a different body, 409."))] = None) -> JSONResponse:
        """Security events in: CEF, LEEF, syslog (RFC 5424/3164), OCSF JSON or STIX 2.1, one record
        or many. Answers **200** when every record is stored (or was already: `duplicates`),
        **207** when some were refused (the good ones are stored; each refused one is in
        `errors` with its index, line, field and a hint), **422** when none was usable. Limits:
        `events.max_batch_records` records (422, field `records`), `events.max_record_bytes` per
        record (that record refused), a per-tenant rate (429 + Retry-After)."""
        content_type = request.headers.get("content-type")
        if not _media_ok(content_type):
            return _unsupported(content_type)
        body = await request.body()
        digest = body_digest(body, content_type) if idempotency_key is not None else None
        if idempotency_key is not None and digest is not None:
            prior = await run_in_threadpool(intake.store.answer_for, p.tenant, idempotency_key)
            if prior is not None:
                status, out = _replay(prior, digest, idempotency_key)
                return JSONResponse(out, status_code=status, headers={"Idempotent-Replayed": "true"})
        try:
            status, out = await run_in_threadpool(intake.ingest, p.tenant, body, content_type, idempotency_key,
                                                  digest)
        except InvalidEvent as exc:
            if exc.field == "content_type":
                return _unsupported(content_type, exc)
            raise
        return JSONResponse(out, status_code=status)

    @app.get("/v1/events", response_model=EventPageOut, tags=["events"],
             responses={422: err})
    async def list_events(
            p: Any = Depends(principal),
            since: Annotated[str | None, Query(json_schema_extra=_TIME_SCHEMA, description=(
                "Events at or after this time (source time): an RFC 3339 date-time (UTC if no zone) or "
                "Unix seconds."))] = None,
            until: Annotated[str | None, Query(json_schema_extra=_TIME_SCHEMA,
                                               description="Events before this time (as `since`).")] = None,
            severity: Annotated[str | None, Query(pattern=SEVERITY_PATTERN, description=(
                "At least this OCSF severity: a severity_id (1-6) or a name (informational, low, medium, high, "
                "critical, fatal); 99/other matches only Other, 0/unknown everything."))] = None,
            category: Annotated[str | None, Query(pattern=CATEGORY_PATTERN, description=(
                "An OCSF category_uid (2) or name (findings, network_activity, iam, ...).") )] = None,
            class_uid: Annotated[int | None, Query(ge=0, le=999_999, description="An OCSF class_uid, e.g. 2004.")] = None,
            limit: Annotated[int, Query(ge=1, description="Events per page, at most the API's `max_page` "
                                                          "(500 unless configured).")] = 100,
            cursor: Annotated[str | None, Query(pattern=r"^-?[0-9]{1,19}_[0-9a-zA-Z]{1,64}$",
                                                description="The `next_cursor` of the previous page.")] = None,
            raw: Annotated[bool, Query(description="Include each event's raw record.")] = False) -> JSONResponse:
        """The caller's events, **newest first** (by the event's own time, then id; keyset pages:
        a page never skips or repeats an event while new ones arrive). Each item is the
        normalized event; its raw record only with `raw=true`."""
        cap = state.api.current.max_page
        if limit > cap:
            raise LimitExceeded(f"query parameter 'limit' is {limit}, over this API's limit of {cap}.",
                                field="limit", fix=f"ask for at most {cap} (the API's `max_page`).")
        since_t = time_param("since", since) if since is not None else None
        until_t = time_param("until", until) if until is not None else None
        sev = severity_of(severity) if severity is not None else None
        cat = category_of(category) if category is not None else None
        page: EventPage = await run_in_threadpool(
            intake.store.query, p.tenant, since=since_t, until=until_t, severity_min=sev, category=cat,
            class_uid=class_uid, limit=limit, cursor=cursor, raw=raw)
        return JSONResponse({"events": page.items, "next_cursor": page.next_cursor})


# `since` / `until`: parsed here rather than by pydantic's datetime, whose rules the document
# cannot state (a number past 2e10 becomes milliseconds, "2e10" is refused but "2.1e10" read).
# The document says exactly this: an RFC 3339 date-time, or Unix seconds written plainly
# (at most 11 integer digits: up to the year 5138). A date-time without a zone is read as UTC,
# a leap second as the second before it.
_SECONDS = r"[0-9]{1,11}(\.[0-9]{1,6})?"
_TIME_SCHEMA: dict[str, Any] = {"anyOf": [
    {"type": "string", "format": "date-time"}, {"type": "string", "pattern": f"^{_SECONDS}$"}, {"type": "null"}]}
_SECONDS_RE = re.compile(f"^{_SECONDS}$")


def time_param(name: str, text: str) -> dt.datetime:
    """A time query parameter: an RFC 3339 date-time (UTC when it names no zone) or Unix seconds."""
    if _SECONDS_RE.match(text):
        return dt.datetime.fromtimestamp(float(text), dt.timezone.utc)
    try:
        iso = re.sub(r"(?<=[0-9]{2}:[0-9]{2}):60", ":59", text.strip().upper().replace("Z", "+00:00"), count=1)
        value = dt.datetime.fromisoformat(iso)
    except ValueError:
        raise InvalidRequest(f"query parameter {name!r} is {text[:40]!r}, not a date-time or Unix seconds.",
                             field=name, fix="give an RFC 3339 date-time (2026-12-06T08:00:00Z) or Unix seconds "
                                             "(1796544000).") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)


def _unsupported(content_type: str | None, exc: QAllocError | None = None) -> JSONResponse:
    from ray_qalloc.api import error_response

    message = exc.message if exc is not None else f"content type {content_type!r} is not a security event format."
    return error_response("unsupported_media_type", message, field="Content-Type", status=415,
                          hint="send one of " + ", ".join(sorted(CONTENT_TYPES)) + " (UTF-8).")
