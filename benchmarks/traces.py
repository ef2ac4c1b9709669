"""Generate a workload trace (JSON Lines, the format of DESIGN.md).

    python -m benchmarks.traces --jobs N --seed S --out FILE [--rate 2.0] [--burst-every 60]
        [--mix light|heavy|mixed|architectures] [--families a,b] [--exclude-families a,b] [--load 0.85]

Each line: ``{"id", "arrival_s", "qasm", "shots", "priority", "deadline_s", "intent",
"fidelity_min", "tenant", "family", "mix"}`` (``family`` and ``mix`` are extra; readers must
not need them). Priorities, intents, deadlines and tenants are drawn from fixed mixes (below),
so two runs with the same arguments write the same file.

Without ``--mix`` the trace is today's: MQT Bench circuits of mixed families and sizes, Poisson
arrivals at ``--rate`` jobs/s with bursts (every ``--burst-every`` s, 5–20 jobs within 1 s).

Mixes (why each exists: the issue "Never lose to the free choice" measured qalloc 2.7× worse
than Aer ``automatic`` on wide non-Clifford circuits and 1.29× on small statevector bursts):

* ``heavy`` — wide (17–24 qubits) non-Clifford circuits where the Aer method decides the
  runtime: QFT, QPE, W-state, adders and multipliers (MPS wins by 10–100×), quantum volume and
  deep random circuits (statevector wins; MPS runs past any cap). Sizes stop at 24: beyond, the
  statevector run of QFT/multipliers passes the 20 s measuring cap on two loaded cores, and a
  censored run is charged a guess (3× the cap) that would bias the comparison against
  ``automatic``. Shots are 1024 (one measured case per circuit: measuring is the expensive
  part). Arrivals are Poisson at the rate that keeps the cores ``--load`` busy (default 0.85)
  by an *estimate* of each job's work: the cheapest predicted core-seconds over the pool's
  candidates, by the shipped cost model (or the prior), or — with ``--work-from TRUTH_DIR`` —
  the cheapest *measured* core-seconds where the circuit is in that truth cache (the model is
  off by orders of magnitude on families it has not seen). The benchmark prints the
  utilisation the measured lower-bound work really achieves.
* ``light`` — small (≤ 16 qubits) statevector-bound circuits (QAOA, VQE, random circuits,
  quantum volume, QNN, entangled QFT; MQT's ``ae`` fails to build with this numpy) in bursts: every
  ``--burst-every`` s (default 10) a burst of 20–40 jobs within one second, and Poisson
  background at ``--rate`` (default 1/s). Shots from today's mix.
* ``mixed`` — 30 % heavy circuits, 70 % light, arrivals as ``heavy`` (load-driven) plus the
  light bursts.
* ``architectures`` — quantum-intent jobs where the QPU's architecture decides (issue #14): QFTs
  and random-pair circuits of 8–20 qubits (all-to-all interaction: SWAPs on a sparse chip, none on
  ions), QFTs of 26–30 qubits (past the 25-ion chain: neutral atoms or a routed chip), and GHZ
  states of 3–5 qubits with 4,000–20,000 shots and a deadline (ms per ion shot, 0.3 s per atom
  shot: a superconducting chip). ``family`` names which (``routing``, ``wide``, ``shots``).
  Poisson arrivals at ``--rate`` (default 0.2/s).

Quantum-intent jobs are built at ≤ 10 qubits (``QPU_MAX_QUBITS``, the widest circuit the
emulated QPUs simulate with exact local noise), so their fidelity can be measured.
``--families`` keeps only the named families of the mix, ``--exclude-families`` drops some
(e.g. those the shipped model was trained on: ``benchmarks.placement`` prints, per trace, which
of its families the model has seen).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

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
HEAVY_SHOTS = 1024
QPU_MAX_QUBITS = 10
MIXES: tuple[str, ...] = ("light", "heavy", "mixed")
DEFAULT_LOAD = 0.85
HEAVY_SHARE_OF_MIXED = 0.3

# Families of the mixes: name -> sizes. Builders below (MQT Bench by name, or Qiskit).
HEAVY_FAMILIES: dict[str, tuple[int, ...]] = {
    "qft": (20, 22, 24), "qpeexact": (20, 22), "qpeinexact": (20, 22), "wstate": (20, 22, 24),
    "draper_qft_adder": (20, 22), "cdkm_ripple_carry_adder": (20, 24), "modular_adder": (22,),
    "multiplier": (20,), "rg_qft_multiplier": (20,), "quantumvolume": (18, 20, 21), "random": (18, 20, 22),
}
LIGHT_FAMILIES: dict[str, tuple[int, ...]] = {
    "qaoa": (8, 12, 14), "vqe_real_amp": (8, 12, 16), "randomcircuit": (8, 12), "quantumvolume": (8, 12, 14),
    "random": (10, 14, 16), "qnn": (8, 12), "qftentangled": (10, 14),
}
# Qiskit-built families (the rest are MQT Bench names).
QISKIT_FAMILIES = frozenset({"quantumvolume", "random"})


def _pick(rng: random.Random, table: tuple[tuple[str, float], ...]) -> str:
    return rng.choices([k for k, _ in table], weights=[w for _, w in table])[0]


_OBJECT_ID = re.compile(r"_(\d{9,})\b")


def stable_names(text: str) -> str:
    """Qiskit's exporters name some custom gates after Python object ids (``mcphase_1406...``),
    so the same circuit exports differently in every process: number them by first appearance
    instead, so that a seed always writes the same file (and the same measured-truth cache key)."""
    ids: dict[str, str] = {}
    return _OBJECT_ID.sub(lambda m: "_" + ids.setdefault(m.group(1), str(len(ids) + 1)), text)


def _export(qc: Any) -> str:
    from qiskit import qasm2, qasm3

    if not any(inst.operation.name == "measure" for inst in qc.data):
        qc = qc.copy()
        qc.measure_all()   # a circuit that measures nothing returns no counts (and no fidelity)
    try:
        return stable_names(qasm2.dumps(qc))
    except Exception:  # noqa: BLE001 - mid-circuit measurement, control flow: OpenQASM 3
        return stable_names(qasm3.dumps(qc))


def build_circuit(family: str, size: int, seed: int = 0) -> Any:
    """A QuantumCircuit of ``family`` at ``size`` qubits (MQT Bench, or Qiskit for quantum
    volume and random circuits, which are unitary-free once transpiled to ``u``/``cx``)."""
    if family == "quantumvolume":
        from qiskit import transpile
        from qiskit.circuit.library import quantum_volume

        # unitary blocks do not survive OpenQASM 2 export: expand them to u + cx
        return transpile(quantum_volume(size, seed=seed + size), basis_gates=["u", "cx"], optimization_level=0)
    if family == "random":
        from qiskit.circuit.random import random_circuit

        depth = 8 if size >= 22 else 16
        return random_circuit(size, depth, max_operands=2, measure=True, seed=seed + size)
    from mqt.bench import BenchmarkLevel, get_benchmark

    return get_benchmark(family, BenchmarkLevel.ALG, circuit_size=size)


def _qasm(family: str, size: int, cache: dict[tuple[str, int], str]) -> str:
    key = (family, size)
    if key not in cache:
        cache[key] = _export(build_circuit(family, size))
    return cache[key]


def _qasm_at_most(family: str, size: int, cache: dict[tuple[str, int], str]) -> tuple[str, int]:
    """The family's circuit at ``size`` or the next smaller size it can be built at."""
    for n in range(size, 2, -1):
        try:
            return _qasm(family, n, cache), n
        except Exception:  # noqa: BLE001 - MQT refuses some sizes (multipliers: multiples of 4)
            continue
    raise ValueError(f"{family}: no size <= {size} can be built")


def arrivals(rng: random.Random, n: int, rate: float, burst_every: float,
             burst: tuple[int, int] = (5, 20)) -> Iterator[float]:
    t, next_burst, made = 0.0, burst_every, 0
    while made < n:
        t += rng.expovariate(rate)
        if burst_every > 0 and t >= next_burst:
            for _ in range(min(rng.randint(*burst), n - made)):
                yield next_burst + rng.random()
                made += 1
            next_burst += burst_every
            continue
        yield t
        made += 1


def _job_fields(rng: random.Random) -> dict[str, Any]:
    priority = _pick(rng, PRIORITIES)
    intent = _pick(rng, INTENTS)
    deadline = None
    if priority in ("emergency", "high") or rng.random() < 0.2:
        deadline = round(rng.choice((5.0, 15.0, 60.0, 300.0)), 1)
    fidelity_min = round(rng.choice((0.5, 0.7, 0.9)), 2) if intent != "classical" and rng.random() < 0.3 else None
    return {"priority": priority, "deadline_s": deadline, "intent": intent, "fidelity_min": fidelity_min,
            "tenant": _pick(rng, TENANTS)}


def generate(n: int, seed: int, rate: float = 2.0, burst_every: float = 60.0) -> list[dict[str, Any]]:
    """Today's default trace (no ``--mix``): unchanged, so old seeds give the same files."""
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


# ---------------------------------------------------------------------------------------------
# Mixes
# ---------------------------------------------------------------------------------------------

@dataclass
class _Draft:
    family: str
    qasm: str
    size: int
    shots: int
    heavy: bool
    fields: dict[str, Any]


def select_families(table: dict[str, tuple[int, ...]], families: Sequence[str] | None,
                    exclude: Sequence[str]) -> dict[str, tuple[int, ...]]:
    keep = {f: s for f, s in table.items() if (not families or f in families) and f not in set(exclude)}
    return keep


def _draft(rng: random.Random, table: dict[str, tuple[int, ...]], heavy: bool,
           cache: dict[tuple[str, int], str]) -> _Draft:
    family = rng.choice(sorted(table))
    size = rng.choice(table[family])
    fields = _job_fields(rng)
    if fields["intent"] == "quantum":
        size = min(size, QPU_MAX_QUBITS)
    qasm, size = _qasm_at_most(family, size, cache)
    shots = HEAVY_SHOTS if heavy else rng.choice(SHOTS)
    return _Draft(family, qasm, size, shots, heavy and fields["intent"] != "quantum", fields)


WorkEstimate = Callable[[str, int], float]


def predicted_core_seconds(cores: int = 2) -> WorkEstimate:
    """Estimated work of one job: the cheapest predicted core-seconds (runtime × threads) over
    the pool's simulator candidates, by the shipped cost model (the prior when there is none).
    An estimate only: it sets the arrival rate, and the benchmark reports the real utilisation."""
    from ray_qalloc.backends.pools import pool_candidate_specs
    from ray_qalloc.config import Limits
    from ray_qalloc.costmodel.registry import load_predictor
    from ray_qalloc.jobs import make_spec, prepare_job
    from ray_qalloc.placement.filters import DEFAULT_FILTERS
    from ray_qalloc.placement.model import BackendView, JobView

    predictor = load_predictor(None, exploration_rate=0.0)
    views = [BackendView(s) for s in pool_candidate_specs("cpu-local", cores=cores, memory_bytes=4 * 2**30)]
    memo: dict[tuple[str, int], float] = {}

    def estimate(qasm: str, shots: int) -> float:
        key = (qasm, shots)
        if key not in memo:
            job = prepare_job(make_spec(circuit=qasm, shots=shots), Limits(), job_id="estimate")
            jv = JobView("estimate", job.num_qubits, job.ops, job.features, shots)
            ok = [v for v in views if all(f.check(jv, v).ok for f in DEFAULT_FILTERS)]
            memo[key] = min((e.runtime_s * max(v.spec.threads, 1)
                             for e, v in zip(predictor.predict(jv, ok), ok)), default=1.0)
        return memo[key]

    return estimate


def measured_core_seconds(truth_dir: Path, cores: int = 2, time_cap_s: float = 20.0) -> WorkEstimate:
    """Estimated work from a measured-truth cache (``benchmarks.placement --truth``): the least
    measured core-seconds over the pool's simulator candidates; circuits not measured yet fall
    back to ``predicted_core_seconds``. Why: the cost model can be wrong by orders of magnitude
    on families it has not seen, so a rate set from it may load the cores far less (or more)
    than asked; a second generation with the same seed draws the same circuits, and this
    estimate then sets their arrivals from what they were measured to cost."""
    from benchmarks.placement import case_id_of
    from benchmarks.truth import automatic_spec, pool_specs, read_truth
    from ray_qalloc.costmodel.history import RunHistory

    specs = {s.name: s for s in pool_specs(cores=cores) + [automatic_spec(cores=cores)]}
    table = RunHistory(Path(truth_dir) / "threads1").read()
    ids = set(table.column("case_id").to_pylist()) if table.num_rows and "case_id" in table.column_names else set()
    truth, _ = read_truth(Path(truth_dir), {i for i in ids if i}, list(specs.values()), time_cap_s)
    fallback = predicted_core_seconds(cores)

    def estimate(qasm: str, shots: int) -> float:
        row = truth.get(case_id_of(qasm, shots))
        if not row:
            return fallback(qasm, shots)
        return min(t * max(specs[b].threads, 1) for b, t in row.items() if b in specs)

    return estimate


def _times(rng: random.Random, heavy: Sequence[bool], circuits: Sequence[tuple[str, int]], mix: str, *,
           rate: float | None, burst_every: float | None, load: float, cores: int,
           work: WorkEstimate | None) -> tuple[list[float], dict[str, Any]]:
    """Arrival times per job (in the jobs' order): light jobs in bursts, heavy ones Poisson at the
    rate that keeps ``cores`` ``load`` busy by ``work`` (see the module doc)."""
    n = len(heavy)
    every = 10.0 if burst_every is None else burst_every
    if mix == "light":
        r = 1.0 if rate is None else rate
        return sorted(arrivals(rng, n, r, every, burst=(20, 40))), {"rate": r, "burst_every": every}
    work = work or predicted_core_seconds(cores)
    heavy_work = sum(work(q, s) for (q, s), h in zip(circuits, heavy) if h)
    n_heavy = max(sum(heavy), 1)
    span = heavy_work / (cores * load) if rate is None else n_heavy / rate
    r = n_heavy / max(span, 1e-9)
    heavy_times = iter(sorted(arrivals(rng, n_heavy, r, 0.0)))
    light_n = n - sum(heavy)
    light_rate = max(light_n / max(span, 1.0), 1e-3)
    light_times = iter(sorted(arrivals(rng, light_n, light_rate, every if mix == "mixed" else 0.0, burst=(20, 40))))
    times = [next(heavy_times) if h else next(light_times) for h in heavy]
    return times, {"rate": r, "estimated_heavy_core_s": heavy_work, "estimated_span_s": span, "target_load": load,
                   "estimate": "cheapest predicted core-seconds per job (shipped model or prior)"}


def retime(records: Sequence[dict[str, Any]], seed: int, mix: str, *, load: float = DEFAULT_LOAD, cores: int = 2,
           rate: float | None = None, burst_every: float | None = None,
           work: WorkEstimate | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The jobs of an existing trace with new arrivals (same circuits, hence the same measured
    truth): heavy jobs are those not of quantum intent of at least 17 qubits."""
    from ray_qalloc.circuits import parse_circuit
    from ray_qalloc.config import Limits

    rng = random.Random(seed)
    heavy = [r.get("intent") != "quantum" and parse_circuit(r["qasm"], Limits()).circuit.num_qubits >= 17
             for r in records]
    times, info = _times(rng, heavy, [(r["qasm"], int(r.get("shots", 1024))) for r in records], mix, rate=rate,
                         burst_every=burst_every, load=load, cores=cores, work=work)
    order = sorted(range(len(records)), key=times.__getitem__)
    out = [{**records[i], "arrival_s": round(times[i], 4), "mix": records[i].get("mix") or mix} for i in order]
    return out, {"mix": mix, "jobs": len(out), "seed": seed, **info}


def generate_mix(n: int, seed: int, mix: str, *, rate: float | None = None, burst_every: float | None = None,
                 families: Sequence[str] | None = None, exclude: Sequence[str] = (), load: float = DEFAULT_LOAD,
                 cores: int = 2, work: WorkEstimate | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A trace of one mix, and what was estimated to build it (work, rate, span)."""
    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}; use one of {', '.join(MIXES)}")
    rng = random.Random(seed)
    cache: dict[tuple[str, int], str] = {}
    heavy_t = select_families(HEAVY_FAMILIES, families, exclude)
    light_t = select_families(LIGHT_FAMILIES, families, exclude)
    if (mix in ("heavy", "mixed") and not heavy_t) or (mix in ("light", "mixed") and not light_t):
        raise ValueError(f"no {mix} family left after --families/--exclude-families")
    drafts = []
    for _ in range(n):
        heavy = mix == "heavy" or (mix == "mixed" and rng.random() < HEAVY_SHARE_OF_MIXED)
        drafts.append(_draft(rng, heavy_t if heavy else light_t, heavy, cache))
    info: dict[str, Any] = {"mix": mix, "jobs": n, "seed": seed, "families": sorted(
        set(heavy_t if mix != "light" else {}) | set(light_t if mix != "heavy" else {}))}
    times, timing = _times(rng, [d.heavy for d in drafts], [(d.qasm, d.shots) for d in drafts], mix, rate=rate,
                           burst_every=burst_every, load=load, cores=cores, work=work)
    info.update(timing)
    order = sorted(range(n), key=times.__getitem__)
    drafts, times = [drafts[i] for i in order], [times[i] for i in order]
    jobs = []
    for i, (d, t) in enumerate(zip(drafts, times)):
        jobs.append({"id": f"{mix[0]}{i:05d}", "arrival_s": round(t, 4), "qasm": d.qasm, "shots": d.shots,
                     **d.fields, "family": d.family, "mix": mix})
    return jobs, info


ARCHITECTURES_MIX = "architectures"


def _random_pairs(n: int, gates: int, seed: int) -> Any:
    """CX between random pairs (each followed by a small Z rotation): an all-to-all interaction graph."""
    from qiskit import QuantumCircuit

    rng = random.Random(seed)
    qc = QuantumCircuit(n)
    qc.h(range(n))
    for _ in range(gates):
        a, b = rng.sample(range(n), 2)
        qc.cx(a, b)
        qc.rz(0.3, b)
    qc.measure_all()
    return qc


def _qft_of_plus(n: int) -> Any:
    """QFT of |+>^n (ideal answer |0>^n; an MPS of low bond dimension, so wide ones simulate fast)."""
    from qiskit import QuantumCircuit
    from qiskit.circuit.library import QFTGate

    qc = QuantumCircuit(n)
    qc.h(range(n))
    qc.append(QFTGate(n), range(n))
    qc.measure_all()
    return qc.decompose()


def _ghz(n: int) -> Any:
    from qiskit import QuantumCircuit

    qc = QuantumCircuit(n)
    qc.h(0)
    for i in range(n - 1):
        qc.cx(i, i + 1)
    qc.measure_all()
    return qc


def generate_architectures(n: int, seed: int, rate: float = 0.2) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The ``architectures`` mix (module docstring): every job quantum intent, a third of each kind."""
    rng = random.Random(seed)
    t = 0.0
    jobs = []
    for i in range(n):
        t += rng.expovariate(rate)
        kind = ("routing", "wide", "shots")[i % 3]
        if kind == "routing":
            if rng.random() < 0.5:
                qc, shots = _qft_of_plus(rng.choice((8, 10, 12))), 1000
            else:
                qc, shots = _random_pairs(rng.choice((12, 16, 20)), 40, rng.randrange(1 << 30)), 1000
            fields = {"priority": "normal", "deadline_s": None}
        elif kind == "wide":
            qc, shots = _qft_of_plus(rng.choice((26, 28, 30))), 200
            fields = {"priority": "batch", "deadline_s": None}
        else:
            qc, shots = _ghz(rng.choice((3, 4, 5))), rng.choice((4000, 10000, 20000))
            fields = {"priority": "high", "deadline_s": 60.0}
        jobs.append({"id": f"x{i:05d}", "arrival_s": round(t, 4), "qasm": _export(qc), "shots": shots,
                     "intent": "quantum", "fidelity_min": None, "tenant": f"t{i % 3}", **fields,
                     "family": kind, "mix": ARCHITECTURES_MIX})
    return jobs, {"mix": ARCHITECTURES_MIX, "jobs": n, "seed": seed, "rate": rate}


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
                        "tenant": rec.get("tenant", "default"), "family": rec.get("family"),
                        "mix": rec.get("mix")})
    return out


def _csv(text: str | None) -> list[str]:
    return [x for x in (text or "").split(",") if x]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rate", type=float, default=None,
                    help="mean arrivals per second outside bursts (default 2.0; heavy/mixed: set by --load)")
    ap.add_argument("--burst-every", type=float, default=None, help="seconds between bursts (0: none)")
    ap.add_argument("--mix", choices=(*MIXES, ARCHITECTURES_MIX),
                    help="light, heavy, mixed or architectures (default: today's trace)")
    ap.add_argument("--families", help="only these families of the mix (comma-separated)")
    ap.add_argument("--exclude-families", help="drop these families (comma-separated)")
    ap.add_argument("--load", type=float, default=DEFAULT_LOAD,
                    help="heavy/mixed: target core utilisation of the estimated work")
    ap.add_argument("--from-trace", type=Path,
                    help="keep this trace's jobs and circuits, draw new arrivals (with --mix heavy|mixed)")
    ap.add_argument("--work-from", type=Path,
                    help="heavy/mixed: estimate work from this measured-truth cache (default: the cost model)")
    args = ap.parse_args(argv)
    if args.mix == ARCHITECTURES_MIX:
        jobs, info = generate_architectures(args.jobs, args.seed, 0.2 if args.rate is None else args.rate)
    elif args.from_trace is not None:
        if args.mix is None:
            raise SystemExit("--from-trace needs --mix")
        work = measured_core_seconds(args.work_from) if args.work_from and args.mix != "light" else None
        jobs, info = retime(read_trace(args.from_trace), args.seed, args.mix, load=args.load, rate=args.rate,
                            burst_every=args.burst_every, work=work)
        if work is not None:
            info["estimate"] = f"least measured core-seconds per job from {args.work_from} (model where unmeasured)"
    elif args.mix is None:
        if args.families or args.exclude_families:
            raise SystemExit("--families/--exclude-families need --mix")
        jobs = generate(args.jobs, args.seed, 2.0 if args.rate is None else args.rate,
                        60.0 if args.burst_every is None else args.burst_every)
        info: dict[str, Any] = {}
    else:
        work = measured_core_seconds(args.work_from) if args.work_from and args.mix != "light" else None
        jobs, info = generate_mix(args.jobs, args.seed, args.mix, rate=args.rate, burst_every=args.burst_every,
                                  families=_csv(args.families), exclude=_csv(args.exclude_families), load=args.load,
                                  work=work)
        if work is not None:
            info["estimate"] = f"least measured core-seconds per job from {args.work_from} (model where unmeasured)"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as fh:
        for job in jobs:
            fh.write(json.dumps(job) + "\n")
    fams = sorted({j["family"] for j in jobs})
    print(f"wrote {len(jobs)} jobs ({jobs[-1]['arrival_s']:.1f} s of arrivals) to {args.out}; families: "
          f"{', '.join(fams)}")
    if info.get("estimated_heavy_core_s") is not None:
        print(f"estimated heavy work {info['estimated_heavy_core_s']:.1f} core-s over {info['estimated_span_s']:.1f} s "
              f"(target load {info['target_load']:g} of {2} cores; rate {info['rate']:.3g}/s) - estimate: "
              f"{info['estimate']}; benchmarks.placement reports the measured utilisation")
    if not math.isfinite(jobs[-1]["arrival_s"]):
        raise SystemExit("arrival times are not finite")


if __name__ == "__main__":
    main()
