"""The HTTP API end to end: a real Ray Serve on the session's Ray, real allocator and Aer,
driven over loopback with httpx and with ray_qalloc.Client."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any
from pathlib import Path

import httpx
import pytest

from ray_qalloc.client import Client
from ray_qalloc.exceptions import (Forbidden, IdempotencyKeyReused, InvalidCircuit, JobFailed, JobNotFound,
                                   QuotaExceeded, Unauthorized)
from ray_qalloc.tenants import Quota
from tests.serve_fixtures import BELL

FAST = ["statevector"]


def tenant() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def slow_qasm(n: int = 10, layers: int = 40) -> str:
    """About a second on the density-matrix simulator: long enough to hold its one slot."""
    lines = ["OPENQASM 2.0;", 'include "qelib1.inc";', f"qreg q[{n}];", f"creg c[{n}];"]
    for k in range(layers):
        lines += [f"h q[{i}];" for i in range(n)] + [f"cx q[{i}],q[{(i + 1) % n}];" for i in range(n)]
        lines += [f"rz({0.1 * (k + 1)}) q[{i}];" for i in range(n)]
    lines.append("measure q -> c;")
    return "\n".join(lines) + "\n"


@pytest.fixture
def alice(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, headers=server.headers(tenant()), timeout=60) as c:
        yield c


def test_submit_then_result_over_http(alice):
    r = alice.post("/v1/jobs", json={"qasm": BELL, "shots": 200, "backends": FAST})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["created"] is True and r.headers["Location"] == f"/v1/jobs/{body['id']}"
    res = alice.get(f"/v1/jobs/{body['id']}/result", params={"wait": 30})
    assert res.status_code == 200, res.text
    out = res.json()
    assert sum(out["counts"].values()) == 200 and set(out["counts"]) <= {"00", "11"}
    assert out["backend"].endswith("/statevector")
    st = alice.get(f"/v1/jobs/{body['id']}").json()
    assert st["state"] == "completed" and st["shots"] == 200
    again = alice.get(f"/v1/jobs/{body['id']}/result", params={"wait": 0}).json()   # read from the store
    assert [h["outcome"] for h in again["failover_history"]] == ["completed"]
    ex = alice.get(f"/v1/jobs/{body['id']}/explain").json()
    assert ex["chosen"].endswith("/statevector") and "backends" in ex


def test_batch_answers_each_job_and_refuses_only_the_bad_one(alice):
    jobs = [{"qasm": BELL, "shots": 50, "backends": FAST, "id": f"j{i}"} for i in range(4)]
    jobs.insert(2, {"qasm": "this is not qasm", "id": "bad"})
    r = alice.post("/v1/jobs:batch", json={"jobs": jobs})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["accepted"] == 4 and out["refused"] == 1
    assert [j["client_id"] for j in out["jobs"]] == ["j0", "j1", "bad", "j2", "j3"]
    assert out["jobs"][2]["error"]["code"] == "invalid_circuit"
    for item in out["jobs"]:
        if item["id"]:
            assert alice.get(f"/v1/jobs/{item['id']}/result", params={"wait": 30}).status_code == 200


def test_idempotency_key_returns_the_same_job_and_refuses_a_different_one(alice):
    key = uuid.uuid4().hex
    first = alice.post("/v1/jobs", json={"qasm": BELL, "backends": FAST}, headers={"Idempotency-Key": key})
    again = alice.post("/v1/jobs", json={"qasm": BELL, "backends": FAST}, headers={"Idempotency-Key": key})
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and again.json()["created"] is False
    other = alice.post("/v1/jobs", json={"qasm": BELL, "shots": 7, "backends": FAST}, headers={"Idempotency-Key": key})
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    listed = [j["id"] for j in alice.get("/v1/jobs", params={"limit": 100}).json()["jobs"]]
    assert listed.count(first.json()["id"]) == 1 and len(listed) == 1


def test_batch_idempotency_key_makes_no_second_jobs(alice):
    body = {"jobs": [{"qasm": BELL, "backends": FAST}] * 3}
    key = uuid.uuid4().hex
    a = alice.post("/v1/jobs:batch", json=body, headers={"Idempotency-Key": key}).json()
    b = alice.post("/v1/jobs:batch", json=body, headers={"Idempotency-Key": key}).json()
    assert [j["id"] for j in a["jobs"]] == [j["id"] for j in b["jobs"]]
    assert all(j["created"] is False for j in b["jobs"])


def test_batch_idempotency_key_with_different_jobs_is_refused_per_job(alice):
    key = uuid.uuid4().hex
    a = alice.post("/v1/jobs:batch", json={"jobs": [{"qasm": BELL, "backends": FAST}] * 2},
                   headers={"Idempotency-Key": key}).json()
    b = alice.post("/v1/jobs:batch", json={"jobs": [{"qasm": BELL, "backends": FAST},
                                                    {"qasm": BELL, "shots": 3, "backends": FAST}]},
                   headers={"Idempotency-Key": key}).json()
    assert b["jobs"][0]["id"] == a["jobs"][0]["id"] and b["jobs"][0]["created"] is False
    assert b["jobs"][1]["error"]["code"] == "idempotency_key_reused"


def test_limits_are_checked_before_quotas(server):
    t = tenant()
    server.tenants.set_quota(t, Quota(shots_per_day=10))
    with httpx.Client(base_url=server.url, headers=server.headers(t), timeout=30) as c:
        r = c.post("/v1/jobs", json={"qasm": BELL, "shots": 10**30})
        assert r.status_code == 422 and r.json()["error"]["code"] == "limit_exceeded"


def test_cancel_a_queued_job(alice):
    # the first job holds the density-matrix slot for a while; the second waits behind it
    busy = alice.post("/v1/jobs", json={"qasm": slow_qasm(), "shots": 64, "backends": ["density_matrix"]})
    waiting = alice.post("/v1/jobs", json={"qasm": slow_qasm(), "shots": 64, "backends": ["density_matrix"]})
    assert busy.status_code == waiting.status_code == 201
    jid = waiting.json()["id"]
    r = alice.delete(f"/v1/jobs/{jid}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    again = alice.delete(f"/v1/jobs/{jid}")
    assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
    res = alice.get(f"/v1/jobs/{jid}/result", params={"wait": 0})
    assert res.status_code == 409 and res.json()["error"]["code"] == "job_cancelled"
    # let the other run finish so no later test waits behind it
    assert alice.get(f"/v1/jobs/{busy.json()['id']}/result", params={"wait": 60}).status_code == 200


def test_result_answers_202_while_the_job_runs(alice):
    r = alice.post("/v1/jobs", json={"qasm": slow_qasm(10, 50), "shots": 64, "backends": ["density_matrix"]})
    jid = r.json()["id"]
    res = alice.get(f"/v1/jobs/{jid}/result", params={"wait": 0})
    assert res.status_code == 202 and res.headers["Retry-After"] == "1"
    assert res.json()["state"] in ("queued", "running")
    assert alice.get(f"/v1/jobs/{jid}/result", params={"wait": 60}).status_code == 200


def test_tenants_see_and_cancel_only_their_own_jobs(server, alice):
    jid = alice.post("/v1/jobs", json={"qasm": BELL, "backends": FAST}).json()["id"]
    with httpx.Client(base_url=server.url, headers=server.headers(tenant()), timeout=30) as bob:
        for method, path in [("GET", f"/v1/jobs/{jid}"), ("GET", f"/v1/jobs/{jid}/result"),
                             ("GET", f"/v1/jobs/{jid}/explain"), ("DELETE", f"/v1/jobs/{jid}")]:
            r = bob.request(method, path)
            assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found", (method, path)
        assert bob.get("/v1/jobs").json()["jobs"] == []
        # a job body naming another tenant is refused
        r = bob.post("/v1/jobs", json={"qasm": BELL, "tenant": "someone-else"})
        assert r.status_code == 403 and r.json()["error"]["field"] == "tenant"
    assert alice.get(f"/v1/jobs/{jid}").status_code == 200


def test_list_is_paginated_newest_first(alice):
    ids = [alice.post("/v1/jobs", json={"qasm": BELL, "backends": FAST}).json()["id"] for _ in range(5)]
    seen, cursor = [], None
    while True:
        page = alice.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        assert len(page["jobs"]) <= 2
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == 5


@pytest.mark.parametrize("quota, job, limit", [
    (Quota(max_active_jobs=0), {"qasm": BELL}, "max_active_jobs"),
    (Quota(shots_per_day=100), {"qasm": BELL, "shots": 101}, "shots_per_day"),
    (Quota(qpu_seconds_per_day=0), {"qasm": BELL, "intent": "quantum"}, "qpu_seconds_per_day"),
])
def test_quotas_answer_429_with_retry_after(server, quota, job, limit):
    t = tenant()
    server.tenants.set_quota(t, quota)
    with httpx.Client(base_url=server.url, headers=server.headers(t), timeout=30) as c:
        r = c.post("/v1/jobs", json=job)
        assert r.status_code == 429, r.text
        assert int(r.headers["Retry-After"]) >= 1
        err = r.json()["error"]
        assert err["code"] == "quota_exceeded" and err["details"]["limit"] == limit
        batch = c.post("/v1/jobs:batch", json={"jobs": [job]})
        assert batch.status_code == 429


def test_spent_qpu_time_keeps_auto_jobs_on_simulators(server):
    t = tenant()
    server.tenants.set_quota(t, Quota(qpu_seconds_per_day=0))
    with httpx.Client(base_url=server.url, headers=server.headers(t), timeout=60) as c:
        r = c.post("/v1/jobs", json={"qasm": BELL, "intent": "auto"})
        assert r.status_code == 201 and r.json()["simulators_only"] is True
        res = c.get(f"/v1/jobs/{r.json()['id']}/result", params={"wait": 60})
        assert res.status_code == 200, res.text
        assert res.json()["backend"].startswith("cpu-")


def test_emergency_only_where_granted(server):
    t = tenant()
    with httpx.Client(base_url=server.url, headers=server.headers(t), timeout=60) as c:
        r = c.post("/v1/jobs", json={"qasm": BELL, "priority": "emergency", "backends": FAST})
        assert r.status_code == 403 and r.json()["error"]["field"] == "priority"
        server.tenants.set_quota(t, Quota(priorities=["emergency", "normal"]))
        r = c.post("/v1/jobs", json={"qasm": BELL, "priority": "emergency", "backends": FAST})
        assert r.status_code == 201


def test_tokens_are_required_and_checked(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer nonsense"},
                        {"Authorization": "Bearer qat_0000000000000000_wrong"}):
            r = c.get("/v1/jobs", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            assert r.headers["WWW-Authenticate"] == "Bearer"
        token = server.token(tenant())
        good = {"Authorization": f"Bearer {token}"}
        assert c.get("/v1/jobs", headers=good).status_code == 200
        wrong_secret = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        assert c.get("/v1/jobs", headers={"Authorization": f"Bearer {wrong_secret}"}).status_code == 401


def test_tokens_are_stored_only_as_hashes(server):
    token = server.token(tenant())
    secret = token.split("_", 2)[2]
    import sqlalchemy as sa

    with server.tenants.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM tokens")).all()
    assert rows and not any(secret in json.dumps([str(v) for v in r]) for r in rows)


def test_admin_routes_are_refused_to_other_tenants(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        user = server.headers(tenant())
        admin = server.headers("ops", admin=True)
        for method, path, body in [("POST", "/v1/admin/tokens", {"tenant": "x"}), ("GET", "/v1/admin/stats", None),
                                   ("PUT", "/v1/admin/tenants/x/quota", {"max_active_jobs": 5})]:
            r = c.request(method, path, json=body, headers=user)
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", path
        made = c.post("/v1/admin/tokens", json={"tenant": "newcomer"}, headers=admin)
        assert made.status_code == 201
        token = made.json()["token"]
        assert c.get("/v1/me", headers={"Authorization": f"Bearer {token}"}).json()["tenant"] == "newcomer"
        q = c.put("/v1/admin/tenants/newcomer/quota", json={"max_active_jobs": 5}, headers=admin)
        assert q.status_code == 200 and q.json()["quota"]["max_active_jobs"] == 5
        assert c.get("/v1/admin/stats", headers=admin).json()["store"]


@pytest.mark.parametrize("body, code, field", [
    ({"shots": 10}, "invalid_request", "qasm"),
    ({"qasm": BELL, "shots": 0}, "invalid_request", "shots"),
    ({"qasm": BELL, "priority": "urgent"}, "invalid_request", "priority"),
    ({"qasm": BELL, "surprise": 1}, "invalid_request", "surprise"),
    ({"qasm": "OPENQASM 2.0;\nqreg q[2];\nfoo q[0];\n"}, "invalid_circuit", "circuit"),
    ({"qasm": 'OPENQASM 2.0;\ninclude "/etc/passwd";\nqreg q[1];\n'}, "forbidden_include", "circuit"),
    ({"qasm": "OPENQASM 2.0;\nqreg q[5000];\ncreg c[1];\nmeasure q[0] -> c[0];\n"}, "limit_exceeded", "circuit"),
    ({"qasm": BELL, "shots": 10_000_000}, "limit_exceeded", "shots"),
    ({"qasm": BELL, "intent": "quantum", "backends": ["stabilizer"]}, "no_feasible_backend", None),
    ({"qasm": BELL, "backends": ["no_such_backend"]}, "invalid_job_spec", "backends"),
])
def test_every_bad_job_gets_a_clear_json_error(alice, body, code, field):
    r = alice.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"]
    if field is not None:
        assert err["field"] == field, err
    assert err.get("hint")


def test_transport_level_errors_are_json_too(alice):
    r = alice.get("/v1/nowhere")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = alice.put("/v1/jobs")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = alice.get("/v1/jobs/does-not-exist")
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
    r = alice.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


def test_request_bodies_have_a_size_limit(server, alice):
    limit = server.settings.api.max_body_bytes
    r = alice.post("/v1/jobs", content=b"x" * (limit + 1), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    # nothing was stored for it, and the server still answers
    assert alice.get("/healthz").status_code == 200


def test_batch_size_is_limited(server, alice):
    n = server.settings.api.max_batch_jobs + 1
    r = alice.post("/v1/jobs:batch", json={"jobs": [{"qasm": BELL}] * n})
    assert r.status_code == 422 and r.json()["error"]["code"] == "limit_exceeded"


def test_health_and_readiness(server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/readyz", timeout=30).json() == {"status": "ready"}


def test_committed_openapi_matches_the_app():
    from ray_qalloc.api import openapi_document

    committed = Path(__file__).resolve().parents[1] / "docs" / "openapi.json"
    assert committed.read_text() == openapi_document(), "run `qalloc openapi --out docs/openapi.json`"


def test_served_openapi_lists_every_route(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    for path in ("/v1/jobs", "/v1/jobs:batch", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/result",
                 "/v1/jobs/{job_id}/explain", "/v1/backends", "/healthz", "/readyz"):
        assert path in spec["paths"]


# ---- the Python client ---------------------------------------------------------------------
def test_client_submit_result_cancel_and_errors(server):
    with Client(server.url, server.token(tenant())) as c:
        job = c.submit(BELL, shots=100, backends=FAST)
        res = job.result(timeout=60)
        assert sum(res.counts.values()) == 100 and res.backend.endswith("/statevector")
        assert job.status()["state"] == "completed"
        assert job.cancel() is False        # already finished
        handles = c.submit_many([{"circuit": BELL, "shots": 10, "backends": FAST} for _ in range(3)])
        assert len({h.id for h in handles}) == 3
        assert all(sum(h.result(timeout=60).counts.values()) == 10 for h in handles)
        assert {j["id"] for j in c.jobs(limit=2)} >= {job.id, *(h.id for h in handles)}
        with pytest.raises(InvalidCircuit):
            c.submit("OPENQASM 2.0;\nnonsense;\n")
        with pytest.raises(JobNotFound):
            c.job("nope").status()
        with pytest.raises(Forbidden):
            c.submit(BELL, priority="emergency")
        with pytest.raises(IdempotencyKeyReused):
            c.submit(BELL, idempotency_key="k1", backends=FAST)
            c.submit(BELL, shots=3, idempotency_key="k1", backends=FAST)
    with pytest.raises(Unauthorized):
        Client(server.url, "qat_x_y").backends()


def test_client_sends_qiskit_circuits_and_raises_quota_errors(server):
    from qiskit import QuantumCircuit

    t = tenant()
    with Client(server.url, server.token(t), retries=0) as c:
        qc = QuantumCircuit(3)
        qc.x(0)
        qc.cx(0, 2)
        qc.measure_all()
        res = c.submit(qc, shots=50, backends=FAST).result(timeout=60)
        assert res.counts == {"101": 50}
        server.tenants.set_quota(t, Quota(max_active_jobs=0))
        with pytest.raises(QuotaExceeded) as info:
            c.submit(qc)
        assert info.value.details["retry_after_s"] >= 1


def test_client_result_of_a_cancelled_job_raises(server):
    with Client(server.url, server.token(tenant())) as c:
        busy = c.submit(slow_qasm(), shots=64, backends=["density_matrix"])
        job = c.submit(slow_qasm(), shots=64, backends=["density_matrix"])
        assert job.cancel() is True
        with pytest.raises(JobFailed):
            job.result(timeout=10)
        busy.result(timeout=60)


def test_sampler_over_http_matches_qiskit_reference(server):
    from qiskit import QuantumCircuit
    from qiskit.primitives import StatevectorSampler

    from ray_qalloc import QAllocSampler

    qc = QuantumCircuit(2)
    qc.ry(1.1, 0)
    qc.cx(0, 1)
    qc.measure_all()
    with Client(server.url, server.token(tenant())) as c:
        ours = QAllocSampler(client=c, backends=FAST).run([qc], shots=4000).result()[0].data.meas
        ref = StatevectorSampler(seed=7).run([qc], shots=4000).result()[0].data.meas
    p, q = ours.get_counts(), ref.get_counts()
    tvd = 0.5 * sum(abs(p.get(k, 0) - q.get(k, 0)) / 4000 for k in set(p) | set(q))
    assert tvd < 0.05, (p, q)


def test_a_failed_job_answers_409_job_failed(server):
    from ray_qalloc.store import JobStore
    from tests.helpers import prepared

    t = tenant()
    store = JobStore(server.settings.resolved_store_url)
    job = prepared(tenant=t)
    store.add_job(job)
    assert store.fail(job.id, "every backend failed it")
    with httpx.Client(base_url=server.url, headers=server.headers(t), timeout=30) as c:
        r = c.get(f"/v1/jobs/{job.id}/result", params={"wait": 0})
        assert r.status_code == 409 and r.json()["error"]["code"] == "job_failed"
        assert "every backend failed it" in r.json()["error"]["message"]
        assert c.get(f"/v1/jobs/{job.id}").json()["state"] == "failed"
    store.close()


def test_no_allocator_answers_503_unavailable_and_not_ready(server):
    import asyncio

    from ray_qalloc.api import create_app

    settings = server.settings.model_copy(update={"allocator_name": "no-such-allocator"})
    headers = server.headers(tenant())

    async def main() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=create_app(settings))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as c:
            return (await c.post("/v1/jobs", json={"qasm": BELL}, headers=headers),
                    await c.get("/readyz"), await c.get("/healthz"))

    r, ready, health = asyncio.run(main())
    assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
    assert r.headers["Retry-After"]
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "unavailable"
    assert health.status_code == 200


def test_the_change_stream_follows_a_job_through_serve(server, alice):
    """Over the real Serve ingress: the stream (SSE) shows the caller's job from acceptance to
    completion, each event with the position a reconnecting reader would send back."""
    events: list[dict[str, Any]] = []
    with alice.stream("GET", "/v1/stream", timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        job = alice.post("/v1/jobs", json={"qasm": BELL, "shots": 20, "backends": FAST}).json()["id"]
        buf = ""
        for chunk in r.iter_text():
            buf += chunk
            while "\n\n" in buf:
                block, buf = buf.split("\n\n", 1)
                data = [line[6:] for line in block.splitlines() if line.startswith("data: ")]
                if data:
                    events.append(json.loads(data[0]))
            if any(e["kind"] == "job" and e["data"]["job_id"] == job and e["data"]["to"] == "completed"
                   for e in events):
                break
    mine = [e["data"]["event"] for e in events if e["kind"] == "job" and e["data"]["job_id"] == job]
    assert mine[0] == "accept" and mine[-1] == "complete" and "dispatch" in mine
    again = alice.get("/v1/changes", params={"after": events[0]["id"], "limit": 500}).json()["changes"]
    n = min(len(again), len(events) - 1)    # the same feed read again from the first event's position
    assert n >= len(mine) - 1 and [c["id"] for c in again[:n]] == [e["id"] for e in events[1:n + 1]]


def test_soar_actions_need_the_scope_and_are_idempotent(server):
    """A SOAR playbook's token (scope soar) pauses, resumes and raises a tenant over HTTP;
    retries change nothing; a plain tenant token is refused."""
    victim = tenant()
    soar = {"Authorization": f"Bearer {server.tenants.create_token('soar-' + victim, scopes=('soar',))}"}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        plain = c.post(f"/v1/threat/tenants/{victim}/pause", json={}, headers=server.headers(tenant()))
        assert plain.status_code == 403 and plain.json()["error"]["code"] == "forbidden"
        first = c.post(f"/v1/threat/tenants/{victim}/pause", json={"reason": "phishing"}, headers=soar)
        again = c.post(f"/v1/threat/tenants/{victim}/pause", json={"reason": "phishing"}, headers=soar)
        assert (first.status_code, again.status_code) == (201, 200), (first.text, again.text)
        job = c.post("/v1/jobs", json={"qasm": BELL, "shots": 10, "backends": FAST},
                     headers=server.headers(victim)).json()["id"]
        time.sleep(1.0)
        assert c.get(f"/v1/jobs/{job}", headers=server.headers(victim)).json()["state"] == "queued"
        assert c.post(f"/v1/threat/tenants/{victim}/resume", headers=soar).json() == {"resumed": True}
        assert c.post(f"/v1/threat/tenants/{victim}/resume", headers=soar).json() == {"resumed": False}
        res = c.get(f"/v1/jobs/{job}/result", params={"wait": 30}, headers=server.headers(victim))
        assert res.status_code == 200, res.text
        body = {"to": "high", "for_s": 600, "reason": "incident 7", "event_id": "ev-7"}
        key = {"Idempotency-Key": f"inc-7-{victim}"}
        r1 = c.post(f"/v1/threat/tenants/{victim}/raise", json=body, headers={**soar, **key})
        r2 = c.post(f"/v1/threat/tenants/{victim}/raise", json=body, headers={**soar, **key})
        assert (r1.status_code, r2.status_code) == (201, 200) and r1.json()["action"]["until"] == r2.json()["action"]["until"]
        other = c.post(f"/v1/threat/tenants/{victim}/raise", json={**body, "to": "emergency"}, headers={**soar, **key})
        assert other.status_code == 409
        listed = c.get("/v1/threat/actions", headers=soar).json()
        assert listed["class_floors"].get(victim) == "high"
        bad = c.post("/v1/threat/actions", json={"kind": "reserve", "target": "qpu_fez", "slots": 1, "for_s": 60},
                     headers=soar)
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "id"
        assert c.delete(f"/v1/threat/actions/inc-7-{victim}", headers=soar).json() == {"removed": True}
        missing = c.post("/v1/threat/templates/nope:submit", headers={**soar, "Idempotency-Key": "k1"})
        assert missing.status_code == 422 and missing.json()["error"]["field"] == "name"
        no_key = c.post("/v1/threat/templates/nope:submit", headers=soar)
        assert no_key.status_code == 422 and no_key.json()["error"]["field"] == "Idempotency-Key"


def test_a_security_event_changes_allocation_end_to_end(server):
    """Over Serve: an operator adds a threat rule live; a CEF event posted by the SOC's tenant
    makes the allocator boost another tenant; the SOAR view shows the action with its rule and
    event, the change stream shows it as an audited change, and it is undone at the end."""
    tag = uuid.uuid4().hex[:12]
    victim, soc = tenant(), tenant()
    admin = server.headers(tenant(), admin=True)
    rule = {"name": f"e2e-{tag}", "match": {"severity_min": 4, "message_contains": tag},
            "action": {"kind": "boost", "tenant": victim, "to": "high", "for_s": 120}}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        start = c.get("/v1/changes", params={"limit": 1}, headers=admin).json()["next"]
        r = c.put("/v1/admin/config", json={"changes": {"threat.rules": [rule], "threat.poll_s": 0.1}}, headers=admin)
        assert r.status_code == 200, r.text
        try:
            ev = c.post("/v1/events", content=f"CEF:0|Acme|EDR|3.1|77|lateral movement {tag}|9|src=10.2.3.4",
                        headers={**server.headers(soc), "Content-Type": "application/cef"})
            assert ev.status_code == 200 and ev.json()["accepted"] == 1, ev.text
            action_id = f"rule:e2e-{tag}:{victim}"
            deadline = time.time() + 20
            view: dict[str, Any] = {}
            while time.time() < deadline:
                view = c.get("/v1/threat/actions", headers=admin).json()
                if any(a["id"] == action_id for a in view["actions"]):
                    break
                time.sleep(0.1)
            action = next(a for a in view["actions"] if a["id"] == action_id)
            assert action["rule"] == f"e2e-{tag}" and action["event_id"] == ev.json()["ids"][0]
            assert view["class_floors"][victim] == "high"
            changes = c.get("/v1/changes", params={"after": start, "limit": 500}, headers=admin).json()["changes"]
            audited = [ch["data"]["action"] for ch in changes if ch["kind"] == "config"]
            assert f"threat.boost {action_id}"[:64] in audited, audited
        finally:
            c.delete(f"/v1/threat/actions/rule:e2e-{tag}:{victim}", headers=admin)
            c.put("/v1/admin/config", json={"changes": {}, "unset": ["threat.rules", "threat.poll_s"]}, headers=admin)
