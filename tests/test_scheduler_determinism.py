"""The scheduler decides the same way in every process: no decision may follow the
interpreter's string-hash seed (``PYTHONHASHSEED``), which changes the iteration order of
sets of backend names between processes.

Issue #10 §3 asks for deterministic state changes; the failure this guards against was the
pass handing out each declined backend's jittered timeout while iterating a ``set``, so two
processes fed the same inputs skipped different backends for different times and, later,
dispatched differently. Both processes here run the same seeded scenarios (several backends
on nodes of their own, overruns, removals, a short lookahead so that several free backends
are declined in one pass) and must log the same decisions: dispatches, flags, preemptions,
jobs given up, and which backends are declined until when.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.placement.model import Estimate, JobView, Plan
from ray_qalloc.placement.scheduler import Scheduler, SchedulerConfig

REPO = Path(__file__).resolve().parent.parent
PRIORITIES = ("emergency", "high", "normal", "batch")
# (seed, arrivals per step, lookahead): chosen so that passes decline several free backends
# at once; the first one changed its dispatches with the hash seed before the fix
SCENARIOS = ((0, 0.5, 2), (1, 0.35, 1), (2, 0.35, 1), (3, 0.25, 3))
HASH_SEEDS = ("0", "1", "2")


def decision_log(seed: int, rate: float, lookahead: int, steps: int = 1000) -> list[Any]:
    """Every decision of one seeded run, as JSON-able values. Runs end at a seeded multiple of
    their prediction (overruns make waiting jobs change their minds, so a backend's decline
    timeout decides when a job is weighed again)."""
    rng = random.Random(seed)
    specs = [BackendSpec(f"sim{i}", "simulator", "aer", 30, slots=rng.choice((1, 2)), method="statevector")
             for i in range(6)]
    specs += [BackendSpec(f"qpu{i}", "qpu", "fake_qpu", 127, device=f"d{i}", noisy=True) for i in range(4)]
    s = Scheduler(SchedulerConfig(lookahead=lookahead), node_cpus={f"n-{sp.name}": 64 for sp in specs})
    for sp in specs:
        s.add_backend(sp, node=f"n-{sp.name}")     # a node each: a finish clears only its own declines
    log: list[Any] = []
    ends: dict[str, float] = {}
    now, n = 0.0, 0
    for _ in range(steps):
        for jid in sorted(s.runs):
            if jid not in ends:
                run = s.runs[jid]
                ends[jid] = run.started + run.predicted_s * rng.choice((0.5, 1.0, 1.0, 2.0, 4.0))
        for jid in sorted((j for j in s.runs if ends[j] <= now), key=lambda j: (ends[j], j)):
            s.finish(jid)
            log.append(["finish", jid])
        while rng.random() < rate:
            job = JobView(f"j{n}", 3, frozenset({"h"}), {}, 100, priority=rng.choice(PRIORITIES),
                          deadline_s=rng.choice((None, None, 5.0, 50.0)))
            n += 1
            chosen = rng.sample(specs, rng.randint(1, 6))
            s.enqueue(job, Plan(job.id, {sp.name: Estimate(sp.name, 10 ** rng.uniform(-2, 1), rng.uniform(0.6, 1.0),
                                                           rng.uniform(0, 1)) for sp in chosen}), now)
        if rng.random() < 0.05 and s.entries:
            jid = rng.choice(sorted(s.entries))
            s.remove(jid)
            log.append(["remove", jid])
        now = round(now + rng.choice((0.01, 0.05, 0.1)), 6)
        res = s.decide(now)
        log.append([now, [(d.entry.job.id, d.choice.backend) for d in res.dispatch],
                    [e.job.id for e in res.flagged], [(v.job_id, e.job.id) for v, e in res.preempt],
                    [e.job.id for e in res.unplaceable], sorted(s._declined.items())])
    return log


def _logs_in_subprocess(hash_seed: str) -> subprocess.Popen[str]:
    code = ("import json, sys\n"
            "from tests.test_scheduler_determinism import SCENARIOS, decision_log\n"
            "json.dump([decision_log(*sc) for sc in SCENARIOS], sys.stdout)\n")
    env = dict(os.environ, PYTHONHASHSEED=hash_seed,
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    # the invariant check recomputes the state after every call: correct, but it would make
    # this test slow, and what it checks is covered in-process by the other scheduler tests
    env.pop("RAY_QALLOC_CHECK_INVARIANTS", None)
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_decisions_do_not_depend_on_the_hash_seed() -> None:
    procs = {h: _logs_in_subprocess(h) for h in HASH_SEEDS}
    logs: dict[str, Any] = {}
    for h, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        logs[h] = json.loads(out)
    first = logs[HASH_SEEDS[0]]
    assert any(len(step[-1]) >= 2 for run in first for step in run if isinstance(step[0], float)), \
        "the scenarios no longer decline several backends at once: they test nothing"
    for h in HASH_SEEDS[1:]:
        for k, (a, b) in enumerate(zip(first, logs[h])):
            diverge = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            assert a == b, (f"scenario {SCENARIOS[k]}: PYTHONHASHSEED={HASH_SEEDS[0]} and {h} decide differently "
                            f"from step {diverge}: {a[diverge] if diverge is not None else None} vs "
                            f"{b[diverge] if diverge is not None else None}")


def test_the_log_is_the_same_in_this_process() -> None:
    """The scenario itself is seeded: two runs here agree (so a difference between processes
    can only come from the hash seed)."""
    assert decision_log(*SCENARIOS[0], steps=200) == decision_log(*SCENARIOS[0], steps=200)
