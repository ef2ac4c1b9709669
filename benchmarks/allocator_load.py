"""The allocator under load, in Ray: how fast it accepts and queues jobs, and its memory.

    python -m benchmarks.allocator_load --json OUT [--jobs 100000] [--batch 2000]

A local Ray with the default pool; every job is a small circuit pinned to one emulated QPU
(``backends=["qpu_torino"]``, one slot), so that almost all of them stay queued — the point
is the allocator's own cost, not the backends'. Jobs are prepared (intake) beforehand and
sent with ``submit_many`` in batches; each batch is stored in one transaction, planned,
queued, and answered.

``summary.jobs_per_s``: accepted-and-queued jobs per second (submit → queued, dispatch
decisions included; goal ≥ 1,000/s). ``summary.rss_mb_100k_queued``: the allocator actor's
resident memory with all of them queued (goal ≤ 1,000 MB). Also the single-``submit`` rate
for comparison (one round trip per job).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks._common import make_console, write_json
from rich.progress import Progress

GHZ3 = 'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[3];\ncreg c[3];\nh q[0];\ncx q[0],q[1];\ncx q[1],q[2];\n' \
       'measure q -> c;\n'


def run(n_jobs: int, batch: int, console: Console) -> dict[str, Any]:
    import ray

    from ray_qalloc import connect

    qa = connect(data_dir=Path(tempfile.mkdtemp(prefix="qalloc-load-")), num_cpus=2,
                 ray_temp_dir=tempfile.mkdtemp(prefix="ql", dir="/tmp"))
    try:
        base = ray.get(qa.allocator.stats.remote())["rss_bytes"]
        t0 = time.perf_counter()
        prepared = [qa._prepare(GHZ3, shots=100, backends=["qpu_torino"], priority=("normal", "batch", "high")[i % 3])
                    for i in range(n_jobs)]
        intake_s = time.perf_counter() - t0
        sent = 0
        t0 = time.perf_counter()
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("submitting", total=n_jobs)
            while sent < n_jobs:
                chunk = prepared[sent:sent + batch]
                answers = ray.get(qa.allocator.submit_many.remote(chunk))
                assert all("id" in a for a in answers), answers[:3]
                sent += len(chunk)
                progress.advance(task, len(chunk))
        submit_s = time.perf_counter() - t0
        stats = ray.get(qa.allocator.stats.remote())
        del prepared, chunk, answers   # the driver's own 100k objects would slow its GC, not the allocator
        import gc

        gc.collect()
        singles = 300
        t1 = time.perf_counter()
        for _ in range(singles):
            qa.submit(GHZ3, shots=100, backends=["qpu_torino"])
        single_s = time.perf_counter() - t1
    finally:
        qa.shutdown()
    summary = {
        "jobs_per_s": n_jobs / submit_s, "jobs": n_jobs, "batch": batch, "submit_s": submit_s,
        "rss_mb_100k_queued": stats["rss_bytes"] / 2**20 if n_jobs >= 100_000 else None,
        "rss_mb_queued": stats["rss_bytes"] / 2**20, "rss_mb_empty": base / 2**20, "queued": stats["queued"],
        "single_submit_jobs_per_s": singles / single_s, "client_intake_jobs_per_s": n_jobs / intake_s,
        "goal_jobs_per_s": 1000, "goal_rss_mb": 1000,
    }
    return {"benchmark": "allocator_load", "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=2000)
    args = ap.parse_args()
    console = make_console()
    result = run(args.jobs, args.batch, console)
    s = result["summary"]
    console.print(f"accepted and queued {s['jobs']} jobs in {s['submit_s']:.1f} s: "
                  f"[bold]{s['jobs_per_s']:.0f} jobs/s[/bold] (goal ≥ 1000; batches of {s['batch']})")
    console.print(f"allocator RSS with {s['queued']} queued: [bold]{s['rss_mb_queued']:.0f} MB[/bold] "
                  f"(empty {s['rss_mb_empty']:.0f} MB; goal ≤ 1000 MB at 100k)")
    console.print(f"one submit per round trip: {s['single_submit_jobs_per_s']:.0f} jobs/s; "
                  f"client-side intake: {s['client_intake_jobs_per_s']:.0f} jobs/s")
    write_json(args.json, result, console)


if __name__ == "__main__":
    main()
