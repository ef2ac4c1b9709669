"""Small builders shared by tests (no Ray, no Qiskit)."""

from __future__ import annotations

from typing import Any

from ray_qalloc.jobs import Intent, PreparedJob, Priority, new_job_id


def prepared(**kw: Any) -> PreparedJob:
    base: dict[str, Any] = dict(
        id=new_job_id(), tenant="t1", priority=Priority.NORMAL, intent=Intent.AUTO, shots=100,
        deadline_s=None, fidelity_min=None, idempotency_key=None, payload=b"qpy-bytes",
        source_format="qasm2", num_qubits=3, num_clbits=3, ops=frozenset({"h", "cx", "measure"}),
        features={"size": 3.0, "depth": 4.0, "two_qubit_count": 2.0, "measure_count": 3.0})
    base.update(kw)
    return PreparedJob(**base)
