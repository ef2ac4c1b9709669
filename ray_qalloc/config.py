"""One typed configuration tree, with ``QALLOC_*`` environment overrides.

Why a tree and not loose keyword arguments: the allocator, the backends, the CLI and the
tests all need the same limits and paths, and the allocator actor is rebuilt by Ray from
its constructor arguments after a crash, so the whole configuration must be one
picklable value.

Environment overrides use ``QALLOC_`` plus the field path joined by ``__`` (for example
``QALLOC_DATA_DIR=/srv/qalloc`` or ``QALLOC_LIMITS__MAX_QUBITS=40``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ray_qalloc.predictive import PredictiveScalingSettings
from ray_qalloc.costmodel.policy import LearningSettings

from ray_qalloc.exceptions import ConfigError
from ray_qalloc.monitor.drift import DriftSettings

ENV_PREFIX = "QALLOC_"


class Limits(BaseModel):
    """Intake limits: checked before any expensive work is done on a job."""

    model_config = ConfigDict(frozen=True)

    max_qasm_bytes: int = Field(1_000_000, gt=0, description="Largest accepted circuit text, in bytes.")
    max_qubits: int = Field(160, gt=0, description="Most qubits a circuit may declare.")
    max_clbits: int = Field(1_024, gt=0, description="Most classical bits a circuit may declare.")
    max_gates: int = Field(2_000_000, gt=0,
                           description="Most operations after expanding custom gate definitions.")
    max_shots: int = Field(1_000_000, gt=0, description="Most shots a job may ask for.")
    max_deadline_s: float = Field(7 * 86_400.0, gt=0, description="Longest accepted deadline.")


class ApiSettings(BaseModel):
    """The HTTP API's own limits (the intake limits apply to every job on top)."""

    model_config = ConfigDict(frozen=True)

    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0, description="Largest accepted request body.")
    max_batch_jobs: int = Field(1_000, gt=0, description="Most jobs in one POST /v1/jobs:batch.")
    max_result_wait_s: float = Field(60.0, gt=0, description="Longest GET .../result waits before answering 202.")
    max_page: int = Field(500, gt=0, description="Most jobs in one page of GET /v1/jobs.")
    replicas: int = Field(1, gt=0, description="Serve replicas of the ingress.")
    max_ongoing_requests: int = Field(64, gt=0, description="Requests one replica works on at once.")
    replica_resources: dict[str, float] = Field(default_factory=dict, description="Custom resources each "
                                                "replica needs (e.g. to keep replicas on the head node).")


class SyslogListenerSettings(BaseModel):
    """An optional syslog receiver for tools that only forward syslog (RFC 5424/3164 lines, CEF
    or LEEF inside them): TCP with octet-counting framing (RFC 6587) or newlines, and UDP."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0: every interface).")
    tcp_port: int | None = Field(None, ge=0, le=65535, description="TCP port (None: no TCP listener; 0: any free port).")
    udp_port: int | None = Field(None, ge=0, le=65535, description="UDP port (None: no UDP listener; 0: any free port).")
    tenant: str = Field("syslog", min_length=1, max_length=64, description="Tenant the received events belong to.")
    max_message_bytes: int = Field(65_536, gt=0, description="Longest accepted syslog message.")


class EventSettings(BaseModel):
    """Security events in (SIEM/SOAR): limits per tenant, retention, the syslog listener."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    retention_s: float = Field(30 * 86_400.0, gt=0, description="How long stored events are kept.")
    max_batch_records: int = Field(10_000, gt=0, description="Most records in one POST /v1/events.")
    max_record_bytes: int = Field(65_536, gt=0, description="Longest accepted record (a line, a JSON object).")
    rate_per_s: float = Field(20_000.0, gt=0, description="Events a tenant may send per second, sustained "
                              "(a token bucket; beyond it 429 with Retry-After).")
    burst: int = Field(100_000, gt=0, description="Events a tenant may send at once above its rate.")
    syslog: SyslogListenerSettings = Field(default_factory=SyslogListenerSettings)


class RuleMatch(BaseModel):
    """Which normalized security events a threat rule looks at (all given conditions must hold)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    severity_min: int = Field(0, ge=0, le=6, description="OCSF severity_id at least (0 any; 4 High, 5 Critical).")
    categories: list[int] = Field(default_factory=list, description="OCSF category_uid, any of (empty: any).")
    classes: list[int] = Field(default_factory=list, description="OCSF class_uid, any of (empty: any).")
    tenants: list[str] = Field(default_factory=list, description="Tenants that sent the event (empty: any).")
    formats: list[str] = Field(default_factory=list, description="cef, leef, syslog, ocsf, stix (empty: any).")
    observables: dict[str, list[str]] = Field(default_factory=dict, description="kind (ip, hostname, user, "
                                              "sha256, ...) -> values, any of (empty: any).")
    message_contains: str | None = Field(None, min_length=1, max_length=200,
                                         description="Case-insensitive text in the event's message.")


class RuleRate(BaseModel):
    """Fire only when ``count`` matching events arrived within ``window_s`` (per tenant that sent them)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    count: int = Field(ge=1, le=1_000_000)
    window_s: float = Field(gt=0, le=86_400)


class RuleAction(BaseModel):
    """What a rule does when it fires: a timed action (threatdesk.py) or a job template."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["boost", "reserve", "pause", "submit"]
    tenant: str = Field("$event.tenant", description="Whose jobs (boost, pause) or who submits (submit): a "
                        "tenant name, or $event.tenant for the tenant that sent the event.")
    to: Literal["emergency", "high", "normal"] | None = Field(None, description="boost: the class.")
    target: str | None = Field(None, description="reserve: a backend or a pool.")
    slots: int | None = Field(None, ge=1, le=1024, description="reserve: how many.")
    for_s: float | None = Field(None, gt=0, le=30 * 86_400, description="How long (pause: None until resumed).")
    template: str | None = Field(None, description="submit: a name in threat.templates.")

    @model_validator(mode="after")
    def _needs(self) -> "RuleAction":
        need = {"boost": ("to", "for_s"), "reserve": ("target", "slots", "for_s"), "pause": (), "submit": ("template",)}
        missing = [f for f in need[self.kind] if getattr(self, f) is None]
        if missing:
            raise ValueError(f"a {self.kind} action needs {', '.join(missing)}")
        return self


class ThreatRule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    match: RuleMatch = Field(default_factory=RuleMatch)
    rate: RuleRate | None = None
    action: RuleAction
    enabled: bool = True


class TemplateJob(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    qasm: str = Field(min_length=1, description="OpenQASM 2 or 3.")
    shots: int = Field(1024, ge=1)
    priority: Literal["emergency", "high", "normal", "batch"] = "high"
    intent: Literal["auto", "quantum", "classical"] = "auto"
    backends: list[str] | None = None


class JobTemplate(BaseModel):
    """A named set of circuits and options, submitted by a threat rule or a SOAR playbook by name."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    jobs: list[TemplateJob] = Field(min_length=1, max_length=100)
    description: str = ""


class ThreatSettings(BaseModel):
    """Threat-driven allocation: rules over normalized security events, and job templates."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rules: list[ThreatRule] = Field(default_factory=list, description="Evaluated on every stored event.")
    templates: dict[str, JobTemplate] = Field(default_factory=dict, description="Name -> jobs (submit actions, "
                                              "POST /v1/threat/templates/{name}:submit).")
    poll_s: float = Field(0.25, gt=0, le=60, description="How often new events are read for the rules.")
    settle_s: float = Field(2.0, ge=0, le=300, description="Events are read again this far back (a writer "
                            "that committed late is not missed; each event is evaluated once).")

    @model_validator(mode="after")
    def _consistent(self) -> "ThreatSettings":
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ValueError("threat rule names must be unique")
        for r in self.rules:
            if r.action.kind == "submit" and r.action.template not in self.templates:
                raise ValueError(f"rule {r.name!r} submits template {r.action.template!r}, which is not in "
                                 f"threat.templates")
        return self


class HedgeSettings(BaseModel):
    """Hedged runs: the first defence against a wrong runtime prediction."""

    model_config = ConfigDict(frozen=True)

    enabled: bool = Field(True, description="Start backup runs for overrunning simulator runs.")
    overrun_factor: float = Field(3.0, gt=1, description="A run is overrunning once it has run this many "
                                  "times its predicted runtime (then its overrun is remembered at once).")
    min_overrun_s: float = Field(0.5, ge=0, description="Runs shorter than this are never hedged (a backup "
                                 "costs a worker start).")
    interval_s: float = Field(0.25, gt=0, description="How often running jobs are checked for overruns.")
    probe_idle: bool = Field(True, description="With nothing queued, race a started simulator run against a "
                             "method never measured on its circuit, on an idle core (stopped as soon as a "
                             "job waits): how a method the model wrongly believes slow gets measured.")
    restart: bool = Field(True, description="An overrunning simulator run that got no backup (no core was "
                          "free) is stopped and placed again without that backend, once per job, when another "
                          "method on its pool is expected to need at most half its remaining time.")
    restart_min_s: float = Field(5.0, ge=0, description="A run is never restarted before it has run this long: "
                                 "a restart throws away what ran, and in its first seconds a run may be waiting "
                                 "for its worker to start.")


class ClassWeights(BaseModel):
    """How one priority class trades time against fidelity and money (see placement.pipeline)."""

    model_config = ConfigDict(frozen=True)

    fidelity: float = Field(4.0, ge=0, description="Weight of -log(fidelity) against log(completion time).")
    money: float = Field(0.0, ge=0, description="Weight of the money cost.")


def _default_class_weights() -> dict[str, ClassWeights]:
    from ray_qalloc.placement.pipeline import CLASS_WEIGHTS

    return {c: ClassWeights(fidelity=w.fidelity, money=w.money) for c, w in CLASS_WEIGHTS.items()}


class PlacementSettings(BaseModel):
    """The selector's trade-offs; the allocator and the placement benchmark read the same ones."""

    model_config = ConfigDict(frozen=True)

    class_weights: dict[str, ClassWeights] = Field(default_factory=_default_class_weights,
                                                   description="Per priority class: fidelity and money weights.")
    quantum_fidelity_factor: float = Field(2.0, ge=0, description="Quantum-intent jobs weigh fidelity this "
                                           "many times their class's weight.")
    explore_factor: float = Field(4.0, ge=1, le=10, description="How much faster than predicted a little-"
                                  "observed backend is shown to placement so that it is tried now and then "
                                  "(1: never explore; an exploratory choice costs at most this factor).")
    coherence_budget: float | None = Field(1.0, gt=0, description="A QPU is a candidate only if the circuit's "
                                           "scheduled duration fits in this many coherence times (min T1, T2) "
                                           "of the weakest of the qubits it would use (None: no check).")
    foreign_cpu: bool = Field(True, description="Plan on the cores a pool's node really has free: CPU its "
                              "node measures busy with work that is not ours (other jobs on a shared HPC node) "
                              "is taken off the pool's cores for new starts and wait estimates (never below one).")
    foreign_cpu_slack: float = Field(0.5, ge=0, description="Cores of foreign load ignored (measurement noise, "
                                     "Ray's own processes) before a core is taken off a pool.")
    provider_job_s: float = Field(60.0, ge=0, description="Seconds one job of another user ahead of ours in a "
                                  "QPU provider's queue is taken to hold the device (providers report how many jobs "
                                  "wait, not how long they take): the provider's pending jobs times this is added "
                                  "to the QPU's wait (0: ignore the provider's queue).")

    def table(self) -> Any:
        from ray_qalloc.placement.pipeline import Weights, WeightTable

        return WeightTable({c: Weights(w.fidelity, w.money) for c, w in self.class_weights.items()},
                           self.quantum_fidelity_factor)


class MonitorSettings(BaseModel):
    """The quantum monitor: how often QPU calibrations are read, kept and judged stale."""

    model_config = ConfigDict(frozen=True)

    hub: bool = Field(True, description="Read calibrations in a hub actor of their own and hand the allocator "
                      "one digest per period (False: inside the allocator, as tests with injected backends do).")
    calibration_period_s: float = Field(300.0, gt=0, description="How often every QPU's calibration is read "
                                        "(placement, the series and drift detection use the newest).")
    max_stale_periods: float = Field(3.0, gt=0, description="A calibration older than this many periods "
                                     "is stale (an alert; placement keeps the last values).")
    retention_s: float = Field(30 * 86_400.0, gt=0, description="How long calibration samples are kept.")
    series_url: str | None = Field(None, description="SQLAlchemy URL of the calibration series "
                                   "(None: calibration.db in data_dir).")
    emulated_drift: DriftSettings | None = Field(None, description="How the emulated QPUs drift (None: their "
                                                 "calibration stays the snapshot's). Each device draws its own "
                                                 "wander from the seed and its name.")


def _default_alert_rules() -> list[dict[str, Any]]:
    """What an operator of a fresh install is told about without writing a rule."""
    return [
        {"name": "queue-wait", "kind": "queue_wait", "severity": "warning", "for_s": 30.0,
         "params": {"thresholds_s": {"emergency": 10.0, "high": 120.0, "normal": 1800.0, "batch": 6 * 3600.0}}},
        {"name": "backend-down", "kind": "backend_down", "severity": "error", "for_s": 60.0},
        {"name": "backend-flapping", "kind": "backend_flapping", "severity": "warning"},
        {"name": "breaker-open", "kind": "breaker_open", "severity": "warning"},
        {"name": "calibration-drift", "kind": "calibration_drift", "severity": "warning",
         "params": {"window_s": 3600.0, "min_events": 1, "min_magnitude": 0.69}},
        {"name": "calibration-stale", "kind": "calibration_stale", "severity": "warning",
         "params": {"max_age_s": 86_400.0}},
        {"name": "deadline-misses", "kind": "deadline_miss_rate", "severity": "warning"},
        {"name": "prediction-error", "kind": "prediction_error", "severity": "info"},
        {"name": "quota-exhaustion", "kind": "quota_exhaustion", "severity": "notice"},
        {"name": "node-memory", "kind": "node_memory", "severity": "warning", "for_s": 30.0},
    ]


class AlertSettings(BaseModel):
    """Alert rules and where alerts go (``ray_qalloc.alerts``); validated at start-up and on change."""

    model_config = ConfigDict(frozen=True)

    enabled: bool = Field(True, description="Evaluate the rules and deliver alerts.")
    interval_s: float = Field(5.0, gt=0, description="How often the rules are evaluated.")
    rules: list[dict[str, Any]] = Field(default_factory=_default_alert_rules,
                                        description="Alert rules (ray_qalloc.alerts.rules: name, kind, severity, "
                                                    "for_s, labels, params).")
    rate_limit: dict[str, Any] = Field(default_factory=dict, description="Default rate limit per rule "
                                       "(max_notifications, window_s).")
    sinks: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Name -> a webhook "
                                             "({type: webhook, url, secret, ...}), syslog "
                                             "({type: syslog, host, port, protocol, ...}) or Splunk HEC "
                                             "({type: splunk_hec, url, token, index, ...}) receiver; each "
                                             "with format json (default), ocsf or cef.")
    retry: dict[str, Any] = Field(default_factory=dict, description="Retry policy of failing sinks "
                                  "(base_s, multiplier, max_s, jitter, give_up_after_s).")
    retention_s: float = Field(30 * 86_400.0, gt=0, description="How long delivered alerts are kept.")

    @model_validator(mode="after")
    def _valid(self) -> "AlertSettings":
        self.alert_rules()
        self.sink_configs()
        self.retry_policy()
        return self

    def alert_rules(self) -> Any:
        from ray_qalloc.alerts.rules import load_rules

        return load_rules({"rules": self.rules, **({"rate_limit": self.rate_limit} if self.rate_limit else {})})

    def sink_configs(self) -> dict[str, Any]:
        from ray_qalloc.alerts.sinks import SINK_CONFIGS

        out = {}
        for name, raw in self.sinks.items():
            kind = SINK_CONFIGS.get(str(raw.get("type")))
            if kind is None:
                kinds = ", ".join(repr(k) for k in SINK_CONFIGS)
                raise ValueError(f"sink {name!r}: type must be one of {kinds}, not {raw.get('type')!r}. "
                                 f"To fix: set the sink's \"type\" to one of them")
            try:
                out[name] = kind.model_validate(raw)
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(x) for x in err["loc"])
                raise ValueError(f"sink {name!r}: {where or 'config'}: {err['msg']}") from None
        return out

    def retry_policy(self) -> Any:
        from ray_qalloc.alerts.outbox import RetryPolicy

        return RetryPolicy(**self.retry)


class Settings(BaseModel):
    """Everything ray-qalloc reads at start-up."""

    model_config = ConfigDict(frozen=True)

    data_dir: Path = Field(default_factory=lambda: Path(platformdirs.user_data_dir("ray-qalloc")),
                           description="Where everything written at run time lives.")
    store_url: str | None = Field(None, description="SQLAlchemy URL of the JobStore; "
                                  "default: SQLite file jobs.db under data_dir.")
    namespace: str = Field("qalloc", description="Ray namespace of the allocator and backends.")
    allocator_name: str = Field("qalloc-allocator", description="Name of the detached allocator actor.")
    limits: Limits = Field(default_factory=Limits)
    api: ApiSettings = Field(default_factory=ApiSettings)
    pool: list[str] = Field(default_factory=lambda: ["default"],
                            description="Backends to start: 'default', or backend names.")
    sim_threads: int = Field(1, gt=0, description="Threads one simulator run may use.")
    health_interval_s: float = Field(2.0, gt=0, description="How often backends are pinged.")
    health_timeout_s: float = Field(5.0, gt=0, description="A ping slower than this marks a backend unhealthy.")
    run_timeout_floor_s: float = Field(120.0, gt=0,
                                       description="An attempt never times out sooner than this.")
    run_timeout_factor: float = Field(20.0, gt=1,
                                      description="An attempt times out after this many predicted runtimes.")
    hedge: HedgeSettings = Field(default_factory=HedgeSettings)
    placement: PlacementSettings = Field(default_factory=PlacementSettings)
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)
    events: EventSettings = Field(default_factory=EventSettings)
    threat: ThreatSettings = Field(default_factory=ThreatSettings)
    scaling: PredictiveScalingSettings = Field(default_factory=PredictiveScalingSettings,
                                               description="Predictive scaling of the elastic pool (off by default).")
    learning: LearningSettings = Field(default_factory=LearningSettings,
                                       description="Online learning policy (correction | bandit) and the "
                                                   "unattended retraining loop (off by default).")
    max_attempts: int = Field(5, gt=0, description="Attempts per job before it is failed.")
    breaker_failures: int = Field(3, gt=0, description="Consecutive failed runs that open a backend's "
                                  "circuit breaker (no new runs until a probe succeeds).")
    breaker_cooldown_s: float = Field(5.0, gt=0, description="First wait before an open breaker is probed; "
                                      "doubles on each failed probe.")
    breaker_max_cooldown_s: float = Field(300.0, gt=0, description="Longest wait between probes.")
    elastic_idle_s: float = Field(300.0, gt=0, description="An elastic backend (one whose resource came "
                                  "with an autoscaled node) idle this long is stopped, so the node can go.")
    call_timeout_s: float = Field(30.0, gt=0, description="Bound on every control call (status, cancel, ...) "
                                  "made to an actor.")
    history_flush_s: float = Field(5.0, gt=0, description="How often the Parquet run history is written.")
    tenant_backends: dict[str, list[str]] = Field(
        default_factory=dict, description="Tenant -> backends it may use (names, or kind:qpu / kind:simulator); "
                                          "tenants not listed may use any backend.")
    max_calibration_age_s: float | None = Field(
        None, gt=0, description="QPUs with an older calibration are not used until refreshed (None: no limit).")
    scheduler: dict[str, Any] = Field(
        default_factory=lambda: {"preempt_min_remaining_s": 10.0},
        description="SchedulerConfig fields: reserved (backend -> emergency slots), aging_s, "
                    "qpu_wait_high_s, qpu_wait_low_s, lookahead, preempt_min_remaining_s, preemption.")

    @model_validator(mode="after")
    def _scheduler_keys(self) -> "Settings":
        from dataclasses import fields

        from ray_qalloc.placement.scheduler import SchedulerConfig

        known = {f.name for f in fields(SchedulerConfig)}
        unknown = sorted(set(self.scheduler) - known)
        if unknown:
            raise ValueError(f"unknown scheduler setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return self

    @model_validator(mode="after")
    def _absolute(self) -> "Settings":
        if not self.data_dir.is_absolute():
            object.__setattr__(self, "data_dir", self.data_dir.resolve())
        return self

    @property
    def resolved_store_url(self) -> str:
        return self.store_url or f"sqlite:///{self.data_dir / 'jobs.db'}"

    @property
    def history_dir(self) -> Path:
        return self.data_dir / "history"

    @property
    def models_dir(self) -> Path:
        """The model registry: ``qalloc train`` publishes here, the allocator loads from here."""
        return self.data_dir / "models"

    def scheduler_config(self) -> Any:
        """The scheduler's typed config from these settings (the allocator's and the simulation's)."""
        from ray_qalloc.placement.scheduler import SchedulerConfig

        return SchedulerConfig(**self.scheduler)

    def copy_with(self, **changes: Any) -> "Settings":
        return self.model_copy(update=changes)


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or not value:
            continue
        path = key[len(ENV_PREFIX):].lower().split("__")
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        leaf = path[-1]
        if value.lstrip()[:1] in ("{", "["):
            try:
                node[leaf] = json.loads(value)
                continue
            except json.JSONDecodeError:
                raise ConfigError(f"{key} is not valid JSON.", fix="quote keys, e.g. '{\"reserved\": {\"aer_mps\": 1}}'.") from None
        node[leaf] = value.split(",") if leaf == "pool" else value
    return tree


def load_settings(environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Defaults, then ``QALLOC_*`` variables, then explicit keyword arguments."""
    data = _env_overrides(dict(os.environ if environ is None else environ))
    known = set(Settings.model_fields)
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        raise ConfigError(f"unknown setting(s) from the environment: {', '.join('QALLOC_' + k.upper() for k in unknown)}.",
                          fix="remove them or check their spelling against ray_qalloc.config.Settings.")
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("limits", "hedge", "api", "placement") and isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"setting {where!r} is invalid: {err['msg']}.", field=where,
                          fix=f"set QALLOC_{where.upper().replace('.', '__')} to a valid value.") from None
