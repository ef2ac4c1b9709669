"""POST /v1/events and GET /v1/events through httpx's ASGI transport against ``create_app``
(no Ray: the event routes need the store, not the allocator)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from ray_qalloc.api import create_app
from ray_qalloc.api_events import REQUEST_BODY, TokenBucket, category_of, severity_of
from ray_qalloc.config import Settings
from ray_qalloc.exceptions import InvalidEvent
from ray_qalloc.integration.eventstore import EventStore
from ray_qalloc.tenants import TenantStore

CEF = "CEF:0|Acme|IDS|2.1|4001|Port scan {i}|{sev}|src=10.0.0.{i} dst=192.168.1.20 dpt=22"
SYSLOG = "<34>1 2025-06-01T12:00:0{i}Z fw1 sshd 41{i} AUTH - Failed password for root from 203.0.113.{i}"
LEEF = "LEEF:2.0|Acme|Firewall|1.0|deny{i}|^|src=10.0.0.{i}^dst=192.168.1.20^sev=6"
OCSF = {"class_uid": 2004, "category_uid": 2, "severity_id": 5, "time": 1748779200000,
        "message": "Malware detected", "metadata": {"version": "1.3.0", "product": {"vendor_name": "Acme", "name": "EDR"}}}
STIX = {"type": "bundle", "id": "bundle--5d0092c5-5f74-4287-9642-33f4c354e56d", "objects": [{
    "type": "indicator", "spec_version": "2.1", "id": "indicator--8e2e2d2b-17d4-4cbf-938f-98ee46b3cd3f",
    "created": "2025-06-01T12:00:00.000Z", "modified": "2025-06-01T12:00:00.000Z", "name": "C2",
    "pattern": "[ipv4-addr:value = '198.51.100.7']", "pattern_type": "stix", "valid_from": "2025-06-01T12:00:00Z"}]}


class Api:
    """The app over a fresh data dir, and a token per tenant."""

    def __init__(self, tmp: Path, **events: Any) -> None:
        self.settings = Settings(data_dir=tmp, events=events) if events else Settings(data_dir=tmp)
        self.app = create_app(self.settings, allocator=object())
        self.tenants = TenantStore(self.settings.resolved_store_url)

    def headers(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tenants.create_token(tenant)}"}

    def run(self, *requests: tuple[str, str, dict[str, Any]]) -> list[httpx.Response]:
        async def main() -> list[httpx.Response]:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://api") as c:
                return [await c.request(method, path, **kw) for method, path, kw in requests]
        return asyncio.run(main())

    def post(self, tenant_headers: dict[str, str], body: str | bytes, content_type: str | None,
             **headers: str) -> httpx.Response:
        h = {**tenant_headers, **headers}
        if content_type is not None:
            h["Content-Type"] = content_type
        return self.run(("POST", "/v1/events", {"content": body, "headers": h}))[0]

    def get(self, tenant_headers: dict[str, str], **params: Any) -> httpx.Response:
        return self.run(("GET", "/v1/events", {"params": params, "headers": tenant_headers}))[0]


@pytest.fixture()
def api(tmp_path: Path) -> Api:
    a = Api(tmp_path)
    yield a
    a.tenants.close()


def lines(template: str, n: int, **kw: Any) -> str:
    return "\n".join(template.format(i=i, **kw) for i in range(n))


def test_all_good_is_200_and_committed_before_the_answer(api):
    alice = api.headers("alice")
    r = api.post(alice, lines(CEF, 5, sev=7), "application/cef")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["accepted"], body["duplicates"], body["rejected"], body["errors"]) == (5, 0, 0, [])
    assert len(body["ids"]) == 5
    store = EventStore(api.settings.resolved_store_url)   # another connection: it is committed
    assert store.count("alice") == 5
    store.close()


def test_some_bad_is_207_with_each_error_and_the_good_ones_kept(api):
    alice = api.headers("alice")
    payload = "\n".join([CEF.format(i=1, sev=3), "CEF:0|broken", "", CEF.format(i=2, sev=3), "junk"])
    r = api.post(alice, payload, "application/cef")
    assert r.status_code == 207, r.text
    body = r.json()
    assert (body["accepted"], body["rejected"]) == (2, 2)
    assert [(e["index"], e["line"]) for e in body["errors"]] == [(1, 2), (3, 5)]
    for e in body["errors"]:
        assert set(e) == {"index", "line", "format", "code", "field", "reason", "hint"}
        assert e["format"] == "cef" and e["code"] == "invalid_event" and e["field"] and e["hint"]


def test_none_good_is_422_with_the_same_fields_and_the_usual_error(api):
    r = api.post(api.headers("alice"), "junk\nmore junk", "application/cef")
    assert r.status_code == 422
    body = r.json()
    assert body["error"]["code"] == "invalid_event" and body["accepted"] == 0 and body["rejected"] == 2
    empty = api.post(api.headers("alice"), "\n\n", "application/cef")
    assert empty.status_code == 422 and empty.json()["error"]["field"] == "body"


def test_duplicates_are_reported_not_refused(api):
    alice = api.headers("alice")
    api.post(alice, lines(CEF, 3, sev=1), "application/cef")
    r = api.post(alice, lines(CEF, 4, sev=1), "application/cef")
    assert r.status_code == 200 and (r.json()["accepted"], r.json()["duplicates"]) == (1, 3)


@pytest.mark.parametrize("content_type,payload,fmt", [
    ("application/leef", lines(LEEF, 2), "leef"),
    ("application/syslog", lines(SYSLOG, 2), "syslog"),
    ("text/plain", CEF.format(i=1, sev=2) + "\n" + SYSLOG.format(i=1), None),
    (None, lines(SYSLOG, 2), "syslog"),
    ("application/ocsf+json", json.dumps([OCSF, {**OCSF, "message": "again"}]), "ocsf"),
    ("application/json", json.dumps(OCSF), "ocsf"),
    ("application/stix+json", json.dumps(STIX), "stix"),
])
def test_every_format_by_content_type_or_detected(api, content_type, payload, fmt):
    alice = api.headers("alice")
    r = api.post(alice, payload, content_type)
    assert r.status_code == 200, r.text
    items = api.get(alice).json()["events"]
    assert len(items) == r.json()["accepted"] >= 1
    if fmt:
        assert {e["format"] for e in items} == {fmt}


def test_unsupported_content_type_is_415(api):
    for ct in ("text/csv", "application/cef; charset=latin-1"):
        r = api.post(api.headers("alice"), CEF.format(i=1, sev=1), ct)
        assert r.status_code == 415 and r.json()["error"]["field"] == "Content-Type", r.text


def test_idempotency_key_same_body_same_answer_different_body_409(api):
    alice = api.headers("alice")
    first = api.post(alice, lines(CEF, 3, sev=2) + "\njunk", "application/cef", **{"Idempotency-Key": "b-1"})
    again = api.post(alice, lines(CEF, 3, sev=2) + "\njunk", "application/cef", **{"Idempotency-Key": "b-1"})
    assert first.status_code == again.status_code == 207
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    other = api.post(alice, lines(CEF, 4, sev=2), "application/cef", **{"Idempotency-Key": "b-1"})
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    # keys are per tenant
    bob = api.post(api.headers("bob"), lines(CEF, 4, sev=2), "application/cef", **{"Idempotency-Key": "b-1"})
    assert bob.status_code == 200 and bob.json()["accepted"] == 4
    assert len(api.get(alice).json()["events"]) == 3


def test_a_tenant_sees_only_its_own_events(api):
    api.post(api.headers("alice"), lines(CEF, 2, sev=1), "application/cef")
    api.post(api.headers("bob"), lines(CEF, 5, sev=1), "application/cef")
    assert len(api.get(api.headers("alice")).json()["events"]) == 2
    assert {e["tenant"] for e in api.get(api.headers("bob")).json()["events"]} == {"bob"}
    assert api.run(("GET", "/v1/events", {}))[0].status_code == 401


def test_get_filters_pages_and_raw(api):
    alice = api.headers("alice")
    api.post(alice, lines(CEF, 6, sev=9), "application/cef")                      # Critical
    api.post(alice, lines(SYSLOG, 4), "application/syslog")                        # <34>: crit → Critical
    api.post(alice, json.dumps(OCSF), "application/ocsf+json")                     # Findings, 2004
    assert len(api.get(alice, category="findings").json()["events"]) == 1
    assert len(api.get(alice, category="2").json()["events"]) == 1
    assert len(api.get(alice, class_uid=2004).json()["events"]) == 1
    assert len(api.get(alice, severity="critical").json()["events"]) == 11
    assert len(api.get(alice, severity="6").json()["events"]) == 0
    assert len(api.get(alice, since="2025-06-01T12:00:02Z", until="2025-06-01T12:00:04Z").json()["events"]) == 2
    seen, cursor = [], None
    while True:
        page = api.get(alice, limit=3, **({"cursor": cursor} if cursor else {})).json()
        seen += page["events"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 11 and len({e["id"] for e in seen}) == 11
    assert [e["time"] for e in seen] == sorted((e["time"] for e in seen), reverse=True)   # newest first
    assert "raw" not in seen[0] and api.get(alice, raw="true", limit=1).json()["events"][0]["raw"]
    for bad in ({"severity": "loud"}, {"category": "weather"}, {"limit": 10_000}, {"cursor": "1_zz-"},
                {"cursor": "99999999999999999999_ab"}):
        r = api.get(alice, **bad)
        assert r.status_code == 422, (bad, r.text)


def test_limits_batch_records_record_bytes_and_rate(tmp_path):
    api = Api(tmp_path, max_batch_records=5, max_record_bytes=200, rate_per_s=2.0, burst=8)
    try:
        alice = api.headers("alice")
        over = api.post(alice, lines(CEF, 6, sev=1), "application/cef")
        assert over.status_code == 422 and over.json()["error"]["field"] == "records"
        big = api.post(alice, CEF.format(i=1, sev=1) + "\n" + CEF.format(i=2, sev=1) + " msg=" + "x" * 300,
                       "application/cef")
        assert big.status_code == 207 and big.json()["errors"][0]["code"] == "limit_exceeded"
        ok = api.post(alice, lines(CEF, 5, sev=2), "application/cef")       # 2 + 5 of the 8-token burst
        assert ok.status_code == 200
        limited = api.post(alice, lines(CEF, 5, sev=3), "application/cef")
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
        assert limited.json()["error"]["code"] == "quota_exceeded"
        assert api.post(api.headers("bob"), lines(CEF, 5, sev=3), "application/cef").status_code == 200  # per tenant
    finally:
        api.tenants.close()


def test_token_bucket():
    b = TokenBucket(rate=10.0, burst=20.0, now=0.0)
    assert b.take(15, 0.0) == 0.0 and b.take(10, 0.0) == pytest.approx(0.5)
    assert b.take(10, 0.5) == 0.0 and b.take(1, 0.5) > 0


def test_severity_and_category_names():
    assert severity_of("High") == 4 and severity_of("info") == 1 and severity_of("5") == 5
    assert category_of("Network Activity") == 4 and category_of("network_activity") == 4 and category_of("iam") == 3
    with pytest.raises(InvalidEvent):
        severity_of("7")


def test_openapi_describes_every_media_type(api):
    spec = api.run(("GET", "/openapi.json", {}))[0].json()
    post = spec["paths"]["/v1/events"]["post"]
    assert set(post["requestBody"]["content"]) == set(REQUEST_BODY["content"])
    assert {"200", "207", "409", "413", "415", "422", "429"} <= set(post["responses"])
    assert "newest first" in spec["paths"]["/v1/events"]["get"]["description"]


def test_every_openapi_example_is_accepted(api):
    """The fuzzer's 'examples' mode sends these: each must be a good record of its media type."""
    alice = api.headers("alice")
    for media_type, entry in REQUEST_BODY["content"].items():
        example = entry["example"]
        payload = example if isinstance(example, str) else json.dumps(example)
        r = api.post(alice, payload, media_type)
        assert r.status_code == 200 and r.json()["accepted"] + r.json()["duplicates"] >= 1, (media_type, r.text)
