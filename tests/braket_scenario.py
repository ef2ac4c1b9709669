"""Braket's local simulator placed by a real allocator on a real local Ray, in its own process.

Run by ``test_braket_backend.py`` (the test session's Ray has the default pool, without the
``braket`` extra's backend). The pool is configured through settings, as users do:
``pool=["statevector", "braket_local"]`` (``QALLOC_POOL=statevector,braket_local``). Writes
what it saw as JSON to ``argv[2]``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import traceback
from pathlib import Path


def main(tmp: Path, out: Path) -> None:
    report: dict = {"error": None}
    qa = None
    try:
        import cirq
        from braket.circuits import Circuit

        from ray_qalloc import connect
        from ray_qalloc.frontends.cirq import QAllocCirqSampler

        ray_tmp = tempfile.mkdtemp(prefix="qb", dir="/tmp")   # Ray's sockets need a short path
        qa = connect(data_dir=tmp / "data", num_cpus=2, ray_temp_dir=ray_tmp, pool=["statevector", "braket_local"],
                     health_interval_s=0.5, history_flush_s=1.0, placement={"foreign_cpu": False})
        job = qa.submit(Circuit().x(4).h(0).cnot(0, 9).measure([4, 9, 0]), shots=200,
                        backends=["braket_local"])
        res = job.result(timeout=180)
        report["braket"] = {"backend": res.backend, "counts": res.counts}
        report["explain_backends"] = sorted(job.explain()["backends"])
        q = cirq.LineQubit.range(2)
        sampler = QAllocCirqSampler(qa, backends=["braket_local"])
        circuit = cirq.Circuit(cirq.X(q[1]), cirq.measure(*q, key="pair"))
        result = sampler.run(circuit, repetitions=50)
        direct = qa.submit(circuit, shots=20, backends=["braket_local"]).result(timeout=180)
        report["cirq"] = {"backend": direct.backend, "counts": direct.counts,
                          "pairs": sorted({tuple(int(b) for b in row) for row in result.measurements["pair"]})}
    except BaseException as exc:  # noqa: BLE001 - the report says what went wrong
        report["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
    finally:
        out.write_text(json.dumps(report))
        if qa is not None:
            qa.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
