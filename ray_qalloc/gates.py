"""The gate vocabulary: which operation names are directives, control flow, Clifford, rotations.

Why one module: intake (circuit features), placement (the operations filter) and the Aer
backend (what the stabilizer method accepts) must agree on what "Clifford" or "not a gate"
means. Each consumer still builds the exact set it needs from these names (they differ on
purpose in places, e.g. Aer accepts ``pauli`` natively); what is shared is the vocabulary.
"""

from __future__ import annotations

# Scheduling markers: no effect on the state.
DIRECTIVES: frozenset[str] = frozenset({"barrier", "delay"})
# Operations that are not unitary gates but every simulator and QPU runs.
NON_UNITARY: frozenset[str] = frozenset({"measure", "reset"})
# Everything in a circuit that is not a gate (and that every backend accepts as it is).
NOT_GATES: frozenset[str] = DIRECTIVES | NON_UNITARY
IDENTITY = "id"

# Not operations: markers intake adds to a job's operation names for what it asks of a backend
# beyond its gates — expectation values (an estimator job) and a measurement before the end.
# Every CPU simulator and QPU runner serves both; a backend that cannot lists them in
# ``BackendSpec.refuses`` (the GPU engines), and the operations filter keeps such jobs off it.
EXPECTATION = "expectation"
MID_MEASURE = "mid_circuit_measure"
JOB_MARKERS: frozenset[str] = frozenset({EXPECTATION, MID_MEASURE})

# Control-flow operations that carry blocks of their own ...
CONTROL_FLOW_BLOCKS: frozenset[str] = frozenset({"if_else", "for_loop", "while_loop", "switch_case"})
# ... the jumps inside loops ...
LOOP_CONTROL: frozenset[str] = frozenset({"break_loop", "continue_loop"})
# ... and Qiskit's ``box`` (a scoped block, no branching).
BOX = "box"

ONE_QUBIT_CLIFFORD_GATES: frozenset[str] = frozenset({"h", "s", "sdg", "x", "y", "z", "sx", "sxdg", IDENTITY})
TWO_QUBIT_CLIFFORD_GATES: frozenset[str] = frozenset({"cx", "cy", "cz", "swap", "iswap", "ecr", "dcx"})
CLIFFORD_GATES: frozenset[str] = ONE_QUBIT_CLIFFORD_GATES | TWO_QUBIT_CLIFFORD_GATES
# Aer's multi-qubit Pauli gate: Clifford, but only Aer names it.
PAULI = "pauli"

# Rotations that are Clifford exactly when every angle is a multiple of pi/2.
QUARTER_TURN_CLIFFORD_GATES: frozenset[str] = frozenset({"rz", "p", "u1", "rx", "ry", "r",
                                                          "rzz", "rxx", "ryy", "rzx"})
# Every parametrised rotation (the feature vector's rotation count).
ROTATION_GATES: frozenset[str] = QUARTER_TURN_CLIFFORD_GATES | frozenset({
    "u", "u2", "u3", "crx", "cry", "crz", "cp", "cu", "cu1", "cu3", "xx_minus_yy", "xx_plus_yy",
})
TWO_QUBIT_ROTATION_GATES: frozenset[str] = frozenset({"rzz", "rxx", "ryy", "rzx", "crx", "cry", "crz", "cp",
                                                      "cu", "cu1", "cu3", "xx_minus_yy", "xx_plus_yy"})
TWO_QUBIT_GATES: frozenset[str] = TWO_QUBIT_CLIFFORD_GATES | TWO_QUBIT_ROTATION_GATES
