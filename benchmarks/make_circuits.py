"""Write MQT Bench circuits as OpenQASM files: inputs for the cost-model benchmark.

    python -m benchmarks.make_circuits --out DIR [--families qft,ghz,...] [--sizes 6,10,14,18,22]

Files are named ``<family>-<level>-<qubits>.qasm``; the benchmarks read the family from the
name (any other ``.qasm`` file is accepted too, with family ``file``). Besides MQT Bench's
families, ``quantumvolume`` and ``random`` are built with Qiskit (``benchmarks.traces.build_circuit``:
MQT Bench has no quantum volume), so the heavy trace's circuits can be written out too. OpenQASM 2 is written
where Qiskit can export it, OpenQASM 3 otherwise (mid-circuit measurement, control flow).
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_FAMILIES = ("ghz", "graphstate", "qft", "qftentangled", "qaoa", "wstate", "dj", "qpeexact", "ae",
                    "vqe_real_amp", "randomcircuit", "qnn")
DEFAULT_SIZES = (6, 10, 14, 18, 22)
# Families whose circuits (or transpiles) grow too fast to go wide on two cores.
MAX_SIZE = {"qnn": 14, "randomcircuit": 18, "ae": 18, "qpeexact": 18, "qaoa": 18, "vqe_real_amp": 18,
            "grover": 8, "qwalk": 8}


def write_circuits(out: Path, families: tuple[str, ...] = DEFAULT_FAMILIES,
                   sizes: tuple[int, ...] = DEFAULT_SIZES, level: str = "alg") -> list[Path]:
    from mqt.bench import BenchmarkLevel, get_benchmark
    from qiskit import qasm2, qasm3

    out.mkdir(parents=True, exist_ok=True)
    written = []
    from benchmarks.traces import QISKIT_FAMILIES, build_circuit

    for fam in families:
        for n in sizes:
            if n > MAX_SIZE.get(fam, 10**9):
                continue
            if fam in QISKIT_FAMILIES:
                qc = build_circuit(fam, n)
            else:
                qc = get_benchmark(fam, BenchmarkLevel[level.upper()], circuit_size=n)
            try:
                text = qasm2.dumps(qc.decompose(reps=2) if fam in ("ae", "qnn") else qc)
            except Exception:  # noqa: BLE001 - fall back to OpenQASM 3
                text = qasm3.dumps(qc)
            path = out / f"{fam}-{level}-{qc.num_qubits}.qasm"
            path.write_text(text)
            written.append(path)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--families", default=",".join(DEFAULT_FAMILIES))
    ap.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    ap.add_argument("--level", default="alg", choices=("alg", "indep"))
    args = ap.parse_args()
    paths = write_circuits(args.out, tuple(f for f in args.families.split(",") if f),
                           tuple(int(s) for s in args.sizes.split(",") if s), args.level)
    print(f"wrote {len(paths)} circuits to {args.out}")


if __name__ == "__main__":
    main()
