"""Drift detection per calibration quantity, against its own history; and staleness.

Why per quantity and in log space: a T1 of 20 µs is bad on one qubit and normal on
another, and "T1 dropped 8×" means the same at 300 µs as at 30 µs. So every series is
judged against itself: its log value is standardized by an exponentially weighted mean
and variance (EWMA), and a two-sided CUSUM of the standardized residuals decides. A
TLS defect (T1 ÷ 5–20) is tens of standard deviations at once and fires on the first
refresh that sees it; slow wander rarely adds up to ``h`` because the EWMA follows it.

Per series, each refresh:

1. ``z = (y - mean) / max(sd, sd_floor)`` with ``y = log(value)``;
2. normal: ``S+ = max(0, S+ + z - k)``, ``S- = max(0, S- - z - k)``; an **event** ("rise"
   or "drop") fires when, after ``warmup`` samples, ``S+`` (``S-``) exceeds ``h`` *and* the
   value is at least ``min_factor`` times above (below) the mean: small but persistent
   shifts raise the score without paging anyone. Without an event the EWMA absorbs ``y``
   (its residual clipped at ``clip`` standard deviations, so that one big jump short of
   an event does not inflate the variance and slow the detection of the next) and the
   sums are held at ``h`` at most;
3. in alarm: the baseline is frozen (the anomaly must not become the new normal), and
   ``recover_samples`` refreshes in a row within ``recover_factor`` of it end the alarm
   ("recovered"); an alarm that lasts ``rebaseline_samples`` refreshes is accepted as a
   new level ("new_level") instead.

The state of all series of a device is kept in arrays and updated in one vectorised
step per refresh; ``tests/test_drift_detect.py`` checks it against a plain scalar
reference on random series.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ray_qalloc.monitor.calseries import QUANTITIES, SeriesKey, safe_log

EVENT_KINDS = ("rise", "drop", "recovered", "new_level")


class DetectorSettings(BaseModel):
    """Thresholds of the detector; the defaults are sized for refreshes every ~15 minutes."""

    model_config = ConfigDict(frozen=True)

    alpha: float = Field(0.1, gt=0, le=1, description="EWMA weight of a new sample.")
    k: float = Field(1.0, ge=0, description="CUSUM slack, in standard deviations.")
    h: float = Field(6.0, gt=0, description="CUSUM decision threshold, in standard deviations.")
    sd_floor: float = Field(0.05, gt=0, description="Smallest residual std assumed, in log units (5%).")
    min_factor: float = Field(2.0, gt=1, description="Smallest change (×) that is an event.")
    warmup: int = Field(4, ge=1, description="Samples of a series before it can raise an event.")
    recover_factor: float = Field(1.5, gt=1, description="Back within this factor of the baseline ...")
    recover_samples: int = Field(2, ge=1, description="... for this many refreshes in a row: recovered.")
    rebaseline_samples: int = Field(96, ge=2, description="An alarm this long is accepted as the new level.")
    clip: float = Field(3.0, gt=0, description="Residuals beyond this many std move the baseline only as far "
                                              "as this (Huber): a jump just under an event does not inflate "
                                              "the variance and hide the next one.")


@dataclass(frozen=True)
class DriftEvent:
    """Something a person should hear about: a sharp change of one quantity, or its end."""

    device: str
    key: SeriesKey
    kind: str                 # rise | drop | recovered | new_level
    at: float                 # the calibration time of the refresh that showed it
    factor: float             # value / baseline
    value: float
    baseline: float
    since: float | None = None  # recovered / new_level: when the alarm began

    @property
    def message(self) -> str:
        quantity = QUANTITIES.get(self.key.quantity)
        what = f"{self.key.element_label} {quantity.label if quantity else self.key.quantity}"
        when = format_time(self.at)
        if self.kind == "drop":
            return f"{what} dropped {1.0 / self.factor:.1f}× at {when}"
        if self.kind == "rise":
            return f"{what} rose {self.factor:.1f}× at {when}"
        lasted = f" after {format_duration(self.at - self.since)}" if self.since is not None else ""
        if self.kind == "recovered":
            return f"{what} recovered at {when}{lasted}"
        return f"{what} settled at a new level ({self.factor:.2g}× the old) at {when}{lasted}"


@dataclass(frozen=True)
class DriftScore:
    """Where one series stands: its last standardized residual, CUSUM (1 = threshold), alarm."""

    z: float
    cusum: float
    alarm: int                # +1 risen, -1 dropped, 0 normal
    since: float | None
    factor: float             # last value / baseline


def format_time(at: float) -> str:
    """UTC wall time for unix stamps; seconds for the small stamps of simulated clocks."""
    if at > 1e8:
        return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(at))
    return f"t={at:.0f}s"


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86_400:.1f} d"


class _Bank:
    """Detector state of every series of one device, one slot per series, in growing arrays."""

    _FIELDS = {"n": np.int64, "mean": float, "var": float, "s_pos": float, "s_neg": float,
               "alarm": np.int8, "alarm_at": float, "alarm_mean": float, "alarm_n": np.int64,
               "recover_n": np.int64, "z": float, "last": float}

    def __init__(self) -> None:
        self.index: dict[SeriesKey, int] = {}
        self.keys: list[SeriesKey] = []
        self.size = 0
        self.last_at = -math.inf
        self.arrays = {name: np.zeros(16, dtype=kind) for name, kind in self._FIELDS.items()}

    def slots(self, keys: Iterable[SeriesKey]) -> np.ndarray:
        out = []
        for key in keys:
            slot = self.index.get(key)
            if slot is None:
                slot = self.index[key] = len(self.keys)
                self.keys.append(key)
            out.append(slot)
        if len(self.keys) > len(self.arrays["n"]):
            grow = max(len(self.keys), 2 * len(self.arrays["n"]))
            for name, arr in self.arrays.items():
                bigger = np.zeros(grow, dtype=arr.dtype)
                bigger[:len(arr)] = arr
                self.arrays[name] = bigger
        return np.array(out, dtype=np.intp)


class DriftDetector:
    """EWMA + two-sided CUSUM per series, per device; events kept in a bounded log."""

    def __init__(self, settings: DetectorSettings | None = None, *, max_events: int = 10_000) -> None:
        self.settings = settings or DetectorSettings()
        self._banks: dict[str, _Bank] = {}
        self._events: deque[DriftEvent] = deque(maxlen=max_events)

    def update(self, device: str, at: float, values: Mapping[SeriesKey, float]) -> list[DriftEvent]:
        """Feed one refresh of ``device``; returns the events it raised. Older or repeated ``at``: ignored."""
        bank = self._banks.setdefault(device, _Bank())
        if at <= bank.last_at:
            return []
        bank.last_at = float(at)
        keys = [k for k, v in values.items() if v is not None and math.isfinite(v)]
        if not keys:
            return []
        idx = bank.slots(keys)
        y = safe_log([values[k] for k in keys])
        events = self._step(bank, device, float(at), idx, y)
        self._events.extend(events)
        return events

    def _step(self, bank: _Bank, device: str, at: float, idx: np.ndarray, y: np.ndarray) -> list[DriftEvent]:
        s, a = self.settings, bank.arrays
        n, mean, var = a["n"][idx], a["mean"][idx], a["var"][idx]
        s_pos, s_neg, alarm = a["s_pos"][idx], a["s_neg"][idx], a["alarm"][idx]
        alarm_at, alarm_mean = a["alarm_at"][idx], a["alarm_mean"][idx]
        alarm_n, recover_n = a["alarm_n"][idx], a["recover_n"][idx]

        first = n == 0
        base = np.where(alarm != 0, alarm_mean, mean)
        sd = np.maximum(np.sqrt(var), s.sd_floor)
        z = np.where(first, 0.0, (y - base) / sd)
        normal = (alarm == 0) & ~first
        up = np.maximum(0.0, s_pos + z - s.k)
        down = np.maximum(0.0, s_neg - z - s.k)
        big = math.log(s.min_factor)
        armed = normal & (n >= s.warmup)
        fire_up = armed & (up > s.h) & (y - mean >= big)
        fire_down = armed & (down > s.h) & (mean - y >= big) & ~fire_up
        fire = fire_up | fire_down

        in_alarm = (alarm != 0) & ~first
        back = np.abs(y - alarm_mean) < math.log(s.recover_factor)
        recover_n = np.where(in_alarm, np.where(back, recover_n + 1, 0), 0)
        alarm_n = np.where(in_alarm, alarm_n + 1, alarm_n)
        recovered = in_alarm & (recover_n >= s.recover_samples)
        new_level = in_alarm & ~recovered & (alarm_n >= s.rebaseline_samples)

        events: list[DriftEvent] = []
        for i in np.nonzero(fire | recovered | new_level)[0]:
            key = bank.keys[idx[i]]
            value = float(math.exp(y[i]))
            if fire[i]:
                kind, ref, since = ("rise" if fire_up[i] else "drop"), float(mean[i]), None
            else:
                kind = "recovered" if recovered[i] else "new_level"
                ref, since = float(alarm_mean[i]), float(alarm_at[i])
            events.append(DriftEvent(device, key, kind, at, math.exp(y[i] - ref), value, math.exp(ref), since))

        # EWMA: normal series without an event, and series that just left an alarm.
        ewma = (normal & ~fire) | recovered
        d = np.clip(y - mean, -s.clip * sd, s.clip * sd)
        new_mean = np.where(first, y, np.where(ewma, mean + s.alpha * d, mean))
        new_var = np.where(ewma, (1.0 - s.alpha) * (var + s.alpha * d * d), var)
        new_mean = np.where(new_level, y, new_mean)
        leaving = recovered | new_level
        a["n"][idx] = n + 1
        a["mean"][idx] = new_mean
        a["var"][idx] = new_var
        a["s_pos"][idx] = np.where(leaving | fire, 0.0, np.where(normal, np.minimum(up, s.h), s_pos))
        a["s_neg"][idx] = np.where(leaving | fire, 0.0, np.where(normal, np.minimum(down, s.h), s_neg))
        a["alarm"][idx] = np.where(fire_up, 1, np.where(fire_down, -1, np.where(leaving, 0, alarm)))
        a["alarm_at"][idx] = np.where(fire, at, alarm_at)
        a["alarm_mean"][idx] = np.where(fire, mean, alarm_mean)
        a["alarm_n"][idx] = np.where(fire, 1, np.where(leaving, 0, alarm_n))
        a["recover_n"][idx] = np.where(leaving | fire, 0, recover_n)
        a["z"][idx] = z
        a["last"][idx] = y
        return events

    # -- reading -----------------------------------------------------------------------------

    def scores(self, device: str) -> dict[SeriesKey, DriftScore]:
        bank = self._banks.get(device)
        if bank is None:
            return {}
        a, h = bank.arrays, self.settings.h
        out: dict[SeriesKey, DriftScore] = {}
        for key, i in bank.index.items():
            alarm = int(a["alarm"][i])
            base = a["alarm_mean"][i] if alarm else a["mean"][i]
            out[key] = DriftScore(z=float(a["z"][i]), cusum=float(max(a["s_pos"][i], a["s_neg"][i]) / h),
                                  alarm=alarm, since=float(a["alarm_at"][i]) if alarm else None,
                                  factor=float(math.exp(a["last"][i] - base)))
        return out

    def alarms(self, device: str) -> dict[SeriesKey, DriftScore]:
        """The series of ``device`` that are in alarm now."""
        return {k: v for k, v in self.scores(device).items() if v.alarm}

    def events(self, device: str | None = None, *, since: float | None = None) -> list[DriftEvent]:
        return [e for e in self._events if (device is None or e.device == device)
                and (since is None or e.at >= since)]

    def devices(self) -> list[str]:
        return sorted(self._banks)

    def last_at(self, device: str) -> float | None:
        bank = self._banks.get(device)
        return None if bank is None or bank.last_at == -math.inf else bank.last_at

    def replay(self, device: str, history: Iterable[tuple[float, Mapping[SeriesKey, float]]]) -> list[DriftEvent]:
        """Feed stored refreshes, oldest first (a restarted monitor, or the CLI, rebuilding state)."""
        out: list[DriftEvent] = []
        for at, values in history:
            out += self.update(device, at, values)
        return out


# ----------------------------------------------------------------------------- staleness


@dataclass(frozen=True)
class Staleness:
    """How old a device's calibration is, in seconds and in refresh periods."""

    device: str
    last_at: float | None
    age_s: float
    periods: float
    stale: bool

    @property
    def message(self) -> str:
        if self.last_at is None:
            return f"{self.device}: no calibration recorded"
        return (f"{self.device}: calibration {format_duration(self.age_s)} old "
                f"({self.periods:.1f} periods){' — stale' if self.stale else ''}")


def staleness(device: str, last_at: float | None, now: float, period_s: float, max_periods: float) -> Staleness:
    """Stale when the last calibration is older than ``max_periods`` refresh periods (or missing)."""
    if last_at is None:
        return Staleness(device, None, math.inf, math.inf, True)
    age = max(0.0, now - last_at)
    periods = age / period_s
    return Staleness(device, last_at, age, periods, periods > max_periods)
