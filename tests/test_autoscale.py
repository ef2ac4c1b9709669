"""ray_qalloc.autoscale's decisions, without Ray: what to ask the autoscaler for, and when to
stop asking. (tests/test_cluster.py runs the same calls against a real autoscaler.)"""

from __future__ import annotations

import pytest

from ray_qalloc.autoscale import Requester, backends_of, bundles_to_request, main, waiting_for
from ray_qalloc.placement.model import Estimate, Plan, Status

GPU = "aer_statevector_gpu"
R_GPU = f"qalloc_backend_{GPU}"
CPU_CLUSTER = {"CPU": 16.0, "qalloc_backend_aer_statevector": 1.0, "qalloc_backend_aer_mps": 1.0}


def _est(b: str, s: float) -> Estimate:
    return Estimate(b, runtime_s=s, fidelity=1.0, cost=0.0)


# ---- waiting_for ---------------------------------------------------------------------------------
def test_waiting_for_orders_by_predicted_runtime_then_backends_down_for_now():
    plan = Plan("j1", {"aer_statevector": _est("aer_statevector", 4.0), "aer_mps": _est("aer_mps", 0.5)},
                 {GPU: Status("unschedulable", "health", ("down",)),
                  "qpu_fez": Status("unresolvable", "intent", ("needs a simulator",))})
    assert waiting_for(plan) == ["aer_mps", "aer_statevector", GPU]


def test_waiting_for_a_job_nothing_can_run_is_empty():
    assert waiting_for(Plan("j2", {}, {"aer_mps": Status("unresolvable")})) == []


# ---- bundles_to_request ----------------------------------------------------------------------------
def test_a_job_only_a_missing_backend_can_run_asks_for_its_node():
    assert bundles_to_request([[GPU]], CPU_CLUSTER) == [{R_GPU: 1.0}]


def test_a_job_an_offered_backend_can_run_asks_for_nothing():
    assert bundles_to_request([["aer_mps", GPU]], CPU_CLUSTER) == []
    assert bundles_to_request([[GPU, "aer_mps"]], CPU_CLUSTER) == []    # a slot, not a node


def test_nothing_waiting_clears_the_request():
    assert bundles_to_request([], CPU_CLUSTER) == []
    assert bundles_to_request([[]], CPU_CLUSTER) == []    # infeasible everywhere: no node helps


def test_the_best_missing_backend_is_asked_for():
    assert bundles_to_request([[GPU, "aer_density_matrix"]], CPU_CLUSTER) == [{R_GPU: 1.0}]
    assert bundles_to_request([["aer_density_matrix", GPU]], CPU_CLUSTER) == [
        {"qalloc_backend_aer_density_matrix": 1.0}]


def test_bundles_are_bounded_per_backend_and_in_total():
    many = [[GPU]] * 50 + [["aer_density_matrix"]] * 3 + [["qpu_fez"]]
    assert bundles_to_request(many, CPU_CLUSTER) == [{R_GPU: 1.0}, {"qalloc_backend_aer_density_matrix": 1.0},
                                                     {"qalloc_backend_qpu_fez": 1.0}]
    scaled = bundles_to_request(many, CPU_CLUSTER, max_per_backend=4, max_bundles=6)
    assert scaled == [{R_GPU: 1.0}] * 4 + [{"qalloc_backend_aer_density_matrix": 1.0}] * 2   # most-waited first
    assert bundles_to_request(many, CPU_CLUSTER, max_bundles=0) == []


def test_bundle_size_is_the_backends_slots():
    assert bundles_to_request([[GPU]], CPU_CLUSTER, slots={GPU: 2}) == [{R_GPU: 2.0}]
    # one unit offered is not enough for a two-slot backend: still missing
    assert bundles_to_request([[GPU]], {**CPU_CLUSTER, R_GPU: 1.0}, slots={GPU: 2}) == [{R_GPU: 2.0}]


def test_a_node_that_arrived_for_the_request_is_held_while_jobs_wait_for_it():
    with_gpu = {**CPU_CLUSTER, R_GPU: 1.0}
    assert bundles_to_request([[GPU]], with_gpu) == []                          # not asked for: nothing to hold
    assert bundles_to_request([[GPU]], with_gpu, held={GPU}) == [{R_GPU: 1.0}]  # asked for: keep it
    assert bundles_to_request([], with_gpu, held={GPU}) == []                   # queue drained: let go
    assert bundles_to_request([[GPU, "aer_mps"]], with_gpu, held={GPU}) == []   # the CPU pool can run it


def test_backends_of_reads_a_request_back():
    assert backends_of([{R_GPU: 1.0}, {"qalloc_backend_aer_mps": 1.0, "CPU": 2}]) == {GPU, "aer_mps"}
    assert backends_of([]) == set()


# ---- Requester -------------------------------------------------------------------------------------
def test_requester_tells_ray_only_when_the_request_changes():
    sent: list[list[dict[str, float]]] = []
    r = Requester(send=lambda b: sent.append([dict(x) for x in b]))
    assert r.update([], CPU_CLUSTER) == [] and sent == []          # nothing asked, nothing to clear
    r.update([[GPU]], CPU_CLUSTER)
    r.update([[GPU], [GPU]], CPU_CLUSTER)                           # same request: no call
    assert sent == [[{R_GPU: 1.0}]]
    r.update([[GPU]], {**CPU_CLUSTER, R_GPU: 1.0})                   # node up, job still waiting: held
    assert sent == [[{R_GPU: 1.0}]]
    r.update([], {**CPU_CLUSTER, R_GPU: 1.0})                        # drained: cleared once
    r.update([], CPU_CLUSTER)
    assert sent == [[{R_GPU: 1.0}], []]
    r.update([[GPU]], CPU_CLUSTER)
    r.clear()
    r.clear()
    assert sent == [[{R_GPU: 1.0}], [], [{R_GPU: 1.0}], []]


def test_wait_command_needs_a_subcommand():
    with pytest.raises(SystemExit):
        main([])
