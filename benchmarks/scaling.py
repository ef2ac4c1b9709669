"""Predictive scaling benchmark (issue #12): queue wait and node-seconds, predictive vs reactive, per class.

``python -m benchmarks.scaling [--json OUT] [--seeds 7,11,12,13,14,15] [--boot-s S] [--lag-s S] ...``

A discrete-event simulation of two elastic simulator pools and two QPU classes (pure: no Ray, no Aer):

* **demand classes** (``ray_qalloc.forecast_classes``): ``pool:cpu`` (nodes of ``--cores``
  cores), ``pool:gpu`` (nodes of ``--gpus`` GPUs), ``qpu:superconducting``, ``qpu:trapped_ion``.
  Every job belongs to one class (the backend it runs on).
* **pool nodes** boot for ``--boot-s`` after they are launched, then run jobs; ``min_nodes`` are
  always up. A node idle for ``--idle-s`` is given back (the elastic path:
  ``fleet._elastic_pools_tick`` stops its pool, then Ray's idle timeout) — unless the standing
  autoscaling request would fall below its floor. A node costs from launch (its boot is paid) to
  release: **node-seconds**.
* **jobs** of a pool class are served first come, first served on any free core of an up node of
  that pool (packed onto the busiest node, so that idle nodes can go). **queue wait** = start −
  arrival.
* **reactive** (what ``autoscale.Requester`` + Ray's autoscaler do for a queue): every tick,
  launch enough nodes to fit the queued jobs that free and booting cores cannot take, up to
  ``--max-nodes``. This is more generous than today's ``Requester`` (one bundle per shape), so
  the baseline is not a straw man.
* **predictive** = reactive + ``PredictiveController``: the bundles of a pool's shape in its
  request are a floor on that pool's node count (``request_resources``), launched at once and
  kept from release while they stand.
* **QPU classes** are not launched: the controller's surge reservations on them are recorded
  and scored (share of the class's jobs that arrive while one is held, hours held).

Two traces from one seed, each a training part (the history the forecasters fit on, once) and a
test part (measured; never seen by the fit):

* **predictive**: job bursts on the CPU pool and the trapped-ion QPUs (``--burst-share``), each
  preceded by a burst of high-severity events ``--lag-s`` earlier (± ``--lag-jitter-s``), its
  size growing with the job burst's; background jobs of every class and background events with
  a daily cycle. The GPU pool and the superconducting QPUs see background only: a forecaster of
  the total would pre-warm them for the CPU pool's bursts.
* **control**: the same jobs, the same event bursts in number and size, at times independent
  of the job bursts.

Every seed of ``--seeds`` is a fresh pair of traces. JSON ``summary``: the mean over the seeds of
``p95_wait_ratio_predictive`` (predictive/reactive queue-wait p95 of all pool jobs on the
predictive trace; goal ≤ 0.5), ``node_seconds_ratio_control`` (predictive/reactive node-seconds
of both pools on the control trace; goal ≤ 1.1) and ``forecast_mape`` (the WAPE — Σ|error| / Σ
actual — of every class's forecast of its serving window over the predictive trace's test part;
defined when some windows see no job, see ``ray_qalloc.forecast``); ``per_seed`` has each seed's,
``goals_met_every_seed`` whether each goal held on all of them.
"""

from __future__ import annotations

import argparse
import copy
import heapq
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import make_console, write_json
from ray_qalloc.forecast_classes import CPU_POOL, GPU_POOL, POOL_RESOURCES, is_pool_class
from ray_qalloc.predictive import BANDS, PredictiveController, PredictiveScalingSettings

GOALS = {"p95_wait_ratio_predictive": ("<=", 0.5), "node_seconds_ratio_control": ("<=", 1.1)}
DAY_S = 86_400.0
DEFAULT_SEEDS: tuple[int, ...] = (7, 11, 12, 13, 14, 15)
CLASSES: tuple[str, ...] = (CPU_POOL, GPU_POOL, "qpu:superconducting", "qpu:trapped_ion")


@dataclass(frozen=True)
class TraceParams:
    """How the two traces are generated (every field is a flag of the command line)."""

    seed: int = 7
    train_s: float = 2 * DAY_S
    test_s: float = 6 * 3600.0
    lag_s: float = 120.0                 # event burst → job burst
    lag_jitter_s: float = 20.0           # standard deviation of the lag
    background_jobs_per_s: float = 0.05 / 0.6   # all classes; the CPU pool's share is 0.05 /s
    background_share: tuple[float, ...] = (0.6, 0.15, 0.15, 0.1)   # by CLASSES
    daily_amplitude: float = 0.5         # background rate × (1 + a·sin(day phase))
    burst_every_s: float = 1800.0        # mean time between job bursts (Poisson)
    burst_jobs_per_s: tuple[float, float] = (1.0 / 0.75, 3.0 / 0.75)   # a burst's rate, uniform in this range
    burst_share: tuple[float, ...] = (0.75, 0.0, 0.0, 0.25)   # by CLASSES: the CPU pool gets 1-3 jobs/s
    burst_len_s: float = 120.0
    runtime_mean_s: float = 30.0
    runtime_sigma: float = 0.5           # lognormal
    events_per_s: tuple[float, float, float] = (2.0, 0.3, 0.02)   # background, by band (low, medium, high)
    event_burst_per_job_rate: float = 15.0 * 0.75   # high-severity events in a burst per job/s of its job burst
    event_burst_len_s: float = 60.0


@dataclass
class Trace:
    name: str
    start: float                          # the training part starts here (Unix time; daily phase from it)
    test_start: float
    end: float
    job_t: np.ndarray                     # arrival times, sorted
    job_run: np.ndarray                   # runtimes
    job_cls: np.ndarray                   # index into CLASSES
    event_t: np.ndarray                   # event times, sorted
    event_band: np.ndarray                # band index of each event

    def bins(self, bin_s: float, until: float) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Per class, job arrivals per bin; event counts per bin (by band); from ``start`` to ``until``."""
        n = int(math.ceil((until - self.start) / bin_s - 1e-9))
        edges = self.start + np.arange(n + 1) * bin_s
        jobs = {c: np.histogram(self.job_t[self.job_cls == i], edges)[0].astype(float) for i, c in enumerate(CLASSES)}
        ev = np.column_stack([np.histogram(self.event_t[self.event_band == b], edges)[0] for b in range(len(BANDS))])
        return jobs, ev.astype(float)


def _poisson_times(rng: np.random.Generator, rate_fn: Any, t0: float, t1: float, rate_max: float) -> np.ndarray:
    """Arrival times of an inhomogeneous Poisson process (thinning)."""
    n = rng.poisson(rate_max * (t1 - t0))
    t = np.sort(rng.uniform(t0, t1, n))
    return t[rng.uniform(0, rate_max, n) < rate_fn(t)]


def make_traces(p: TraceParams) -> tuple[Trace, Trace]:
    """The predictive and the control trace: the same jobs; event bursts leading, or independent."""
    rng = np.random.default_rng(p.seed)
    start = 1_700_000_000.0 - (1_700_000_000.0 % DAY_S)     # midnight UTC: the daily phase is readable
    test_start = start + p.train_s
    end = test_start + p.test_s
    lam0 = p.background_jobs_per_s

    def daily(t: np.ndarray) -> np.ndarray:
        return 1.0 + p.daily_amplitude * np.sin(2 * math.pi * ((t - start) % DAY_S) / DAY_S)

    bg = _poisson_times(rng, lambda t: lam0 * daily(t), start, end, lam0 * (1 + p.daily_amplitude))
    bg_cls = rng.choice(len(CLASSES), len(bg), p=np.asarray(p.background_share) / sum(p.background_share))
    # job bursts
    n_b = rng.poisson((end - start) / p.burst_every_s)
    b_at = np.sort(rng.uniform(start + p.lag_s + 3 * p.lag_jitter_s, end - p.burst_len_s, n_b))
    b_rate = rng.uniform(*p.burst_jobs_per_s, n_b)
    burst_jobs = [np.sort(rng.uniform(s, s + p.burst_len_s, rng.poisson(r * p.burst_len_s)))
                  for s, r in zip(b_at, b_rate)]
    b_t = np.concatenate(burst_jobs) if burst_jobs else np.zeros(0)
    b_cls = rng.choice(len(CLASSES), len(b_t), p=np.asarray(p.burst_share) / sum(p.burst_share))
    all_t = np.concatenate([bg, b_t])
    order = np.argsort(all_t, kind="stable")
    job_t, job_cls = all_t[order], np.concatenate([bg_cls, b_cls])[order]
    mu = math.log(p.runtime_mean_s) - p.runtime_sigma ** 2 / 2
    job_run = rng.lognormal(mu, p.runtime_sigma, len(job_t))
    # background events by band, with the same daily cycle
    bg_ev = []
    for band, rate in enumerate(p.events_per_s):
        t = _poisson_times(rng, lambda t, r=rate: r * daily(t), start, end, rate * (1 + p.daily_amplitude))
        bg_ev.append((t, np.full(len(t), band)))
    sizes = rng.poisson(p.event_burst_per_job_rate * b_rate)

    def event_bursts(at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ts = [np.sort(rng.uniform(s, s + p.event_burst_len_s, k)) for s, k in zip(at, sizes)]
        t = np.concatenate(ts) if ts else np.zeros(0)
        return t, np.full(len(t), len(BANDS) - 1)

    leading = b_at - p.lag_s + rng.normal(0.0, p.lag_jitter_s, n_b)
    independent = np.sort(rng.uniform(start, end - p.event_burst_len_s, n_b))
    traces = []
    for name, at in (("predictive", leading), ("control", independent)):
        t_b, band_b = event_bursts(at)
        t = np.concatenate([x[0] for x in bg_ev] + [t_b])
        band = np.concatenate([x[1] for x in bg_ev] + [band_b])
        order = np.argsort(t, kind="stable")
        traces.append(Trace(name, start, test_start, end, job_t, job_run, job_cls, t[order], band[order]))
    return traces[0], traces[1]


# ---- the simulation -------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolParams:
    boot_s: float = 90.0
    cores: int = 8                        # the CPU pool's cores per node
    gpus: int = 4                         # the GPU pool's GPUs per node
    idle_s: float = 300.0
    min_nodes: int = 1
    max_nodes: int = 16
    tick_s: float = 10.0

    def slots(self, cls: str) -> int:
        return self.gpus if cls == GPU_POOL else self.cores


@dataclass
class _Node:
    launched: float
    ready: float
    busy: int = 0
    idle_since: float = 0.0
    released: float | None = None


@dataclass
class SimResult:
    jobs: int
    p95_wait_s: float
    mean_wait_s: float
    max_wait_s: float
    node_seconds: float
    peak_nodes: int
    launches: int
    requests_sent: int = 0
    reservations: list[dict[str, Any]] = field(default_factory=list)   # (class, target, from, until)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)


def simulate(trace: Trace, pool: PoolParams, controller: PredictiveController | None, cls: str = CPU_POOL
             ) -> SimResult:
    """Run the test part of ``trace``'s jobs of pool class ``cls`` on that pool; with a controller
    (told every class's arrivals, this pool's capacity and queue), the bundles of this pool's
    shape in its request are a node floor."""
    t0, t_end = trace.test_start, trace.end
    ci = CLASSES.index(cls)
    cores = pool.slots(cls)
    resource = POOL_RESOURCES[cls]
    sel_all = (trace.job_t >= t0) & (trace.job_t < t_end)
    all_t, all_c = trace.job_t[sel_all], trace.job_cls[sel_all]
    sel = sel_all & (trace.job_cls == ci)
    arr, run = trace.job_t[sel], trace.job_run[sel]
    ev_sel = (trace.event_t >= t0) & (trace.event_t < t_end)
    ev_t, ev_b = trace.event_t[ev_sel], trace.event_band[ev_sel]
    nodes = [_Node(launched=t0, ready=t0, idle_since=t0) for _ in range(pool.min_nodes)]
    heap: list[tuple[float, int, str, int]] = []
    seq = 0

    def push(t: float, kind: str, i: int) -> None:
        nonlocal seq
        heapq.heappush(heap, (t, seq, kind, i))
        seq += 1

    for i, t in enumerate(arr):
        push(float(t), "arrive", i)
    k = 0
    while t0 + k * pool.tick_s <= t_end:
        push(t0 + k * pool.tick_s, "tick", k)
        k += 1
    queue: list[int] = []           # FIFO of job indices
    qhead = 0
    start_at = np.full(len(arr), np.nan)
    job_node = np.full(len(arr), -1)
    floor = 0
    launches = 0
    sent = 0
    reservations: list[dict[str, Any]] = []
    last_all_i = 0
    last_ev_i = 0
    work_per_job = controller.work_of(cls) if controller is not None else 0.0
    decisions: list[dict[str, Any]] = []
    peak = len(nodes)

    def live() -> list[int]:
        return [i for i, n in enumerate(nodes) if n.released is None]

    def dispatch(now: float) -> None:
        nonlocal qhead
        while qhead < len(queue):
            cand = [i for i in live() if nodes[i].ready <= now and nodes[i].busy < cores]
            if not cand:
                return
            ni = max(cand, key=lambda i: (nodes[i].busy, -i))
            j = queue[qhead]
            qhead += 1
            nodes[ni].busy += 1
            start_at[j], job_node[j] = now, ni
            push(now + float(run[j]), "finish", j)

    def launch(now: float, n: int) -> None:
        nonlocal launches, peak
        for _ in range(max(0, min(n, pool.max_nodes - len(live())))):
            nodes.append(_Node(launched=now, ready=now + pool.boot_s, idle_since=now + pool.boot_s))
            push(now + pool.boot_s, "ready", len(nodes) - 1)
            launches += 1
        peak = max(peak, len(live()))

    while heap:
        now, _, kind, i = heapq.heappop(heap)
        if kind == "arrive":
            queue.append(i)
        elif kind == "finish":
            n = nodes[job_node[i]]
            n.busy -= 1
            if n.busy == 0:
                n.idle_since = now
        elif kind == "ready":
            nodes[i].idle_since = now
        elif kind == "tick":
            if controller is not None:
                hi_all = int(np.searchsorted(all_t, now, side="left"))
                hi_ev = int(np.searchsorted(ev_t, now, side="left"))
                counts = np.bincount(ev_b[last_ev_i:hi_ev], minlength=len(BANDS)).astype(float)
                arrived = np.bincount(all_c[last_all_i:hi_all], minlength=len(CLASSES))
                hi_arr = int(np.searchsorted(arr, now, side="left"))
                queued_n = len(queue) - qhead
                # what the allocator knows of running work: the mean job, less what has run (no oracle)
                busy_work = sum(max(work_per_job - (now - start_at[j]), 0.0) for j in _running(start_at, run, now, hi_arr))
                before = controller.current
                d = controller.tick(now, {c: float(arrived[x]) for x, c in enumerate(CLASSES)}, counts,
                                    {cls: len(live())}, {cls: queued_n * work_per_job + busy_work},
                                    node_cores={cls: float(cores)})
                sent += int(controller.current != before)
                for r in d.reserves:
                    who = next((c for c, t in controller.reserve_targets.items() if t == r["target"]), "")
                    reservations.append({"class": who, "target": r["target"], "from": now - t0,
                                         "until": now - t0 + float(r["for_s"])})
                floor = sum(1 for b in controller.current or [] if resource in b)
                last_all_i, last_ev_i = hi_all, hi_ev
                cd = d.per_class.get(cls)
                if cd is not None and cd.forecast_jobs is not None:
                    decisions.append({"t": now - t0, "forecast_jobs": round(cd.forecast_jobs, 2),
                                      "requested_nodes": cd.requested_nodes})
            # reactive: fit the queue that free and booting cores cannot take
            lv = live()
            free = sum(cores - nodes[j].busy for j in lv)    # booting nodes: all their cores are free
            excess = (len(queue) - qhead) - free
            if excess > 0:
                launch(now, math.ceil(excess / cores))
            if floor > len(lv):
                launch(now, floor - len(live()))
            # release idle nodes above the floor (the oldest idle first)
            keep = max(floor, pool.min_nodes)
            for j in sorted(live(), key=lambda j: nodes[j].idle_since):
                n = nodes[j]
                if len(live()) <= keep:
                    break
                if n.ready <= now and n.busy == 0 and now - n.idle_since >= pool.idle_s:
                    n.released = now
        dispatch(now)
    last = float(np.nanmax(start_at + run)) if len(arr) else t_end
    stop = max(t_end, last)
    node_s = sum((n.released if n.released is not None else stop) - n.launched for n in nodes)
    waits = start_at - arr
    return SimResult(jobs=len(arr), p95_wait_s=float(np.percentile(waits, 95)) if len(arr) else 0.0,
                     mean_wait_s=float(waits.mean()) if len(arr) else 0.0,
                     max_wait_s=float(waits.max()) if len(arr) else 0.0, node_seconds=float(node_s),
                     peak_nodes=peak, launches=launches, requests_sent=sent, reservations=reservations,
                     decisions=decisions, waits=[float(w) for w in waits])


def _running(start_at: np.ndarray, run: np.ndarray, now: float, upto: int) -> np.ndarray:
    """Indices of the jobs (of the first ``upto``) running at ``now``."""
    s = start_at[:upto]
    ok = ~np.isnan(s)
    idx = np.nonzero(ok)[0]
    return idx[(s[idx] <= now) & (s[idx] + run[idx] > now)]


# ---- one benchmark run -------------------------------------------------------------------------------
def controller_for(trace: Trace, settings: PredictiveScalingSettings, pool: PoolParams) -> PredictiveController:
    """A controller seeded with the trace's training part and fitted on it, once (frozen for the test).
    Surge reservations are held on the QPU classes (one emulated device each)."""
    jobs, events = trace.bins(settings.bin_s, trace.test_start)
    train = trace.job_t < trace.test_start
    work = {c: float(trace.job_run[train & (trace.job_cls == i)].mean()) for i, c in enumerate(CLASSES)
            if (train & (trace.job_cls == i)).any()}
    targets = {c: f"qpu_{c.split(':', 1)[1]}" for c in CLASSES if not is_pool_class(c)}
    c = PredictiveController(settings, lambda bundles: None, clock=lambda: trace.test_start,
                             node_cores={c: float(pool.slots(c)) for c in CLASSES if is_pool_class(c)},
                             work_per_job_s=work, reserve_targets=targets, refit=False)
    c.seed(jobs, events, trace.start)
    c.fit()
    return c


def _reservation_score(trace: Trace, cls: str, holds: list[dict[str, Any]]) -> dict[str, Any]:
    """Share of the class's test jobs that arrive while a reservation on it is held, and hours held."""
    ci = CLASSES.index(cls)
    sel = (trace.job_t >= trace.test_start) & (trace.job_t < trace.end) & (trace.job_cls == ci)
    t = trace.job_t[sel] - trace.test_start
    mine = [h for h in holds if h["class"] == cls]
    covered = np.zeros(len(t), dtype=bool)
    for h in mine:
        covered |= (t >= h["from"]) & (t < h["until"])
    span = trace.end - trace.test_start
    held = np.zeros(int(span) + 1, dtype=bool)
    for h in mine:
        held[int(h["from"]):int(min(h["until"], span))] = True
    return {"reservations": len(mine), "hours_held": float(held.sum() / 3600.0),
            "share_of_time_held": float(held.mean()),
            "share_of_jobs_covered": float(covered.mean()) if len(t) else math.nan, "jobs": int(len(t))}


def run_trace(trace: Trace, settings: PredictiveScalingSettings, pool: PoolParams) -> dict[str, Any]:
    ctrl = controller_for(trace, settings, pool)
    jobs, events = trace.bins(settings.bin_s, trace.end)
    test_from = int(round((trace.test_start - trace.start) / settings.bin_s))
    per_class: dict[str, Any] = {}
    err = tot = 0.0
    for cls in CLASSES:
        f = ctrl.forecasters.models.get(cls)
        report = ctrl.forecasters.reports.get(cls)
        entry: dict[str, Any] = {"forecast": None}
        if f is not None and report is not None:
            pred = f.predict_series(jobs[cls], events, trace.start)[test_from:]
            actual = f.actual_series(jobs[cls])[test_from:]
            ok = ~(np.isnan(pred) | np.isnan(actual))
            e, a = float(np.abs(pred[ok] - actual[ok]).sum()), float(actual[ok].sum())
            err, tot = err + e, tot + a
            entry["forecast"] = {**report.as_dict(), "test_wape": e / a if a > 0 else math.nan,
                                 "surge_level": ctrl.forecasters.thresholds.get(cls),
                                 "work_per_job_s": ctrl.work_of(cls)}
        per_class[cls] = entry
    t = time.perf_counter()
    holds: list[dict[str, Any]] = []
    pooled = {"reactive": [], "predictive": []}
    node_s = {"reactive": 0.0, "predictive": 0.0}
    for cls in (c for c in CLASSES if is_pool_class(c)):
        reactive = simulate(trace, pool, None, cls)
        predictive = simulate(trace, pool, copy.deepcopy(ctrl), cls)
        if cls == CPU_POOL:
            holds = predictive.reservations     # every class's reservations, as one controller took them
        for name, r in (("reactive", reactive), ("predictive", predictive)):
            pooled[name] += r.waits
            node_s[name] += r.node_seconds
        per_class[cls] |= {"reactive": asdict(reactive) | {"decisions": None, "waits": None, "reservations": None},
                           "predictive": asdict(predictive) | {"decisions": predictive.decisions[:500], "waits": None,
                                                                "reservations": None},
                           "p95_wait_ratio": _ratio(predictive.p95_wait_s, reactive.p95_wait_s),
                           "node_seconds_ratio": _ratio(predictive.node_seconds, reactive.node_seconds)}
    for cls in (c for c in CLASSES if not is_pool_class(c)):
        per_class[cls]["reservations"] = _reservation_score(trace, cls, holds)
    sim_s = time.perf_counter() - t
    p95 = {k: float(np.percentile(v, 95)) if v else 0.0 for k, v in pooled.items()}
    mean = {k: float(np.mean(v)) if v else 0.0 for k, v in pooled.items()}
    return {"classes": per_class, "pools": {"p95_wait_s": p95, "mean_wait_s": mean, "node_seconds": node_s},
            "p95_wait_ratio": _ratio(p95["predictive"], p95["reactive"]),
            "mean_wait_ratio": _ratio(mean["predictive"], mean["reactive"]),
            "node_seconds_ratio": _ratio(node_s["predictive"], node_s["reactive"]),
            "forecast_wape": err / tot if tot > 0 else math.nan, "sim_s": sim_s}


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else (1.0 if a == 0 else math.inf)


def run_seed(params: TraceParams, pool: PoolParams, settings: PredictiveScalingSettings) -> dict[str, Any]:
    pred_trace, ctrl_trace = make_traces(params)
    results = {tr.name: run_trace(tr, settings, pool) for tr in (pred_trace, ctrl_trace)}
    summary = {"p95_wait_ratio_predictive": results["predictive"]["p95_wait_ratio"],
               "node_seconds_ratio_control": results["control"]["node_seconds_ratio"],
               "forecast_mape": results["predictive"]["forecast_wape"],
               "forecast_mape_control": results["control"]["forecast_wape"],
               "node_seconds_ratio_predictive": results["predictive"]["node_seconds_ratio"],
               "p95_wait_ratio_control": results["control"]["p95_wait_ratio"],
               "mean_wait_ratio_predictive": results["predictive"]["mean_wait_ratio"]}
    summary["goals_met"] = {k: _met(summary[k], *GOALS[k]) for k in GOALS}
    return {"seed": params.seed, "traces": results, "summary": summary}


def run(params: TraceParams, pool: PoolParams, settings: PredictiveScalingSettings,
        seeds: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Every seed (default: ``params.seed`` alone) on fresh traces; the summary's figures are
    their mean, ``per_seed`` each seed's."""
    t = time.perf_counter()
    runs = [run_seed(TraceParams(**(asdict(params) | {"seed": s})), pool, settings)
            for s in (seeds or (params.seed,))]
    keys = ("p95_wait_ratio_predictive", "node_seconds_ratio_control", "forecast_mape", "forecast_mape_control",
            "node_seconds_ratio_predictive", "p95_wait_ratio_control", "mean_wait_ratio_predictive")
    summary: dict[str, Any] = {k: float(np.mean([r["summary"][k] for r in runs])) for k in keys}
    summary["goals_met"] = {k: _met(summary[k], *GOALS[k]) for k in GOALS}
    summary["goals_met_every_seed"] = {k: all(r["summary"]["goals_met"][k] for r in runs) for k in GOALS}
    summary["seeds"] = [r["seed"] for r in runs]
    summary["per_seed"] = {str(r["seed"]): {k: v for k, v in r["summary"].items()} for r in runs}
    summary["features"] = {str(r["seed"]): {tr: {c: (x["forecast"] or {}).get("groups") for c, x in
                                                 r["traces"][tr]["classes"].items()} for tr in r["traces"]}
                           for r in runs}
    return {"benchmark": "scaling", "params": asdict(params), "pool": asdict(pool), "classes": list(CLASSES),
            "settings": settings.model_dump(), "goals": {k: f"{op} {v}" for k, (op, v) in GOALS.items()},
            "forecast_error": "WAPE: sum |forecast - actual| / sum actual of every class's jobs in its serving "
                              "window (boot_s, boot_s + horizon_s], test part only",
            "runs": runs, "summary": summary, "wall_s": time.perf_counter() - t}


def _met(v: float, op: str, target: float) -> bool:
    return bool(v <= target) if op == "<=" else bool(v >= target)


def print_result(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    def mark(ok: bool) -> str:
        return "[green]met[/]" if ok else "[red]missed[/]"

    p, pool, st = result["params"], result["pool"], result["settings"]
    title = (f"boot {pool['boot_s']:.0f} s, forecast window ({st['boot_s']:.0f} s, {st['boot_s'] + st['horizon_s']:.0f} s], "
             f"lag {p['lag_s']:.0f} s, CPU {pool['cores']} cores/node, GPU {pool['gpus']}/node, "
             f"idle release {pool['idle_s']:.0f} s, train {p['train_s'] / 3600:.0f} h, test {p['test_s'] / 3600:.1f} h")
    s = result["summary"]
    g = Table(title=f"predictive scaling, per seed ({title}); goals measured, not adjusted")
    for c in ("seed", "p95 wait ratio (predictive trace)", "goal", "", "node-s ratio (control)", "goal", "",
              "forecast WAPE", "WAPE control", "node-s ratio (pred.)", "p95 ratio (control)", "mean wait ratio"):
        g.add_column(c, justify="right")
    for seed, x in s["per_seed"].items():
        g.add_row(seed, f"{x['p95_wait_ratio_predictive']:.3f}", "<= 0.5",
                  mark(x["goals_met"]["p95_wait_ratio_predictive"]), f"{x['node_seconds_ratio_control']:.3f}", "<= 1.1",
                  mark(x["goals_met"]["node_seconds_ratio_control"]), f"{x['forecast_mape']:.3f}",
                  f"{x['forecast_mape_control']:.3f}", f"{x['node_seconds_ratio_predictive']:.3f}",
                  f"{x['p95_wait_ratio_control']:.3f}", f"{x['mean_wait_ratio_predictive']:.3f}")
    g.add_row("mean", f"{s['p95_wait_ratio_predictive']:.3f}", "<= 0.5", mark(s["goals_met"]["p95_wait_ratio_predictive"]),
              f"{s['node_seconds_ratio_control']:.3f}", "<= 1.1", mark(s["goals_met"]["node_seconds_ratio_control"]),
              f"{s['forecast_mape']:.3f}", f"{s['forecast_mape_control']:.3f}",
              f"{s['node_seconds_ratio_predictive']:.3f}", f"{s['p95_wait_ratio_control']:.3f}",
              f"{s['mean_wait_ratio_predictive']:.3f}")
    console.print(g)
    t = Table(title="per class and seed (pools: p95 wait s reactive → predictive, node-s ratio; QPUs: reservations)")
    for c in ("seed", "trace", "class", "features kept", "CV WAPE", "test WAPE", "p95 wait s", "p95 ratio",
              "node-s ratio", "peak nodes", "reserved h", "jobs covered"):
        t.add_column(c, justify="left" if c in ("trace", "class", "features kept") else "right")
    for r in result["runs"]:
        for tr, x in r["traces"].items():
            for cls, y in x["classes"].items():
                fc = y["forecast"] or {}
                row = [str(r["seed"]), tr, cls, "+".join(fc.get("groups", ["(no model)"])),
                       f"{fc['cv_wape']:.3f}" if fc else "", f"{fc['test_wape']:.3f}" if fc else ""]
                if "reactive" in y:
                    row += [f"{y['reactive']['p95_wait_s']:.1f} → {y['predictive']['p95_wait_s']:.1f}",
                            f"{y['p95_wait_ratio']:.3f}", f"{y['node_seconds_ratio']:.3f}",
                            f"{y['reactive']['peak_nodes']} → {y['predictive']['peak_nodes']}", "", ""]
                else:
                    rs = y.get("reservations") or {}
                    row += ["", "", "", "", f"{rs.get('hours_held', 0.0):.2f}",
                            f"{rs.get('share_of_jobs_covered', math.nan):.2f}"]
                t.add_row(*row)
    console.print(t)
    console.print(f"seeds {', '.join(map(str, s['seeds']))}; wall {result['wall_s']:.1f} s")


def _seeds(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    d, dp = TraceParams(), PoolParams()
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, default=None, help="write the result here")
    ap.add_argument("--seeds", type=_seeds, default=DEFAULT_SEEDS,
                    help="comma-separated seeds, each a fresh pair of traces (7: the seed of earlier figures; "
                         "11-15: never looked at while designing)")
    ap.add_argument("--seed", type=int, default=None, help="one seed alone (overrides --seeds)")
    ap.add_argument("--boot-s", type=float, default=dp.boot_s, help="node boot delay (also the forecast's lead)")
    ap.add_argument("--lead-s", type=float, default=None,
                    help="where the forecast window starts (default: the boot delay; 0: the unshifted window, "
                         "for comparison)")
    ap.add_argument("--horizon-s", type=float, default=None,
                    help="the forecast window's length (default: the boot delay)")
    ap.add_argument("--lag-s", type=float, default=d.lag_s, help="event burst → job burst lag on the predictive trace")
    ap.add_argument("--lag-jitter-s", type=float, default=d.lag_jitter_s)
    ap.add_argument("--train-h", type=float, default=d.train_s / 3600, help="training part, hours")
    ap.add_argument("--test-h", type=float, default=d.test_s / 3600, help="measured part, hours")
    ap.add_argument("--cores", type=int, default=dp.cores)
    ap.add_argument("--gpus", type=int, default=dp.gpus)
    ap.add_argument("--idle-s", type=float, default=dp.idle_s, help="idle node release")
    ap.add_argument("--max-nodes", type=int, default=dp.max_nodes)
    ap.add_argument("--max-extra-nodes", type=int, default=PredictiveScalingSettings().max_extra_nodes)
    ap.add_argument("--burst-every-s", type=float, default=d.burst_every_s)
    args = ap.parse_args(argv)
    params = TraceParams(train_s=args.train_h * 3600, test_s=args.test_h * 3600, lag_s=args.lag_s,
                         lag_jitter_s=args.lag_jitter_s, burst_every_s=args.burst_every_s)
    pool = PoolParams(boot_s=args.boot_s, cores=args.cores, gpus=args.gpus, idle_s=args.idle_s,
                      max_nodes=args.max_nodes)
    train_s = params.train_s
    settings = PredictiveScalingSettings(enabled=True, horizon_s=args.horizon_s or args.boot_s,
                                         boot_s=args.boot_s if args.lead_s is None else args.lead_s,
                                         min_history_s=min(train_s, 6 * 3600.0),
                                         history_s=max(train_s + params.test_s, 15 * DAY_S),
                                         max_extra_nodes=args.max_extra_nodes, reserve_on_surge=True)
    console = make_console()
    result = run(params, pool, settings, (args.seed,) if args.seed is not None else args.seeds)
    print_result(result, console)
    write_json(args.json, result, console)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
