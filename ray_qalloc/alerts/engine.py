"""The alert engine: rules × an observation snapshot → firing, resolved and summary events.

Why it is shaped this way:

- **Identity.** An alert is one rule applied to one thing (a backend, a priority class, a
  tenant's quota): its fingerprint hashes the rule's name and the alert's labels. The same
  fingerprint firing on every evaluation is one incident, so it is announced once (dedup),
  and once more when its condition clears (resolve).
- **for_s.** A condition must hold on consecutive evaluations for ``for_s`` seconds before
  the alert fires ("pending" until then), so a single noisy reading pages nobody.
- **Rate limit.** A rule sends at most ``max_notifications`` in any ``window_s`` (sliding);
  what it could not send is counted, and one ``suppressed`` summary says how many and
  which alerts' latest state went unannounced, as soon as the window has room again. The
  summary takes a slot itself, so the limit holds for everything a rule sends.
- **Decide, commit, apply.** ``decide`` computes the events *and* the next state without
  changing anything; the caller commits the events durably (the outbox), then ``apply``
  installs the state. If the commit fails nothing changed, and the next evaluation decides
  the same transitions again. ``step`` does the three in order. After a restart,
  ``restore`` takes the alerts the outbox last announced as firing, so a condition that
  still holds is not announced a second time and one that cleared is resolved.
- **Unknown is not clear.** A rule whose window has too few samples, or whose evaluation
  raised, neither fires nor resolves its alerts. An alert whose subject vanished from the
  observations (a backend removed, a rule deleted) resolves.

The clock is injected (``clock=``) so that tests drive time by hand.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
import statistics
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

from ray_qalloc.alerts.rules import (
    AlertRules, BackendDownRule, BackendFlappingRule, BreakerOpenRule, CalibrationDriftRule,
    CalibrationStaleRule, DeadlineMissRateRule, NodeMemoryRule, PredictionErrorRule, QueueWaitRule,
    QuotaExhaustionRule, RateLimit, Severity,
)
from ray_qalloc.jobs import Priority

log = logging.getLogger(__name__)

EventStatus = Literal["firing", "resolved", "suppressed"]
#: Runtimes below this are taken as this when computing log errors (a 0 s run is not infinitely wrong).
RUNTIME_FLOOR_S = 1e-3
#: How many suppressed alerts a summary names; the rest are only counted.
SUMMARY_NAMES = 50


# ---- what the allocator observes ----------------------------------------------------------
@dataclass(frozen=True)
class HealthChange:
    """One health observation of a backend: up or down at ``at``."""

    at: float
    up: bool


@dataclass(frozen=True)
class DriftEvent:
    """A calibration metric that moved beyond its expected range (monitor.quantum)."""

    at: float
    metric: str
    magnitude: float


@dataclass(frozen=True)
class CalibrationStatus:
    """A QPU's calibration: when it was last refreshed, and its recent drift events."""

    updated_at: float | None
    drift: Sequence[DriftEvent] = ()


@dataclass(frozen=True)
class DeadlineOutcome:
    """A finished job that had a deadline: did it meet it?"""

    at: float
    priority: Priority | str
    met: bool


@dataclass(frozen=True)
class PredictionSample:
    """A finished run's predicted and actual runtime."""

    at: float
    backend: str
    predicted_s: float
    actual_s: float

    @property
    def log_error(self) -> float:
        return abs(math.log(max(self.actual_s, RUNTIME_FLOOR_S) / max(self.predicted_s, RUNTIME_FLOOR_S)))


@dataclass(frozen=True)
class QuotaUsage:
    """How much of one quota a tenant has used; ``limit`` None or ≤ 0 is not watched."""

    used: float
    limit: float | None


@dataclass(frozen=True)
class MemoryUsage:
    used_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class Observations:
    """One snapshot of what the allocator knows, filled by it before each evaluation.

    Histories (health, drift, outcomes, samples) may be longer than any rule's window: each
    rule looks only at its own window. Keys of ``queue_waits`` and priorities of outcomes may
    be ``Priority`` members or their string values."""

    queue_waits: Mapping[Priority | str, Sequence[float]] = field(default_factory=dict)
    backend_health: Mapping[str, Sequence[HealthChange]] = field(default_factory=dict)
    breakers: Mapping[str, str] = field(default_factory=dict)        # "open" | "half-open" | "closed"
    calibrations: Mapping[str, CalibrationStatus] = field(default_factory=dict)
    deadline_outcomes: Sequence[DeadlineOutcome] = ()
    prediction_errors: Sequence[PredictionSample] = ()
    quotas: Mapping[str, Mapping[str, QuotaUsage]] = field(default_factory=dict)  # tenant → quota name → usage
    node_memory: Mapping[str, MemoryUsage] = field(default_factory=dict)


# ---- evaluating one rule --------------------------------------------------------------------
@dataclass(frozen=True)
class Measurement:
    """One rule on one subject: its value and whether the condition holds (None: unknown)."""

    labels: Mapping[str, str]
    value: float | None
    threshold: float
    breached: bool | None
    text: str


def _pvalue(p: Priority | str) -> str:
    return p.value if isinstance(p, Priority) else str(p)


def _statistic(values: Sequence[float], name: str) -> float:
    ordered = sorted(values)
    if name == "max":
        return ordered[-1]
    q = {"p50": 0.50, "p95": 0.95}[name]
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]  # nearest rank


def _queue_wait(rule: QueueWaitRule, obs: Observations, now: float) -> list[Measurement]:
    waits = {_pvalue(k): v for k, v in obs.queue_waits.items()}
    out = []
    for klass, threshold in rule.params.thresholds_s.items():
        values = waits.get(klass.value) or ()
        value = _statistic(values, rule.params.statistic) if values else 0.0
        out.append(Measurement({"priority": klass.value}, value, threshold, value > threshold,
                               f"{klass.value} queue: {rule.params.statistic} wait {value:.1f} s over "
                               f"{len(values)} queued jobs (threshold {threshold:g} s)"))
    return out


def _sorted_health(history: Sequence[HealthChange]) -> list[HealthChange]:
    return sorted(history, key=lambda h: h.at)


def _backend_down(rule: BackendDownRule, obs: Observations, now: float) -> list[Measurement]:
    out = []
    for name, history in sorted(obs.backend_health.items()):
        if not fnmatch.fnmatchcase(name, rule.params.match) or not history:
            continue
        hist = _sorted_health(history)
        if hist[-1].up:
            out.append(Measurement({"backend": name}, 0.0, 0.0, False, f"backend {name} is up"))
            continue
        since = hist[-1].at
        for h in reversed(hist):
            if h.up:
                break
            since = h.at
        down_s = max(now - since, 0.0)
        out.append(Measurement({"backend": name}, down_s, 0.0, True, f"backend {name} down for {down_s:.0f} s"))
    return out


def _backend_flapping(rule: BackendFlappingRule, obs: Observations, now: float) -> list[Measurement]:
    p = rule.params
    out = []
    for name, history in sorted(obs.backend_health.items()):
        if not fnmatch.fnmatchcase(name, p.match) or not history:
            continue
        hist = _sorted_health(history)
        flips = sum(1 for prev, cur in zip(hist, hist[1:]) if cur.up != prev.up and cur.at > now - p.window_s)
        out.append(Measurement({"backend": name}, float(flips), float(p.transitions), flips >= p.transitions,
                               f"backend {name} changed health {flips} times in {p.window_s:g} s "
                               f"(threshold {p.transitions})"))
    return out


def _breaker_open(rule: BreakerOpenRule, obs: Observations, now: float) -> list[Measurement]:
    out = []
    for name, raw in sorted(obs.breakers.items()):
        if not fnmatch.fnmatchcase(name, rule.params.match):
            continue
        state = raw.lower().replace("_", "-")
        if state not in ("open", "half-open", "closed"):
            breached: bool | None = None
        else:
            breached = state == "open" or (rule.params.include_half_open and state == "half-open")
        out.append(Measurement({"breaker": name}, 1.0 if breached else 0.0, 1.0, breached,
                               f"circuit breaker {name} is {state}"))
    return out


def _calibration_drift(rule: CalibrationDriftRule, obs: Observations, now: float) -> list[Measurement]:
    p = rule.params
    out = []
    for name, cal in sorted(obs.calibrations.items()):
        if not fnmatch.fnmatchcase(name, p.match):
            continue
        recent = [d for d in cal.drift if d.at > now - p.window_s and d.magnitude >= p.min_magnitude]
        worst = max(recent, key=lambda d: d.magnitude, default=None)
        text = f"{name}: {len(recent)} calibration drift events in {p.window_s:g} s"
        if worst is not None:
            text += f" (largest: {worst.metric} by {worst.magnitude:g})"
        out.append(Measurement({"backend": name}, float(len(recent)), float(p.min_events),
                               len(recent) >= p.min_events, text))
    return out


def _calibration_stale(rule: CalibrationStaleRule, obs: Observations, now: float) -> list[Measurement]:
    p = rule.params
    out = []
    for name, cal in sorted(obs.calibrations.items()):
        if not fnmatch.fnmatchcase(name, p.match):
            continue
        if cal.updated_at is None:
            out.append(Measurement({"backend": name}, None, p.max_age_s, True, f"{name} has no calibration"))
            continue
        age = max(now - cal.updated_at, 0.0)
        out.append(Measurement({"backend": name}, age, p.max_age_s, age > p.max_age_s,
                               f"{name}: calibration is {age:.0f} s old (limit {p.max_age_s:g} s)"))
    return out


def _deadline_miss_rate(rule: DeadlineMissRateRule, obs: Observations, now: float) -> list[Measurement]:
    p = rule.params
    want = None if p.priority is None else p.priority.value
    recent = [o for o in obs.deadline_outcomes
              if o.at > now - p.window_s and (want is None or _pvalue(o.priority) == want)]
    labels = {} if want is None else {"priority": want}
    scope = "all classes" if want is None else f"class {want}"
    if len(recent) < p.min_samples:
        return [Measurement(labels, None, p.threshold, None,
                            f"{scope}: {len(recent)} deadline outcomes in the window, fewer than {p.min_samples}")]
    misses = sum(1 for o in recent if not o.met)
    rate = misses / len(recent)
    return [Measurement(labels, rate, p.threshold, rate > p.threshold,
                        f"{scope}: {misses} of {len(recent)} jobs missed their deadline ({rate:.1%}, "
                        f"threshold {p.threshold:.1%}) in {p.window_s:g} s")]


def _prediction_error(rule: PredictionErrorRule, obs: Observations, now: float) -> list[Measurement]:
    """Per backend, an instance appears only with samples in the window: a backend with none
    left has no evidence of error, and a firing alert on it resolves."""
    p = rule.params
    groups: dict[str, list[float]] = {}
    if not p.per_backend:
        groups[""] = []
    for s in obs.prediction_errors:
        if s.at > now - p.window_s and fnmatch.fnmatchcase(s.backend, p.match):
            groups.setdefault(s.backend if p.per_backend else "", []).append(s.log_error)
    out = []
    for backend, errors in sorted(groups.items()):
        labels = {"backend": backend} if p.per_backend else {}
        scope = f"backend {backend}" if p.per_backend else "all backends"
        if len(errors) < p.min_samples:
            out.append(Measurement(labels, None, p.threshold, None,
                                   f"{scope}: {len(errors)} runtime samples, fewer than {p.min_samples}"))
            continue
        median = statistics.median(errors)
        out.append(Measurement(labels, median, p.threshold, median > p.threshold,
                               f"{scope}: median runtime prediction off by ×{math.exp(median):.2f} "
                               f"(|log| {median:.2f} > {p.threshold:.2f}) over {len(errors)} runs"))
    return out


def _quota_exhaustion(rule: QuotaExhaustionRule, obs: Observations, now: float) -> list[Measurement]:
    p = rule.params
    out = []
    for tenant, usages in sorted(obs.quotas.items()):
        if not fnmatch.fnmatchcase(tenant, p.match):
            continue
        for resource, u in sorted(usages.items()):
            if (p.resources is not None and resource not in p.resources) or u.limit is None or u.limit <= 0:
                continue
            frac = u.used / u.limit
            out.append(Measurement({"tenant": tenant, "resource": resource}, frac, p.threshold,
                                   frac >= p.threshold,
                                   f"tenant {tenant} used {frac:.0%} of {resource} ({u.used:g} of {u.limit:g})"))
    return out


def _node_memory(rule: NodeMemoryRule, obs: Observations, now: float) -> list[Measurement]:
    p = rule.params
    out = []
    for node, m in sorted(obs.node_memory.items()):
        if not fnmatch.fnmatchcase(node, p.match) or m.total_bytes <= 0:
            continue
        frac = m.used_bytes / m.total_bytes
        out.append(Measurement({"node": node}, frac, p.threshold, frac >= p.threshold,
                               f"node {node} memory {frac:.0%} used ({m.used_bytes / 2**30:.1f} of "
                               f"{m.total_bytes / 2**30:.1f} GiB)"))
    return out


_EVALUATORS: dict[str, Callable[[Any, Observations, float], list[Measurement]]] = {
    "queue_wait": _queue_wait, "backend_down": _backend_down, "backend_flapping": _backend_flapping,
    "breaker_open": _breaker_open, "calibration_drift": _calibration_drift,
    "calibration_stale": _calibration_stale, "deadline_miss_rate": _deadline_miss_rate,
    "prediction_error": _prediction_error, "quota_exhaustion": _quota_exhaustion, "node_memory": _node_memory,
}


def evaluate_rule(rule: Any, obs: Observations, now: float) -> list[Measurement]:
    """Every subject ``rule`` applies to in ``obs``, measured at ``now``."""
    return _EVALUATORS[rule.kind](rule, obs, now)


# ---- events and state ----------------------------------------------------------------------
def fingerprint(rule: str, labels: Mapping[str, str]) -> str:
    """An alert's identity: the same rule on the same labels is the same alert."""
    text = json.dumps([rule, sorted(labels.items())], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _key(*parts: Any) -> str:
    return hashlib.sha256("|".join(repr(p) for p in parts).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class AlertEvent:
    """One notification. ``key`` is its idempotency key: deterministic from what it
    announces, so receivers (and the outbox) can drop duplicates."""

    key: str
    status: EventStatus
    rule: str
    kind: str
    severity: Severity
    fingerprint: str
    labels: Mapping[str, str]
    summary: str
    at: float
    active_since: float | None = None
    fired_at: float | None = None
    value: float | None = None
    threshold: float | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; what the sinks send and the outbox stores."""
        return {"key": self.key, "status": self.status, "rule": self.rule, "kind": self.kind,
                "severity": self.severity.value, "fingerprint": self.fingerprint, "labels": dict(self.labels),
                "summary": self.summary, "at": self.at, "active_since": self.active_since,
                "fired_at": self.fired_at, "value": _finite(self.value), "threshold": _finite(self.threshold),
                "details": dict(self.details)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AlertEvent:
        return cls(key=d["key"], status=d["status"], rule=d["rule"], kind=d["kind"],
                   severity=Severity(d["severity"]), fingerprint=d["fingerprint"], labels=dict(d["labels"]),
                   summary=d["summary"], at=d["at"], active_since=d.get("active_since"),
                   fired_at=d.get("fired_at"), value=d.get("value"), threshold=d.get("threshold"),
                   details=dict(d.get("details") or {}))


def _finite(x: float | None) -> float | None:
    """JSON has no infinity or NaN: such values travel as null."""
    return x if x is None or math.isfinite(x) else None


@dataclass(frozen=True)
class AlertState:
    """A pending (``fired_at`` None) or firing alert."""

    fingerprint: str
    rule: str
    kind: str
    severity: Severity
    labels: Mapping[str, str]
    pending_since: float
    fired_at: float | None = None
    value: float | None = None
    threshold: float | None = None
    text: str = ""

    @property
    def firing(self) -> bool:
        return self.fired_at is not None


@dataclass(frozen=True)
class _Limiter:
    """One rule's sliding window and what it held back since its last summary."""

    sent: tuple[float, ...] = ()
    suppressed: int = 0
    by_status: tuple[tuple[str, int], ...] = ()
    latest: tuple[tuple[str, str], ...] = ()   # (fingerprint, status) of the newest suppressed, oldest first
    first_at: float | None = None
    last_at: float | None = None


@dataclass(frozen=True)
class _State:
    alerts: Mapping[str, AlertState]
    limiters: Mapping[str, _Limiter]
    suppressed_total: Mapping[str, int]


@dataclass(frozen=True)
class Decision:
    """What one evaluation decided: ``events`` to commit and send, ``suppressed`` ones only
    counted, ``errors`` of rules that could not be evaluated. Install with ``apply``."""

    at: float
    events: tuple[AlertEvent, ...]
    suppressed: tuple[AlertEvent, ...]
    errors: tuple[str, ...]
    base_version: int
    state: _State = field(repr=False)


class StaleDecision(RuntimeError):
    """``apply`` of a decision taken before another one was applied."""


class AlertEngine:
    """Evaluates rules on observation snapshots; see the module docstring for the semantics."""

    def __init__(self, rules: AlertRules, *, clock: Callable[[], float] = time.time) -> None:
        self.rules = rules
        self._by_name = rules.by_name()
        self._clock = clock
        self._state = _State(alerts={}, limiters={}, suppressed_total={})
        self._version = 0
        self._lock = threading.Lock()

    # ---- reading -----------------------------------------------------------------------
    def alerts(self) -> list[AlertState]:
        """Pending and firing alerts, in a stable order."""
        return sorted(self._state.alerts.values(), key=lambda a: (a.rule, sorted(a.labels.items())))

    def firing(self) -> list[AlertState]:
        return [a for a in self.alerts() if a.firing]

    def suppressed_total(self) -> dict[str, int]:
        """Per rule, every notification ever held back by the rate limit (for metrics)."""
        return dict(self._state.suppressed_total)

    # ---- restart -------------------------------------------------------------------------
    def restore(self, firing: Iterable[AlertEvent]) -> None:
        """Take the alerts last announced as firing (``Outbox.firing_events()``) as firing now.

        Only before the first decision: restoring into a running engine would overwrite what
        it has decided since."""
        with self._lock:
            if self._version:
                raise StaleDecision("restore() must come before the first evaluation.")
            alerts = dict(self._state.alerts)
            for ev in firing:
                if ev.status != "firing":
                    continue
                alerts[ev.fingerprint] = AlertState(
                    fingerprint=ev.fingerprint, rule=ev.rule, kind=ev.kind, severity=ev.severity,
                    labels=dict(ev.labels), pending_since=ev.active_since if ev.active_since is not None else ev.at,
                    fired_at=ev.fired_at if ev.fired_at is not None else ev.at, value=ev.value,
                    threshold=ev.threshold, text=ev.summary)
            self._state = replace(self._state, alerts=alerts)

    # ---- deciding ------------------------------------------------------------------------
    def decide(self, obs: Observations) -> Decision:
        """Evaluate every rule on ``obs`` at the clock's time; changes nothing."""
        now = float(self._clock())
        state, version = self._state, self._version
        alerts = dict(state.alerts)
        candidates: dict[str, list[AlertEvent]] = {}
        seen: set[str] = set()
        errors: list[str] = []

        for rule in self.rules.rules:
            try:
                measurements = evaluate_rule(rule, obs, now)
            except Exception as exc:  # noqa: BLE001 - one broken rule must not silence the others
                log.exception("alert rule %s could not be evaluated", rule.name)
                errors.append(f"{rule.name}: {exc.__class__.__name__}: {exc}")
                seen.update(fp for fp, a in alerts.items() if a.rule == rule.name)  # unknown is not clear
                continue
            for m in measurements:
                labels = {**rule.labels, **m.labels}
                fp = fingerprint(rule.name, labels)
                seen.add(fp)
                cur = alerts.get(fp)
                text = f"{rule.summary} {m.text}" if rule.summary else m.text
                if m.breached is None:
                    continue
                if m.breached:
                    if cur is None:
                        cur = AlertState(fp, rule.name, rule.kind, rule.severity, labels, pending_since=now)
                    cur = replace(cur, value=m.value, threshold=m.threshold, text=text, severity=rule.severity)
                    if not cur.firing and now - cur.pending_since >= rule.for_s:
                        cur = replace(cur, fired_at=now)
                        candidates.setdefault(rule.name, []).append(self._event(cur, "firing", now, text))
                    alerts[fp] = cur
                elif cur is not None:
                    if cur.firing:
                        ended = replace(cur, value=m.value, threshold=m.threshold)
                        candidates.setdefault(rule.name, []).append(self._event(ended, "resolved", now, text))
                    del alerts[fp]

        for fp, cur in list(alerts.items()):  # subjects gone from the observations, rules removed
            if fp in seen:
                continue
            if cur.firing:
                why = "no longer observed" if cur.rule in self._by_name else "rule no longer configured"
                gone = replace(cur, value=None)
                candidates.setdefault(cur.rule, []).append(
                    self._event(gone, "resolved", now, f"{cur.text} ({why})".strip()))
            del alerts[fp]

        events, suppressed, limiters, totals = self._rate_limit(state, candidates, now)
        new_state = _State(alerts=alerts, limiters=limiters, suppressed_total=totals)
        return Decision(at=now, events=tuple(events), suppressed=tuple(suppressed), errors=tuple(errors),
                        base_version=version, state=new_state)

    def apply(self, decision: Decision) -> None:
        """Install a decision's state, once its events are committed."""
        with self._lock:
            self._apply(decision)

    def _apply(self, decision: Decision) -> None:
        if decision.base_version != self._version:
            raise StaleDecision(f"decision taken on state {decision.base_version}, engine is at {self._version}.")
        self._state = decision.state
        self._version += 1

    def step(self, obs: Observations,
             commit: Callable[[Sequence[AlertEvent]], Any] | None = None) -> Decision:
        """Decide, commit the events (if ``commit`` is given), then apply; serialised.

        When ``commit`` raises, the engine is left as it was and the error propagates."""
        with self._lock:
            decision = self.decide(obs)
            if commit is not None and decision.events:
                commit(decision.events)
            self._apply(decision)
            return decision

    # ---- helpers -------------------------------------------------------------------------
    @staticmethod
    def _event(a: AlertState, status: EventStatus, now: float, text: str) -> AlertEvent:
        return AlertEvent(key=_key(a.fingerprint, status, a.fired_at), status=status, rule=a.rule, kind=a.kind,
                          severity=a.severity, fingerprint=a.fingerprint, labels=dict(a.labels), summary=text,
                          at=now, active_since=a.pending_since, fired_at=a.fired_at, value=a.value,
                          threshold=a.threshold)

    def _limit(self, rule_name: str) -> RateLimit:
        rule = self._by_name.get(rule_name)
        return self.rules.rate_limit if rule is None else self.rules.limit_for(rule)

    def _rate_limit(self, state: _State, candidates: dict[str, list[AlertEvent]], now: float
                    ) -> tuple[list[AlertEvent], list[AlertEvent], dict[str, _Limiter], dict[str, int]]:
        events: list[AlertEvent] = []
        held: list[AlertEvent] = []
        limiters = dict(state.limiters)
        totals = dict(state.suppressed_total)
        names = list(dict.fromkeys([*(r.name for r in self.rules.rules), *candidates, *limiters]))
        for name in names:
            lim = limiters.get(name, _Limiter())
            limit = self._limit(name)
            sent = [t for t in lim.sent if t > now - limit.window_s]
            if lim.suppressed and len(sent) < limit.max_notifications:
                events.append(self._summary(name, lim, now))
                sent.append(now)
                lim = _Limiter()
            for ev in candidates.get(name, ()):
                if len(sent) < limit.max_notifications:
                    events.append(ev)
                    sent.append(now)
                    continue
                held.append(ev)
                totals[name] = totals.get(name, 0) + 1
                counts = dict(lim.by_status)
                counts[ev.status] = counts.get(ev.status, 0) + 1
                latest = [(fp, s) for fp, s in lim.latest if fp != ev.fingerprint] + [(ev.fingerprint, ev.status)]
                lim = _Limiter(sent=(), suppressed=lim.suppressed + 1, by_status=tuple(sorted(counts.items())),
                               latest=tuple(latest),
                               first_at=lim.first_at if lim.first_at is not None else now, last_at=now)
            lim = replace(lim, sent=tuple(sent))
            if lim == _Limiter():
                limiters.pop(name, None)
            else:
                limiters[name] = lim
        return events, held, limiters, totals

    def _summary(self, name: str, lim: _Limiter, now: float) -> AlertEvent:
        rule = self._by_name.get(name)
        labels = dict(rule.labels) if rule is not None else {}
        latest = dict(lim.latest)
        named = dict(list(latest.items())[-SUMMARY_NAMES:])
        counts = dict(lim.by_status)
        limit = self._limit(name)
        text = (f"rule {name}: {lim.suppressed} notifications held back by the rate limit "
                f"({limit.max_notifications} per {limit.window_s:g} s): "
                + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
        return AlertEvent(key=_key(name, "suppressed", lim.first_at, lim.last_at, lim.suppressed),
                          status="suppressed", rule=name, kind=rule.kind if rule is not None else "unknown",
                          severity=Severity.NOTICE, fingerprint=fingerprint(name, {"__summary__": "1"}),
                          labels=labels, summary=text, at=now, value=float(lim.suppressed),
                          threshold=float(limit.max_notifications),
                          details={"suppressed": lim.suppressed, "by_status": counts, "since": lim.first_at,
                                   "until": lim.last_at, "latest": named,
                                   "unnamed": len(latest) - len(named)})
