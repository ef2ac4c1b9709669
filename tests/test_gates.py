"""One vocabulary of gates and one order of priority classes, read by every consumer.

The consumers' sets are pinned to what they were before they were built from
``ray_qalloc.gates`` (behaviour must not change); where they differ from one another, the
difference is pinned too, so that changing it is a decision and not an accident.
"""

from __future__ import annotations

from ray_qalloc import gates
from ray_qalloc.backends import aer
from ray_qalloc.circuits import _CONTROL_FLOW, _DIRECTIVES, _NOT_GATES, CLIFFORD_GATES, ROTATION_GATES
from ray_qalloc.jobs import Priority
from ray_qalloc.placement import filters, pipeline
from ray_qalloc.placement import scheduler as sched
from ray_qalloc.priority import CLASSES, RANK, known, rank

_CLIFFORD_16 = {"h", "s", "sdg", "x", "y", "z", "cx", "cz", "cy", "swap", "id", "sx", "sxdg", "iswap", "ecr", "dcx"}


def test_filters_keep_their_sets():
    # the job markers (what a job asks beyond its gates) pass the Clifford and control-flow checks;
    # a backend refuses them by ``BackendSpec.refuses``
    assert gates.JOB_MARKERS == {"expectation", "mid_circuit_measure"}
    assert filters._DIRECTIVES == {"measure", "barrier", "reset", "delay", "id"} | gates.JOB_MARKERS
    assert filters._CONTROL_FLOW == {"if_else", "for_loop", "while_loop", "switch_case", "break_loop", "continue_loop"}
    assert filters.CLIFFORD_OPS == _CLIFFORD_16 | {"measure", "barrier", "reset", "delay"} | gates.JOB_MARKERS


def test_aer_keeps_its_sets():
    assert aer.ALWAYS_SUPPORTED == {"measure", "barrier", "reset", "delay"}
    assert aer._CLIFFORD_ANGLE_GATES == {"rz", "p", "u1", "rx", "ry", "r", "rzz", "rxx", "ryy", "rzx"}
    assert aer._CLIFFORD_NAMES == _CLIFFORD_16 | {"pauli", "measure", "barrier", "reset", "delay"}


def test_circuit_features_keep_their_sets():
    assert CLIFFORD_GATES == _CLIFFORD_16
    assert ROTATION_GATES == {"rx", "ry", "rz", "p", "u", "u1", "u2", "u3", "r", "crx", "cry", "crz", "cp", "cu",
                              "cu1", "cu3", "rxx", "ryy", "rzz", "rzx", "xx_minus_yy", "xx_plus_yy"}
    assert _DIRECTIVES == {"barrier", "delay"} and _NOT_GATES == {"barrier", "delay", "measure", "reset"}
    assert _CONTROL_FLOW == {"if_else", "for_loop", "while_loop", "switch_case", "box"}


def test_the_known_differences_between_consumers():
    # Aer's stabilizer runs "pauli"; the placement filter does not know it (conservative)
    assert aer._CLIFFORD_NAMES - filters.CLIFFORD_OPS == {gates.PAULI}
    # features treat "box" as control flow; the operations filter does not check it
    assert _CONTROL_FLOW - filters._CONTROL_FLOW == {gates.BOX}
    assert filters._CONTROL_FLOW - _CONTROL_FLOW == gates.LOOP_CONTROL


def test_the_vocabulary_is_consistent():
    assert gates.QUARTER_TURN_CLIFFORD_GATES <= gates.ROTATION_GATES
    assert not gates.CLIFFORD_GATES & gates.ROTATION_GATES
    assert gates.TWO_QUBIT_CLIFFORD_GATES <= gates.TWO_QUBIT_GATES and gates.NOT_GATES.isdisjoint(gates.CLIFFORD_GATES)
    from qiskit.circuit.library.standard_gates import get_standard_gate_name_mapping

    std = get_standard_gate_name_mapping()
    assert all(std[g].num_qubits == 2 for g in gates.TWO_QUBIT_GATES)
    assert all(std[g].num_qubits == 1 for g in gates.ONE_QUBIT_CLIFFORD_GATES)


def test_one_priority_order_everywhere():
    assert tuple(p.value for p in Priority) == CLASSES == sched.CLASSES
    assert [p.rank for p in Priority] == [RANK[c] for c in CLASSES] == [0, 1, 2, 3]
    assert set(pipeline.CLASS_WEIGHTS) == set(CLASSES)
    assert rank("no such class") == RANK["normal"] and known("no such class") == "normal" and known("batch") == "batch"
