"""Generate a workload trace (JSON Lines, the format of DESIGN.md).

    python -m benchmarks.traces --jobs N --seed S --out FILE [--rate 2.0] [--burst-every 60]

Each line: ``{"id", "arrival_s", "qasm", "shots", "priority", "deadline_s", "intent",
"fidelity_min", "tenant", "family"}`` (``family`` is extra; readers must not need it).
Arrivals are Poisson at ``--rate`` jobs/s with bursts (every ``--burst-every`` s, a burst of
5–20 jobs within one second). Circuits are MQT Bench circuits of mixed families and sizes;
priorities, intents, deadlines and tenants are drawn from fixed mixes (below), so two runs
with the same seed write the same file.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any, Iterator

# (family, sizes): sizes keep every job within seconds on two cores for some backend.
FAMILIES: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("ghz", (5, 10, 16, 24, 32)), ("graphstate", (6, 12, 20)), ("qft", (6, 10, 14, 18, 20)),
    ("qftentangled", (6, 10, 14)), ("qaoa", (6, 10, 14)), ("wstate", (6, 12, 18)), ("dj", (5, 10, 16)),
    ("bv", (5, 10, 16)), ("qpeexact", (6, 10, 14)), ("vqe_real_amp", (6, 10, 14)), ("randomcircuit", (5, 8, 12)),
)
PRIORITIES = (("emergency", 0.03), ("high", 0.17), ("normal", 0.5), ("batch", 0.3))
INTENTS = (("auto", 0.7), ("classical", 0.15), ("quantum", 0.15))
TENANTS = (("soc-blue", 0.4), ("research", 0.35), ("ir-team", 0.25))
SHOTS = (256, 1024, 1024, 4096)


def _pick(rng: random.Random, table: tuple[tuple[str, float], ...]) -> str:
    return rng.choices([k for k, _ in table], weights=[w for _, w in table])[0]


def _qasm(family: str, size: int, cache: dict[tuple[str, int], str]) -> str:
    key = (family, size)
    if key not in cache:
        from mqt.bench import BenchmarkLevel, get_benchmark
        from qiskit import qasm2, qasm3

        qc = get_benchmark(family, BenchmarkLevel.ALG, circuit_size=size)
        try:
            cache[key] = qasm2.dumps(qc)
        except Exception:  # noqa: BLE001
            cache[key] = qasm3.dumps(qc)
    return cache[key]


def arrivals(rng: random.Random, n: int, rate: float, burst_every: float) -> Iterator[float]:
    t, next_burst, made = 0.0, burst_every, 0
    while made < n:
        t += rng.expovariate(rate)
        if burst_every > 0 and t >= next_burst:
            for _ in range(min(rng.randint(5, 20), n - made)):
                yield next_burst + rng.random()
                made += 1
            next_burst += burst_every
            continue
        yield t
        made += 1


def generate(n: int, seed: int, rate: float = 2.0, burst_every: float = 60.0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    cache: dict[tuple[str, int], str] = {}
    jobs = []
    for i, t in enumerate(sorted(arrivals(rng, n, rate, burst_every))):
        family, sizes = rng.choice(FAMILIES)
        size = rng.choice(sizes)
        priority = _pick(rng, PRIORITIES)
        intent = _pick(rng, INTENTS)
        if intent == "quantum":
            size = min(size, 12)
        deadline = None
        if priority in ("emergency", "high") or rng.random() < 0.2:
            deadline = round(rng.choice((5.0, 15.0, 60.0, 300.0)), 1)
        fidelity_min = round(rng.choice((0.5, 0.7, 0.9)), 2) if intent != "classical" and rng.random() < 0.3 else None
        jobs.append({"id": f"j{i:05d}", "arrival_s": round(t, 4), "qasm": _qasm(family, size, cache),
                     "shots": rng.choice(SHOTS), "priority": priority, "deadline_s": deadline, "intent": intent,
                     "fidelity_min": fidelity_min, "tenant": _pick(rng, TENANTS), "family": family})
    return jobs


def read_trace(path: Path | str) -> list[dict[str, Any]]:
    """Any trace of the format: missing optional fields take their defaults."""
    out = []
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if "qasm" not in rec:
                raise ValueError(f"{path}:{lineno}: a trace line needs a 'qasm' field")
            out.append({"id": str(rec.get("id", f"line{lineno}")), "arrival_s": float(rec.get("arrival_s", 0.0)),
                        "qasm": rec["qasm"], "shots": int(rec.get("shots", 1024)),
                        "priority": rec.get("priority", "normal"), "deadline_s": rec.get("deadline_s"),
                        "intent": rec.get("intent", "auto"), "fidelity_min": rec.get("fidelity_min"),
                        "tenant": rec.get("tenant", "default"), "family": rec.get("family")})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rate", type=float, default=2.0, help="mean arrivals per second outside bursts")
    ap.add_argument("--burst-every", type=float, default=60.0, help="seconds between bursts (0: none)")
    args = ap.parse_args()
    jobs = generate(args.jobs, args.seed, args.rate, args.burst_every)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as fh:
        for job in jobs:
            fh.write(json.dumps(job) + "\n")
    print(f"wrote {len(jobs)} jobs ({jobs[-1]['arrival_s']:.1f} s of arrivals) to {args.out}")


if __name__ == "__main__":
    main()
