"""Alerting: rules over what the allocator observes, delivered through one durable outbox.

The path of an alert::

    Observations ──► AlertEngine.decide ──► Outbox.enqueue (commit) ──► AlertEngine.apply
                     rules, dedup, for_s,     one row per event,          state installed
                     resolve, rate limit      one delivery per sink       only after the commit
                                                   │
                                                   ▼
                                      Dispatcher ──► WebhookSink (signed JSON POST)
                                      retry, backoff └► SyslogSink (RFC 5424, TCP/UDP)

``AlertEngine.step(obs, commit=outbox.enqueue)`` runs the first three in order; the
dispatcher delivers at least once, with an idempotency key per event for receivers to drop
duplicates. Nothing here imports Ray: the allocator fills ``Observations`` and calls ``step``.
"""

from ray_qalloc.alerts.engine import (
    AlertEngine, AlertEvent, AlertState, CalibrationStatus, Decision, DeadlineOutcome, DriftEvent, HealthChange,
    MemoryUsage, Observations, PredictionSample, QuotaUsage, StaleDecision, fingerprint,
)
from ray_qalloc.alerts.outbox import Dispatcher, DispatchReport, Outbox, RetryPolicy
from ray_qalloc.alerts.rules import AlertRules, RateLimit, Severity, load_rules
from ray_qalloc.alerts.sinks import (
    DeliveryError, Sink, SyslogConfig, SyslogSink, WebhookConfig, WebhookSink, build_sink, format_rfc5424,
    verify_signature,
)

__all__ = [
    "AlertEngine", "AlertEvent", "AlertRules", "AlertState", "CalibrationStatus", "Decision", "DeadlineOutcome",
    "DeliveryError", "DispatchReport", "Dispatcher", "DriftEvent", "HealthChange", "MemoryUsage", "Observations",
    "Outbox", "PredictionSample", "QuotaUsage", "RateLimit", "RetryPolicy", "Severity", "Sink", "StaleDecision",
    "SyslogConfig", "SyslogSink", "WebhookConfig", "WebhookSink", "build_sink", "fingerprint", "format_rfc5424",
    "load_rules", "verify_signature",
]
