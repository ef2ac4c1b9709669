"""The operators' dashboard: what ``/dashboard`` shows, gathered by the allocator.

Why the allocator keeps a short timeline itself and the page does not query Prometheus: the
page must work on an install with no Prometheus (``make run``), and what it plots —
utilisation per pool and QPU, queue depth per class — is the allocator's own state, sampled
once per operations round into a ring buffer (``Timeline``). Prometheus, where it runs,
keeps the long history (and the shipped Grafana dashboard plots it).

The calibration heatmaps (qubit × T1, T2, readout error, drift alarms marked) come from the
calibration monitor's newest snapshot and open alarms, not from the fleet member: the member
keeps medians and a ranked profile, which have lost which qubit is which.

The page itself (``web/dashboard.html``) is static: it asks for an admin token, keeps it in
the browser's session storage, and polls ``GET /v1/admin/dashboard`` with it.
"""

from __future__ import annotations

import collections
import math
import statistics
import time
from importlib import resources
from typing import Any, Mapping

from ray_qalloc.monitor.calseries import Snapshot, safe_log
from ray_qalloc.monitor.keys import QUANTITIES, SeriesKey

TIMELINE_POINTS = 720
"""Samples kept (one per operations round: an hour at the default 5 s)."""

HEATMAP_QUANTITIES = ("t1", "t2", "readout_error")
"""The rows of a device's calibration heatmap, top to bottom."""

HEATMAP_MAX_QUBITS = 1024
"""Columns sent per device: the page polls every 5 s, and past this a column is under a pixel."""


class Timeline:
    """A ring buffer of (time, utilisation per executor, queue depth per class)."""

    def __init__(self, points: int = TIMELINE_POINTS) -> None:
        self._samples: collections.deque[tuple[float, dict[str, float], dict[str, int]]] = \
            collections.deque(maxlen=points)

    def sample(self, at: float, utilisation: dict[str, float], depth: dict[str, int]) -> None:
        self._samples.append((at, dict(utilisation), dict(depth)))

    def series(self) -> dict[str, Any]:
        """Column form for plotting: shared times, one list per executor and per class (None where
        an executor did not exist yet)."""
        times = [s[0] for s in self._samples]
        names = sorted({n for s in self._samples for n in s[1]})
        classes = sorted({c for s in self._samples for c in s[2]})
        return {"t": times,
                "utilisation": {n: [s[1].get(n) for s in self._samples] for n in names},
                "queue": {c: [s[2].get(c, 0) for s in self._samples] for c in classes}}


def utilisation(alloc: Any) -> dict[str, float]:
    """Per pool: cores busy with our runs / cores; per QPU: runs / slots (0..1)."""
    out: dict[str, float] = {}
    sched = alloc.sched.backends
    for host in alloc.fleet.hosts.values():
        if not host.members or host.actor is None:
            continue
        if host.kind == "pool":
            busy = sum(len(sched[n].runs) * sched[n].spec.threads for n in host.members if n in sched)
            out[host.name] = min(busy / max(host.cores, 1.0), 1.0)
        else:
            m = alloc.fleet.members.get(host.members[0])
            slots = max(m.spec.slots, 1) if m is not None else 1
            runs = sum(len(sched[n].runs) for n in host.members if n in sched)
            out[host.name] = min(runs / slots, 1.0)
    return out


def queue_by_class(alloc: Any) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter(q.job.priority.value for q in alloc.d.queued.values())
    for cls in ("emergency", "high", "normal", "batch"):
        counts.setdefault(cls, 0)
    return dict(counts)


def calibration(alloc: Any) -> list[dict[str, Any]]:
    """Per QPU: medians now, the weakest qubits, drift alarms, staleness."""
    rows = []
    status = {s["device"]: s for s in alloc.calwatch.status()}
    for host in alloc.fleet.hosts.values():
        m = alloc.fleet.members.get(host.members[0]) if host.members else None
        if m is None or m.spec.kind != "qpu":
            continue
        cal = m.calibration or {}
        q = m.qubits
        st = status.get(host.name, {})
        snapshot, alarms = _monitor_view(alloc, host.name)
        rows.append({"device": host.name, "qubits": int(cal.get("qubits", 0) or 0),
                     "t1_median_us": _finite(cal.get("t1_median_us")), "t2_median_us": _finite(cal.get("t2_median_us")),
                     "readout_error_median": _finite(cal.get("readout_error_median")),
                     "gate_2q_error_median": _finite(cal.get("gate_2q_error_median")),
                     "weakest_t_us": None if q is None or not q.qubits else _finite(q.coherence_s[-1] * 1e6),
                     "taken_at": m.calibration_taken_at, "age_s": _finite(st.get("age_s")),
                     "read_age_s": _finite(st.get("read_age_s")),
                     "stale": bool(st.get("stale", False)), "alarms": st.get("alarms", []),
                     "error": st.get("error"),
                     "provider": _provider(host),
                     "heatmap": heatmap(snapshot, alarms, int(cal.get("qubits", 0) or 0))})
    return rows


def _provider(host: Any) -> dict[str, Any] | None:
    status = getattr(host, "provider", None)
    return status.to_dict() if status is not None else None


def _monitor_view(alloc: Any, name: str) -> tuple[Snapshot | None, Mapping[SeriesKey, Any]]:
    """The device's per-qubit values and open alarms as the calibration monitor recorded them.

    The monitor and not the fleet member, because the member keeps medians and a ranked
    ``QubitProfile`` (sorted, so qubit indices are gone); a device the monitor has not
    recorded yet (first round pending, the series' database down) has no heatmap yet."""
    monitor = getattr(getattr(alloc, "calwatch", None), "monitor", None)
    if monitor is None:
        return None, {}
    try:
        snapshot = monitor.current(name)
    except Exception:  # not watched yet, or the series cannot be read: the table still shows
        snapshot = None
    try:
        alarms = monitor.alarms(name)
    except Exception:
        alarms = {}
    return snapshot, alarms


def heatmap(snapshot: Snapshot | None, alarms: Mapping[SeriesKey, Any], qubits: int = 0,
            max_qubits: int = HEATMAP_MAX_QUBITS) -> dict[str, Any] | None:
    """Per qubit T1, T2 (µs) and readout error, each with a 0..1 "badness" (1: the row's worst),
    and the qubits in drift alarm.

    Badness is computed here and not in the page so that colour means "worse" the same way
    for every row (low coherence, high error) and a test can hold it to that. It is taken in
    log space, as the drift detector judges values: one qubit with a readout error forty
    times the others' would, on a linear scale, paint the rest of the row one colour.

    ``qubits`` is the calibration's own qubit count, so qubits with no value at the end of
    the chip still get a (null) column; ``snapshot`` only holds finite values."""
    if snapshot is None:
        return None
    total = max(int(qubits or 0), snapshot.num_qubits)
    n = min(total, max(int(max_qubits), 0))
    cells: dict[str, list[int]] = {name: [] for name in HEATMAP_QUANTITIES}
    why: dict[int, list[str]] = collections.defaultdict(list)
    for key, score in sorted(alarms.items()):
        on = [q for q in key.qubits if 0 <= q < n]
        if not on:
            continue
        if key.quantity in cells and len(key.qubits) == 1:
            cells[key.quantity].append(key.qubits[0])
        text = _alarm_text(key, score)
        for q in on:
            why[q].append(text)
    rows: list[dict[str, Any]] = []
    for name in HEATMAP_QUANTITIES:
        quantity = QUANTITIES[name]
        raw = [_finite(snapshot.get(name, q)) for q in range(n)]
        rows.append({"quantity": name, "label": quantity.label, "unit": quantity.unit, "worse": quantity.worse,
                     "values": [None if v is None else float(f"{v * quantity.scale:.6g}") for v in raw],
                     "badness": _badness(raw, quantity.worse), "drift": sorted(set(cells[name]))})
    return {"taken_at": _finite(snapshot.taken_at), "qubits": n, "truncated": total > n, "rows": rows,
            "drifted": [{"qubit": q, "why": why[q]} for q in sorted(why)]}


def _badness(values: list[float | None], worse: str) -> list[float | None]:
    """0 for the row's best value, 1 for its worst (log space); a flat row is all 0: nothing
    in it is worse than the rest."""
    known = [v for v in values if v is not None]
    if not known:
        return [None] * len(values)
    logs = safe_log(known)
    lo, hi = float(logs.min()), float(logs.max())
    span = hi - lo
    out: list[float | None] = []
    it = iter(logs.tolist())
    for v in values:
        if v is None:
            out.append(None)
            continue
        x = next(it)
        b = 0.0 if span <= 0 else ((hi - x) if worse == "down" else (x - lo)) / span
        out.append(round(b, 4))
    return out


def _alarm_text(key: SeriesKey, score: Any) -> str:
    """``q3-q4 2q error rose ×1.80`` (what the hover of a drifted qubit says)."""
    alarm = getattr(score, "alarm", 0)
    factor = _finite(getattr(score, "factor", None))
    way = "rose" if alarm > 0 else "dropped" if alarm < 0 else "in alarm"
    return f"{key.label} {way}" + ("" if factor is None else f" ×{factor:.2f}")


def nodes(alloc: Any) -> list[dict[str, Any]]:
    out = []
    for host in alloc.fleet.hosts.values():
        s = getattr(host, "node_stats", None)
        if host.kind != "pool" or s is None:
            continue
        out.append({"pool": host.name, "node": (host.node_id or "")[:8], "cores": s.cores,
                    "cpu_ratio": s.cpu_ratio, "load_1m": s.load_1m, "memory_total_bytes": s.memory_total_bytes,
                    "memory_used_bytes": s.memory_used_bytes, "gpus": len(s.gpus)})
    return out


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def data(alloc: Any, alerts: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """Everything one refresh of the page shows."""
    now = time.time() if now is None else now
    decisions = list(alloc.d.observer.decisions)[-50:][::-1]
    waits = [d["waited_s"] for d in decisions]
    return {"at": now, "timeline": alloc.timeline.series(), "utilisation_now": utilisation(alloc),
            "queue_now": queue_by_class(alloc), "running": len(alloc.d.running),
            "decisions": decisions, "median_wait_s": statistics.median(waits) if waits else None,
            "alerts": alerts, "calibration": calibration(alloc), "nodes": nodes(alloc),
            "backends_healthy": sum(1 for h in alloc.fleet.hosts.values() if h.healthy),
            "backends_total": len(alloc.fleet.hosts)}


def page() -> str:
    """The page's HTML (static; its script fetches the data with the operator's token)."""
    return resources.files("ray_qalloc.web").joinpath("dashboard.html").read_text(encoding="utf-8")


def plotly_js() -> bytes | None:
    """Plotly's browser bundle as the ``plotly`` wheel ships it (None where it is not installed:
    the page then shows tables only)."""
    try:
        import plotly
    except ImportError:
        return None
    from pathlib import Path

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    return path.read_bytes() if path.exists() else None
