"""Measured QPU fidelity (#13): the formula, the bounds, the correction, the history, and the live
allocator learning that a device is noisier than its calibration says."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import pytest
from qiskit import QuantumCircuit

from ray_qalloc.backends.fake_qpu import FakeQPUBackend
from ray_qalloc.costmodel.fidelity import (METHOD_EXACT, exact_distribution, measure_counts, measure_payload)
from ray_qalloc.costmodel.fidelity_correction import (MAX_EXPONENT, FidelityCorrected, FidelityCorrections,
                                                      FidelitySample, corrections_of)
from ray_qalloc.costmodel.history import RunHistory


def ghz(n: int) -> QuantumCircuit:
    qc = QuantumCircuit(n, n)
    qc.h(0)
    for i in range(n - 1):
        qc.cx(i, i + 1)
    qc.measure(range(n), range(n))
    return qc


def ghz_qasm(n: int) -> str:
    from qiskit import qasm2

    return qasm2.dumps(ghz(n))


# ---- the formula and what is measured --------------------------------------------------------------
def test_exact_counts_measure_one_and_noise_measures_less():
    qc = ghz(3)
    assert measure_counts(qc, {"000": 512, "111": 512}).fidelity == pytest.approx(1.0)
    m = measure_counts(qc, {"000": 450, "111": 450, "010": 62, "101": 62})
    assert m.method == METHOD_EXACT and 0.85 < m.fidelity < 0.9 and m.outcomes == pytest.approx(2.0)
    # register spaces in keys (two registers) read as one bitstring, classical bit 0 rightmost
    two = QuantumCircuit(2)
    from qiskit.circuit import ClassicalRegister

    a, b = ClassicalRegister(1, "a"), ClassicalRegister(1, "b")
    two.add_register(a)
    two.add_register(b)
    two.x(1)
    two.measure(0, a[0])
    two.measure(1, b[0])
    assert measure_counts(two, {"1 0": 100}).fidelity == pytest.approx(1.0)


def test_what_is_not_measured_says_why():
    wide = ghz(13)
    assert measure_counts(wide, {"0" * 13: 10}).reason == "wider than 12 qubits"
    mid = QuantumCircuit(1, 2)
    mid.h(0)
    mid.measure(0, 0)
    mid.h(0)
    mid.measure(0, 1)
    assert measure_counts(mid, {"00": 5}).reason == "not only final measurements"
    spread = QuantumCircuit(8, 8)
    spread.h(range(8))
    spread.measure(range(8), range(8))
    m = measure_counts(spread, {"0" * 8: 1024})          # 256 outcomes, 1024 shots: biased low
    assert m.fidelity is None and "biased" in m.reason
    assert measure_counts(ghz(2), {}).reason == "no counts"


def test_estimator_payloads_are_not_measured():
    from ray_qalloc.config import Limits
    from ray_qalloc.jobs import make_spec, prepare_job
    from ray_qalloc.runopts import RunOptions, wrap_payload

    inner = prepare_job(make_spec(circuit=ghz_qasm(2), shots=100), Limits()).payload
    est = wrap_payload(inner, RunOptions(observables=((("ZZ", 1.0),),)))
    assert measure_payload(est, {"00": 5}).reason == "estimator job"
    seeded = wrap_payload(inner, RunOptions(seed=3))
    assert measure_payload(seeded, {"00": 50, "11": 50}).fidelity == pytest.approx(1.0)


def test_the_benchmarks_use_the_packages_formula():
    import benchmarks.fidelity as bench

    assert bench.hellinger is measure_counts.__globals__["hellinger"]
    dist, how = bench.ideal_distribution(ghz(3))
    assert how == "exact" and dist == exact_distribution(ghz(3))[0]


# ---- the emulator's test-only miscalibration ---------------------------------------------------------
def test_noise_scale_makes_a_device_noisier_than_its_calibration():
    plain, noisy = FakeQPUBackend("fake_fez"), FakeQPUBackend("fake_fez", noise_scale=4.0)
    assert plain.calibration().summary() == noisy.calibration().summary()
    a, b = plain.run(ghz(3), 4096, seed=5), noisy.run(ghz(3), 4096, seed=5)
    assert a.metadata["esp"] == b.metadata["esp"] and b.metadata["noise_scale"] == 4.0
    fa, fb = measure_counts(ghz(3), a.counts).fidelity, measure_counts(ghz(3), b.counts).fidelity
    assert abs(fa - a.metadata["esp"]) < 0.03
    assert fb < fa - 0.05


# ---- the correction ------------------------------------------------------------------------------
def test_the_correction_is_shrunk_bounded_and_decays_with_recalibration():
    c = FidelityCorrections()
    assert c.exponent("d") == 1.0
    c.add(FidelitySample("d", 0.9, 0.9 ** 3, calibration_at=100.0))
    one = c.exponent("d")
    assert 1.0 < one < 3.0                                  # one sample moves it, part way
    for _ in range(30):
        c.add(FidelitySample("d", 0.9, 0.9 ** 3, calibration_at=100.0))
    many = c.exponent("d")
    assert one < many < 3.0 and many > 2.8                  # many samples: nearly all the way
    assert c.apply("d", 0.9) == pytest.approx(0.9 ** many)
    # a calibration newer than every sample weighs them half: the exponent shrinks toward 1
    assert 1.0 < c.exponent("d", calibration_at=200.0) < many
    c.add(FidelitySample("e", 0.9, 1e-9))
    assert c.exponent("e") <= MAX_EXPONENT
    # near-perfect estimates say little (a ratio of shot noise): they hardly move it
    c.add(FidelitySample("f", 0.999, 0.99))
    assert c.exponent("f") < 1.1


def test_the_wrapper_corrects_qpus_only_and_survives_a_model_swap():
    from ray_qalloc import overruns
    from ray_qalloc.backends.registry import make_backend
    from ray_qalloc.config import Limits
    from ray_qalloc.costmodel.prior import HeuristicPrior
    from ray_qalloc.jobs import make_spec, prepare_job
    from ray_qalloc.placement.model import BackendView, JobView, QubitProfile

    qpu = make_backend("qpu_fez")
    cal = qpu.calibration()
    views = [BackendView(qpu.spec(), True, cal.summary(), time.time() - cal.taken_at, QubitProfile.of(cal)),
             BackendView(make_backend("aer_statevector").spec())]
    job = prepare_job(make_spec(circuit=ghz_qasm(3), shots=1024), Limits())
    jv = JobView(job.id, job.num_qubits, job.ops, job.features, job.shots)
    stack = overruns.wrap_predictor(HeuristicPrior())
    before = {e.backend: e.fidelity for e in stack.predict(jv, views)}
    corr = corrections_of(stack)
    assert corr is not None
    for _ in range(10):
        corr.add(FidelitySample("qpu_fez", before["qpu_fez"], before["qpu_fez"] ** 3, calibration_at=cal.taken_at))
    after = {e.backend: e.fidelity for e in stack.predict(jv, views)}
    assert after["aer_statevector"] == before["aer_statevector"] == 1.0
    assert after["qpu_fez"] < before["qpu_fez"] ** 1.8
    assert stack.calibration_fidelity(jv, views[0]) == pytest.approx(before["qpu_fez"])
    swapped = overruns.wrap_predictor(HeuristicPrior(), stack)      # a new model keeps them
    assert corrections_of(swapped) is corr
    assert isinstance(swapped.base, FidelityCorrected)


# ---- the history ---------------------------------------------------------------------------------
def test_history_joins_measured_fidelity_onto_its_attempt(tmp_path):
    h = RunHistory(tmp_path)
    h.append([{"id": 1, "job_id": "a", "n": 1, "backend": "qpu_fez", "outcome": "completed"},
              {"id": 2, "job_id": "b", "n": 1, "backend": "qpu_fez", "outcome": "completed"}])
    assert "fidelity" not in h.read().column_names          # nothing measured: the history reads as before
    h.append_fidelity([{"job_id": "a", "n": 1, "backend": "qpu_fez", "fidelity": 0.91, "method": METHOD_EXACT,
                        "calibration_estimate": 0.95, "estimate": 0.95, "device_esp": 0.93,
                        "calibration_at": 5.0, "measured_at": 6.0}])
    t = h.read()
    assert t.column("fidelity").to_pylist() == [0.91, None]
    assert t.column("fidelity_method").to_pylist() == [METHOD_EXACT, None]
    assert t.column("fidelity_calibration").to_pylist() == [0.95, None]
    assert h.read_fidelity().num_rows == 1


# ---- the live allocator ---------------------------------------------------------------------------
def test_measured_fidelity_is_recorded_and_moves_placement_off_a_noisier_than_calibrated_device(qa, tmp_path):
    """Real emulated torino (as calibrated) and fez whose applied noise is 4× its calibration's, each in
    its Ray actor, under an allocator. A GHZ-3 run on torino records a measured Hellinger fidelity in
    the history, close to the device's own ESP. By calibration fez looks best, so a quantum GHZ-3 goes
    there; after a few measured runs on fez its estimate falls toward what was measured, and the next
    job goes to torino. A restarted allocator keeps the correction."""
    import ray

    from ray_qalloc.allocator import Allocator
    from ray_qalloc.backends.actor import RemoteBackendActor, backend_actor_options
    from ray_qalloc.backends.registry import make_backend
    from ray_qalloc.config import Limits, load_settings
    from ray_qalloc.jobs import make_spec, prepare_job

    settings = load_settings(data_dir=tmp_path, health_interval_s=0.5, history_flush_s=0.5)
    kwargs = {"qpu_torino": None, "qpu_fez": {"noise_scale": 4.0}}
    specs = {name: make_backend(name).spec() for name in kwargs}
    actors = {name: RemoteBackendActor.options(**backend_actor_options(specs[name], "fid-test", use_resource=False))
              .remote(name, kwargs[name], "fid-test", "nobody") for name in kwargs}
    members = {name: (specs[name], actors[name]) for name in kwargs}
    qasm = ghz_qasm(3)

    def job(**kw: Any) -> Any:
        return prepare_job(make_spec(circuit=qasm, shots=2048, intent="quantum", **kw), Limits())

    async def estimate_of(alloc: Allocator, name: str) -> float:
        j = job()
        p = alloc.d.plan_for(alloc.d.view(j, frozenset()))
        return p.estimates[name].fidelity

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        alloc = Allocator(settings, members=members)
        await alloc.ready()
        out["fez_before"] = await estimate_of(alloc, "qpu_fez")
        first = await alloc.wait((await alloc.submit(job()))["id"], timeout=120)
        out["first_choice"] = first["result"]["backend"]
        rec = await alloc.wait((await alloc.submit(job(backends=("qpu_torino",))))["id"], timeout=120)
        out["torino"] = rec
        ids = [(await alloc.submit(job(backends=("qpu_fez",))))["id"] for _ in range(4)]
        for i in ids:
            assert (await alloc.wait(i, timeout=180))["state"] == "completed"
        await alloc.fidelity_meter.drain()
        out["fez_after"] = await estimate_of(alloc, "qpu_fez")
        out["exponent"] = corrections_of(alloc.predictor).exponent("qpu_fez")
        last = await alloc.wait((await alloc.submit(job()))["id"], timeout=120)
        out["last_choice"] = last["result"]["backend"]
        await alloc.fidelity_meter.drain()
        await alloc.flush_history()
        out["rows"] = await alloc.d.db(alloc.fidelity_meter.rows)
        out["stats"] = dict(alloc.fidelity_meter.stats)
        again = Allocator(settings, members=members)      # a restart: the store keeps the samples
        await again.ready()
        out["exponent_after_restart"] = corrections_of(again.predictor).exponent("qpu_fez")
        return out

    t0 = time.monotonic()
    out = asyncio.run(main())
    for a in actors.values():
        ray.kill(a)
    history = RunHistory(settings.history_dir).read()
    rows = {(r["job_id"], r["attempt"]): r for r in history.to_pylist()}
    tor = rows[(out["torino"]["id"], 1)]
    esp = out["torino"]["result"]["metadata"]["esp"]
    assert tor["fidelity_method"] == METHOD_EXACT
    assert abs(tor["fidelity"] - esp) < 0.03, (tor["fidelity"], esp)          # measured ≈ the emulator's ESP
    assert tor["fidelity_calibration"] is not None and tor["fidelity_estimate"] is not None
    fez = [r for r in out["rows"] if r["backend"] == "qpu_fez"]
    assert len(fez) >= 5 and out["stats"].get("measured", 0) >= 6, out["stats"]
    measured = sum(r["fidelity"] for r in fez) / len(fez)
    assert measured < out["fez_before"] - 0.03                                # fez is worse than it claims
    # placement's estimate moved toward what was measured (more than half the way)
    assert abs(out["fez_after"] - measured) < 0.5 * abs(out["fez_before"] - measured), out
    assert out["exponent"] > 1.5, out["exponent"]
    assert out["first_choice"] == "qpu_fez" and out["last_choice"] == "qpu_torino", out
    assert out["exponent_after_restart"] == pytest.approx(out["exponent"])
    assert time.monotonic() - t0 < 240
    assert not math.isnan(measured)


def test_the_correction_is_not_extrapolated_below_the_measured_range():
    """Learned on high-fidelity circuits measured better than estimated, the exponent must not
    lift a routed circuit's very low estimate (0.01 -> 0.3) past a device that deserves it."""
    from ray_qalloc.costmodel.fidelity_correction import FidelityCorrections, FidelitySample

    corr = FidelityCorrections()
    for est, meas in ((0.90, 0.97), (0.85, 0.95), (0.88, 0.96)) * 4:
        corr.add(FidelitySample("qpu_x", est, meas))
    assert corr.exponent("qpu_x") < 0.6                      # measured well above the estimates
    assert corr.apply("qpu_x", 0.88) > 0.93                  # inside the range: corrected
    low = corr.apply("qpu_x", 0.01)
    assert 0.01 <= low < 0.012                               # below it: the edge's ratio, not 0.01**s
    assert corr.apply("qpu_y", 0.01) == 0.01                 # a device without samples: as estimated
