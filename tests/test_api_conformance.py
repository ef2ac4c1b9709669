"""What the HTTP API promises where a fuzzer looks (issue #14), checked in process, without Ray.

The fuzz test (``test_api_fuzz``) drives every route on a real Serve with every schemathesis
check; these pin the specific promises so that a regression names itself: a 405 says what the
path allows (RFC 9110), the served document states the limits the server checks by hand with
the values in force (and follows a live reconfigure), and a body is refused by the model
exactly where the document says it is invalid.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from ray_qalloc.api import create_app
from ray_qalloc.config import Settings
from ray_qalloc.tenants import TenantStore


@pytest.fixture()
def app_and_headers(tmp_path: Path) -> tuple[Any, dict[str, str]]:
    settings = Settings(data_dir=tmp_path, limits={"max_shots": 5_000})
    tenants = TenantStore(settings.resolved_store_url)
    headers = {"Authorization": f"Bearer {tenants.create_token('conf')}"}
    tenants.close()
    return create_app(settings, allocator=object()), headers


def _requests(app: Any, *calls: tuple[str, str, dict[str, Any]]) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return [await c.request(m, u, **kw) for m, u, kw in calls]
    return asyncio.run(go())


def test_a_405_names_every_method_of_the_path(app_and_headers: tuple[Any, dict[str, str]]) -> None:
    app, headers = app_and_headers
    patch_job, put_jobs, post_health = _requests(app, ("PATCH", "/v1/jobs/abc", {"headers": headers}),
                                                 ("PUT", "/v1/jobs", {"headers": headers}),
                                                 ("POST", "/healthz", {}))
    assert patch_job.status_code == 405 and patch_job.json()["error"]["code"] == "method_not_allowed"
    assert patch_job.headers["allow"] == "DELETE, GET"        # two FastAPI routes, one resource
    assert put_jobs.headers["allow"] == "GET, POST"
    assert post_health.headers["allow"] == "GET"


def test_the_document_states_the_limits_in_force(app_and_headers: tuple[Any, dict[str, str]]) -> None:
    app, _ = app_and_headers
    doc = app.openapi()
    job = doc["components"]["schemas"]["JobIn"]
    assert job["properties"]["shots"]["maximum"] == 5_000 and job["properties"]["qasm"]["minLength"] == 1
    assert "maximum" not in doc["components"]["schemas"]["BatchJobIn"]["properties"]["shots"]
    page = next(p for p in doc["paths"]["/v1/jobs"]["get"]["parameters"] if p["name"] == "limit")
    assert page["schema"]["maximum"] == 500
    app.state.limits.reconfigure({"max_page": 50, "max_batch_jobs": 7})     # Serve's user_config, live
    doc = app.openapi()
    page = next(p for p in doc["paths"]["/v1/jobs"]["get"]["parameters"] if p["name"] == "limit")
    assert page["schema"]["maximum"] == 50
    assert doc["components"]["schemas"]["BatchIn"]["properties"]["jobs"]["maxItems"] == 7
    served = _requests(app, ("GET", "/openapi.json", {}))[0].json()
    assert served["components"]["schemas"]["BatchIn"]["properties"]["jobs"]["maxItems"] == 7


@pytest.mark.parametrize("body, field", [({"qasm": ""}, "qasm"), ({"qasm": "x", "shots": "5"}, "shots"),
                                         ({"qasm": "x", "shots": True}, "shots"),
                                         ({"qasm": "x", "deadline_s": "10"}, "deadline_s")])
def test_a_body_the_document_calls_invalid_is_refused_by_the_model(
        app_and_headers: tuple[Any, dict[str, str]], body: dict[str, Any], field: str) -> None:
    app, headers = app_and_headers
    r = _requests(app, ("POST", "/v1/jobs", {"json": body, "headers": headers}))[0]
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text
    assert r.json()["error"]["field"] == field
