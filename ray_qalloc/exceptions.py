"""Every error ray-qalloc raises on purpose, in one place.

The tree::

    QAllocError                     base; ``code`` is stable and machine-readable
    ├── IntakeError                 a job was refused at intake; nothing was stored
    │   ├── LimitExceeded           a size limit (text, qubits, shots, gates, ...)
    │   ├── InvalidCircuit          the circuit text does not parse or is not allowed
    │   │   └── ForbiddenInclude    QASM ``include`` of something but the standard libraries
    │   ├── InvalidJobSpec          a field of the job has a wrong type or value
    │   ├── InvalidEvent            a security event record (CEF, LEEF, syslog, OCSF, STIX) is malformed
    │   └── InvalidRequest          another part of a request (a header, a query parameter) is malformed
    ├── NoFeasibleBackend           every backend was filtered out (explanation attached)
    ├── JobNotFound                 no job with that id (or not visible to this tenant)
    ├── JobFailed                   the job ended in FAILED or CANCELLED
    ├── JobTimeout                  waiting for a result took longer than asked
    ├── BackendError                a backend could not run a circuit (not a crash)
    ├── StoreError                  the job store could not be opened or written
    ├── Unauthorized / Forbidden    no valid token / a route or class not granted (HTTP 401 / 403)
    ├── QuotaExceeded               a tenant's quota is spent (HTTP 429 with Retry-After)
    ├── Conflict                    contradicts the job's state or an earlier request (HTTP 409)
    └── ConfigError                 configuration is inconsistent or unusable

Messages say what was wrong and end with "To fix: ..." so that a person reading a
traceback, an HTTP error body or a CLI line knows the next step.
"""

from __future__ import annotations

from typing import Any


class QAllocError(Exception):
    """Base of every deliberate ray-qalloc error."""

    code: str = "qalloc_error"

    def __init__(self, message: str, *, fix: str | None = None, field: str | None = None,
                 **details: Any) -> None:
        self.message = message
        self.fix = fix
        self.field = field
        self.details = details
        text = message if fix is None else f"{message} To fix: {fix}"
        super().__init__(text)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, used by the CLI's --output json and the HTTP API."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            out["field"] = self.field
        if self.fix is not None:
            out["hint"] = self.fix
        if self.details:
            out["details"] = self.details
        return out

    def __reduce__(self):  # keep the fields when Ray pickles an error across processes
        return (_rebuild, (type(self), self.message, self.fix, self.field, self.details))


def _rebuild(cls: type[QAllocError], message: str, fix: str | None, field: str | None,
             details: dict[str, Any]) -> QAllocError:
    return cls(message, fix=fix, field=field, **details)


class IntakeError(QAllocError):
    code = "invalid_job"


class LimitExceeded(IntakeError):
    code = "limit_exceeded"


class InvalidCircuit(IntakeError):
    code = "invalid_circuit"


class ForbiddenInclude(InvalidCircuit):
    code = "forbidden_include"


class InvalidJobSpec(IntakeError):
    code = "invalid_job_spec"


class InvalidEvent(IntakeError):
    """A security event record that cannot be read; ``field`` names the part, ``details.format`` the format."""

    code = "invalid_event"


class InvalidRequest(IntakeError):
    """A header or query parameter that is not a job or an event (e.g. a stream position)."""

    code = "invalid_request"


class NoFeasibleBackend(QAllocError):
    code = "no_feasible_backend"


class JobNotFound(QAllocError):
    code = "job_not_found"


class UnknownBackend(QAllocError):
    """A name that is no backend, pool or QPU of this allocator (HTTP 404)."""

    code = "unknown_backend"


class JobFailed(QAllocError):
    code = "job_failed"


class JobTimeout(QAllocError):
    code = "job_timeout"


class BackendError(QAllocError):
    code = "backend_error"


class StoreError(QAllocError):
    code = "store_error"


class Unauthorized(QAllocError):
    """No valid bearer token (HTTP 401)."""

    code = "unauthorized"


class Forbidden(QAllocError):
    """A valid caller asking for what it may not do (HTTP 403)."""

    code = "forbidden"


class QuotaExceeded(QAllocError):
    """A tenant's quota is spent; ``details.retry_after_s`` says when it frees (HTTP 429)."""

    code = "quota_exceeded"


class Conflict(QAllocError):
    """The request contradicts the job's state or an earlier request (HTTP 409)."""

    code = "conflict"


class IdempotencyKeyReused(Conflict):
    """An Idempotency-Key sent again with a different job."""

    code = "idempotency_key_reused"


class ConfigError(QAllocError):
    code = "config_error"
