"""The allocator's alerting: engine, outbox and delivery built from ``Settings.alerts``.

Why here and not in the allocator: the order of one evaluation is the whole point — decide on
a snapshot, commit the events to the outbox (the job store's database, so an alert raised
just before a crash is delivered by the next allocator), only then install the engine's new
state and wake delivery — and it must not depend on Ray, so tests drive it with a clock.

Sinks: every configured receiver whose ``records`` include ``alerts`` (the default), plus
``log`` (the allocator's own structured log), which is always there so that an install with
no receivers still keeps and shows its alerts. Delivery runs on a thread of its own
(``alerts.outbox.Dispatcher``): a receiver that hangs delays nobody's placement.

Receivers whose ``records`` include ``jobs`` or ``audit`` also get the job lifecycle and the
configuration audit trail, read from the change feed by an ``integration.forwarder.Forwarder``
on a second thread, started and stopped with the dispatcher. It has sink objects of its own
(the same configuration, another connection), so that a backlog of job records never holds
up an alert on the same receiver.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from ray_qalloc.alerts.engine import AlertEngine, AlertEvent, AlertState, Decision, Observations
from ray_qalloc.alerts.outbox import Dispatcher, Outbox
from ray_qalloc.alerts.rules import AlertRules
from ray_qalloc.alerts.sinks import build_sink
from ray_qalloc.metrics import metrics

log = logging.getLogger("ray_qalloc.alerts")

LOG_SINK = "log"
_LEVELS = {"critical": logging.CRITICAL, "error": logging.ERROR, "warning": logging.WARNING,
           "notice": logging.INFO, "info": logging.INFO}


class LogSink:
    """Alerts as structured log lines of the allocator (level by severity)."""

    name = LOG_SINK

    def send(self, event: Mapping[str, Any]) -> None:
        level = logging.INFO if event.get("status") != "firing" else _LEVELS.get(str(event.get("severity")),
                                                                                  logging.WARNING)
        log.log(level, "alert %s %s: %s", event.get("rule"), event.get("status"), event.get("summary"),
                extra={"alert": dict(event)})

    def close(self) -> None:
        return None


class AlertService:
    """One allocator's alerting. ``evaluate(obs)`` is one round; delivery runs by itself."""

    def __init__(self, settings: Any, engine_or_url: Any, *, clock: Callable[[], float] = time.time,
                 start_delivery: bool = True) -> None:
        self.settings = settings
        self.clock = clock
        configs = settings.sink_configs()
        self.sinks: dict[str, Any] = {LOG_SINK: LogSink(), **{n: build_sink(n, c) for n, c in configs.items()
                                                              if "alerts" in c.records}}
        self.outbox = Outbox(engine_or_url, list(self.sinks), clock=clock)
        self.engine = AlertEngine(settings.alert_rules(), clock=clock)
        self.engine.restore(self.outbox.firing_events())     # a restart does not announce an alert twice
        self.delivery = Dispatcher(self.outbox, self.sinks, retry=settings.retry_policy(), clock=clock)
        self.subscriptions: dict[str, set[str]] = {n: c.forwarded() for n, c in configs.items() if c.forwarded()}
        self.record_sinks: dict[str, Any] = {n: build_sink(n, configs[n]) for n in self.subscriptions}
        self.forwarder: Any = None
        if self.subscriptions:     # imported only then: an alerts-only install runs what it ran before
            from ray_qalloc.integration.forwarder import Forwarder

            self.forwarder = Forwarder(self.outbox.engine, self.record_sinks, self.subscriptions,
                                       retry=settings.retry_policy(), clock=clock)
        self.errors: list[str] = []
        self.evaluations = 0
        self._lock = threading.Lock()
        if start_delivery:
            self.delivery.start()
            if self.forwarder is not None:
                self.forwarder.start()

    def evaluate(self, obs: Observations) -> Decision:
        """Decide, commit, apply (``AlertEngine.step`` with the outbox as the commit), then wake
        delivery. A failing commit leaves the engine unchanged and raises: the next round
        decides the same transitions again."""
        with self._lock:
            decision = self.engine.step(obs, commit=self.outbox.enqueue)
            self.evaluations += 1
            self.errors = list(decision.errors)
        for e in decision.events:
            if e.status == "firing":
                metrics.alert(e.rule, str(getattr(e.severity, "value", e.severity)))
        firing: dict[tuple[str, str], int] = {}
        for a in self.engine.firing():
            key = (a.rule, str(getattr(a.severity, "value", a.severity)))
            firing[key] = firing.get(key, 0) + 1
        for rule in self.engine.rules.rules:
            sev = str(getattr(rule.severity, "value", rule.severity))
            metrics.alerts_firing(rule.name, sev, firing.get((rule.name, sev), 0))
        if decision.events:
            self.delivery.wake()
        return decision

    def replace_rules(self, rules: AlertRules) -> None:
        """New rules on the running engine (live configuration): alerts of rules that stay keep
        their state; those of removed rules resolve on the next round."""
        with self._lock:
            firing = [e for e in self.outbox.firing_events()]
            self.engine = AlertEngine(rules, clock=self.clock)
            self.engine.restore(firing)

    def firing(self) -> list[AlertState]:
        return self.engine.firing()

    def recent(self, limit: int = 100) -> list[AlertEvent]:
        return self.outbox.recent(limit)

    def delivery_counts(self) -> dict[str, dict[str, int]]:
        return self.outbox.counts()

    def forward(self, now: float | None = None) -> dict[str, Any]:
        """One forwarding pass now (the thread does this every second; for tests and tools)."""
        return self.forwarder.pump(now) if self.forwarder is not None else {}

    def sink_status(self) -> list[dict[str, Any]]:
        """Per sink subscribed to jobs or audit: its position, lag and delivery counts."""
        return self.forwarder.status() if self.forwarder is not None else []

    def prune(self, now: float | None = None) -> int:
        now = self.clock() if now is None else now
        return self.outbox.prune(now - self.settings.retention_s)

    def close(self) -> None:
        self.delivery.stop()
        if self.forwarder is not None:
            self.forwarder.stop()
        for sink in [*self.sinks.values(), *self.record_sinks.values()]:
            try:
                sink.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        self.outbox.close()


def alert_dict(a: AlertState | AlertEvent) -> dict[str, Any]:
    """A firing alert or an event as JSON for the API and the dashboard."""
    if isinstance(a, AlertEvent):
        return a.to_dict()
    return {"fingerprint": a.fingerprint, "rule": a.rule, "kind": a.kind,
            "severity": str(getattr(a.severity, "value", a.severity)), "labels": dict(a.labels),
            "value": a.value, "threshold": a.threshold, "text": a.text, "fired_at": a.fired_at,
            "pending_since": a.pending_since}


__all__: Sequence[str] = ("AlertService", "LogSink", "LOG_SINK", "alert_dict")
