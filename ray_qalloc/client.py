"""The HTTP client of the ray-qalloc API.

Why it mirrors the in-Ray session (``QAlloc``): code written against ``submit`` /
``submit_many`` / ``handle.result()`` — and ``QAllocSampler`` — works over HTTP unchanged;
only the connection differs. Server errors come back as the same typed exceptions the
library raises in-process (their stable ``code`` picks the class).
"""

from __future__ import annotations

import hashlib
import numbers
import os
import time
import uuid
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import httpx

from ray_qalloc import exceptions as exc_mod
from ray_qalloc.exceptions import InvalidJobSpec, JobFailed, JobTimeout, QAllocError
from ray_qalloc.session import JobResult

if TYPE_CHECKING:  # pragma: no cover
    from qiskit import QuantumCircuit

_BY_CODE: dict[str, type[QAllocError]] = {
    cls.code: cls for cls in vars(exc_mod).values()
    if isinstance(cls, type) and issubclass(cls, QAllocError)
}


def to_qasm(circuit: "str | QuantumCircuit | Any") -> str:
    """QASM text for the wire: OpenQASM 2 where it can express the circuit, else 3.

    A Cirq or Braket circuit is converted here, caller-side (``ray_qalloc.frontends``), so the
    server sees plain OpenQASM and the counts come back in the framework's bit order."""
    if isinstance(circuit, str):
        return circuit
    from qiskit import qasm2, qasm3

    from ray_qalloc.frontends import framework_of, to_intake

    if framework_of(circuit) is not None:
        circuit = to_intake(circuit)

    try:
        return qasm2.dumps(circuit)
    except Exception:  # noqa: BLE001 - anything QASM 2 cannot express
        return qasm3.dumps(circuit)


def _error(resp: httpx.Response) -> QAllocError:
    try:
        body = resp.json()["error"]
    except Exception:  # noqa: BLE001 - not our JSON (a proxy, a crash page)
        return QAllocError(f"HTTP {resp.status_code} from {resp.request.url}: {resp.text[:200]}",
                           status=resp.status_code)
    cls = _BY_CODE.get(body.get("code", ""), QAllocError)
    details = dict(body.get("details") or {})
    details["status"] = resp.status_code
    if "Retry-After" in resp.headers:
        details["retry_after_s"] = float(resp.headers["Retry-After"])
    err = cls(body.get("message", ""), fix=body.get("hint"), field=body.get("field"), **details)
    if cls is QAllocError:
        err.code = body.get("code", "qalloc_error")
    return err


class RemoteJob:
    """A job submitted over HTTP: its status, result, explanation, or cancel it."""

    def __init__(self, client: "Client", job_id: str, created: bool = True, flag: str | None = None) -> None:
        self._client = client
        self.id = job_id
        self.created = created
        self.flag = flag

    def __repr__(self) -> str:
        return f"RemoteJob({self.id!r})"

    def status(self) -> dict[str, Any]:
        return self._client._request("GET", f"/v1/jobs/{self.id}").json()

    def result(self, timeout: float | None = None) -> JobResult:
        """Wait for the result (long-polling the server); JobTimeout after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 30.0 if deadline is None else max(deadline - time.monotonic(), 0.0)
            resp = self._client._request("GET", f"/v1/jobs/{self.id}/result",
                                         params={"wait": min(left, self._client.max_wait_s)},
                                         ok=(200, 202, 409), timeout=min(left, self._client.max_wait_s) + 30.0)
            body = resp.json()
            if resp.status_code == 200:
                # an estimator job's values go where the in-Ray JobResult has them (and the
                # primitives read them): metadata["expectation"]
                expectation = body.get("expectation")
                return JobResult(job_id=body["id"], counts=body["counts"], shots=body["shots"],
                                 backend=body["backend"], wall_s=body["wall_s"], queue_s=body["queue_s"],
                                 qpu_s=body.get("qpu_s"), attempts=body["attempts"],
                                 failover_history=body.get("failover_history", []),
                                 metadata={"expectation": expectation} if expectation is not None else {})
            if resp.status_code == 409:
                err = body["error"]
                raise JobFailed(err["message"], fix=err.get("hint"), state=err["code"])
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeout(f"job {self.id} is still {body['state']} after {timeout} s.",
                                 fix="wait longer (result(timeout=...)).", state=body["state"])

    def explain(self) -> dict[str, Any]:
        return self._client._request("GET", f"/v1/jobs/{self.id}/explain").json()

    def cancel(self) -> bool:
        """True if it was cancelled now; False if it had already finished."""
        resp = self._client._request("DELETE", f"/v1/jobs/{self.id}", ok=(200, 409))
        return resp.status_code == 200


class Client:
    """``Client(url, token)``; ``url`` and ``token`` default to ``QALLOC_URL`` / ``QALLOC_TOKEN``.

    Retries: connection errors, 503 and 429 are retried with backoff (honouring
    ``Retry-After`` up to ``max_retry_wait_s``); submissions carry an Idempotency-Key, so a
    retried submit never makes a second job."""

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 60.0,
                 retries: int = 3, max_retry_wait_s: float = 10.0, max_wait_s: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        url = url or os.environ.get("QALLOC_URL", "http://127.0.0.1:8000")
        token = token or os.environ.get("QALLOC_TOKEN")
        if not token:
            raise QAllocError("no API token was given.", fix="pass token=... or set QALLOC_TOKEN; "
                              "an admin creates one with `qalloc token create TENANT`.", field="token")
        self.url = url.rstrip("/")
        self.retries, self.max_retry_wait_s, self.max_wait_s = retries, max_retry_wait_s, max_wait_s
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport,
                                  headers={"Authorization": f"Bearer {token}"})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    # ---- jobs -------------------------------------------------------------------------------
    def submit(self, circuit: "str | QuantumCircuit", *, shots: int = 1024, priority: str = "normal",
               deadline_s: float | None = None, intent: str = "auto", fidelity_min: float | None = None,
               backends: list[str] | None = None, idempotency_key: str | None = None,
               tenant: str | None = None, format: str = "qasm", observables: list[Any] | None = None,
               precision: float | None = None, seed: int | None = None) -> RemoteJob:
        """One job; the arguments as for ``QAlloc.submit`` (``circuit``: text, Qiskit, Cirq or Braket).

        ``observables`` (``[{pauli_label: coeff}, ...]``) make it an estimator job: its result's
        ``metadata["expectation"]`` holds ``evs`` and ``stds``, as in-Ray; ``seed`` seeds simulator runs."""
        body = _job_body(circuit=circuit, shots=shots, priority=priority, deadline_s=deadline_s, intent=intent,
                         fidelity_min=fidelity_min, backends=backends, tenant=tenant, format=format,
                         observables=observables, precision=precision, seed=seed)
        key = idempotency_key or f"client-{uuid.uuid4().hex}"
        resp = self._request("POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key}, ok=(200, 201))
        out = resp.json()
        return RemoteJob(self, out["id"], out["created"], out.get("flag"))

    def submit_many(self, jobs: Iterable[dict[str, Any]], *, chunk: int = 500) -> list[RemoteJob]:
        """Many jobs, ``chunk`` per request (keyword dicts as for ``submit``). Refused jobs raise
        one error after all were sent; the accepted ones are on it as ``details['accepted']``."""
        items = list(jobs)
        handles: list[RemoteJob] = []
        errors: list[dict[str, Any]] = []
        for start in range(0, len(items), chunk):
            part = items[start:start + chunk]
            keys = [j.get("idempotency_key") for j in part]
            body = {"jobs": [_job_body(**{k: v for k, v in j.items() if k != "idempotency_key"}) for j in part]}
            # one key per request; job i gets "<key>/i" on the server. Callers' own per-job keys
            # (the Sampler sends them) make the request key, so a retried call names the same jobs
            if all(keys):
                key = "batch-" + hashlib.sha256("\0".join(map(str, keys)).encode()).hexdigest()[:48]
            else:
                key = f"batch-{uuid.uuid4().hex}"
            headers = {"Idempotency-Key": key}
            out = self._request("POST", "/v1/jobs:batch", json=body, headers=headers).json()
            for item in out["jobs"]:
                if item.get("error"):
                    errors.append(item["error"])
                else:
                    handles.append(RemoteJob(self, item["id"], bool(item["created"])))
        if errors:
            first = errors[0]
            cls = _BY_CODE.get(first.get("code", ""), QAllocError)
            raise cls(f"{len(errors)} of {len(items)} jobs were refused: {first['message']}", fix=first.get("hint"),
                      field=first.get("field"), accepted=[h.id for h in handles], errors=errors)
        return handles

    def job(self, job_id: str) -> RemoteJob:
        return RemoteJob(self, job_id, created=False)

    def jobs(self, *, limit: int = 50) -> Iterable[dict[str, Any]]:
        """The caller's jobs, newest first, page by page."""
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": limit}
            if cursor:
                params["cursor"] = cursor
            page = self._request("GET", "/v1/jobs", params=params).json()
            yield from page["jobs"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def backends(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/backends").json()

    def me(self) -> dict[str, Any]:
        return self._request("GET", "/v1/me").json()

    # ---- operators (admin token) ------------------------------------------------------------
    def maintenance(self, name: str | None = None) -> dict[str, Any]:
        path = f"/v1/admin/backends/{name}/maintenance" if name else "/v1/admin/maintenance"
        return self._request("GET", path).json()

    def cordon(self, name: str, reason: str = "") -> dict[str, Any]:
        return self._request("POST", f"/v1/admin/backends/{name}/cordon", json={"reason": reason}).json()

    def drain(self, name: str, reason: str = "", wait_s: float = 60.0) -> dict[str, Any]:
        return self._request("POST", f"/v1/admin/backends/{name}/drain", json={"reason": reason, "wait_s": wait_s},
                             timeout=wait_s + 60.0).json()

    def uncordon(self, name: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/admin/backends/{name}/uncordon").json()

    def add_window(self, name: str, start: float, end: float, reason: str = "") -> dict[str, Any]:
        return self._request("POST", f"/v1/admin/backends/{name}/windows",
                             json={"start": start, "end": end, "reason": reason}).json()

    def clear_windows(self, name: str) -> dict[str, Any]:
        return self._request("DELETE", f"/v1/admin/backends/{name}/windows").json()

    def audit(self, key: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if key:
            params["key"] = key
        return self._request("GET", "/v1/admin/audit", params=params).json()

    def config(self) -> dict[str, Any]:
        """The allocator's settings in force, its live overrides and the keys that may change."""
        return self._request("GET", "/v1/admin/config").json()

    def set_config(self, changes: dict[str, Any], unset: list[str] | None = None) -> dict[str, Any]:
        return self._request("PUT", "/v1/admin/config", json={"changes": changes, "unset": unset or []}).json()

    def alerts(self, limit: int = 100) -> dict[str, Any]:
        return self._request("GET", "/v1/admin/alerts", params={"limit": limit}).json()

    def calibration_status(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/admin/calibration").json()

    # ---- plumbing ---------------------------------------------------------------------------
    def _request(self, method: str, path: str, *, ok: tuple[int, ...] = (200,), **kw: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                resp = self._http.request(method, path, **kw)
            except httpx.TransportError as exc:
                if attempt >= self.retries:
                    raise QAllocError(f"cannot reach {self.url}: {exc}", fix="check the URL and that the server "
                                      "runs (`qalloc serve`).", unavailable=True) from None
                time.sleep(min(0.2 * 2 ** attempt, self.max_retry_wait_s))
                attempt += 1
                continue
            if resp.status_code in ok:
                return resp
            if resp.status_code in (429, 503) and attempt < self.retries:
                wait = float(resp.headers.get("Retry-After", 0.2 * 2 ** attempt))
                if wait <= self.max_retry_wait_s:
                    time.sleep(wait)
                    attempt += 1
                    continue
            raise _error(resp)


def _job_body(*, circuit: "str | QuantumCircuit", shots: int = 1024, priority: str = "normal",
              deadline_s: float | None = None, intent: str = "auto", fidelity_min: float | None = None,
              backends: list[str] | None = None, tenant: str | None = None,
              format: str = "qasm", observables: Iterable[Any] | None = None, precision: float | None = None,
              seed: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"qasm": to_qasm(circuit), "shots": int(shots), "priority": priority, "intent": intent}
    if format != "qasm" and isinstance(circuit, (str, bytes)):   # framework text: the server translates it
        body["format"] = format
    for k, v in (("deadline_s", deadline_s), ("fidelity_min", fidelity_min), ("backends", backends),
                 ("tenant", tenant)):
        if v is not None:
            body[k] = list(v) if k == "backends" else v
    if observables is not None:
        body["observables"] = _wire_observables(observables)
    if precision is not None:
        body["precision"] = _wire_number(precision, "precision", "precision")
    if seed is not None:
        body["seed"] = _wire_number(seed, "seed", "seed")
    return body


def _wire_observables(raw: Iterable[Any]) -> Any:
    """Observables as the API takes them: a list of ``{label: coefficient}`` with JSON numbers.

    Why here: the in-Ray session also takes ``[[label, coeff], ...]`` pairs and numpy or complex
    coefficients (``ray_qalloc.runopts``); the wire has one shape and JSON numbers. Equal labels
    are summed (as intake does); everything else is left to the server, which names what is wrong."""
    if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Iterable):
        return raw   # the server refuses it with the field and the fix
    out: list[Any] = []
    for i, obs in enumerate(raw):
        pairs = obs.items() if isinstance(obs, Mapping) else obs if isinstance(obs, (list, tuple)) else None
        if pairs is None:
            out.append(obs)
            continue
        terms: dict[Any, Any] = {}
        for pair in pairs:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise InvalidJobSpec(f"observables[{i}]: {pair!r:.60} is not a (label, coefficient) pair.",
                                     field="observables", fix='use {"ZZ": 1.0} or [["ZZ", 1.0]].')
            label, coeff = pair
            value = _wire_number(coeff, where=f"observables[{i}], the coefficient of {label!r:.40}")
            terms[label] = terms[label] + value if label in terms else value
        out.append(terms)
    return out


def _wire_number(value: Any, where: str | None = None, field: str = "observables") -> Any:
    """A Python, numpy or real-valued complex number as a JSON number (``int`` stays ``int``)."""
    if isinstance(value, bool) or type(value) in (int, float):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, numbers.Complex):
        if abs(value.imag) > 1e-10 * max(1.0, abs(value.real)):
            raise InvalidJobSpec(f"{where} is complex ({value}); it must be real.", field=field,
                                 fix="use real numbers (observables: a Hermitian sum of Pauli terms).")
        return float(value.real)
    return value   # not a number: the server refuses it, naming the field
