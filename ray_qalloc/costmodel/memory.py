"""Memory of what ran: a measured runtime beats a prediction for a circuit seen before.

Why: a model is wrong on circuits unlike its training data, and a wrong simulation method
costs 100-1000× (NOTES.md: quantum volume 18 took > 20 s on MPS, predicted ~1 s; 0.22 s as a
statevector). The allocator must not pay for that more than once. So every completed run is
remembered by circuit (content hash) and *variant* (kind, method, threads: what decides a
runtime, not which pool ran it), and so is every overrun at once, as a censored lower bound
("at least this long"), before the run ends or is stopped. The next job of that circuit then
gets the measured runtime instead of the model's guess, and goes elsewhere after an overrun.

What a lookup answers, on one variant:

* **exact** (same circuit key): the median of the measured runtimes (robust to one run slowed
  by load), spread ``EXACT_LOG_SD`` or the observations' own spread if larger;
* **censored** (same key, only overruns, or an overrun longer than the typical run): at least
  the largest bound. Only bounds: ``CENSORED_FACTOR`` × the bound, since a heavy-tailed run
  (power law, α ≈ 1) that has lasted ``b`` has median total ``2b``, with the large spread
  ``CENSORED_LOG_SD``. A bound never lowers the model's prediction, and no answer is ever
  below a remembered bound;
* **neighbour** (no run of this circuit on this variant): the nearest remembered circuit of
  about the same width, within ``NEIGHBOUR_MAX_DISTANCE`` in a scale-free feature space
  (``feature_point``), lends its ratio actual/predicted (or its censored ratio, as a lower
  bound) to this job's prediction, with a spread that grows with the distance.

Bounded and cheap: at most ``max_entries`` (circuit, variant) records, least recently used
dropped first; each keeps its last ``MAX_OBSERVATIONS`` outcomes (so an old overrun ages out);
neighbours are searched only among the ``NEIGHBOUR_BUCKET`` most recent circuits of each
(variant, width) bucket, widths within ``NEIGHBOUR_QUBITS``: an exact hit is one dictionary
lookup, a neighbour search a few dozen ``math.dist`` calls. QPU runs are never remembered
(their time is modelled from calibration, and a QPU job is never hedged or re-run for speed).
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from typing import Any, Hashable, Mapping, Sequence

from ray_qalloc.backends.base import BackendSpec
from ray_qalloc.placement.model import BackendView, Estimate, JobView

#: Spread of a runtime measured on this very circuit and variant: run-to-run noise from load,
#: caches and transpilation (a few tens of percent on a shared 2-core machine).
EXACT_LOG_SD = 0.15
#: A run that lasted ``b`` and has not ended is expected to take ``CENSORED_FACTOR·b`` in all
#: (median of a power-law tail with α = 1, given survival to b).
CENSORED_FACTOR = 2.0
#: Spread around that: the total could be just past the bound or never end (×2.7 at one sd).
CENSORED_LOG_SD = 1.0
#: Outcomes kept per (circuit, variant): enough for a robust median, few enough that a stale
#: overrun (a machine that was loaded then) ages out.
MAX_OBSERVATIONS = 9
#: Neighbour search: widths within this many qubits, ...
NEIGHBOUR_QUBITS = 1
#: ... the most recent circuits of each (variant, width), ...
NEIGHBOUR_BUCKET = 32
#: ... nearer than this in ``feature_point`` units (1 unit: clearly another kind of circuit).
NEIGHBOUR_MAX_DISTANCE = 0.5
#: Extra log_sd per unit of distance: a neighbour's ratio is a guess about this circuit.
NEIGHBOUR_LOG_SD_PER_UNIT = 1.0
#: A neighbour's ratio is data and is transferred whole; this only guards against a corrupt
#: record. Not smaller: the prior's MPS formula calls QFT-23 ~10⁴ s where it runs in 0.03 s,
#: a ratio of 10⁻⁵·⁷, and correcting exactly such errors is what memory is for.
MAX_LOG_RATIO = math.log(1e8)
DEFAULT_MAX_ENTRIES = 20_000

_QUBIT_SCALE = 8.0   # 8 qubits wider = 1 unit
_LOG2_SCALE = 2.0    # 4× the gates or the depth = 1 unit
_FRACTION_SCALE = 0.5  # a fraction (two-qubit share, graph density, Clifford share) off by 0.5 = 1 unit


def variant_of(spec: BackendSpec) -> str | None:
    """What decides a simulator run's time: kind (CPU/GPU), method and threads; None for QPUs.

    Candidates of the same method and threads on different pools share a variant: a circuit
    measured on one node's pool tells about the same method on another's.
    """
    if spec.kind == "qpu":
        return None
    gpu = spec.family == "gpu" or spec.device == "GPU" or spec.name.endswith("_gpu")
    return f"{'gpu' if gpu else 'cpu'}:{spec.method or 'other'}@{max(int(spec.threads), 1)}"


def _f(features: Mapping[str, float], key: str, default: float = 0.0) -> float:
    value = features.get(key, default)
    return default if value is None or value != value else float(value)


def feature_point(num_qubits: int, features: Mapping[str, float]) -> tuple[float, ...]:
    """A circuit as a point in a normalised, scale-free space (Euclidean distance in units).

    Coordinates: width; log2 of gate count and of depth (a size *ratio* matters, not a
    difference); the share of two-qubit gates; log2 of the gates crossing the busiest cut and
    the density of the interaction graph (how much entanglement it can build: what decides MPS);
    the Clifford share (what decides the stabilizer method). Each scaled so that 1 unit is a
    clearly different circuit.
    """
    n = max(int(num_qubits), 1)
    size = max(_f(features, "size"), 0.0)
    depth = max(_f(features, "depth"), 0.0)
    gates = max(size, 1.0)
    pairs = max(n * (n - 1) / 2.0, 1.0)
    return (
        n / _QUBIT_SCALE,
        math.log2(1.0 + size) / _LOG2_SCALE,
        math.log2(1.0 + depth) / _LOG2_SCALE,
        min(_f(features, "two_qubit_count") / gates, 1.0) / _FRACTION_SCALE,
        math.log2(1.0 + max(_f(features, "cut_max"), 0.0)) / _LOG2_SCALE,
        min(_f(features, "interaction_edges") / pairs, 1.0) / _FRACTION_SCALE,
        min(max(_f(features, "clifford_fraction", 1.0), 0.0), 1.0) / _FRACTION_SCALE,
    )


@dataclass(frozen=True)
class Recall:
    """What memory says of one job on one variant."""

    runtime_s: float       # median runtime to use instead of the prediction
    log_sd: float          # its spread
    source: str            # memory:exact | memory:censored | memory:neighbour | memory:neighbour-censored
    at_least_s: float = 0.0   # the censored lower bound it respects (0: none known)
    distance: float = 0.0     # feature distance to the circuit it came from (0: this one)


@dataclass
class _Record:
    variant: str
    ident: Hashable
    num_qubits: int
    point: tuple[float, ...]
    # (seconds, censored, log(seconds / predicted) or None, run id or None), newest last
    events: deque[tuple[float, bool, float | None, str | None]] = field(
        default_factory=lambda: deque(maxlen=MAX_OBSERVATIONS))

    def add(self, seconds: float, censored: bool, ratio: float | None, run_id: str | None) -> None:
        """Append an outcome; one run keeps one event (its overrun bound grows, its end replaces it)."""
        if run_id is not None:
            for i, (s, c, _, rid) in enumerate(self.events):
                if rid == run_id:
                    if c and (not censored or seconds > s):
                        self.events[i] = (seconds, censored, ratio, run_id)
                    return
        self.events.append((seconds, censored, ratio, run_id))

    def times(self) -> list[float]:
        return [s for s, c, _, _ in self.events if not c]

    def bound(self) -> float:
        return max((s for s, c, _, _ in self.events if c), default=0.0)

    def ratios(self) -> list[float]:
        return [r for _, c, r, _ in self.events if not c and r is not None]

    def bound_ratio(self) -> float | None:
        return max((r for _, c, r, _ in self.events if c and r is not None), default=None)

    @property
    def transferable(self) -> bool:
        return any(r is not None for _, _, r, _ in self.events)


def _log_spread(values: Sequence[float], floor: float) -> float:
    """Sample sd of ``values`` (already logs), at least ``floor``. In floats: ``statistics.stdev``
    sums exactly in fractions, ~30 µs a call, on every plan of a remembered circuit."""
    n = len(values)
    if n < 2:
        return floor
    mean = math.fsum(values) / n
    return max(floor, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)))


class RunMemory:
    """Bounded memory of measured and censored runs per (circuit, variant). Not thread-safe:
    the allocator (one actor) and the simulator each own one."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries={max_entries} must be at least 1. To fix: pass a positive bound.")
        self.max_entries = int(max_entries)
        self._records: OrderedDict[tuple[str, Hashable], _Record] = OrderedDict()
        self._buckets: dict[tuple[str, int], OrderedDict[Hashable, _Record]] = {}

    def __len__(self) -> int:
        return len(self._records)

    # -- writing --------------------------------------------------------------------------
    def record(self, variant: str, circuit_key: str | None, num_qubits: int, features: Mapping[str, float],
               seconds: float, *, censored: bool = False, predicted_s: float | None = None,
               run_id: str | None = None, point: tuple[float, ...] | None = None) -> None:
        """One outcome: a completed run of ``seconds``, or (``censored``) one that has run at least
        that long (an overrun, or a run stopped before its end). ``predicted_s`` is the model's
        prediction for it (what a neighbour's ratio is taken against); without one the record
        serves exact lookups only. A circuit without a key is kept for neighbour searches only.
        ``run_id`` (the job id) makes repeated reports of one run one event: an overrun reported
        at every pass raises its bound, and its completion replaces the bound.
        """
        if not (seconds > 0 and math.isfinite(seconds)):
            return
        ident: Hashable = circuit_key if circuit_key is not None else ("features", point
                                                                      or feature_point(num_qubits, features))
        rec = self._records.get((variant, ident))
        if rec is None:
            rec = _Record(variant, ident, int(num_qubits), point or feature_point(num_qubits, features))
            self._records[(variant, ident)] = rec
            while len(self._records) > self.max_entries:
                _, old = self._records.popitem(last=False)
                bucket = self._buckets.get((old.variant, old.num_qubits))
                if bucket is not None:
                    bucket.pop(old.ident, None)
        else:
            self._records.move_to_end((variant, ident))
        ratio = None
        if predicted_s is not None and predicted_s > 0 and math.isfinite(predicted_s):
            ratio = math.log(seconds / predicted_s)
        rec.add(float(seconds), bool(censored), ratio, run_id)
        bucket = self._buckets.setdefault((variant, rec.num_qubits), OrderedDict())
        bucket[ident] = rec
        bucket.move_to_end(ident)
        while len(bucket) > NEIGHBOUR_BUCKET:
            bucket.popitem(last=False)

    # -- reading --------------------------------------------------------------------------
    def lookup(self, variant: str, circuit_key: str | None, num_qubits: int, features: Mapping[str, float],
               predicted_s: float | None = None, *, point: tuple[float, ...] | None = None,
               near: dict[str, tuple[_Record, float] | None] | None = None) -> Recall | None:
        """What memory knows of this circuit on ``variant``; None: nothing (keep the prediction).

        ``predicted_s`` (the model's prediction) is needed for censored answers, which never go
        below it, and for neighbours, whose ratio scales it. ``near`` caches the neighbour
        search per variant across the backends of one job (pools share variants)."""
        if circuit_key is not None:
            rec = self._records.get((variant, circuit_key))
            if rec is not None:
                self._records.move_to_end((variant, circuit_key))
                return _exact(rec, predicted_s)
        if predicted_s is None or not (predicted_s > 0 and math.isfinite(predicted_s)):
            return None
        if near is not None and variant in near:
            found = near[variant]
        else:
            found = self._nearest(variant, num_qubits, point or feature_point(num_qubits, features), circuit_key)
            if near is not None:
                near[variant] = found
        return None if found is None else _transfer(found[0], found[1], predicted_s)

    def _nearest(self, variant: str, num_qubits: int, point: tuple[float, ...],
                 skip: Hashable) -> tuple[_Record, float] | None:
        best: _Record | None = None
        best_d = NEIGHBOUR_MAX_DISTANCE
        dist = math.dist
        buckets = self._buckets
        for n in range(num_qubits - NEIGHBOUR_QUBITS, num_qubits + NEIGHBOUR_QUBITS + 1):
            bucket = buckets.get((variant, n))
            if not bucket:
                continue
            for ident, rec in bucket.items():
                if ident == skip:
                    continue
                d = dist(point, rec.point)
                if d <= best_d and rec.transferable:
                    best, best_d = rec, d
        return None if best is None else (best, best_d)


def _exact(rec: _Record, predicted_s: float | None) -> Recall | None:
    times = rec.times()
    bound = rec.bound()
    if times:
        median = statistics.median(times)
        if median >= bound:
            sd = _log_spread([math.log(t) for t in times], EXACT_LOG_SD)
            return Recall(median, sd, "memory:exact", bound)
        # an overrun longer than the typical run: at least that long, whatever the others did
        return Recall(bound, CENSORED_LOG_SD, "memory:censored", bound)
    if bound <= 0:
        return None
    at_least = CENSORED_FACTOR * bound
    if predicted_s is not None and predicted_s >= at_least:
        # the prediction already says longer: it stands, but the estimate says that this
        # variant already ran this circuit (it lost a race, or was cut short): "memory:bounded"
        return Recall(predicted_s, 0.0, "memory:bounded", bound)
    return Recall(at_least, CENSORED_LOG_SD, "memory:censored", bound)


def _transfer(rec: _Record, distance: float, predicted_s: float) -> Recall | None:
    """Scale this job's prediction by a neighbour's ratio actual/predicted."""
    extra = NEIGHBOUR_LOG_SD_PER_UNIT * distance
    ratios = rec.ratios()
    bound_ratio = rec.bound_ratio()
    if ratios:
        med = statistics.median(ratios)
        if bound_ratio is None or med >= bound_ratio:
            med = min(max(med, -MAX_LOG_RATIO), MAX_LOG_RATIO)
            return Recall(predicted_s * math.exp(med), _log_spread(ratios, EXACT_LOG_SD) + extra,
                          "memory:neighbour", 0.0, distance)
        factor = 1.0              # an overrun longer than its typical run: at least that (as _exact)
    elif bound_ratio is not None:
        factor = CENSORED_FACTOR  # only overruns: twice the bound (as _exact)
    else:
        return None
    runtime = factor * predicted_s * math.exp(min(bound_ratio, MAX_LOG_RATIO))
    if runtime <= predicted_s:
        return None               # the neighbour was stopped before our prediction: says nothing
    return Recall(runtime, CENSORED_LOG_SD + extra, "memory:neighbour-censored", 0.0, distance)


_SHOWN_SIZE = 4096   # (backend, shown runtime) -> base prediction, for observe() and remember()


class MemoryPredictor:
    """A Predictor that asks ``base`` once, then lets ``memory`` override what it knows better.

    The allocator calls ``remember`` when a run completes, and at once when one overruns
    (``hedging.overrun_bound``), so the next job of that circuit is placed on what happened.
    ``observe`` (online correction) is forwarded to ``base`` with *base's* own prediction, so
    an override never teaches the model a residual against a number it did not make.
    Everything else (``source``, ``correction``, ``explorations``, ...) is the base's.
    """

    def __init__(self, base: Any, memory: RunMemory | None = None) -> None:
        self.base = base
        self.memory = memory if memory is not None else RunMemory()
        # (backend, runtime shown) -> (base's runtime shown, base's honest runtime), for the
        # estimates that differ from the base's honest prediction (memory overrides, explorations)
        self._shown: OrderedDict[tuple[str, float], tuple[float, float]] = OrderedDict()

    def __getattr__(self, name: str) -> Any:
        if name in ("base", "memory", "_shown"):   # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)

    def predict(self, job: JobView, backends: Sequence[BackendView]) -> list[Estimate]:
        estimates = self.base.predict(job, backends)
        if not self.memory._records:
            self._note_explorations(estimates)
            return estimates
        specs = {b.name: b.spec for b in backends}
        point: tuple[float, ...] | None = None
        near: dict[str, tuple[_Record, float] | None] = {}
        out: list[Estimate] = []
        for est in estimates:
            spec = specs.get(est.backend)
            variant = variant_of(spec) if spec is not None else None
            if variant is None:
                out.append(est)
                continue
            if point is None:
                point = feature_point(job.num_qubits, job.features)
            honest = self._honest(est)
            hit = self.memory.lookup(variant, job.circuit_key, job.num_qubits, job.features, honest,
                                     point=point, near=near)
            if hit is None:
                self._note_explorations([est])
                out.append(est)
                continue
            if hit.source == "memory:bounded":    # the prediction stands; only its source says more
                out.append(replace(est, source=hit.source))
                continue
            shown = replace(est, runtime_s=hit.runtime_s, log_sd=hit.log_sd, source=hit.source,
                            cost=spec.price.cost(hit.runtime_s, job.shots) if spec is not None else est.cost)
            self._note(est.backend, hit.runtime_s, est.runtime_s, honest)
            out.append(shown)
        return out

    def observe(self, backend: str, predicted_s: float, actual_s: float) -> None:
        """Online correction, forwarded to the base with the prediction *it* made."""
        observe = getattr(self.base, "observe", None)
        if observe is None:
            return
        base_shown = self._shown.get((backend, predicted_s), (predicted_s, predicted_s))[0]
        observe(backend, base_shown, actual_s)

    def remember(self, job: JobView, spec: BackendSpec, seconds: float, *, censored: bool = False,
                 predicted_s: float | None = None) -> None:
        """Record an outcome of ``job`` on ``spec`` (a no-op for QPUs). ``predicted_s``: the
        runtime of the Estimate it ran on, as this predictor returned it (memory overrides and
        explorations are mapped back to the model's honest prediction). Safe to call for an
        overrun at every pass: the job id keeps it one event, which its completion replaces."""
        variant = variant_of(spec)
        if variant is None:
            return
        honest = None
        if predicted_s is not None:
            honest = self._shown.get((spec.name, predicted_s), (predicted_s, predicted_s))[1]
        self.memory.record(variant, job.circuit_key, job.num_qubits, job.features, seconds,
                           censored=censored, predicted_s=honest, run_id=job.id)

    # -- internals ------------------------------------------------------------------------
    def _honest(self, est: Estimate) -> float:
        """The base's prediction without its exploration shrink (what ratios are taken against)."""
        if est.source.endswith(":explore"):
            return est.runtime_s * float(getattr(self.base, "explore_factor", 1.0))
        return est.runtime_s

    def _note_explorations(self, estimates: Sequence[Estimate]) -> None:
        for est in estimates:
            if est.source.endswith(":explore"):
                self._note(est.backend, est.runtime_s, est.runtime_s, self._honest(est))

    def _note(self, backend: str, shown: float, base_shown: float, honest: float) -> None:
        self._shown[(backend, shown)] = (base_shown, honest)
        self._shown.move_to_end((backend, shown))
        while len(self._shown) > _SHOWN_SIZE:
            self._shown.popitem(last=False)
