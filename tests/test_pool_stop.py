"""Stopping one run must never kill another run's worker (Ray 2.60; docs/notes.md, "Ray: cancelling
a queued task can kill the worker running another").

What went wrong: ``PoolActor.stop`` force-cancelled the run's task. A force-cancel makes the
worker *start* exiting; a run that finishes in that window still returns its result, the pool
actor (the owner) then hands the same leased worker to the next queued run of the same
scheduling class, and that run dies with the worker (``WorkerCrashedError``). Runs of small
circuits that lose a race are stopped exactly as they finish, so it happened in a ``make run``.

The live tests share the session's Ray (``qa``) and hold all but one of its CPUs with a blocker
task, so that a second run queues behind the first, as it does on a busy pool. The unit tests
drive the run gate (``pool_actor.run_gate`` / ``stop_gated``) with real processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ray_qalloc.backends import pool_actor as pa
from ray_qalloc.backends.pool_actor import PoolActor, RunStopped, pool_actor_options
from ray_qalloc.config import Limits
from ray_qalloc.exceptions import BackendError
from ray_qalloc.jobs import make_spec, prepare_job

pytestmark = pytest.mark.timeout(300)

STOP_ME = "stop-me:"      # a run whose backend name starts so runs the test body below, not Aer


def _bell_payload() -> bytes:
    from qiskit import QuantumCircuit

    qc = QuantumCircuit(2, 2)
    qc.h(0)
    qc.cx(0, 1)
    qc.measure([0, 1], [0, 1])
    return prepare_job(make_spec(circuit=qc, shots=100), Limits()).payload


def _slow_payload(n: int, layers: int) -> bytes:
    from benchmarks.overhead import layered_circuit

    return prepare_job(make_spec(circuit=layered_circuit(n, layers), shots=100), Limits()).payload


def _wait_for(pred: Any, what: str, timeout_s: float = 60.0) -> None:
    """Poll until ``pred()``; the bound only turns a hang into a clear failure."""
    end = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _make_actor_class() -> Any:
    """A PoolActor whose runs go through one test task, so that they share one scheduling class as
    real runs do. A run named ``stop-me:<path>`` touches <path>, then waits for a child process
    to die and returns at once: a force-cancel kills the worker's children first and exits a
    moment later, so such a run finishes exactly inside that window — the incident, every time.
    Every other run is the real ``run_variant``. Defined in a function so that cloudpickle ships
    it by value to the actor's process."""
    def body(*args: Any) -> dict[str, Any]:
        name = args[6]
        if not str(name).startswith(STOP_ME):
            return pa.run_variant(*args)
        import subprocess as sp
        import time as t

        child = sp.Popen(["sleep", "600"])
        try:
            Path(name[len(STOP_ME):]).touch()
            while child.poll() is None:
                t.sleep(0.0002)
        finally:
            child.kill()
            child.wait()
        return {"counts": {}, "shots": 0, "backend": name, "metadata": {}}

    class BodyPool(PoolActor):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            self._body_task = ray.remote(max_retries=0)(body)

        def _task(self, fn: Any, threads: int, name: str) -> Any:
            if fn is pa._run_task:       # every run, old code and new, is submitted through here
                fn = self._body_task
            return super()._task(fn, threads, name)

    return ray.remote(BodyPool)


@pytest.fixture(scope="module")
def busy_pool(qa, tmp_path_factory) -> Iterator[tuple[Any, Path]]:
    """A pool actor on the session's node with warm workers, and a blocker holding every CPU but
    one: a second one-thread run queues behind the first, in the pool actor (its owner)."""
    node = ray.get_runtime_context().get_node_id()
    tmp = tmp_path_factory.mktemp("pool-stop")
    pool = "cpu-stoptest"
    actor = _make_actor_class().options(**pool_actor_options(pool, node, "pool-stop-test", use_resource=False)).remote(
        pool, node, ("statevector",))
    assert ray.get(actor.warmed.remote(120.0))
    blocker_ref = None
    cpus = next(n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["NodeID"] == node)
    hold = cpus - 1.0        # all of the node's CPUs but one, once other work gives them back
    if hold > 0:
        started, release = tmp / "blocker-started", tmp / "blocker-release"

        @ray.remote(max_retries=0)
        def blocker(started: str, release: str) -> None:
            Path(started).touch()
            while not os.path.exists(release):
                time.sleep(0.05)

        blocker_ref = blocker.options(num_cpus=hold, scheduling_strategy=NodeAffinitySchedulingStrategy(
            node, soft=False)).remote(str(started), str(release))
        _wait_for(started.exists, "the blocker to hold the other CPUs")
    yield actor, tmp
    if blocker_ref is not None:
        (tmp / "blocker-release").touch()
        ray.get(blocker_ref, timeout=60)
    ray.kill(actor)


def _outcome(ref: Any) -> Any:
    try:
        return ray.get(ref, timeout=180)
    except RunStopped:
        return "stopped"
    except BackendError as exc:
        return f"failed: {exc}"


def test_a_run_stopped_as_it_finishes_does_not_take_the_next_run_with_it(busy_pool):
    """Three rounds: before the fix, each round lost the queued run about three times in four."""
    actor, tmp = busy_pool
    for i in range(3):
        marker = tmp / f"x-started-{i}"
        x = actor.run.remote(f"x-finishing-{i}", 1, _bell_payload(), 100, method="statevector",
                             name=f"{STOP_ME}{marker}")
        _wait_for(marker.exists, "the first run to start")
        y = actor.run.remote(f"y-queued-{i}", 1, _bell_payload(), 100, method="statevector")
        _wait_for(lambda: (f"y-queued-{i}", 1) in ray.get(actor.running.remote()), "the second run to be submitted")
        time.sleep(0.1)                             # its task waits in the owner's queue behind x
        assert ray.get(actor.stop.remote(f"x-finishing-{i}", 1)) is True
        out_y = _outcome(y)
        assert isinstance(out_y, dict), (i, out_y)  # before the fix: "the run's worker ... died: WorkerCrashedError"
        assert sum(out_y["counts"].values()) == 100
        assert set(out_y["counts"]) <= {"00", "11"}
        assert _outcome(x) == "stopped"


def test_stopping_a_started_run_kills_its_own_worker_only(busy_pool):
    actor, _ = busy_pool
    x = actor.run.remote("x-long", 1, _slow_payload(24, 10), 100, method="statevector")   # ~10-20 s alone
    _wait_for(lambda: ray.get(actor.run_state.remote("x-long", 1)) == "started", "the long run to start")
    y = actor.run.remote("y-after-long", 1, _bell_payload(), 100, method="statevector")
    _wait_for(lambda: ray.get(actor.run_state.remote("y-after-long", 1)) is not None, "the second run to be submitted")
    assert ray.get(actor.stop.remote("x-long", 1)) is True
    assert ray.get(actor.run_state.remote("x-long", 1)) == "killed"
    assert _outcome(x) == "stopped"
    out_y = _outcome(y)                             # the stopped run's core went to it
    assert isinstance(out_y, dict), out_y
    assert sum(out_y["counts"].values()) == 100
    assert ray.get(actor.running.remote()) == []


def test_stopping_a_queued_run_kills_nothing(busy_pool):
    actor, _ = busy_pool
    x = actor.run.remote("x-first", 1, _slow_payload(20, 8), 100, method="statevector")   # ~1-3 s
    _wait_for(lambda: ray.get(actor.run_state.remote("x-first", 1)) == "started", "the first run to start")
    y = actor.run.remote("y-waits", 1, _bell_payload(), 100, method="statevector")
    assert ray.get(actor.run_state.remote("y-waits", 1)) == "queued"
    assert ray.get(actor.stop.remote("y-waits", 1)) is True
    assert _outcome(y) == "stopped"
    out_x = _outcome(x)                             # not WorkerCrashedError: its worker was not touched
    assert isinstance(out_x, dict), out_x
    assert sum(out_x["counts"].values()) == 100
    assert ray.get(actor.stop.remote("x-first", 1)) is False     # finished: nothing to stop


# ---- the gate itself, with real processes (no Ray) ---------------------------------------------
_CHILD = """
import sys, time
from pathlib import Path
from ray_qalloc.backends.pool_actor import run_gate

gate, started, returned = sys.argv[1:4]
with run_gate(gate):
    Path(started).touch()
    while not Path(started + ".go").exists():
        time.sleep(0.001)
Path(returned).touch()
"""


def _child(tmp: Path) -> tuple[subprocess.Popen, Path, Path, str]:
    gate, started, returned = str(tmp / "gate"), tmp / "started", tmp / "returned"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, gate, str(started), str(returned)],
                            cwd=Path(__file__).resolve().parents[1])
    return proc, started, returned, gate


def test_a_run_stopped_before_its_gate_does_not_start(tmp_path):
    gate = str(tmp_path / "gate")
    assert pa.stop_gated(gate) == "not_started"
    with pytest.raises(RunStopped):
        with pa.run_gate(gate):
            raise AssertionError("a stopped run must not run")
    assert pa.stop_gated(gate) == "stopped"


def test_a_started_run_is_killed_and_never_returns(tmp_path):
    proc, started, returned, gate = _child(tmp_path)
    try:
        _wait_for(lambda: started.exists() or proc.poll() is not None, "the child to pass its gate", 120.0)
        assert started.exists(), proc.returncode
        assert pa.stop_gated(gate) == "killed"
        Path(str(started) + ".go").touch()      # too late: it is dead, or dies at its next step
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -9
    assert not returned.exists()                # killed inside the gate: it cannot have returned
    assert pa.stop_gated(gate) == "stopped"        # a second stop changes nothing


def test_a_finished_run_is_left_alone(tmp_path):
    gate = str(tmp_path / "gate")
    with pa.run_gate(gate):
        pass
    assert pa.stop_gated(gate) == "done"


def test_a_dead_process_is_not_killed_again(tmp_path):
    """The pid a run wrote names a process that died (and whose number may come back): no signal."""
    proc, started, _, gate = _child(tmp_path)
    _wait_for(lambda: started.exists() or proc.poll() is not None, "the child to pass its gate", 120.0)
    assert started.exists(), proc.returncode
    proc.kill()
    proc.wait(timeout=60)
    assert pa.stop_gated(gate) == "gone"
