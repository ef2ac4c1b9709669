"""Braket devices as backends (``ray_qalloc.backends.braket``).

The local simulator is real throughout, and runs through the real allocator on real Ray in
its own process (``braket_scenario.py``: this session's Ray has the default pool only). The
managed-device path is tested with the AWS side alone replaced (no AWS account here): a
stand-in for the provider's ``BraketAwsBackend`` whose tasks run on the real local simulator
and whose task ids outlive the adapter, as Braket's task ARNs do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("qiskit_braket_provider")

from braket.circuits import Circuit  # noqa: E402

from ray_qalloc.backends.braket import BraketBackend, counts_by_register, short_name  # noqa: E402
from ray_qalloc.backends.registry import make_backend  # noqa: E402
from ray_qalloc.exceptions import BackendError  # noqa: E402
from ray_qalloc.frontends import to_intake  # noqa: E402

SCRIPT = Path(__file__).with_name("braket_scenario.py")


def test_the_local_simulator_is_a_named_backend_that_runs_framework_circuits():
    backend = make_backend("braket_local")
    spec = backend.spec()
    assert (spec.kind, spec.family, spec.num_qubits) == ("simulator", "braket", 26)
    res = backend.run(to_intake(Circuit().x(3).h(0).cnot(0, 1).measure([3, 1, 0])), shots=200,
                      on_submitted=lambda _: pytest.fail("a local task must not be reported"))
    assert set(res.counts) <= {"100", "111"} and sum(res.counts.values()) == 200
    with pytest.raises(BackendError, match="re-attach"):
        backend.reattach(res.provider_job_id, 200)


def test_counts_get_qiskit_s_register_spaces():
    from qiskit import ClassicalRegister, QuantumCircuit, QuantumRegister

    qc = QuantumCircuit(QuantumRegister(3), ClassicalRegister(1, "a"), ClassicalRegister(2, "b"))
    assert counts_by_register({"101": 5, "010": 1}, qc) == {"10 1": 5, "01 0": 1}
    assert short_name("Forte 1") == "forte_1" and short_name("SV1") == "sv1"


def test_managed_devices_need_credentials(monkeypatch, tmp_path):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(BackendError, match="AWS credentials"):
        make_backend("braket_sv1")


# ---- the AWS side, replaced --------------------------------------------------------------------
class _Cloud:
    """What Amazon Braket keeps: tasks by ARN, each submitted once; they outlive any adapter."""

    def __init__(self) -> None:
        from qiskit_braket_provider import BraketLocalBackend

        self.local = BraketLocalBackend("braket_sv")
        self.tasks: dict[str, object] = {}
        self.submitted = 0


class _AwsBackendStandIn:
    """The provider's ``BraketAwsBackend`` as the adapter uses it: ``name``, ``target``, ``run``
    and ``retrieve_job``; tasks run on the real local simulator."""

    def __init__(self, cloud: _Cloud) -> None:
        self.cloud = cloud
        self.name = "SV1"
        self.target = cloud.local.target

    def run(self, circuit, shots):
        self.cloud.submitted += 1
        task = self.cloud.local.run(circuit, shots=shots)
        arn = f"arn:aws:braket:us-east-1:000000000000:quantum-task/{len(self.cloud.tasks)}"
        self.cloud.tasks[arn] = task
        return _Task(arn, task)

    def retrieve_job(self, task_id):
        return _Task(task_id, self.cloud.tasks[task_id])


class _Task:
    def __init__(self, arn, task) -> None:
        self.arn, self.task = arn, task

    def job_id(self) -> str:
        return self.arn

    def result(self):
        return self.task.result()


def test_a_managed_task_id_is_stored_before_waiting_and_a_restart_re_attaches_without_resubmitting():
    cloud = _Cloud()
    stored: list[str] = []

    class Crash(Exception):
        pass

    def on_submitted(task_id: str) -> None:   # the actor stores it in the allocator, then dies
        stored.append(task_id)
        raise Crash

    first = BraketBackend("braket_sv1", _AwsBackendStandIn(cloud), local=False)
    circuit = to_intake(Circuit().x(0).cnot(0, 2).measure([2, 1, 0]))
    with pytest.raises(Crash):
        first.run(circuit, shots=64, on_submitted=on_submitted)
    assert cloud.submitted == 1 and stored == list(cloud.tasks)

    restarted = BraketBackend("braket_sv1", _AwsBackendStandIn(cloud), local=False)   # a new actor
    res = restarted.reattach(stored[0], shots=64)
    assert res.counts == {"101": 64} and res.provider_job_id == stored[0] and res.metadata["reattached"]
    assert cloud.submitted == 1                                                        # never twice
    with pytest.raises(BackendError, match="no task"):
        restarted.reattach("arn:aws:braket:us-east-1:000000000000:quantum-task/none", shots=1)


# ---- through the real allocator on real Ray (own process) ----------------------------------------
@pytest.mark.timeout(420)
def test_braket_local_is_placed_by_the_allocator_and_runs_cirq_and_braket_programs(tmp_path):
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QALLOC_") and k not in ("RAY_ADDRESS",)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SCRIPT.parent.parent), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), str(out)], env=env, cwd=SCRIPT.parent.parent,
                          capture_output=True, text=True, timeout=400)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report.get("error") is None, report
    assert report["braket"]["backend"] == "braket_local"
    assert set(report["braket"]["counts"]) <= {"100", "111"}
    assert report["cirq"]["backend"] == "braket_local" and report["cirq"]["counts"] == {"01": 20}
    assert report["cirq"]["pairs"] == [[0, 1]]
    assert "braket_local" in report["explain_backends"]
