"""Predictive scaling benchmark (issue #12): queue wait and node-seconds, predictive vs reactive.

``python -m benchmarks.scaling [--json OUT] [--seed N] [--boot-s S] [--lag-s S] ...``

A discrete-event simulation of one elastic simulator pool (pure: no Ray, no Aer):

* **nodes** of ``--cores`` cores each boot for ``--boot-s`` after they are launched, then run
  jobs; ``--min-nodes`` are always up. A node idle for ``--idle-s`` is given back (the elastic
  path: ``fleet._elastic_pools_tick`` stops its pool, then Ray's idle timeout) — unless the
  standing autoscaling request would fall below its floor. A node costs from launch (its boot
  is paid) to release: **node-seconds**.
* **jobs** are served first come, first served on any free core of an up node (packed onto the
  busiest node, so that idle nodes can go). **queue wait** = start − arrival.
* **reactive** (what ``autoscale.Requester`` + Ray's autoscaler do for a queue): every tick,
  launch enough nodes to fit the queued jobs that free and booting cores cannot take, up to
  ``--max-nodes``. This is more generous than today's ``Requester`` (one bundle per shape), so
  the baseline is not a straw man.
* **predictive** = reactive + ``PredictiveController``: its request is a floor on the node count
  (``request_resources``), launched at once and kept from release while it stands.

Two traces from one seed, each a training part (the history the forecaster fits on, once) and a
test part (measured; never seen by the fit):

* **predictive**: job bursts, each preceded by a burst of high-severity events ``--lag-s``
  earlier (± ``--lag-jitter-s``), its size growing with the job burst's; background jobs and
  events with a daily cycle.
* **control**: the same jobs, the same event bursts in number and size, at times independent
  of the job bursts.

JSON ``summary``: ``p95_wait_ratio_predictive`` (predictive/reactive queue-wait p95 on the
predictive trace; goal ≤ 0.5), ``node_seconds_ratio_control`` (predictive/reactive node-seconds
on the control trace; goal ≤ 1.1), ``forecast_mape`` (the WAPE — Σ|error| / Σ actual — of the
forecast of jobs in the next horizon over the predictive trace's test part; defined when some
windows see no job, see ``ray_qalloc.forecast``).
"""

from __future__ import annotations

import argparse
import heapq
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import make_console, write_json
from ray_qalloc.forecast import wape
from ray_qalloc.predictive import BANDS, PredictiveController, PredictiveScalingSettings

GOALS = {"p95_wait_ratio_predictive": ("<=", 0.5), "node_seconds_ratio_control": ("<=", 1.1)}
DAY_S = 86_400.0


@dataclass(frozen=True)
class TraceParams:
    """How the two traces are generated (every field is a flag of the command line)."""

    seed: int = 7
    train_s: float = 2 * DAY_S
    test_s: float = 6 * 3600.0
    lag_s: float = 120.0                 # event burst → job burst
    lag_jitter_s: float = 20.0           # standard deviation of the lag
    background_jobs_per_s: float = 0.05
    daily_amplitude: float = 0.5         # background rate × (1 + a·sin(day phase))
    burst_every_s: float = 1800.0        # mean time between job bursts (Poisson)
    burst_jobs_per_s: tuple[float, float] = (1.0, 3.0)   # a burst's rate, uniform in this range
    burst_len_s: float = 120.0
    runtime_mean_s: float = 30.0
    runtime_sigma: float = 0.5           # lognormal
    events_per_s: tuple[float, float, float] = (2.0, 0.3, 0.02)   # background, by band (low, medium, high)
    event_burst_per_job_rate: float = 15.0   # high-severity events in a burst per job/s of its job burst
    event_burst_len_s: float = 60.0


@dataclass
class Trace:
    name: str
    start: float                          # the training part starts here (Unix time; daily phase from it)
    test_start: float
    end: float
    job_t: np.ndarray                     # arrival times, sorted
    job_run: np.ndarray                   # runtimes
    event_t: np.ndarray                   # event times, sorted
    event_band: np.ndarray                # band index of each event

    def bins(self, bin_s: float, until: float) -> tuple[np.ndarray, np.ndarray]:
        """Per-bin job arrivals and event counts (by band) from ``start`` to ``until``."""
        n = int(math.ceil((until - self.start) / bin_s - 1e-9))
        edges = self.start + np.arange(n + 1) * bin_s
        jobs = np.histogram(self.job_t, edges)[0].astype(float)
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
    # job bursts
    n_b = rng.poisson((end - start) / p.burst_every_s)
    b_at = np.sort(rng.uniform(start + p.lag_s + 3 * p.lag_jitter_s, end - p.burst_len_s, n_b))
    b_rate = rng.uniform(*p.burst_jobs_per_s, n_b)
    burst_jobs = [np.sort(rng.uniform(s, s + p.burst_len_s, rng.poisson(r * p.burst_len_s)))
                  for s, r in zip(b_at, b_rate)]
    job_t = np.sort(np.concatenate([bg, *burst_jobs]))
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
        traces.append(Trace(name, start, test_start, end, job_t, job_run, t[order], band[order]))
    return traces[0], traces[1]


# ---- the simulation -------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolParams:
    boot_s: float = 90.0
    cores: int = 8
    idle_s: float = 300.0
    min_nodes: int = 1
    max_nodes: int = 16
    tick_s: float = 10.0


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
    reservations: int = 0
    decisions: list[dict[str, Any]] = field(default_factory=list)


def simulate(trace: Trace, pool: PoolParams, controller: PredictiveController | None) -> SimResult:
    """Run the test part of ``trace`` on the pool; with a controller, its request is a node floor."""
    t0, t_end = trace.test_start, trace.end
    sel = (trace.job_t >= t0) & (trace.job_t < t_end)
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
    reservations = 0
    last_arr_i = 0
    last_ev_i = 0
    work_per_job = controller.work_per_job_s if controller is not None else 0.0
    decisions: list[dict[str, Any]] = []
    peak = len(nodes)

    def live() -> list[int]:
        return [i for i, n in enumerate(nodes) if n.released is None]

    def dispatch(now: float) -> None:
        nonlocal qhead
        while qhead < len(queue):
            cand = [i for i in live() if nodes[i].ready <= now and nodes[i].busy < pool.cores]
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
                hi_arr = int(np.searchsorted(arr, now, side="left"))
                hi_ev = int(np.searchsorted(ev_t, now, side="left"))
                counts = np.bincount(ev_b[last_ev_i:hi_ev], minlength=len(BANDS)).astype(float)
                queued_n = len(queue) - qhead
                # what the allocator knows of running work: the mean job, less what has run (no oracle)
                busy_work = sum(max(work_per_job - (now - start_at[j]), 0.0) for j in _running(start_at, run, now, hi_arr))
                before = controller.current
                d = controller.tick(now, hi_arr - last_arr_i, counts, len(live()),
                                    queued_n * work_per_job + busy_work)
                sent += int(controller.current != before)
                reservations += int(d.reserve is not None)
                floor = len(controller.current or [])
                last_arr_i, last_ev_i = hi_arr, hi_ev
                if d.forecast_jobs is not None:
                    decisions.append({"t": now - t0, "forecast_jobs": round(d.forecast_jobs, 2),
                                      "requested_nodes": d.requested_nodes})
            # reactive: fit the queue that free and booting cores cannot take
            lv = live()
            free = sum(pool.cores - nodes[j].busy for j in lv)    # booting nodes: all their cores are free
            excess = (len(queue) - qhead) - free
            if excess > 0:
                launch(now, math.ceil(excess / pool.cores))
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
                     decisions=decisions)


def _running(start_at: np.ndarray, run: np.ndarray, now: float, upto: int) -> np.ndarray:
    """Indices of the jobs (of the first ``upto``) running at ``now``."""
    s = start_at[:upto]
    ok = ~np.isnan(s)
    idx = np.nonzero(ok)[0]
    return idx[(s[idx] <= now) & (s[idx] + run[idx] > now)]


# ---- one benchmark run -------------------------------------------------------------------------------
def controller_for(trace: Trace, settings: PredictiveScalingSettings, pool: PoolParams) -> PredictiveController:
    """A controller seeded with the trace's training part and fitted on it, once (frozen for the test)."""
    jobs, events = trace.bins(settings.bin_s, trace.test_start)
    train = trace.job_t < trace.test_start
    c = PredictiveController(settings, lambda bundles: None, clock=lambda: trace.test_start,
                             node_cores=pool.cores, work_per_job_s=float(trace.job_run[train].mean()),
                             reserve_target="cpu-elastic", refit=False)
    c.seed(jobs, events, trace.start)
    c.fit()
    return c


def run_trace(trace: Trace, settings: PredictiveScalingSettings, pool: PoolParams) -> dict[str, Any]:
    ctrl = controller_for(trace, settings, pool)
    report = ctrl.forecaster.report
    assert report is not None
    jobs, events = trace.bins(settings.bin_s, trace.end)
    pred = ctrl.forecaster.predict_series(jobs, events, trace.start)
    actual = ctrl.forecaster.actual_series(jobs)
    test_from = int(round((trace.test_start - trace.start) / settings.bin_s))
    test_wape = wape(pred[test_from:], actual[test_from:])
    t = time.perf_counter()
    reactive = simulate(trace, pool, None)
    predictive = simulate(trace, pool, ctrl)
    sim_s = time.perf_counter() - t
    out: dict[str, Any] = {"forecast": {**report.as_dict(), "test_wape": test_wape,
                                        "work_per_job_s": ctrl.work_per_job_s},
                           "reactive": asdict(reactive) | {"decisions": None},
                           "predictive": asdict(predictive) | {"decisions": predictive.decisions[:2000]},
                           "sim_s": sim_s}
    out["p95_wait_ratio"] = _ratio(predictive.p95_wait_s, reactive.p95_wait_s)
    out["mean_wait_ratio"] = _ratio(predictive.mean_wait_s, reactive.mean_wait_s)
    out["node_seconds_ratio"] = _ratio(predictive.node_seconds, reactive.node_seconds)
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else (1.0 if a == 0 else math.inf)


def run(params: TraceParams, pool: PoolParams, settings: PredictiveScalingSettings) -> dict[str, Any]:
    t = time.perf_counter()
    pred_trace, ctrl_trace = make_traces(params)
    results = {tr.name: run_trace(tr, settings, pool) for tr in (pred_trace, ctrl_trace)}
    summary = {"p95_wait_ratio_predictive": results["predictive"]["p95_wait_ratio"],
               "node_seconds_ratio_control": results["control"]["node_seconds_ratio"],
               "forecast_mape": results["predictive"]["forecast"]["test_wape"],
               "forecast_mape_control": results["control"]["forecast"]["test_wape"],
               "node_seconds_ratio_predictive": results["predictive"]["node_seconds_ratio"],
               "p95_wait_ratio_control": results["control"]["p95_wait_ratio"],
               "features_predictive": results["predictive"]["forecast"]["groups"],
               "features_control": results["control"]["forecast"]["groups"]}
    summary["goals_met"] = {k: _met(summary[k], *GOALS[k]) for k in GOALS}
    return {"benchmark": "scaling", "params": asdict(params), "pool": asdict(pool),
            "settings": settings.model_dump(), "goals": {k: f"{op} {v}" for k, (op, v) in GOALS.items()},
            "forecast_error": "WAPE: sum |forecast - actual| / sum actual, jobs in the next horizon, test part only",
            "traces": results, "summary": summary, "wall_s": time.perf_counter() - t}


def _met(v: float, op: str, target: float) -> bool:
    return bool(v <= target) if op == "<=" else bool(v >= target)


def print_result(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    def mark(ok: bool) -> str:
        return "[green]met[/]" if ok else "[red]missed[/]"

    p, pool = result["params"], result["pool"]
    t = Table(title=f"predictive scaling: seed {p['seed']}, boot {pool['boot_s']:.0f} s, lag {p['lag_s']:.0f} s, "
                    f"horizon {result['settings']['horizon_s']:.0f} s, "
                    f"{pool['cores']} cores/node, idle release {pool['idle_s']:.0f} s, test {p['test_s'] / 3600:.1f} h")
    for c in ("trace", "policy", "jobs", "wait p95 s", "wait mean s", "wait max s", "node-s", "peak nodes", "launches"):
        t.add_column(c, justify="left" if c in ("trace", "policy") else "right")
    for name, r in result["traces"].items():
        for pol in ("reactive", "predictive"):
            x = r[pol]
            t.add_row(name, pol, str(x["jobs"]), f"{x['p95_wait_s']:.1f}", f"{x['mean_wait_s']:.1f}",
                      f"{x['max_wait_s']:.1f}", f"{x['node_seconds']:,.0f}", str(x["peak_nodes"]), str(x["launches"]))
    console.print(t)
    f = Table(title="forecaster (jobs in the next horizon; WAPE = Σ|error| / Σ actual)")
    for c in ("trace", "features kept", "held-out WAPE (train CV)", "WAPE by set (CV)", "test WAPE"):
        f.add_column(c)
    for name, r in result["traces"].items():
        fc = r["forecast"]
        f.add_row(name, "+".join(fc["groups"]), f"{fc['cv_wape']:.3f}",
                  ", ".join(f"{k} {v:.3f}" for k, v in fc["cv_wape_by_set"].items()), f"{fc['test_wape']:.3f}")
    console.print(f)
    s = result["summary"]
    g = Table(title="goals (measured, not adjusted)")
    for c in ("figure", "measured", "goal", ""):
        g.add_column(c)
    for k, (op, target) in GOALS.items():
        g.add_row(k, f"{s[k]:.3f}", f"{op} {target}", mark(s["goals_met"][k]))
    g.add_row("forecast_mape (WAPE, predictive trace, test part)", f"{s['forecast_mape']:.3f}", "", "")
    g.add_row("p95_wait_ratio_control (no goal)", f"{s['p95_wait_ratio_control']:.3f}", "", "")
    g.add_row("node_seconds_ratio_predictive (no goal)", f"{s['node_seconds_ratio_predictive']:.3f}", "", "")
    console.print(g)
    console.print(f"wall {result['wall_s']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    d, dp = TraceParams(), PoolParams()
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, default=None, help="write the result here")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--boot-s", type=float, default=dp.boot_s, help="node boot delay (also the forecast horizon)")
    ap.add_argument("--horizon-s", type=float, default=None,
                    help="forecast horizon (default: the boot delay, as PredictiveScalingSettings advises)")
    ap.add_argument("--lag-s", type=float, default=d.lag_s, help="event burst → job burst lag on the predictive trace")
    ap.add_argument("--lag-jitter-s", type=float, default=d.lag_jitter_s)
    ap.add_argument("--train-h", type=float, default=d.train_s / 3600, help="training part, hours")
    ap.add_argument("--test-h", type=float, default=d.test_s / 3600, help="measured part, hours")
    ap.add_argument("--cores", type=int, default=dp.cores)
    ap.add_argument("--idle-s", type=float, default=dp.idle_s, help="idle node release")
    ap.add_argument("--max-nodes", type=int, default=dp.max_nodes)
    ap.add_argument("--max-extra-nodes", type=int, default=PredictiveScalingSettings().max_extra_nodes)
    ap.add_argument("--burst-every-s", type=float, default=d.burst_every_s)
    args = ap.parse_args(argv)
    params = TraceParams(seed=args.seed, train_s=args.train_h * 3600, test_s=args.test_h * 3600, lag_s=args.lag_s,
                         lag_jitter_s=args.lag_jitter_s, burst_every_s=args.burst_every_s)
    pool = PoolParams(boot_s=args.boot_s, cores=args.cores, idle_s=args.idle_s, max_nodes=args.max_nodes)
    train_s = params.train_s
    settings = PredictiveScalingSettings(enabled=True, horizon_s=args.horizon_s or args.boot_s, min_history_s=min(train_s, 6 * 3600.0),
                                         history_s=max(train_s + params.test_s, 15 * DAY_S),
                                         max_extra_nodes=args.max_extra_nodes)
    console = make_console()
    result = run(params, pool, settings)
    print_result(result, console)
    write_json(args.json, result, console)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
