"""Alert rules as configuration: what to watch, how bad it is, how long it must hold.

Why pydantic models with one ``params`` model per ``kind``: a rule is written by an operator
in YAML or JSON, and a typo there must be refused when the configuration is loaded, with the
field named (``rules[2].params.threshold_s``), not discovered when the first incident is not
paged. The ``kind`` field selects the parameter model (a discriminated union), so a rule's
parameters are checked against exactly the kind it claims to be.

A rule::

    {"name": "emergency-wait", "kind": "queue_wait", "severity": "critical", "for_s": 30,
     "params": {"thresholds_s": {"emergency": 5, "high": 60}}, "labels": {"team": "hpc"}}

Each kind is evaluated by ``engine.evaluate_rule``; what each one measures is said on its
parameter model below. Label keys are restricted to what both Prometheus-style routing and
RFC 5424 structured data accept, so a rule that loads can always be delivered.
"""

from __future__ import annotations

import enum
import math
import re
from typing import Annotated, Any, Iterable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ray_qalloc.exceptions import ConfigError
from ray_qalloc.jobs import Priority

_NAME_PATTERN = r"^[a-z][a-z0-9_.-]{0,63}$"
# A label key must be an RFC 5424 SD-NAME (at most 32 printable characters without '=', ' ',
# ']', '"') and a Prometheus label name; this pattern is both.
_LABEL_KEY_PATTERN = r"^[a-zA-Z_][a-zA-Z0-9_]{0,31}$"
#: Label keys the engine sets on each alert instance; a rule's own labels may not shadow them.
INSTANCE_LABELS = frozenset({"alertname", "backend", "breaker", "node", "priority", "resource", "tenant"})


class Severity(str, enum.Enum):
    """How urgent an alert is; the names map one to one onto syslog severities (RFC 5424)."""

    CRITICAL = "critical"
    ERROR = "error"
    WARNING = "warning"
    NOTICE = "notice"
    INFO = "info"

    @property
    def syslog(self) -> int:
        """The RFC 5424 severity number (0 emergency ... 7 debug)."""
        return _SYSLOG_SEVERITY[self]


_SYSLOG_SEVERITY = {Severity.CRITICAL: 2, Severity.ERROR: 3, Severity.WARNING: 4, Severity.NOTICE: 5,
                    Severity.INFO: 6}


class _Params(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class QueueWaitParams(_Params):
    """The longest wait of a job still queued, per priority class, above that class's threshold.

    One alert per class: an emergency job waiting 10 s and a batch job waiting an hour are
    different incidents with different thresholds."""

    thresholds_s: dict[Priority, float] = Field(
        ..., min_length=1, description="Per priority class, the longest acceptable wait in seconds.")
    statistic: Literal["max", "p95", "p50"] = Field(
        "max", description="Which wait of the class's queued jobs is compared: the oldest, or a percentile.")

    @field_validator("thresholds_s")
    @classmethod
    def _positive(cls, v: dict[Priority, float]) -> dict[Priority, float]:
        for klass, threshold in v.items():
            if not threshold > 0:
                raise ValueError(f"the threshold of class {klass.value!r} must be > 0 seconds, not {threshold}")
        return v


class BackendDownParams(_Params):
    """A backend whose latest health observation says it is down."""

    match: str = Field("*", min_length=1, description="Shell-style pattern of backend names to watch.")


class BackendFlappingParams(_Params):
    """A backend whose health changed at least ``transitions`` times within ``window_s``:
    placement keeps trying it and failing over, which costs more than a clean outage."""

    match: str = Field("*", min_length=1, description="Shell-style pattern of backend names to watch.")
    transitions: int = Field(4, ge=2, description="Health changes (up→down or down→up) that count as flapping.")
    window_s: float = Field(600.0, gt=0, description="The window the transitions are counted in, seconds.")


class BreakerOpenParams(_Params):
    """A circuit breaker (per backend, or per pool and method) that is open."""

    match: str = Field("*", min_length=1, description="Shell-style pattern of breaker names to watch.")
    include_half_open: bool = Field(False, description="Also alert while the breaker is half-open (probing).")


class CalibrationDriftParams(_Params):
    """At least ``min_events`` drift events of at least ``min_magnitude`` on one QPU within
    ``window_s``: its fidelity predictions rest on numbers that no longer hold."""

    match: str = Field("*", min_length=1, description="Shell-style pattern of backend names to watch.")
    window_s: float = Field(3600.0, gt=0, description="The window drift events are counted in, seconds.")
    min_events: int = Field(1, ge=1, description="Drift events in the window that raise the alert.")
    min_magnitude: float = Field(0.0, ge=0, description="Smaller drift events are not counted.")


class CalibrationStaleParams(_Params):
    """A QPU whose newest calibration is older than ``max_age_s`` (or that has none)."""

    match: str = Field("*", min_length=1, description="Shell-style pattern of backend names to watch.")
    max_age_s: float = Field(86_400.0, gt=0, description="Oldest acceptable calibration, seconds.")


class DeadlineMissRateParams(_Params):
    """The share of jobs with a deadline that missed it, over a sliding window."""

    priority: Priority | None = Field(None, description="Only this class (and a 'priority' label); "
                                      "all classes pooled when unset.")
    window_s: float = Field(3600.0, gt=0, description="The window outcomes are counted in, seconds.")
    threshold: float = Field(0.05, gt=0, le=1, description="Miss rate (0..1] above which the alert holds.")
    min_samples: int = Field(20, ge=1, description="Fewer outcomes in the window than this decide nothing.")


class PredictionErrorParams(_Params):
    """The median of |log(actual / predicted)| runtime over a window: 0.69 is "off by 2×".

    The median, not the mean, so that one runaway run does not page anyone; the hedging
    subsystem already handles single overruns."""

    window_s: float = Field(3600.0, gt=0, description="The window samples are taken from, seconds.")
    threshold: float = Field(math.log(2.0), gt=0, description="Median |log(actual/predicted)| above which "
                             "the alert holds (natural log).")
    min_samples: int = Field(20, ge=1, description="Fewer samples in the window than this decide nothing.")
    per_backend: bool = Field(True, description="One alert per backend (with a 'backend' label); "
                              "all backends pooled when false.")
    match: str = Field("*", min_length=1, description="Shell-style pattern of backend names to include.")


class QuotaExhaustionParams(_Params):
    """A tenant that has used at least ``threshold`` of one of its quotas."""

    threshold: float = Field(0.9, gt=0, le=1, description="Fraction of the limit (0..1] that raises the alert.")
    resources: tuple[str, ...] | None = Field(None, min_length=1, description="Only these quota names "
                                              "(e.g. 'shots_per_day'); all when unset.")
    match: str = Field("*", min_length=1, description="Shell-style pattern of tenant names to watch.")


class NodeMemoryParams(_Params):
    """A node whose used memory is at least ``threshold`` of its total: the next statevector
    run placed there may be killed by the kernel."""

    threshold: float = Field(0.9, gt=0, le=1, description="Fraction of total memory (0..1] that raises the alert.")
    match: str = Field("*", min_length=1, description="Shell-style pattern of node names to watch.")


class RateLimit(BaseModel):
    """At most ``max_notifications`` per rule in any ``window_s`` seconds; the excess is
    counted and reported in one summary once the window has room again."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    max_notifications: int = Field(10, ge=1, description="Notifications one rule may send in any window.")
    window_s: float = Field(3600.0, gt=0, description="The sliding window, seconds.")


class _RuleBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: str = Field(..., pattern=_NAME_PATTERN, description="Unique name; part of every alert's identity.")
    severity: Severity = Field(Severity.WARNING, description="How urgent a firing alert of this rule is.")
    for_s: float = Field(0.0, ge=0, description="How long the condition must hold before the alert fires.")
    labels: dict[str, str] = Field(default_factory=dict, description="Static labels added to every alert "
                                   "(routing: team, service, ...).")
    summary: str | None = Field(None, max_length=500, description="A sentence prefixed to each alert's message.")
    rate_limit: RateLimit | None = Field(None, description="This rule's own rate limit (else the rule set's).")

    @field_validator("labels")
    @classmethod
    def _label_keys(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not re.match(_LABEL_KEY_PATTERN, key):
                raise ValueError(f"label key {key!r} must match {_LABEL_KEY_PATTERN} (letters, digits, '_', "
                                 "at most 32 characters)")
            if key in INSTANCE_LABELS:
                raise ValueError(f"label key {key!r} is set by the engine on each alert; choose another name")
            if len(value) > 256:
                raise ValueError(f"label {key!r} is longer than 256 characters")
        return v


class QueueWaitRule(_RuleBase):
    kind: Literal["queue_wait"]
    params: QueueWaitParams


class BackendDownRule(_RuleBase):
    kind: Literal["backend_down"]
    params: BackendDownParams = Field(default_factory=BackendDownParams)


class BackendFlappingRule(_RuleBase):
    kind: Literal["backend_flapping"]
    params: BackendFlappingParams = Field(default_factory=BackendFlappingParams)


class BreakerOpenRule(_RuleBase):
    kind: Literal["breaker_open"]
    params: BreakerOpenParams = Field(default_factory=BreakerOpenParams)


class CalibrationDriftRule(_RuleBase):
    kind: Literal["calibration_drift"]
    params: CalibrationDriftParams = Field(default_factory=CalibrationDriftParams)


class CalibrationStaleRule(_RuleBase):
    kind: Literal["calibration_stale"]
    params: CalibrationStaleParams = Field(default_factory=CalibrationStaleParams)


class DeadlineMissRateRule(_RuleBase):
    kind: Literal["deadline_miss_rate"]
    params: DeadlineMissRateParams = Field(default_factory=DeadlineMissRateParams)


class PredictionErrorRule(_RuleBase):
    kind: Literal["prediction_error"]
    params: PredictionErrorParams = Field(default_factory=PredictionErrorParams)


class QuotaExhaustionRule(_RuleBase):
    kind: Literal["quota_exhaustion"]
    params: QuotaExhaustionParams = Field(default_factory=QuotaExhaustionParams)


class NodeMemoryRule(_RuleBase):
    kind: Literal["node_memory"]
    params: NodeMemoryParams = Field(default_factory=NodeMemoryParams)


AlertRule = Annotated[
    Union[QueueWaitRule, BackendDownRule, BackendFlappingRule, BreakerOpenRule, CalibrationDriftRule,
          CalibrationStaleRule, DeadlineMissRateRule, PredictionErrorRule, QuotaExhaustionRule, NodeMemoryRule],
    Field(discriminator="kind"),
]
#: Every rule kind, as written in configuration.
RULE_KINDS: tuple[str, ...] = ("queue_wait", "backend_down", "backend_flapping", "breaker_open",
                               "calibration_drift", "calibration_stale", "deadline_miss_rate",
                               "prediction_error", "quota_exhaustion", "node_memory")


class AlertRules(BaseModel):
    """The whole alerting configuration: the rules and the default rate limit."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rules: tuple[AlertRule, ...] = Field(default=(), description="The rules, each with a unique name.")
    rate_limit: RateLimit = Field(default_factory=RateLimit, description="Default rate limit per rule.")

    @field_validator("rules")
    @classmethod
    def _unique_names(cls, rules: tuple[_RuleBase, ...]) -> tuple[_RuleBase, ...]:
        seen: set[str] = set()
        for rule in rules:
            if rule.name in seen:
                raise ValueError(f"two rules are named {rule.name!r}; names identify alerts and must be unique")
            seen.add(rule.name)
        return rules

    def limit_for(self, rule: _RuleBase) -> RateLimit:
        """The rate limit that applies to ``rule``."""
        return rule.rate_limit or self.rate_limit

    def by_name(self) -> dict[str, _RuleBase]:
        """Rules by name, for the engine's lookups."""
        return {r.name: r for r in self.rules}


def _where(loc: Iterable[int | str]) -> str:
    """``('rules', 2, 'queue_wait', 'params', 'thresholds_s')`` → ``rules[2].params.thresholds_s``.

    The discriminated union adds the kind's tag to the location; a reader wants the path in
    their own file, so the tag is dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in RULE_KINDS or part == "[key]":  # a union tag, or pydantic's marker of a bad dict key
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def load_rules(data: dict[str, Any] | list[dict[str, Any]]) -> AlertRules:
    """Validate alerting configuration; a list is taken as the ``rules`` alone.

    Raises ``ConfigError`` naming every invalid field (``field`` is the first one)."""
    payload = {"rules": data} if isinstance(data, list) else data
    try:
        return AlertRules.model_validate(payload)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            where = _where(e["loc"])
            if e["type"] in ("union_tag_invalid", "union_tag_not_found"):  # the location stops at the rule
                where += ".kind"
            problems.append((where, e["msg"].removeprefix("Value error, ")))
        text = "; ".join(f"{where or 'alerts'}: {msg}" for where, msg in problems)
        raise ConfigError(f"alert rules are invalid: {text}.", field=problems[0][0] or None,
                          fix="correct the named fields (see ray_qalloc.alerts.rules for each kind's parameters).",
                          ) from None
