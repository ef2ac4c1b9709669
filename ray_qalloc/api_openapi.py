"""The served OpenAPI document, made to state the limits this replica enforces.

Why a module of its own: the intake limits are settings and the API's own limits change live,
while the models' constraints are fixed at import; this is the one place that writes the
limits in force into the document (``create_app`` installs it).
"""

import copy
from typing import Any

from fastapi import FastAPI

from ray_qalloc.api_state import ApiLimits
from ray_qalloc.config import Settings
from ray_qalloc.runopts import MAX_OBSERVABLES, MAX_SEED, smallest_precision

def document_live_limits(app: FastAPI, settings: Settings, limits: ApiLimits) -> None:
    """Make the served OpenAPI document state the limits this replica enforces by hand.

    Why by hand and not in the models: the intake limits are settings and the API's own limits
    change live (``ApiLimits.reconfigure``), while a model's constraints are fixed when the
    module is imported. The checks stay where they are (they answer with their own codes,
    `limit_exceeded` and `invalid_job_spec`, naming the setting); the document is rebuilt
    after a reconfigure, so a client or fuzzer reading it sees the bounds in force."""
    build = app.openapi
    built_for = [-1]

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None or built_for[0] != limits.changes:
            app.openapi_schema = None
            doc = build()
            intake, api = settings.limits, limits.current
            schemas = doc["components"]["schemas"]
            # a batch answers a job over a limit on its own (its `error`), not with a 422 for all:
            # its items keep the unbounded shape
            schemas["BatchJobIn"] = copy.deepcopy(schemas["JobIn"])
            schemas["BatchJobIn"]["title"] = "BatchJobIn"
            schemas["BatchJobIn"]["description"] = (
                "As JobIn; a job over an intake limit (shots, deadline, circuit size) is refused on its "
                "own in the answer's `jobs[i].error`, and the others go on.")
            schemas["BatchIn"]["properties"]["jobs"]["items"] = {"$ref": "#/components/schemas/BatchJobIn"}
            for model in ("JobIn", "BatchJobIn"):
                _exact_seed_bound(schemas[model]["properties"]["seed"])
            job = schemas["JobIn"]["properties"]
            job["qasm"]["maxLength"] = intake.max_qasm_bytes   # bytes of UTF-8: a bound on characters too
            job["shots"]["maximum"] = intake.max_shots
            for branch in job["deadline_s"].get("anyOf", []):
                if branch.get("type") == "number":
                    branch["maximum"] = intake.max_deadline_s
            _document_estimator_limits(job, intake.max_shots, intake.max_qubits)
            schemas["BatchIn"]["properties"]["jobs"]["maxItems"] = api.max_batch_jobs
            for path, name, bound in (("/v1/jobs", "limit", api.max_page), ("/v1/events", "limit", api.max_page),
                                      ("/v1/jobs/{job_id}/result", "wait", api.max_result_wait_s)):
                for param in doc["paths"].get(path, {}).get("get", {}).get("parameters", []):
                    if param["name"] == name:
                        param["schema"]["maximum"] = bound
            built_for[0] = limits.changes
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _exact_seed_bound(seed: dict[str, Any]) -> None:
    """The seed's maximum as the integer it is. Why: FastAPI's OpenAPI model holds bounds as
    floats, and 2**63-1 as a float is 2**63, a seed the server refuses."""
    for branch in seed.get("anyOf", []):
        if branch.get("type") == "integer":
            branch["minimum"], branch["maximum"] = 0, MAX_SEED


def _document_estimator_limits(job: dict[str, Any], max_shots: int, max_qubits: int) -> None:
    """The estimator fields' intake limits, in JobIn's document (batch items are refused one by one).

    ``precision`` is 0 (exact) or at least the value whose shots per basis fit ``max_shots``; an
    observable has at most ``MAX_OBSERVABLES`` entries and labels of at most ``max_qubits`` letters
    (a label has one letter per circuit qubit)."""
    for branch in job["observables"].get("anyOf", []):
        if branch.get("type") == "array":
            branch["maxItems"] = MAX_OBSERVABLES
            branch["items"] = copy.deepcopy(branch["items"])
            branch["items"]["propertyNames"]["maxLength"] = max_qubits
    branches = job["precision"].get("anyOf", [])
    for i, branch in enumerate(branches):
        if branch.get("type") == "number":
            branches[i:i + 1] = [{"type": "number", "const": 0},
                                 {"type": "number", "minimum": smallest_precision(max_shots)}]
            break


__all__ = ["document_live_limits"]
