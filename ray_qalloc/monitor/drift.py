"""A seeded drift model for emulated QPUs: calibration that wanders, and TLS defects that strike.

Why: a calibration snapshot never changes, so nothing downstream of it (the calibration
series, drift detection, staleness, noise-aware placement) can be exercised against it.
Real devices drift: T1 and T2 wander by tens of percent over hours, gate and readout
errors follow, and now and then a two-level-system defect couples to a qubit (or a
coupler) and its T1 collapses for a while. This module reproduces that, deterministically
from ``(device, seed, time)`` so that tests and benchmarks see the same device every run.

The model, per element of one device:

* **wander**: every quantity (T1, T2, readout error, single-qubit gate error per qubit,
  two-qubit gate error per coupler) is its snapshot value times ``exp(sigma * Z(t))``,
  where ``Z`` is a standardized Ornstein–Uhlenbeck process that starts at 0 (so at
  ``t = 0`` the device *is* its snapshot) with mean-reversion time ``tau``;
* **defects** (TLS-like): a Poisson process per qubit (per coupler) starts a defect with
  a log-uniform duration; on a qubit, T1 drops by a log-uniform factor (5–20× by
  default) and T2 is held under 2·T1; on a coupler, the two-qubit error grows by a factor.
* **errors follow coherence**: a gate's error is shifted by the change of its
  coherence-limited part (thermal relaxation over the gate's duration at the drifted T1
  and T2) and never falls below it; a readout error by the change in the chance that
  the qubit decays during readout. So a defect on a qubit makes its gates, its couplers'
  gates and its readout worse by amounts that follow from its T1 — no separate knobs.

Random access in time without storing a path: ``Z`` is generated on knots ``step_s``
apart, in chunks of ``chunk_steps`` knots. The chunk boundaries form an exact AR(1) chain
(one draw per boundary, cheap to extend), and a chunk's interior is an OU *bridge*
between its two boundaries drawn from the chunk's own random stream. Any ``t`` therefore
touches one chunk, and the value at ``t`` does not depend on which times were asked for
before. Between knots the value is interpolated linearly.

Pure functions carry the arithmetic (``ou_bridge``, ``coherence_limited_error``,
``drifted_error``, ...); ``DriftModel`` caches; ``apply_to_target`` is the only place that
touches Qiskit (imported lazily).
"""

from __future__ import annotations

import math
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ray_qalloc.exceptions import ConfigError
from ray_qalloc.monitor.keys import QUBIT_GATE_QUANTITIES, SeriesKey

if TYPE_CHECKING:  # pragma: no cover
    from qiskit.transpiler import Target

DAY_S = 86_400.0
HOUR_S = 3_600.0
# Snapshot errors at or above this mark broken couplers (1.0 in IBM snapshots): drift leaves them be.
BROKEN_ERROR = 0.5
_NOT_GATES = frozenset({"measure", "reset", "delay", "barrier"})
_STREAM_INTERIOR, _STREAM_BOUNDARY, _STREAM_QUBIT_DEFECTS, _STREAM_COUPLER_DEFECTS = 0, 1, 2, 3


# ----------------------------------------------------------------------------- settings


class Defect(BaseModel):
    """One TLS-like defect: on a qubit (``element=(q,)``) or a coupler (``element=(a, b)``).

    On a qubit, ``factor`` divides T1; on a coupler it multiplies the two-qubit gate error.
    """

    model_config = ConfigDict(frozen=True)

    element: tuple[int, ...] = Field(description="(q,) for a qubit, (a, b) with a < b for a coupler.")
    start_s: float = Field(ge=0, description="Seconds after the model's origin when it starts.")
    duration_s: float = Field(gt=0, description="How long it lasts, in seconds.")
    factor: float = Field(gt=1, description="T1 divisor (qubit) or 2q-error multiplier (coupler).")

    @model_validator(mode="after")
    def _shape(self) -> "Defect":
        if len(self.element) not in (1, 2) or (len(self.element) == 2 and self.element[0] >= self.element[1]):
            raise ValueError("element must be (q,) or (a, b) with a < b")
        return self

    @property
    def kind(self) -> str:
        return "qubit" if len(self.element) == 1 else "coupler"

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s

    def active(self, t: float) -> bool:
        return self.start_s <= t < self.end_s

    @property
    def label(self) -> str:
        return SeriesKey("t1", self.element).element_label


class DriftSettings(BaseModel):
    """How an emulated device drifts. Defaults: a plausible superconducting chip, ~one defect a week a qubit."""

    model_config = ConfigDict(frozen=True)

    seed: int = Field(0, ge=0, description="Seed of every random stream of the model.")
    step_s: float = Field(900.0, gt=0, description="Spacing of the wander's knots; also how often the "
                                                  "emulated device publishes a new calibration.")
    chunk_steps: int = Field(96, ge=2, description="Knots per generated chunk (one random stream each).")
    t1_sigma: float = Field(0.20, ge=0, description="Stationary std of log T1 (wander).")
    t1_tau_s: float = Field(8 * HOUR_S, gt=0, description="Mean-reversion time of log T1.")
    t2_sigma: float = Field(0.25, ge=0, description="Stationary std of log T2.")
    t2_tau_s: float = Field(6 * HOUR_S, gt=0, description="Mean-reversion time of log T2.")
    readout_sigma: float = Field(0.10, ge=0, description="Stationary std of log readout error.")
    readout_tau_s: float = Field(12 * HOUR_S, gt=0, description="Mean-reversion time of log readout error.")
    gate_1q_sigma: float = Field(0.15, ge=0, description="Stationary std of log single-qubit gate error.")
    gate_1q_tau_s: float = Field(8 * HOUR_S, gt=0, description="Mean-reversion time of log 1q gate error.")
    gate_2q_sigma: float = Field(0.15, ge=0, description="Stationary std of log two-qubit gate error.")
    gate_2q_tau_s: float = Field(8 * HOUR_S, gt=0, description="Mean-reversion time of log 2q gate error.")
    qubit_defect_rate_per_day: float = Field(0.15, ge=0, description="Defects starting per qubit per day.")
    coupler_defect_rate_per_day: float = Field(0.05, ge=0, description="Defects starting per coupler per day.")
    defect_duration_s: tuple[float, float] = Field((1800.0, 6 * HOUR_S),
                                                   description="Log-uniform range of a defect's duration.")
    defect_t1_factor: tuple[float, float] = Field((5.0, 20.0), description="Log-uniform range of T1's drop.")
    coupler_error_factor: tuple[float, float] = Field((3.0, 10.0),
                                                      description="Log-uniform range of a coupler's error rise.")
    error_cap: float = Field(BROKEN_ERROR, gt=0, le=1, description="Largest error drift may produce.")
    defects: tuple[Defect, ...] = Field((), description="Defects scheduled on top of the random ones "
                                                        "(benchmarks and tests that need one at a known place).")
    origin_s: float | None = Field(None, description="Clock reading at which drift time is 0 (None: when the "
                                                     "backend is built). Fix it so that a restarted actor, or "
                                                     "another process, sees the same device at the same time.")

    @model_validator(mode="after")
    def _ranges(self) -> "DriftSettings":
        for name in ("defect_duration_s", "defect_t1_factor", "coupler_error_factor"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high")
        if self.defect_t1_factor[0] <= 1 or self.coupler_error_factor[0] <= 1:
            raise ValueError("defect factors must be above 1")
        return self

    @property
    def chunk_s(self) -> float:
        return self.step_s * self.chunk_steps


# ----------------------------------------------------------------------------- baseline


@dataclass(frozen=True)
class DeviceBaseline:
    """The snapshot values drift is applied to, as arrays (NaN where the snapshot has none)."""

    num_qubits: int
    t1_s: np.ndarray
    t2_s: np.ndarray
    readout_error: np.ndarray
    readout_duration_s: np.ndarray
    gate_1q_error: Mapping[str, np.ndarray]          # op -> per-qubit error
    gate_1q_duration_s: Mapping[str, np.ndarray]
    couplers: tuple[tuple[int, int], ...]            # sorted pairs, sorted
    gate_2q_error: np.ndarray                        # best over directions and 2q ops, per coupler
    gate_2q_duration_s: np.ndarray
    # Every (2q op, direction) entry: each drifts with its own duration, a coupler reads as the best.
    entry_coupler: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.intp))
    entry_2q_error: np.ndarray = field(default_factory=lambda: np.zeros(0))
    entry_2q_duration_s: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @classmethod
    def from_target(cls, target: "Target") -> "DeviceBaseline":
        n = int(target.num_qubits)
        nan = float("nan")
        qprops = target.qubit_properties or [None] * n
        t1 = np.array([_num(getattr(p, "t1", None)) for p in qprops], dtype=float)
        t2 = np.array([_num(getattr(p, "t2", None)) for p in qprops], dtype=float)
        ro = np.full(n, nan)
        ro_d = np.full(n, nan)
        g1: dict[str, np.ndarray] = {}
        g1_d: dict[str, np.ndarray] = {}
        best: dict[tuple[int, int], tuple[float, float]] = {}
        entries: list[tuple[tuple[int, int], float, float]] = []
        for name in target.operation_names:
            if isinstance(target.operation_from_name(name), type) or name in ("reset", "delay", "barrier"):
                continue
            for qargs, props in target[name].items():
                if qargs is None or props is None:
                    continue
                if name == "measure":
                    ro[qargs[0]], ro_d[qargs[0]] = _num(props.error), _num(props.duration)
                elif len(qargs) == 1 and props.error is not None:
                    g1.setdefault(name, np.full(n, nan))[qargs[0]] = float(props.error)
                    g1_d.setdefault(name, np.full(n, nan))[qargs[0]] = _num(props.duration)
                elif len(qargs) == 2 and props.error is not None:
                    pair = (min(qargs), max(qargs))
                    entries.append((pair, float(props.error), _num(props.duration)))
                    if pair not in best or props.error < best[pair][0]:
                        best[pair] = (float(props.error), _num(props.duration))
        couplers = tuple(sorted(best))
        index = {c: i for i, c in enumerate(couplers)}
        return cls(num_qubits=n, t1_s=t1, t2_s=t2, readout_error=ro, readout_duration_s=ro_d,
                   gate_1q_error=g1, gate_1q_duration_s=g1_d, couplers=couplers,
                   gate_2q_error=np.array([best[c][0] for c in couplers], dtype=float),
                   gate_2q_duration_s=np.array([best[c][1] for c in couplers], dtype=float),
                   entry_coupler=np.array([index[e[0]] for e in entries], dtype=np.intp),
                   entry_2q_error=np.array([e[1] for e in entries], dtype=float),
                   entry_2q_duration_s=np.array([e[2] for e in entries], dtype=float))


def _num(value: float | None) -> float:
    return float(value) if value is not None else float("nan")


# ----------------------------------------------------------------------------- pure arithmetic


def ou_bridge(start: np.ndarray, end: np.ndarray, a: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Knots ``0..L`` of standardized OU paths pinned at ``start`` and ``end``.

    ``a`` is the one-step autocorrelation per path; ``normals`` (shape ``(L, S)``) drive a
    free path from ``start``, which is then conditioned on ending at ``end`` by adding
    ``(end - Y_L) * Cov(Y_k, Y_L) / Var(Y_L)`` — exact for a Gaussian process.
    """
    steps = normals.shape[0]
    path = np.empty((steps + 1, normals.shape[1]))
    path[0] = start
    noise = np.sqrt(1.0 - a * a)
    for k in range(1, steps + 1):
        path[k] = a * path[k - 1] + noise * normals[k - 1]
    k = np.arange(steps + 1, dtype=float)[:, None]
    weight = a ** (steps - k) * (1.0 - a ** (2.0 * k)) / (1.0 - a ** (2.0 * steps))
    return path + (end - path[steps]) * weight


def relaxation_process_fidelity(duration: np.ndarray | float, t1: np.ndarray | float,
                                t2: np.ndarray | float) -> np.ndarray:
    """Process fidelity of one qubit's thermal relaxation over ``duration`` (1 where T1/T2 unknown)."""
    d, t1, t2 = np.asarray(duration, float), np.asarray(t1, float), np.asarray(t2, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        f = (1.0 + 2.0 * np.exp(-d / t2) + np.exp(-d / t1)) / 4.0
    return np.where(np.isfinite(f) & (d > 0), f, 1.0)


def coherence_limited_error(duration: np.ndarray | float, t1s: Sequence[np.ndarray | float],
                            t2s: Sequence[np.ndarray | float]) -> np.ndarray:
    """Average gate error that relaxation alone causes on ``len(t1s)`` qubits: (D/(D+1))(1 - ΠF)."""
    fidelity = np.ones_like(np.asarray(duration, float))
    for t1, t2 in zip(t1s, t2s):
        fidelity = fidelity * relaxation_process_fidelity(duration, t1, t2)
    dim = 2 ** len(t1s)
    return dim / (dim + 1.0) * (1.0 - fidelity)


def readout_decay_error(duration: np.ndarray | float, t1: np.ndarray | float) -> np.ndarray:
    """Readout error from T1 decay: |1> decays before mid-integration; averaged over |0>, |1>."""
    d, t1 = np.asarray(duration, float), np.asarray(t1, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = 0.5 * (1.0 - np.exp(-d / (2.0 * t1)))
    return np.where(np.isfinite(p) & (d > 0), p, 0.0)


def drifted_error(e0: np.ndarray | float, scale: np.ndarray | float, limit0: np.ndarray | float,
                  limit1: np.ndarray | float, cap: float) -> np.ndarray:
    """``e0 * scale`` shifted by the change of its coherence limit (``limit0 -> limit1``).

    Never below the new limit (a gate cannot beat relaxation) unless the snapshot itself
    was (then never below ``e0 * scale``: at zero drift the snapshot comes back exactly);
    never above ``cap``; broken entries (``e0 >= BROKEN_ERROR``) and unknown ones pass through.
    """
    e0 = np.asarray(e0, float)
    scaled = e0 * scale
    value = np.maximum(scaled + (limit1 - limit0), np.minimum(limit1, scaled))
    value = np.clip(value, 0.0, cap)
    return np.where(np.isfinite(e0) & (e0 < BROKEN_ERROR), value, e0)


def log_uniform(rng: np.random.Generator, bounds: tuple[float, float], size: int) -> np.ndarray:
    lo, hi = bounds
    return np.exp(rng.uniform(math.log(lo), math.log(hi), size))


def random_defects(rng: np.random.Generator, elements: Sequence[tuple[int, ...]], rate_per_s: float,
                   window: tuple[float, float], durations: tuple[float, float],
                   factors: tuple[float, float]) -> list[Defect]:
    """Defects starting in ``window``: Poisson count, uniform element and start, log-uniform rest."""
    if not elements or rate_per_s <= 0:
        return []
    lo, hi = window
    count = int(rng.poisson(rate_per_s * (hi - lo) * len(elements)))
    which = rng.integers(0, len(elements), size=count)
    starts = lo + rng.random(count) * (hi - lo)
    lengths = log_uniform(rng, durations, count)
    sizes = log_uniform(rng, factors, count)
    return [Defect(element=tuple(elements[int(w)]), start_s=float(s), duration_s=float(d), factor=float(f))
            for w, s, d, f in zip(which, starts, lengths, sizes)]


# ----------------------------------------------------------------------------- state


@dataclass(frozen=True)
class DriftState:
    """The device at one time: absolute values, and the factors that map the snapshot onto them."""

    t: float
    t1_s: np.ndarray
    t2_s: np.ndarray
    readout_error: np.ndarray
    gate_1q_error: Mapping[str, np.ndarray]
    couplers: tuple[tuple[int, int], ...]
    gate_2q_error: np.ndarray
    readout_scale: np.ndarray
    gate_1q_scale: np.ndarray
    gate_2q_scale: np.ndarray                    # wander times coupler defects, per coupler
    defects: tuple[Defect, ...] = ()
    error_cap: float = BROKEN_ERROR
    coupler_index: Mapping[tuple[int, int], int] = field(default_factory=dict, repr=False)

    def samples(self) -> dict[SeriesKey, float]:
        """The values a calibration series records for this state (finite ones only)."""
        out: dict[SeriesKey, float] = {}
        for quantity, values in (("t1", self.t1_s), ("t2", self.t2_s), ("readout_error", self.readout_error)):
            for q, v in enumerate(values):
                if math.isfinite(v):
                    out[SeriesKey(quantity, (q,))] = float(v)
        for op, quantity in QUBIT_GATE_QUANTITIES.items():
            for q, v in enumerate(self.gate_1q_error.get(op, ())):
                if math.isfinite(v):
                    out[SeriesKey(quantity, (q,))] = float(v)
        for pair, v in zip(self.couplers, self.gate_2q_error):
            if math.isfinite(v):
                out[SeriesKey("gate_2q_error", pair)] = float(v)
        return out


# ----------------------------------------------------------------------------- model


class DriftModel:
    """Drift of one device: ``state_at(t)`` is a pure function of ``(device, settings, t)``.

    Caches (chunk paths, chunk boundaries, defect windows) only save work; they are guarded
    by a lock so that a backend's threads may share one model.
    """

    _CHUNK_CACHE = 4
    _WINDOW_CACHE = 256

    def __init__(self, baseline: DeviceBaseline, settings: DriftSettings, device: str) -> None:
        self.baseline = baseline
        self.settings = settings
        self.device = device
        n, m = baseline.num_qubits, len(baseline.couplers)
        self._n, self._m = n, m
        self._coupler_index = {c: i for i, c in enumerate(baseline.couplers)}
        s = settings
        taus = np.concatenate([np.full(n, s.t1_tau_s), np.full(n, s.t2_tau_s), np.full(n, s.readout_tau_s),
                               np.full(n, s.gate_1q_tau_s), np.full(m, s.gate_2q_tau_s)])
        self._sigma = np.concatenate([np.full(n, s.t1_sigma), np.full(n, s.t2_sigma),
                                      np.full(n, s.readout_sigma), np.full(n, s.gate_1q_sigma),
                                      np.full(m, s.gate_2q_sigma)])
        self._a = np.exp(-s.step_s / taus)
        self._a_chunk = self._a ** s.chunk_steps
        self._device_key = zlib.crc32(device.encode())
        self._boundaries: list[np.ndarray] = [np.zeros(len(taus))]
        self._chunks: OrderedDict[int, np.ndarray] = OrderedDict()
        self._windows: OrderedDict[int, tuple[Defect, ...]] = OrderedDict()
        self._lock = threading.Lock()
        # Broken couplers (error already at BROKEN_ERROR) cannot get worse: no defects drawn there.
        self._live_couplers = [c for c, e in zip(baseline.couplers, baseline.gate_2q_error) if e < BROKEN_ERROR]
        for d in s.defects:
            self._check_element(d.element)

    @classmethod
    def for_target(cls, target: "Target", settings: DriftSettings, device: str) -> "DriftModel":
        return cls(DeviceBaseline.from_target(target), settings, device)

    def _check_element(self, element: tuple[int, ...]) -> None:
        ok = element[0] < self._n if len(element) == 1 else tuple(element) in self._coupler_index
        if not ok:
            raise ConfigError(f"scheduled defect on {element} does not exist on {self.device}.",
                              fix=f"use a qubit below {self._n} or one of the device's couplers (a < b).")
        if len(element) == 2 and tuple(element) not in self._live_couplers:
            raise ConfigError(f"scheduled defect on coupler {element} of {self.device}, which is broken already.",
                              fix="choose a working coupler (its two-qubit error below 0.5).")

    # -- random streams ----------------------------------------------------------------------

    def _rng(self, stream: int, index: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.settings.seed, self._device_key,
                                                             stream, index]))

    def _boundary(self, c: int) -> np.ndarray:
        """Standardized values at the start of chunk ``c`` (an exact AR(1) chain from 0)."""
        with self._lock:
            while len(self._boundaries) <= c:
                i = len(self._boundaries) - 1
                eps = self._rng(_STREAM_BOUNDARY, i).standard_normal(len(self._a))
                prev = self._boundaries[i]
                self._boundaries.append(self._a_chunk * prev + np.sqrt(1.0 - self._a_chunk ** 2) * eps)
            return self._boundaries[c]

    def _chunk(self, c: int) -> np.ndarray:
        with self._lock:
            hit = self._chunks.get(c)
            if hit is not None:
                self._chunks.move_to_end(c)
                return hit
        start, end = self._boundary(c), self._boundary(c + 1)
        normals = self._rng(_STREAM_INTERIOR, c).standard_normal((self.settings.chunk_steps, len(self._a)))
        path = ou_bridge(start, end, self._a, normals)
        with self._lock:
            self._chunks[c] = path
            while len(self._chunks) > self._CHUNK_CACHE:
                self._chunks.popitem(last=False)
        return path

    def standardized(self, t: float) -> np.ndarray:
        """The OU values (unit stationary variance) of every series at ``t``, interpolated between knots."""
        knots = max(0.0, float(t)) / self.settings.step_s
        steps = self.settings.chunk_steps
        c = int(knots // steps)
        j = knots - c * steps
        i = min(int(j), steps - 1)
        frac = j - i
        path = self._chunk(c)
        return path[i] * (1.0 - frac) + path[i + 1] * frac

    # -- defects -----------------------------------------------------------------------------

    def _window(self, w: int) -> tuple[Defect, ...]:
        with self._lock:
            hit = self._windows.get(w)
            if hit is not None:
                self._windows.move_to_end(w)
                return hit
        s = self.settings
        span = (w * s.chunk_s, (w + 1) * s.chunk_s)
        qubits = [(q,) for q in range(self._n)]
        found = random_defects(self._rng(_STREAM_QUBIT_DEFECTS, w), qubits, s.qubit_defect_rate_per_day / DAY_S,
                               span, s.defect_duration_s, s.defect_t1_factor)
        found += random_defects(self._rng(_STREAM_COUPLER_DEFECTS, w), self._live_couplers,
                                s.coupler_defect_rate_per_day / DAY_S, span, s.defect_duration_s,
                                s.coupler_error_factor)
        out = tuple(sorted(found, key=lambda d: d.start_s))
        with self._lock:
            self._windows[w] = out
            while len(self._windows) > self._WINDOW_CACHE:
                self._windows.popitem(last=False)
        return out

    def defects_between(self, start: float, end: float) -> list[Defect]:
        """Every defect (random and scheduled) that starts in ``[start, end)``, by start time."""
        s = self.settings
        found = [d for d in s.defects if start <= d.start_s < end]
        for w in range(max(0, int(start // s.chunk_s)), int(max(start, end) // s.chunk_s) + 1):
            found += [d for d in self._window(w) if start <= d.start_s < end]
        return sorted(found, key=lambda d: (d.start_s, d.element))

    def active_defects(self, t: float) -> tuple[Defect, ...]:
        longest = max([self.settings.defect_duration_s[1]] + [d.duration_s for d in self.settings.defects])
        return tuple(d for d in self.defects_between(max(0.0, t - longest), t + 1e-9) if d.active(t))

    # -- state -------------------------------------------------------------------------------

    def state_at(self, t: float) -> DriftState:
        """The device ``t`` seconds after the origin (before it: the snapshot)."""
        t = max(0.0, float(t))
        b, n, m = self.baseline, self._n, self._m
        log_scale = self._sigma * self.standardized(t)
        t1_scale, t2_scale = np.exp(log_scale[:n]), np.exp(log_scale[n:2 * n])
        ro_scale, g1_scale = np.exp(log_scale[2 * n:3 * n]), np.exp(log_scale[3 * n:4 * n])
        g2_scale = np.exp(log_scale[4 * n:4 * n + m])
        defects = self.active_defects(t)
        t1_drop = np.ones(n)
        for d in defects:
            if d.kind == "qubit":
                t1_drop[d.element[0]] *= d.factor
            else:
                g2_scale[self._coupler_index[d.element]] *= d.factor
        t1 = b.t1_s * t1_scale / t1_drop
        t2 = b.t2_s * t2_scale
        t2 = np.where(t1_drop > 1.0, np.minimum(t2, 2.0 * t1), t2)
        cap = self.settings.error_cap
        readout = drifted_error(b.readout_error, ro_scale, readout_decay_error(b.readout_duration_s, b.t1_s),
                                readout_decay_error(b.readout_duration_s, t1), cap)
        gate_1q = {op: drifted_error(err, g1_scale,
                                     coherence_limited_error(b.gate_1q_duration_s[op], [b.t1_s], [b.t2_s]),
                                     coherence_limited_error(b.gate_1q_duration_s[op], [t1], [t2]), cap)
                   for op, err in b.gate_1q_error.items()}
        gate_2q = np.full(m, np.inf)
        if m:
            # Per entry (op, direction), as apply_to_target drifts the Target; a coupler is its best entry.
            e = b.entry_coupler
            a_idx = np.array([c[0] for c in b.couplers])[e]
            b_idx = np.array([c[1] for c in b.couplers])[e]
            d2 = b.entry_2q_duration_s
            drifted = drifted_error(
                b.entry_2q_error, g2_scale[e],
                coherence_limited_error(d2, [b.t1_s[a_idx], b.t1_s[b_idx]], [b.t2_s[a_idx], b.t2_s[b_idx]]),
                coherence_limited_error(d2, [t1[a_idx], t1[b_idx]], [t2[a_idx], t2[b_idx]]), cap)
            np.minimum.at(gate_2q, e, drifted)
        return DriftState(t=t, t1_s=t1, t2_s=t2, readout_error=readout, gate_1q_error=gate_1q,
                          couplers=b.couplers, gate_2q_error=gate_2q, readout_scale=ro_scale,
                          gate_1q_scale=g1_scale, gate_2q_scale=g2_scale, defects=defects,
                          error_cap=cap, coupler_index=self._coupler_index)


# ----------------------------------------------------------------------------- Qiskit edge


def apply_to_target(target: "Target", baseline: DeviceBaseline, state: DriftState) -> "Target":
    """A new ``Target`` with ``state``'s T1/T2 and every instruction's error drifted the same way.

    Each (operation, qubits) entry is drifted by the same rule as ``DriftState``'s
    representative values (``drifted_error``), so the calibration read back from the new
    target agrees with ``state.samples()``; durations and everything else are kept.
    """
    from qiskit.providers import QubitProperties
    from qiskit.transpiler import InstructionProperties, Target

    old_q = target.qubit_properties
    qubit_properties = None
    if old_q:
        qubit_properties = [
            None if p is None else QubitProperties(
                t1=float(state.t1_s[i]) if p.t1 is not None else None,
                t2=float(state.t2_s[i]) if p.t2 is not None else None, frequency=p.frequency)
            for i, p in enumerate(old_q)]
    out = Target(description=target.description, num_qubits=target.num_qubits, dt=target.dt,
                 granularity=target.granularity, min_length=target.min_length,
                 pulse_alignment=target.pulse_alignment, acquire_alignment=target.acquire_alignment,
                 qubit_properties=qubit_properties, concurrent_measurements=target.concurrent_measurements)
    b, cap = baseline, state.error_cap
    for name in target.operation_names:
        op = target.operation_from_name(name)
        props = target[name]
        if isinstance(op, type) or not props or None in props:
            out.add_instruction(op, name=name)
            continue
        new: dict[tuple[int, ...], InstructionProperties | None] = {}
        for qargs, p in props.items():
            if p is None or p.error is None or name in ("reset", "delay", "barrier"):
                new[qargs] = p
                continue
            d = float(p.duration or 0.0)
            if name == "measure":
                q = qargs[0]
                err = drifted_error(p.error, state.readout_scale[q], readout_decay_error(d, b.t1_s[q]),
                                    readout_decay_error(d, state.t1_s[q]), cap)
            elif len(qargs) == 1:
                q = qargs[0]
                err = drifted_error(p.error, state.gate_1q_scale[q],
                                    coherence_limited_error(d, [b.t1_s[q]], [b.t2_s[q]]),
                                    coherence_limited_error(d, [state.t1_s[q]], [state.t2_s[q]]), cap)
            elif len(qargs) == 2:
                x, y = qargs
                scale = state.gate_2q_scale[state.coupler_index[(min(x, y), max(x, y))]]
                err = drifted_error(p.error, scale,
                                    coherence_limited_error(d, [b.t1_s[x], b.t1_s[y]], [b.t2_s[x], b.t2_s[y]]),
                                    coherence_limited_error(d, [state.t1_s[x], state.t1_s[y]],
                                                            [state.t2_s[x], state.t2_s[y]]), cap)
            else:
                new[qargs] = p
                continue
            new[qargs] = InstructionProperties(duration=p.duration, error=float(err))
        out.add_instruction(op, new, name=name)
    return out

