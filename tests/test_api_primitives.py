"""Estimator jobs and sampler seeds over HTTP (issue #14): the Qiskit primitives with the HTTP
``Client`` on a real Ray Serve, against Qiskit's reference primitives; the job fields on the wire;
and the document stating the limits intake enforces on them.

On the pool's simulators expectation values are exact, so over HTTP they must equal
``StatevectorEstimator``'s to 1e-9, as they do in-Ray (``tests/test_estimator.py``): a value lost
or reordered on the wire (the result model, the client's ``JobResult``) moves them by far more.
"""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from qiskit import QuantumCircuit
from qiskit.circuit import ParameterVector
from qiskit.primitives import StatevectorEstimator
from qiskit.quantum_info import SparsePauliOp

from ray_qalloc.api import create_app, smallest_precision
from ray_qalloc.client import Client, _job_body
from ray_qalloc.config import Settings
from ray_qalloc.estimator import QAllocEstimator
from ray_qalloc.exceptions import InvalidJobSpec, QuotaExceeded
from ray_qalloc.runopts import MAX_OBSERVABLES, MAX_SEED, shots_for_precision
from ray_qalloc.sampler import QAllocSampler
from ray_qalloc.tenants import Quota, TenantStore
from tests.serve_fixtures import BELL

pytestmark = pytest.mark.timeout(300)

EXACT = ["statevector"]
ATOL = 1e-9
BELL_UNMEASURED = 'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2];\nh q[0];\ncx q[0],q[1];\n'
OBS = [SparsePauliOp(["ZZ", "XI"], [1.0, 0.5]), SparsePauliOp("IY"), SparsePauliOp(["XX", "YZ"], [-0.7, 0.2])]
# H2 at 0.735 Å (STO-3G, parity-mapped to two qubits), as in tests/test_estimator.py
H2 = SparsePauliOp.from_list([("II", -1.052373245772859), ("IZ", 0.39793742484318045),
                              ("ZI", -0.39793742484318045), ("ZZ", -0.01128010425623538),
                              ("XX", 0.18093119978423156)])


def ansatz() -> QuantumCircuit:
    t = ParameterVector("t", 2)
    qc = QuantumCircuit(2)
    qc.ry(t[0], 0)
    qc.ry(t[1], 1)
    qc.cx(0, 1)
    qc.rz(0.3, 1)
    qc.h(0)
    return qc


def ry_pair() -> QuantumCircuit:
    t = ParameterVector("t", 2)
    qc = QuantumCircuit(2, 2)
    qc.ry(t[0], 0)
    qc.ry(t[1], 1)
    qc.cx(0, 1)
    qc.measure([0, 1], [0, 1])
    return qc


def new_tenant() -> str:
    return f"prim-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def token(server: Any) -> str:
    return server.token(new_tenant())


@pytest.fixture
def client(server: Any, token: str) -> Client:
    with Client(server.url, token, max_wait_s=30) as c:
        yield c


@pytest.fixture
def http(server: Any, token: str) -> httpx.Client:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
        yield c


# ---------------------------------------------------------------------------------------------
# The primitives over HTTP, on a real Serve
# ---------------------------------------------------------------------------------------------

def test_estimator_over_http_equals_the_reference(client: Client) -> None:
    """Broadcast pubs (3 parameter sets x 3 observables, outer product) and an H2 energy, through
    ``QAllocEstimator(client=Client(...))``: exact values, equal to StatevectorEstimator's."""
    estimator = QAllocEstimator(client, backends=EXACT, timeout_s=120)
    values = np.random.default_rng(11).uniform(0, np.pi, (3, 1, 2))
    pubs = [(ansatz(), OBS, values), (ansatz(), H2, [0.4, 1.3])]
    result = estimator.run(pubs).result()
    reference = StatevectorEstimator().run(pubs).result()
    for ours, ref in zip(result, reference):
        assert ours.data.evs.shape == ref.data.evs.shape
        np.testing.assert_allclose(ours.data.evs, ref.data.evs, atol=ATOL, rtol=0)
        assert np.all(ours.data.stds == 0.0)
        assert all(ours.metadata["exact"]) and all(b.endswith("/statevector") for b in ours.metadata["backends"])
    assert result[0].data.evs.shape == (3, 3) and len(result[0].metadata["job_ids"]) == 3


def test_estimator_job_result_over_raw_http(http: httpx.Client, client: Client) -> None:
    """The job body's `observables`, and the result's `expectation` (counts stay empty); the
    client's handle puts the values where the in-Ray JobResult has them."""
    r = http.post("/v1/jobs", json={"qasm": BELL_UNMEASURED, "observables": [{"ZZ": 1.0, "XI": 0.5}, {"XX": 2.0}],
                                    "precision": 0.05, "seed": 7, "backends": EXACT})
    assert r.status_code == 201, r.text
    out = http.get(f"/v1/jobs/{r.json()['id']}/result", params={"wait": 30})
    assert out.status_code == 200, out.text
    body = out.json()
    assert body["counts"] == {}
    exp = body["expectation"]
    assert exp["exact"] is True and exp["precision"] == 0.05 and exp["groups"] == exp["shots_per_group"] == 0
    np.testing.assert_allclose(exp["evs"], [1.0, 2.0], atol=ATOL)    # Bell: <ZZ> = <XX> = 1, <XI> = 0
    assert exp["stds"] == [0.0, 0.0]
    handle = client.job(r.json()["id"])
    assert handle.result(timeout=30).metadata["expectation"]["evs"] == exp["evs"]
    # the same through Client.submit, with pairs and numpy coefficients as the session takes them
    res = client.submit(BELL_UNMEASURED, observables=[[("ZZ", np.float64(0.5)), ("ZZ", 0.5)]], precision=0,
                        backends=EXACT).result(timeout=60)
    assert res.counts == {} and res.metadata["expectation"]["evs"] == pytest.approx([1.0], abs=ATOL)
    sampled = client.submit(BELL, shots=100, backends=EXACT).result(timeout=60)
    assert sampled.metadata == {} and sum(sampled.counts.values()) == 100


def test_seeded_sampler_over_http_repeats_on_a_pinned_method(client: Client) -> None:
    """The same seed on the same method gives the same counts (and the same BitArrays) over
    HTTP, as in-Ray; another seed gives others."""
    pub = (ry_pair(), [[0.7, 2.1], [1.5, 0.3]])

    def run(seed: int) -> Any:
        sampler = QAllocSampler(client, default_shots=500, seed=seed, backends=EXACT, timeout_s=120)
        return sampler.run([pub]).result()[0].data.c

    first, again, other = run(42), run(42), run(43)
    assert [first.get_counts(i) for i in range(2)] == [again.get_counts(i) for i in range(2)]
    assert np.array_equal(first.array, again.array)
    assert [first.get_counts(i) for i in range(2)] != [other.get_counts(i) for i in range(2)]


def test_bad_observables_over_http_name_the_field_and_the_fix(http: httpx.Client, client: Client) -> None:
    cases = [
        ({"observables": [{"ZA": 1.0}]}, "invalid_request", "observables.0", "Pauli label"),
        ({"observables": [{"ZZ": "1"}]}, "invalid_request", "observables.0.ZZ", "a number"),
        ({"observables": []}, "invalid_request", "observables", "Pauli label"),
        ({"observables": [{}]}, "invalid_request", "observables.0", "Pauli label"),
        ({"observables": [{"ZZZ": 1.0}]}, "invalid_job_spec", "observables", "one letter per circuit qubit"),
        ({"precision": 0.1}, "invalid_job_spec", "precision", "observables"),
        ({"observables": [{"ZZ": 1}], "precision": -0.1}, "invalid_request", "precision", ">= 0"),
        ({"observables": [{"ZZ": 1}], "precision": 1e-6}, "limit_exceeded", "precision", "precision of at least"),
        ({"observables": [{"ZZ": 1}], "precision": 0, "intent": "quantum"}, "invalid_job_spec", "precision",
         "precision > 0"),
        ({"seed": "5"}, "invalid_request", "seed", "JSON integer"),
        ({"seed": MAX_SEED + 1}, "invalid_request", "seed", "whole number"),
    ]
    for extra, code, field, fix in cases:
        r = http.post("/v1/jobs", json={"qasm": BELL_UNMEASURED, **extra})
        assert r.status_code == 422, (extra, r.text)
        err = r.json()["error"]
        assert err["code"] == code and err["field"].startswith(field) and fix in err["hint"], (extra, err)
    # in a batch, a job whose observables do not fit its circuit is refused on its own
    r = http.post("/v1/jobs:batch", json={"jobs": [
        {"qasm": BELL_UNMEASURED, "observables": [{"ZZ": 1.0}], "precision": 0, "backends": EXACT, "id": "good"},
        {"qasm": BELL_UNMEASURED, "observables": [{"Z": 1.0}], "id": "bad"}]})
    assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
    assert r.json()["jobs"][1]["error"]["field"] == "observables"
    # the client raises the server's error, typed, with its fix
    with pytest.raises(InvalidJobSpec, match="acts on 3 qubits") as info:
        client.submit(BELL_UNMEASURED, observables=[{"ZZZ": 1.0}])
    assert "To fix:" in str(info.value)
    with pytest.raises(InvalidJobSpec, match="complex"):
        client.submit(BELL_UNMEASURED, observables=[{"ZZ": 1j}])


def test_an_estimator_job_is_charged_the_shots_it_will_run(server: Any) -> None:
    """Quotas count what a QPU would spend: ⌈1/precision²⌉ shots per measurement basis times
    the bases, not the job's `shots` field."""
    tenant = new_tenant()
    server.tenants.set_quota(tenant, Quota(shots_per_day=1_000))
    with httpx.Client(base_url=server.url, headers=server.headers(tenant), timeout=60) as c:
        body = {"qasm": BELL_UNMEASURED, "shots": 10, "observables": [{"ZZ": 1.0}, {"XX": 1.0}], "precision": 0.05,
                "backends": EXACT}
        r = c.post("/v1/jobs", json=body)   # 400 shots x 2 bases (ZZ, XX) = 800 <= 1,000
        assert r.status_code == 201, r.text
        assert c.get(f"/v1/jobs/{r.json()['id']}").json()["shots"] == 800
        c.delete(f"/v1/jobs/{r.json()['id']}")
        r = c.post("/v1/jobs", json=body)   # another 800: 1,600 > 1,000 today
        assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded", r.text


# ---------------------------------------------------------------------------------------------
# The document states the limits intake enforces on the new fields (in process, no Ray)
# ---------------------------------------------------------------------------------------------

@pytest.fixture()
def small_app(tmp_path: Path) -> tuple[Any, dict[str, str]]:
    settings = Settings(data_dir=tmp_path, limits={"max_shots": 5_000, "max_qubits": 40})
    tenants = TenantStore(settings.resolved_store_url)
    headers = {"Authorization": f"Bearer {tenants.create_token('doc')}"}
    tenants.close()
    return create_app(settings, allocator=object()), headers


def _post(app: Any, headers: dict[str, str], body: dict[str, Any]) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post("/v1/jobs", json=body, headers=headers)
    return asyncio.run(go())


def test_the_document_states_the_estimator_limits(small_app: tuple[Any, dict[str, str]]) -> None:
    app, headers = small_app
    schemas = app.openapi()["components"]["schemas"]
    job, batch = schemas["JobIn"]["properties"], schemas["BatchJobIn"]["properties"]
    observables = next(b for b in job["observables"]["anyOf"] if b.get("type") == "array")
    assert observables["minItems"] == 1 and observables["maxItems"] == MAX_OBSERVABLES
    assert observables["items"]["propertyNames"] == {"pattern": "^[IXYZ]+$", "maxLength": 40}
    assert observables["items"]["additionalProperties"] == {"type": "number"}
    assert observables["items"]["minProperties"] == 1
    # precision: 0 (exact) or at least the value whose shots per basis fit max_shots
    p_min = smallest_precision(5_000)
    assert {"type": "number", "const": 0} in job["precision"]["anyOf"]
    assert {"type": "number", "minimum": p_min} in job["precision"]["anyOf"]
    assert shots_for_precision(p_min) <= 5_000 < shots_for_precision(math.nextafter(p_min, 0))
    # batch items keep the unbounded shape: a job over a limit is refused on its own there
    batch_obs = next(b for b in batch["observables"]["anyOf"] if b.get("type") == "array")
    assert "maxItems" not in batch_obs and "maxLength" not in batch_obs["items"]["propertyNames"]
    assert {"type": "number", "minimum": 0} in [{k: v for k, v in b.items() if k != "title"}
                                                for b in batch["precision"]["anyOf"]]
    # the seed's bound is the exact integer (FastAPI's model would write 2**63-1 as the float 2**63)
    for model in (job, batch):
        seed = next(b for b in model["seed"]["anyOf"] if b.get("type") == "integer")
        assert seed["maximum"] == MAX_SEED and isinstance(seed["maximum"], int) and seed["minimum"] == 0
    assert json.loads(json.dumps(app.openapi()))["components"]["schemas"]["JobIn"]["properties"]["seed"] \
        == job["seed"]
    # the boundaries the document states are where the server draws them
    at_min = _post(app, headers, {"qasm": BELL_UNMEASURED, "observables": [{"ZZ": 1}], "precision": p_min})
    below = _post(app, headers, {"qasm": BELL_UNMEASURED, "observables": [{"ZZ": 1}],
                                 "precision": math.nextafter(p_min, 0)})
    assert below.status_code == 422 and below.json()["error"]["code"] == "limit_exceeded"
    assert at_min.json()["error"]["code"] != "limit_exceeded"   # past intake (no allocator here: 503)
    too_long = _post(app, headers, {"qasm": BELL_UNMEASURED, "observables": [{"Z" * 41: 1}]})
    assert too_long.status_code == 422 and too_long.json()["error"]["field"] == "observables"


def test_the_client_sends_the_fields_as_json_numbers() -> None:
    body = _job_body(circuit=BELL_UNMEASURED, observables=[{"ZZ": np.float32(0.5)}, [("XI", 1), ("XI", 2 + 0j)]],
                     precision=np.float64(0.01), seed=np.int64(5))
    assert body["observables"] == [{"ZZ": 0.5}, {"XI": 3.0}] and body["precision"] == 0.01 and body["seed"] == 5
    assert json.loads(json.dumps(body)) == body
    assert type(body["seed"]) is int and type(body["precision"]) is float
    assert "observables" not in _job_body(circuit=BELL) and "seed" not in _job_body(circuit=BELL)
    with pytest.raises(InvalidJobSpec, match="pair"):
        _job_body(circuit=BELL, observables=[["ZZ"]])
