"""Fuzz the event routes from the app's OpenAPI document, in process (ASGI), without Ray.

Why beside ``test_api_fuzz`` (which drives every route on a real Serve, the events ones too):
the event routes need no allocator, so here they get many more cases per media type in a
few seconds, with the same checks: no 5xx, answers the document describes, invalid input
refused. Derandomized, no shrinking, bounded by ``TEST_EVENTS_FUZZ_EXAMPLES``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import given
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

from ray_qalloc.api import create_app
from ray_qalloc.config import Settings
from ray_qalloc.tenants import TenantStore
from tests.test_api_fuzz import CHECKS, FUZZ_SETTINGS, _with_real_records

EXAMPLES = int(os.environ.get("TEST_EVENTS_FUZZ_EXAMPLES", "40"))
SETTINGS = FUZZ_SETTINGS.__class__(FUZZ_SETTINGS, max_examples=EXAMPLES)


@pytest.fixture(scope="module")
def events_api(tmp_path_factory: pytest.TempPathFactory) -> tuple[schemathesis.BaseSchema, dict[str, str]]:
    data = Path(tmp_path_factory.mktemp("events-fuzz"))
    settings = Settings(data_dir=data)
    tenants = TenantStore(settings.resolved_store_url)
    headers = {"Authorization": f"Bearer {tenants.create_token('fuzz-events')}"}
    tenants.close()
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(settings, allocator=object()))
    return schema, headers


def _events_operations(schema: schemathesis.BaseSchema) -> list[Any]:
    ops = [r.ok() for r in schema.get_all_operations()]
    return [op for op in ops if op.path == "/v1/events"]


def test_event_routes_fuzz(events_api: tuple[schemathesis.BaseSchema, dict[str, str]], subtests: Any) -> None:
    schema, headers = events_api
    ops = _events_operations(schema)
    assert {op.label for op in ops} == {"POST /v1/events", "GET /v1/events"}
    calls: list[int] = []

    def call(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=headers, checks=CHECKS)
        calls.append(1)

    for op in ops:
        strategies = [(mode.value, op.as_strategy(mode, headers=headers))
                      for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
        if op.method.upper() == "POST":
            strategies.append(("real records", op.as_strategy(GenerationMode.POSITIVE, headers=headers)
                               .map(_with_real_records)))
        for name, strategy in strategies:
            with subtests.test(operation=op.label, mode=name):
                @SETTINGS
                @given(case=strategy)
                def fuzz(case: schemathesis.Case) -> None:
                    call(case)

                try:
                    fuzz()
                except Unsatisfiable:
                    assert name == "negative", f"no valid request can be generated for {op.label}"
    assert len(calls) >= EXAMPLES
