"""The body of ``qalloc calibration DEVICE``: a device's calibration as the series recorded it.

Why it reads the series and replays the detector instead of asking a running monitor:
the command must answer with no cluster up (like ``status`` and ``explain``), and the
series holds everything the monitor knew. Replaying the stored history through a fresh
``DriftDetector`` gives the same alarms the live monitor has (detection is deterministic).

``report_data`` builds a plain dict (what ``-o json`` prints); ``calibration_report``
renders it with rich: per-qubit current values with trend arrows over the window, drift
flags on the values in alarm, couplers in alarm (or all, on request), recent events and
the staleness line.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ray_qalloc.exceptions import UnknownBackend
from ray_qalloc.monitor.calseries import QUANTITIES, QUBIT_QUANTITIES, CalibrationSeries, SeriesKey
from ray_qalloc.monitor.detect import DriftDetector, format_duration, format_time, staleness

SERIES_FILE = "calibration.db"
DEFAULT_WINDOW_S = 6 * 3_600.0
DEFAULT_PERIOD_S = 900.0


def default_series_url(data_dir: Path | str) -> str:
    """Where the monitor keeps its series unless configured otherwise: beside the job store."""
    return f"sqlite:///{Path(data_dir) / SERIES_FILE}"


def _fmt(quantity: str, value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    q = QUANTITIES.get(quantity)
    if q is not None and q.unit:
        return f"{value * q.scale:.1f}"
    return f"{value:.2e}" if value < 1e-2 else f"{value:.3f}"


def report_data(device: str, series: CalibrationSeries, detector: DriftDetector | None = None, *,
                now: float | None = None, window_s: float = DEFAULT_WINDOW_S,
                period_s: float = DEFAULT_PERIOD_S, max_stale_periods: float = 2.0,
                replay_s: float = 7 * 86_400.0, events: int = 10) -> dict[str, Any]:
    """Everything the report shows, as JSON-ready data."""
    latest = series.latest(device)
    if latest is None:
        known = series.devices()
        raise UnknownBackend(f"no calibration recorded for {device!r}.",
                             fix=f"use one of: {', '.join(known)}." if known else
                             "run the allocator (its quantum monitor records calibrations) first.")
    now = time.time() if now is None else float(now)
    detector = detector or DriftDetector()
    if detector.last_at(device) is None:
        detector.replay(device, series.history(device, since=latest.taken_at - replay_s))
    trends = series.trends(device, window_s, now=latest.taken_at)
    alarms = detector.alarms(device)

    def cell(key: SeriesKey) -> dict[str, Any]:
        trend = trends.get(key)
        score = alarms.get(key)
        return {"value": latest.values.get(key), "arrow": trend.arrow() if trend else "",
                "change": trend.change if trend else None,
                "alarm": None if score is None else {"direction": "up" if score.alarm > 0 else "down",
                                                     "factor": score.factor, "since": score.since}}

    qubits = [{"qubit": q, **{name: cell(SeriesKey(name, (q,))) for name in QUBIT_QUANTITIES}}
              for q in range(latest.num_qubits)]
    couplers = [{"coupler": list(k.qubits), **cell(k)}
                for k in sorted(k for k in latest.values if k.quantity == "gate_2q_error")]
    stale = staleness(device, latest.taken_at, now, period_s, max_stale_periods)
    return {
        "device": device, "taken_at": latest.taken_at, "now": now, "window_s": window_s,
        "staleness": {"age_s": stale.age_s, "periods": stale.periods, "stale": stale.stale,
                      "message": stale.message},
        "qubits": qubits, "couplers": couplers,
        "alarms": [{"series": k.label, "factor": s.factor, "since": s.since} for k, s in sorted(alarms.items())],
        "events": [{"series": e.key.label, "kind": e.kind, "at": e.at, "factor": e.factor, "message": e.message}
                   for e in detector.events(device)[-events:]],
    }


def _cell_text(quantity: str, c: dict[str, Any]) -> str:
    text = f"{_fmt(quantity, c['value'])} {c['arrow']}".rstrip()
    alarm = c["alarm"]
    if alarm is not None:
        factor = alarm["factor"]
        size = f"{1 / factor:.1f}×↓" if alarm["direction"] == "down" else f"{factor:.1f}×↑"
        text = f"[bold red]{text} ⚠ {size}[/bold red]"
    return text


def calibration_report(device: str, series: CalibrationSeries, detector: DriftDetector | None,
                       console: Console, *, now: float | None = None, window_s: float = DEFAULT_WINDOW_S,
                       period_s: float = DEFAULT_PERIOD_S, max_stale_periods: float = 2.0,
                       all_couplers: bool = False) -> dict[str, Any]:
    """Print the device's calibration report to ``console``; returns the data it shows."""
    data = report_data(device, series, detector, now=now, window_s=window_s, period_s=period_s,
                       max_stale_periods=max_stale_periods)
    stale = data["staleness"]
    colour = "red" if stale["stale"] else "green"
    console.print(f"[bold]{device}[/bold] calibration of {format_time(data['taken_at'])} — "
                  f"[{colour}]{stale['message'].split(': ', 1)[-1]}[/{colour}]; "
                  f"trends over {format_duration(window_s)}")
    table = Table(title=f"{device}: qubits")
    table.add_column("qubit", justify="right")
    for name in QUBIT_QUANTITIES:
        q = QUANTITIES[name]
        table.add_column(f"{q.label} {q.unit}".strip(), justify="right")
    table.add_column("drift")
    for row in data["qubits"]:
        flags = [QUANTITIES[n].label for n in QUBIT_QUANTITIES if row[n]["alarm"] is not None]
        table.add_row(str(row["qubit"]), *(_cell_text(n, row[n]) for n in QUBIT_QUANTITIES),
                      "[red]" + ", ".join(flags) + "[/red]" if flags else "")
    console.print(table)
    shown = [c for c in data["couplers"] if all_couplers or c["alarm"] is not None]
    if shown:
        ct = Table(title=f"{device}: couplers" + ("" if all_couplers else " in alarm"))
        ct.add_column("coupler")
        ct.add_column("2q error", justify="right")
        for c in shown:
            ct.add_row("q" + "-q".join(str(q) for q in c["coupler"]), _cell_text("gate_2q_error", c))
        console.print(ct)
    else:
        console.print(f"couplers: {len(data['couplers'])}, none in alarm")
    if data["events"]:
        console.print("[bold]recent drift events[/bold]")
        for e in data["events"]:
            console.print(f"  {e['message']}")
    return data
