"""The API's own limits are Serve's user_config: validated by the settings model (a bad one is
refused whole, naming the field), and in force on the replicas once Serve reconfigures them."""

from __future__ import annotations

import uuid

import httpx
import pytest

from ray_qalloc.api import API_LIVE_FIELDS, ApiLimits
from ray_qalloc.config import ApiSettings
from ray_qalloc.exceptions import ConfigError
from tests.serve_fixtures import BELL


def test_reconfigure_validates_like_start_up_and_applies_nothing_on_error():
    limits = ApiLimits(ApiSettings())
    assert limits.reconfigure({"api": {"max_batch_jobs": 7, "max_page": 20}}).max_batch_jobs == 7
    for bad, field in (({"max_batch_jobs": 0}, "api.max_batch_jobs"), ({"max_page": "many"}, "api.max_page"),
                       ({"replicas": 3}, "api.replicas"), ({"no_such": 1}, "api.no_such")):
        with pytest.raises(ConfigError) as info:
            limits.reconfigure({"api": bad})
        assert info.value.field == field, (bad, info.value)
    assert (limits.current.max_batch_jobs, limits.current.max_page) == (7, 20)   # nothing half-applied
    assert limits.changes == 1
    assert set(API_LIVE_FIELDS) <= set(ApiSettings.model_fields)


def test_a_new_user_config_reaches_the_replicas(server):
    """A second app on the session's Serve: deployed with one user_config, then another."""
    from ray import serve

    from ray_qalloc.serving import deployment_for

    token = server.token(f"lim{uuid.uuid4().hex[:8]}")
    url = server.url + "/limits"
    jobs = {"jobs": [{"qasm": BELL, "shots": 10} for _ in range(3)]}

    def deploy(cfg: dict) -> None:
        serve.run(deployment_for(server.settings, user_config={"api": cfg}), name="limits",
                  route_prefix="/limits", blocking=False)

    try:
        deploy({"max_batch_jobs": 2, "max_page": 5})
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
            over = c.post("/v1/jobs:batch", json=jobs)
            assert over.status_code in (413, 422) and "2" in over.text, over.text
            page = c.get("/v1/jobs", params={"limit": 6})
            assert page.status_code == 422 and "max_page" in page.text, page.text
            deploy({"max_batch_jobs": 5, "max_page": 50})
            ok = c.post("/v1/jobs:batch", json=jobs)
            assert ok.status_code == 200 and len(ok.json()["jobs"]) == 3, ok.text
            assert c.get("/v1/jobs", params={"limit": 6}).status_code == 200
    finally:
        serve.delete("limits")
