"""The `qalloc` command as a user runs it (typer's runner, the session's Ray and allocator)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tests.cliout import command_output

from ray_qalloc.cli import app
from ray_qalloc.backends.registry import FAKE_QPU_POOL

runner = CliRunner()

GHZ3 = """OPENQASM 2.0;
include "qelib1.inc";
qreg q[3];
creg c[3];
h q[0];
cx q[0],q[1];
cx q[1],q[2];
measure q -> c;
"""


def run(*args: str) -> tuple[int, str]:
    """Exit code and what the command printed (``tests/cliout``: the test process's own Ray lines
    left out)."""
    result = runner.invoke(app, list(args))
    return result.exit_code, command_output(result.output)


def test_backends_lists_the_pool_with_calibration(qa):
    code, out = run("--data-dir", str(qa.settings.data_dir), "-o", "json", "backends")
    assert code == 0, out
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(FAKE_QPU_POOL) <= set(rows)
    assert rows["qpu_torino"]["calibration"]["t1_median_us"] > 10
    sims = [r for r in rows.values() if r["kind"] == "simulator"]
    assert {r["method"] for r in sims} == {"statevector", "matrix_product_state", "stabilizer", "density_matrix"}
    assert all(r["pool"] == "cpu-local" and r["calibration"] is None for r in sims)
    code, out = run("--data-dir", str(qa.settings.data_dir), "backends")
    assert code == 0 and "qpu_fez" in out and "T1" in out


def test_submit_status_explain_round_trip(qa, tmp_path):
    path = tmp_path / "ghz.qasm"
    path.write_text(GHZ3)
    dd = str(qa.settings.data_dir)
    code, out = run("--data-dir", dd, "-o", "json", "submit", str(path), "--shots", "500")
    assert code == 0, out
    sub = json.loads(out)
    assert sub["state"] == "completed" and set(sub["counts"]) <= {"000", "111"}
    code, out = run("--data-dir", dd, "-o", "json", "status", sub["id"])
    st = json.loads(out)
    assert st["state"] == "completed" and [t["name"] for t in st["transitions"]][-1] == "complete"
    code, out = run("--data-dir", dd, "-o", "json", "explain", sub["id"])
    ex = json.loads(out)
    assert set(ex["backends"]) == {b["name"] for b in qa.backends()}
    # the placement decision is the first attempt's backend; the result may come from another
    # attempt (an idle-core probe or a hedge raced it, and the faster one won)
    history = ex["failover_history"]
    assert history and ex["chosen"] == history[0]["backend"], (ex["chosen"], history)
    assert [a["backend"] for a in history if a["outcome"] == "completed"] == [sub["backend"]], history
    code, out = run("--data-dir", dd, "explain", sub["id"])
    assert code == 0 and sub["backend"] in out and "scored" in out


@pytest.mark.parametrize("text, word", [
    ('OPENQASM 2.0;\ninclude "/etc/passwd";\nqreg q[1];\n', "include"),
    ("not qasm at all", "OpenQASM"),
])
def test_submit_refuses_bad_files_with_a_clear_error(qa, tmp_path, text, word):
    path = tmp_path / "bad.qasm"
    path.write_text(text)
    code, out = run("--data-dir", str(qa.settings.data_dir), "-o", "json", "submit", str(path))
    assert code == 2
    err = json.loads(out)["error"]
    assert word in err["message"] and err["hint"]


def test_missing_file_and_unknown_job(qa, tmp_path):
    code, out = run("--data-dir", str(qa.settings.data_dir), "submit", str(tmp_path / "nope.qasm"))
    assert code == 2 and "cannot read" in out
    code, out = run("--data-dir", str(qa.settings.data_dir), "-o", "json", "status", "no-such-job")
    assert code == 2 and json.loads(out)["error"]["code"] == "job_not_found"


def test_demo_prints_a_row_per_job(qa):
    code, out = run("--data-dir", str(qa.settings.data_dir), "-o", "json", "demo", "--jobs", "3")
    assert code == 0, out
    data = json.loads(out[out.index("{"):])
    assert len(data["jobs"]) == 3
    names = {b["name"] for b in qa.backends()}
    assert all(r["backend"] in names for r in data["jobs"])
    # GHZ-24, Clifford: the stabilizer; an idle-core probe on MPS may finish first (both are fast)
    assert data["jobs"][0]["method"] in ("stabilizer", "mps"), data["jobs"][0]
    assert data["jobs"][0]["pool"] == data["jobs"][0]["backend"].split("/")[0]
