"""The placement benchmark's figures: ratios, goals by mix, held-out families, the printed tables.

Goals (issue "Never lose to the free choice", section 4), by the trace's mix:

* ``heavy``: qalloc mean JCT ≤ 0.5× ``aer_automatic``'s and ≤ 0.5× ``least_loaded``'s;
* ``light``, ``mixed`` and traces of no known mix: qalloc mean JCT ≤ 1.0× ``aer_automatic``'s
  (the issue sets 1.0 for light only; a mixed or foreign trace is held to the same "never lose
  to the free choice");
* every mix: measured quantum-intent fidelity ≥ 0.99× ``best_fidelity``'s, and deadline misses
  ≤ the best baseline's (the lowest miss rate of fcfs, least_loaded, aer_automatic,
  best_fidelity, random; the hindsight row is not a baseline).

The lower-bound and fcfs ratios are reported without a target. Goals are printed next to the
measured figures and are never adjusted to pass a trace.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from benchmarks.baselines import BASELINES
from benchmarks.simulation import PAIRED

GOAL_JCT: dict[str, tuple[tuple[str, str, float], ...]] = {
    "heavy": (("qalloc_over_aer_automatic_mean_jct", "<=", 0.5), ("qalloc_over_least_loaded_mean_jct", "<=", 0.5)),
    "light": (("qalloc_over_aer_automatic_mean_jct", "<=", 1.0),),
    "mixed": (("qalloc_over_aer_automatic_mean_jct", "<=", 1.0),),
}
GOAL_ALL: tuple[tuple[str, str, float], ...] = (
    ("qalloc_over_best_fidelity_mean_fidelity_quantum", ">=", 0.99),
    ("qalloc_minus_best_baseline_deadline_miss_rate", "<=", 0.0),
)
WHAT: dict[str, str] = {
    "qalloc_over_aer_automatic_mean_jct": "qalloc mean JCT / aer_automatic (same cores; jobs both completed)",
    "qalloc_over_least_loaded_mean_jct": "qalloc mean JCT / least_loaded (jobs both completed)",
    "qalloc_over_fcfs_mean_jct": "qalloc mean JCT / fcfs (jobs both completed)",
    "qalloc_over_lower_bound_mean_jct": "qalloc mean JCT / lower bound (fastest true run, no queue)",
    "qalloc_over_hindsight_mean_jct": "qalloc mean JCT / hindsight (selector fed truth)",
    "qalloc_over_best_fidelity_mean_fidelity_quantum": "qalloc measured fidelity (quantum intent) / best_fidelity's "
                                                       "(jobs both completed)",
    "qalloc_minus_best_baseline_deadline_miss_rate": "qalloc deadline miss rate - best baseline's",
    "qalloc_over_aer_automatic_mean_jct_simulator_eligible": "qalloc mean JCT / aer_automatic, auto and classical "
                                                             "jobs only",
    "qalloc_over_aer_automatic_mean_fidelity_quantum": "qalloc measured fidelity (quantum intent) / aer_automatic's",
}


def ratios(policies: Mapping[str, Mapping[str, Any]], lower: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """qalloc's figures over each baseline's, **paired**: a mean JCT or quantum fidelity ratio is
    taken over the jobs both policies completed.

    Why paired: policies do not complete the same jobs (a fidelity floor one policy's estimate
    says a device cannot meet, a job no candidate of the free pool can take), and a mean over
    different jobs rewards refusing the slow ones. The unpaired means stay in each policy's
    row; ``paired_jobs`` says how many jobs each ratio is over."""
    def src(p: str) -> Mapping[str, Any]:
        return (lower if p == "lower_bound" else policies.get(p)) or {}

    def get(p: str, k: str) -> float | None:
        v = src(p).get(k)
        return None if v is None else float(v)

    def div(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    paired_n: dict[str, int] = {}

    def paired(p: str, what: str, key: str) -> float | None:
        mine, theirs = src("qalloc").get(PAIRED, {}).get(what), src(p).get(PAIRED, {}).get(what)
        if mine is None or theirs is None:        # no per-job figures: the policies' own means
            return div(get("qalloc", key), get(p, key)) if what in ("jct", "fidelity_quantum") else None
        common = [j for j in mine if j in theirs]
        paired_n[f"{p}:{what}"] = len(common)
        if not common:
            return None
        return div(sum(mine[j] for j in common), sum(theirs[j] for j in common))

    misses = {b: get(b, "deadline_miss_rate") for b in BASELINES if b in policies}
    known = {b: m for b, m in misses.items() if m is not None}
    best_b = min(known, key=known.__getitem__) if known else None
    miss_q = get("qalloc", "deadline_miss_rate")
    return {
        "qalloc_over_aer_automatic_mean_jct": paired("aer_automatic", "jct", "mean_jct_s"),
        "qalloc_over_least_loaded_mean_jct": paired("least_loaded", "jct", "mean_jct_s"),
        "qalloc_over_fcfs_mean_jct": paired("fcfs", "jct", "mean_jct_s"),
        "qalloc_over_lower_bound_mean_jct": paired("lower_bound", "jct", "mean_jct_s"),
        "qalloc_over_hindsight_mean_jct": paired("hindsight", "jct", "mean_jct_s"),
        "qalloc_over_best_fidelity_mean_fidelity_quantum": paired("best_fidelity", "fidelity_quantum",
                                                                  "mean_fidelity_quantum"),
        "qalloc_over_aer_automatic_mean_jct_simulator_eligible": paired("aer_automatic", "jct_simulator_eligible",
                                                                        "mean_jct_s"),
        "qalloc_over_aer_automatic_mean_fidelity_quantum": paired("aer_automatic", "fidelity_quantum",
                                                                  "mean_fidelity_quantum"),
        "qalloc_minus_best_baseline_deadline_miss_rate": (None if miss_q is None or best_b is None
                                                           else miss_q - known[best_b]),
        "best_baseline_deadline_miss_rate": known.get(best_b) if best_b else None,
        "best_baseline_for_deadlines": best_b,
        "paired_jobs": paired_n,
    }


def strip_paired(policies: dict[str, Any]) -> None:
    """Drop the per-job figures ``ratios`` needed (they are not part of the JSON)."""
    for row in policies.values():
        if isinstance(row, dict):
            row.pop(PAIRED, None)


def goals(r: Mapping[str, Any], mix: str | None) -> list[dict[str, Any]]:
    out = []
    for key, op, target in GOAL_JCT.get(mix or "", GOAL_JCT["light"]) + GOAL_ALL:
        v = r.get(key)
        met = None if v is None else (v <= target + 1e-12 if op == "<=" else v >= target - 1e-12)
        out.append({"name": key, "what": WHAT[key], "value": v, "op": op, "target": target, "met": met})
    return out


def detect_mix(records: Sequence[Mapping[str, Any]], num_qubits: Sequence[int], non_clifford: Sequence[bool]) -> tuple[str, str]:
    """The trace's mix and how it was found: the ``mix`` field its lines carry (generated
    traces), else its content: most jobs wide (≥ 17 qubits) and non-Clifford -> heavy; none
    wider than 16 -> light; else mixed."""
    marks = {r.get("mix") for r in records if r.get("mix")}
    if len(marks) == 1:
        return marks.pop(), "the trace's 'mix' field"
    n = max(len(num_qubits), 1)
    wide = sum(1 for q, nc in zip(num_qubits, non_clifford) if q >= 17 and nc)
    if wide / n >= 0.5:
        return "heavy", "content: most jobs are wide non-Clifford circuits"
    if all(q <= 16 for q in num_qubits):
        return "light", "content: no circuit wider than 16 qubits"
    return "mixed", "content: some wide circuits"


def trained_families(model_dir: Path | None = None) -> tuple[set[str], str]:
    """Families the cost model was trained on, and where that came from.

    The artifact's ``meta.json`` is read first (key ``families``, if a training run wrote it);
    the shipped artifact does not record them, so the fallback is the sweep it was trained
    from (``ray_qalloc.costmodel.measure.DEFAULT_FAMILY_SIZES`` and the Qiskit random circuits,
    family ``random``)."""
    from ray_qalloc.costmodel.registry import PACKAGED_DIR, latest_artifact

    for root in (model_dir, PACKAGED_DIR):
        path = latest_artifact(root) if root is not None else None
        if path is None:
            continue
        meta = json.loads((Path(path) / "meta.json").read_text())
        fams = meta.get("families") or meta.get("metrics", {}).get("families")
        if fams:
            return set(fams), f"{path}/meta.json"
        break
    from ray_qalloc.costmodel.measure import DEFAULT_FAMILY_SIZES

    return set(DEFAULT_FAMILY_SIZES) | {"random"}, "the default sweep (meta.json records no families)"


def families_seen(families: Sequence[str | None], trained: set[str]) -> dict[str, Any]:
    fams = sorted({f for f in families if f})
    return {"families": fams, "seen_by_model": [f for f in fams if f in trained],
            "held_out": [f for f in fams if f not in trained], "unknown_family_jobs": sum(1 for f in families if not f)}


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def print_report(result: Mapping[str, Any], console: Any) -> None:
    from rich.table import Table

    mode = "simulated" if result.get("mode") == "simulate" else "live, on a local Ray"
    t = Table(title=f"placement, {mode}: {result.get('trace')} ({result['jobs']} jobs, mix "
                    f"{result.get('mix')}, predictor {result.get('predictor', 'allocator')})")
    t.add_column("policy")
    cols = ("mean_jct_s", "p95_jct_s", "makespan_s", "deadline_miss_rate", "emergency_p99_wait_s",
            "mean_fidelity_quantum", "mean_fidelity", "total_cost", "completed", "unplaceable", "preemptions", "hedges", "restarts")
    for c in cols:
        t.add_column(c, justify="right")
    rows = dict(result["policies"])
    if result.get("lower_bound"):
        rows["lower_bound (not a policy)"] = result["lower_bound"]
    for name, m in rows.items():
        t.add_row(name, *(_fmt(m.get(c)) for c in cols))
    console.print(t)
    fam = result.get("families")
    if fam:
        console.print(f"families: {', '.join(fam['families'])}; seen by the model: "
                      f"{', '.join(fam['seen_by_model']) or 'none'}; held out: {', '.join(fam['held_out']) or 'none'} "
                      f"({result.get('trained_families_from')})")
    lb = result.get("lower_bound") or {}
    if lb.get("core_utilisation") is not None:
        console.print(f"lower-bound core work {lb['core_work_s']:.3g} core-s over {lb['arrival_span_s']:.3g} s of "
                      f"arrivals: utilisation {lb['core_utilisation']:.0%} of {result.get('pool_cores')} cores")
    if not result.get("goals"):
        return
    g = Table(title=f"ratios and goals for a {result.get('mix')} trace (measured, not adjusted)")
    for c in ("figure", "measured", "target", "met"):
        g.add_column(c)
    shown = set()
    for row in result["goals"]:
        met = {True: "[green]yes[/green]", False: "[red]NO[/red]", None: "n/a"}[row["met"]]
        g.add_row(row["what"], _fmt(row["value"]), f"{row['op']} {row['target']:g}", met)
        shown.add(row["name"])
    for key, v in result.get("ratios", {}).items():
        if key in WHAT and key not in shown:
            g.add_row(WHAT[key], _fmt(v), "-", "-")
    console.print(g)
    pairs = (result.get("ratios") or {}).get("paired_jobs") or {}
    if pairs:
        console.print("ratios over the jobs both policies completed (policy, figure: jobs): " + ", ".join(
            f"{k.replace(':', ' ')}: {n}" for k, n in sorted(pairs.items())) + f"; of {result.get('jobs')} jobs")


__all__ = ["ratios", "strip_paired", "goals", "detect_mix", "trained_families", "families_seen", "print_report", "GOAL_JCT", "GOAL_ALL"]
