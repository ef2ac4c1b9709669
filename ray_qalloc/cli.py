"""The ``qalloc`` command (typer + rich).

``status`` and ``explain`` read the JobStore directly, so they answer even when no Ray
cluster is up; ``submit`` and ``demo`` connect to (or start) Ray.
"""

from __future__ import annotations

import json
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ray_qalloc.config import Settings, load_settings
from ray_qalloc.exceptions import QAllocError

app = typer.Typer(help="ray-qalloc: place quantum-circuit jobs on the best backend.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
def _make_console(stderr: bool = False) -> Console:
    """Tables are not squeezed to 80 columns when the output is a pipe or a file."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(file=stream, width=None if stream.isatty() else 180)


console = _make_console()
err_console = _make_console(stderr=True)


class Output(str, Enum):
    table = "table"
    json = "json"


_state: dict[str, Any] = {}


@app.callback()
def main(data_dir: Optional[Path] = typer.Option(None, "--data-dir", envvar="QALLOC_DATA_DIR",
                                                help="Where jobs, history and models live."),
         output: Output = typer.Option(Output.table, "--output", "-o", help="table or json.")) -> None:
    """Global options."""
    global console, err_console
    console, err_console = _make_console(), _make_console(stderr=True)
    _state["data_dir"] = data_dir
    _state["output"] = output


def _settings(**kw: Any) -> Settings:
    return load_settings(data_dir=_state.get("data_dir"), **kw)


def _json_out() -> bool:
    return _state.get("output") == Output.json


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _fail(exc: QAllocError) -> None:
    if _json_out():
        _print_json({"error": exc.to_dict()})
    else:
        err_console.print(f"[red]error[/red] {exc}")
    raise typer.Exit(2)


# ---- backends ------------------------------------------------------------------------------
@app.command()
def backends() -> None:
    """What the configured pool offers: a simulator pool per node (its method variants, sized
    here from this machine; on a cluster each node's pool measures its own) and each QPU with
    its calibration summary. Needs no Ray; ``qalloc -o json backends`` for the live view is the
    API's ``GET /v1/backends``."""
    import os

    from ray_qalloc.backends.aer import default_memory_bytes
    from ray_qalloc.backends.pools import pool_candidate_specs, pool_name
    from ray_qalloc.backends.registry import make_backend
    from ray_qalloc.resources import split_pool

    methods, others = split_pool(_settings().pool)
    rows = []
    if methods:
        for spec in pool_candidate_specs(pool_name(None), cores=os.cpu_count() or 1,
                                         memory_bytes=default_memory_bytes(), methods=methods):
            rows.append({"name": spec.name, "kind": spec.kind, "family": spec.family, "pool": spec.pool,
                         "method": spec.method, "threads": spec.threads, "device": None, "qubits": spec.num_qubits,
                         "slots": spec.slots, "resource": "qalloc_pool_cpu", "calibration": None})
    for name in others:
        b = make_backend(name)
        spec = b.spec()
        cal = b.calibration()
        rows.append({"name": spec.name, "kind": spec.kind, "family": spec.family, "pool": None,
                     "method": spec.method, "threads": spec.threads, "device": spec.device,
                     "qubits": spec.num_qubits, "slots": spec.slots, "resource": spec.resource_name,
                     "calibration": cal.summary() if cal is not None else None})
    if _json_out():
        _print_json(rows)
        return
    t = Table(title="ray-qalloc pool (simulator pool: one per node offering qalloc_pool_cpu; "
                    "cpu-local is this machine's)")
    for col in ("backend", "kind", "pool / device", "method", "threads", "qubits", "slots", "T1 µs", "T2 µs",
                "readout err", "1q err", "2q err"):
        t.add_column(col, justify="left" if col in ("backend", "kind", "pool / device", "method") else "right")
    for r in rows:
        c = r["calibration"] or {}
        t.add_row(r["name"], r["kind"], r["pool"] or r["device"] or "", r["method"] or "", str(r["threads"]),
                  str(r["qubits"]), str(r["slots"]),
                  _num(c.get("t1_median_us"), ".0f"), _num(c.get("t2_median_us"), ".0f"),
                  _num(c.get("readout_error_median"), ".3f"), _num(c.get("gate_1q_error_median"), ".1e"),
                  _num(c.get("gate_2q_error_median"), ".1e"))
    console.print(t)


def where(backend: str) -> tuple[str, str]:
    """(pool or device, method) of a backend name, for tables."""
    from ray_qalloc.backends.pools import METHOD_SHORT, parse_candidate

    c = parse_candidate(backend)
    if c is None:
        return backend, "QPU" if backend.startswith(("qpu_", "ibm_")) else "-"
    short = METHOD_SHORT.get(c.method, c.method)
    return c.pool, short if c.threads == 1 else f"{short} ×{c.threads} threads"


def _num(v: Any, fmt: str) -> str:
    if v is None or v != v:
        return "-"
    return format(v, fmt)


# ---- submit / status / explain -----------------------------------------------------------------
@app.command()
def submit(file: Path = typer.Argument(..., help="OpenQASM 2 or 3 file."),
           shots: int = typer.Option(1024), priority: str = typer.Option("normal"),
           intent: str = typer.Option("auto"), deadline_s: Optional[float] = typer.Option(None),
           fidelity_min: Optional[float] = typer.Option(None), tenant: str = typer.Option("default"),
           address: Optional[str] = typer.Option(None, help="Ray cluster address (default: start a local Ray)."),
           wait: bool = typer.Option(True, help="Wait for the result and print it."),
           timeout: float = typer.Option(600.0, help="Seconds to wait for the result.")) -> None:
    """Submit one circuit file."""
    from ray_qalloc.session import connect

    try:
        text = file.read_bytes()
    except OSError as exc:
        err_console.print(f"[red]error[/red] cannot read {file}: {exc.strerror}. To fix: pass an existing file.")
        raise typer.Exit(2) from None
    try:
        qa = connect(address, settings=_settings())
        try:
            handle = qa.submit(text.decode("utf-8", errors="strict") if _is_utf8(text) else text, shots=shots,
                               priority=priority, intent=intent, deadline_s=deadline_s,
                               fidelity_min=fidelity_min, tenant=tenant)
            out: dict[str, Any] = {"id": handle.id}
            if wait:
                res = handle.result(timeout=timeout)
                out.update({"state": "completed", "backend": res.backend, "wall_s": res.wall_s,
                            "queue_s": res.queue_s, "qpu_s": res.qpu_s, "counts": res.counts})
        finally:
            qa.shutdown()
    except QAllocError as exc:
        _fail(exc)
        return
    if _json_out():
        _print_json(out)
        return
    console.print(f"job [bold]{out['id']}[/bold]")
    if "counts" in out:
        top = sorted(out["counts"].items(), key=lambda kv: -kv[1])[:8]
        console.print(f"ran on [cyan]{out['backend']}[/cyan] in {out['wall_s']:.3f} s "
                      f"(waited {out['queue_s']:.3f} s)")
        for k, v in top:
            console.print(f"  {k}  {v}")


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _store():
    from ray_qalloc.store import JobStore

    return JobStore(_settings().resolved_store_url)


@app.command()
def status(job_id: str) -> None:
    """A job's state, backend and attempts (read from the store; no Ray needed)."""
    try:
        store = _store()
        rec = store.get(job_id)
        data = rec.public()
        data["attempt_history"] = store.attempts(job_id)
        data["transitions"] = store.transitions(job_id)
        data["result"] = rec.result
    except QAllocError as exc:
        _fail(exc)
        return
    if _json_out():
        _print_json(data)
        return
    console.print(f"job [bold]{job_id}[/bold]: [cyan]{data['state']}[/cyan] on {data['backend'] or '-'} "
                  f"(priority {data['priority']}, intent {data['intent']}, {data['shots']} shots)")
    for tr in data["transitions"]:
        console.print(f"  {time.strftime('%H:%M:%S', time.localtime(tr['at']))}  {tr['name']:<9} "
                      f"{tr['from_state'] or '-'} → {tr['to_state']}  {tr['stimulus'] or ''}")
    if data["error"]:
        console.print(f"  [red]{data['error']}[/red]")


@app.command()
def explain(job_id: str) -> None:
    """Why a job went where it went, and why not elsewhere."""
    try:
        store = _store()
        rec = store.get(job_id)
        data = rec.explanation or {"job_id": job_id, "chosen": None, "reason": "not yet placed", "backends": {}}
        data["state"] = rec.state.value
        data["failover_history"] = [{k: a[k] for k in ("n", "backend", "outcome", "error")}
                                    for a in store.attempts(job_id)]
    except QAllocError as exc:
        _fail(exc)
        return
    if _json_out():
        _print_json(data)
        return
    render_explanation(data)


def render_explanation(data: dict[str, Any]) -> None:
    console.print(f"job [bold]{data['job_id']}[/bold] ({data.get('state', '?')}): chosen "
                  f"[cyan]{data.get('chosen')}[/cyan] — {data.get('reason')}")
    t = Table()
    for col in ("backend", "status", "wait s", "run s", "fidelity", "cost", "objective", "why", "chosen"):
        t.add_column(col)
    rows = sorted(data.get("backends", {}).items(),
                  key=lambda kv: (kv[1]["status"] != "scored", kv[1].get("objective", 0.0)))
    for name, row in rows:
        if row["status"] == "filtered":
            t.add_row(name, "filtered", "", "", "", "", "", f"{row['filter']}: {'; '.join(row['reasons'])}", "")
        else:
            t.add_row(name, "scored", _num(row.get("wait_s"), ".3g"), _num(row.get("runtime_s"), ".3g"),
                      _num(row.get("fidelity"), ".3f"), _num(row.get("cost"), ".3g"),
                      _num(row.get("objective"), ".3f"), row.get("source", ""), "✔" if row.get("chosen") else "")
    console.print(t)
    for a in data.get("failover_history", []):
        if a["outcome"] != "completed":
            console.print(f"  attempt {a['n']} on {a['backend']}: {a['outcome']} {a.get('error') or ''}")


# ---- cost model: measure and train ----------------------------------------------------------
@app.command()
def measure(quick: bool = typer.Option(False, help="A small sweep (about a minute) instead of the full one."),
            circuits: Optional[Path] = typer.Option(None, help="Measure these instead: a directory of .qasm "
                                                                "files or a JSONL trace."),
            backends: str = typer.Option(",".join(("aer_statevector", "aer_mps", "aer_stabilizer",
                                                   "aer_density_matrix")), help="Comma-separated backend names."),
            time_cap_s: float = typer.Option(20.0, help="Longest run; longer runs are recorded as censored."),
            memory_cap_gib: float = typer.Option(4.0, help="Most memory one run may use."),
            resume: bool = typer.Option(True, help="Skip (circuit, backend) pairs already measured."),
            predicted_factor: float = typer.Option(
                1000.0, help="Record as censored, without running, a run predicted to take more than this many "
                             "time caps (0: always try; the time cap still bounds it)."),
            history: Optional[Path] = typer.Option(None, help="Run-history directory (default: DATA_DIR/history).")
            ) -> None:
    """Measure true runtimes (the cost model's training data) into the Parquet run history."""
    from ray_qalloc.costmodel.history import RunHistory
    from ray_qalloc.costmodel.measure import cases_from_path, default_sweep
    from ray_qalloc.costmodel.measure import measure as run_measure

    settings = _settings()
    cases = cases_from_path(circuits) if circuits else default_sweep(quick=quick)
    hist = RunHistory(history or settings.history_dir)
    report = run_measure(cases, [b for b in backends.split(",") if b], hist, time_cap_s=time_cap_s,
                         memory_cap_bytes=int(memory_cap_gib * 2**30), resume=resume,
                         predicted_factor=predicted_factor or None,
                         progress=not _json_out())
    out = {"history": str(hist.directory), "cases": len(cases), "attempted": report.attempted,
           "completed": report.completed, "censored": report.censored, "skipped_existing": report.skipped_existing,
           "errors": report.errors, "wall_s": report.wall_s}
    if _json_out():
        _print_json(out)
    else:
        console.print(f"measured {out['attempted']} runs ({out['completed']} completed, {out['censored']} censored, "
                      f"{out['errors']} errors, {out['skipped_existing']} already there) in {out['wall_s']:.0f} s "
                      f"→ {out['history']}")


@app.command()
def train(samples: int = typer.Option(8, help="Ray Tune trials."),
          quick: bool = typer.Option(False, help="A few short trials (CI-sized)."),
          history: Optional[Path] = typer.Option(None, help="Run-history directory (default: DATA_DIR/history)."),
          registry: Optional[Path] = typer.Option(None, help="Model registry (default: DATA_DIR/models).")) -> None:
    """Tune and fit the cost model on the run history; publish a versioned artifact."""
    from ray_qalloc.costmodel.tuning import train as run_train

    settings = _settings()
    reg = registry or settings.models_dir
    with console.status("tuning the cost model with Ray Tune ..."):
        path = run_train(history or settings.history_dir, reg, num_samples=samples, quick=quick)
    meta = json.loads((path / "meta.json").read_text())
    out = {"artifact": str(path), "n_rows": meta.get("n_rows"), "metrics": meta.get("metrics")}
    if _json_out():
        _print_json(out)
        return
    m = meta.get("metrics", {})
    console.print(f"published [bold]{path.name}[/bold] ({meta.get('n_rows')} rows) to {reg}")
    for key in sorted(m):
        if isinstance(m[key], (int, float)):
            console.print(f"  {key:<24} {m[key]:.4g}")
    console.print("A running allocator picks it up within seconds; new jobs are placed with it.")


# ---- demo --------------------------------------------------------------------------------------
@app.command()
def demo(jobs: int = typer.Option(0, help="Run only the first N demo jobs (0: all)."),
         num_cpus: Optional[int] = typer.Option(None, help="CPUs for the local Ray (default: all).")) -> None:
    """Start a local Ray with the default pool, run a mixed MQT Bench workload, print where each job ran."""
    from ray_qalloc.session import connect
    from ray_qalloc.workloads import DEMO, mqt_circuit

    items = list(DEMO[:jobs] if jobs else DEMO)
    t0 = time.time()
    with console.status("starting Ray, the allocator, the simulator pool and the emulated QPUs ..."):
        try:
            qa = connect(settings=_settings(), num_cpus=num_cpus)
        except QAllocError as exc:
            _fail(exc)
            return
    start_s = time.time() - t0
    rows = []
    try:
        handles = []
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=False, disable=_json_out()) as progress:
            sub = progress.add_task("submitting", total=len(items))
            for item in items:
                circuit = mqt_circuit(item.family, item.size)
                handles.append(qa.submit(circuit, shots=item.shots, priority=item.priority, intent=item.intent,
                                         fidelity_min=item.fidelity_min, deadline_s=item.deadline_s,
                                         tenant="demo"))
                progress.advance(sub)
            done = progress.add_task("running", total=len(items))
            for item, h in zip(items, handles):
                try:
                    res = h.result(timeout=600)
                    ex = h.explain()
                    chosen = ex["backends"].get(res.backend, {})
                    n_scored = sum(1 for r in ex["backends"].values() if r["status"] == "scored")
                    n_filtered = len(ex["backends"]) - n_scored
                    pool, method = where(res.backend)
                    rows.append({"job": item.label, "id": h.id, "priority": item.priority, "intent": item.intent,
                                 "backend": res.backend, "pool": pool, "method": method,
                                 "reason": _short_reason(res, n_scored, n_filtered),
                                 "wait_s": res.queue_s, "run_s": res.wall_s, "qpu_s": res.qpu_s,
                                 "est_fidelity": chosen.get("fidelity"), "attempts": res.attempts})
                except QAllocError as exc:
                    rows.append({"job": item.label, "id": h.id, "priority": item.priority, "intent": item.intent,
                                 "backend": "-", "pool": "-", "method": "-", "reason": str(exc)[:60], "wait_s": None, "run_s": None,
                                 "qpu_s": None, "est_fidelity": None, "attempts": None})
                progress.advance(done)
        qa.flush_history()
    finally:
        qa.shutdown()
    total_s = time.time() - t0
    if _json_out():
        _print_json({"jobs": rows, "startup_s": start_s, "total_s": total_s})
        return
    t = Table(title=f"ray-qalloc demo: {len(rows)} jobs (start-up {start_s:.1f} s, total {total_s:.1f} s)")
    for col in ("job", "priority", "intent", "pool / QPU", "method", "reason", "wait s", "run s", "QPU s",
                "est. fidelity"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["job"], r["priority"], r["intent"], r["pool"], r["method"], r["reason"], _num(r["wait_s"], ".3f"),
                  _num(r["run_s"], ".3f"), _num(r["qpu_s"], ".2f"), _num(r["est_fidelity"], ".3f"))
    console.print(t)
    console.print("Explain any job: [bold]qalloc explain JOB_ID[/bold]  (ids: qalloc -o json demo)")


def _short_reason(res: Any, n_scored: int, n_filtered: int) -> str:
    outcomes = [a.get("outcome") for a in (res.failover_history or [])]
    raced = outcomes.count("hedge_lost")
    moved = outcomes.count("restarted") + outcomes.count("preempted")   # stopped on purpose, not failed
    failed = len(outcomes) - 1 - raced - moved - outcomes.count("probe_stopped")
    if failed > 0:
        return f"failover after {failed} failed attempt(s)"
    if outcomes.count("restarted"):
        return "restarted: overran its prediction with no core free for a backup"
    if raced:   # a backup beside the first choice finished first (an idle-core probe or a hedge)
        return f"won a race against {res.attempts - 1} other method(s)"
    return f"best of {n_scored} candidates ({n_filtered} filtered out)"


# ---- the HTTP API ----------------------------------------------------------------------------
token_app = typer.Typer(help="API tokens of tenants (stored only as hashes).", no_args_is_help=True)
app.add_typer(token_app, name="token")


def _tenants():
    from ray_qalloc.tenants import TenantStore

    return TenantStore(_settings().resolved_store_url)


@token_app.command("create")
def token_create(tenant: str = typer.Argument(..., help="Tenant name (created if new)."),
                 admin: bool = typer.Option(False, "--admin", help="May use the admin routes."),
                 scope: list[str] = typer.Option([], "--scope", help="Grant a scope: soar (threat actions: "
                                                 "boost, reserve, pause, resume).")) -> None:
    """Print a new token for TENANT. It is shown once: only its hash is kept."""
    try:
        token = _tenants().create_token(tenant, admin=admin, scopes=tuple(scope))
    except QAllocError as exc:
        _fail(exc)
    if _json_out():
        _print_json({"tenant": tenant, "admin": admin, "scopes": sorted(set(scope)), "token": token})
    else:
        err_console.print(f"token for tenant [bold]{tenant}[/bold]{' (admin)' if admin else ''} "
                          "- shown once, keep it safe:")
        print(token)


@token_app.command("list")
def token_list(tenant: Optional[str] = typer.Argument(None, help="Only this tenant's tokens.")) -> None:
    """Token ids, tenants and state (never the tokens themselves)."""
    rows = _tenants().tokens(tenant)
    if _json_out():
        _print_json(rows)
        return
    t = Table("id", "tenant", "admin", "created", "revoked")
    for r in rows:
        t.add_row(r["id"], r["tenant"], "yes" if r["admin"] else "",
                  time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["created_at"])),
                  time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["revoked_at"])) if r["revoked_at"] else "")
    console.print(t)


@token_app.command("revoke")
def token_revoke(token_id: str = typer.Argument(..., help="The id part of the token (`qat_<id>_...`).")) -> None:
    """Revoke a token; every replica refuses it within 5 s."""
    if not _tenants().revoke(token_id):
        _fail(QAllocError(f"no active token with id {token_id!r}.", fix="see `qalloc token list`."))
    console.print(f"revoked {token_id}")


@app.command()
def quota(tenant: str = typer.Argument(...),
          max_active_jobs: Optional[int] = typer.Option(None, help="Jobs queued or running at once."),
          shots_per_day: Optional[int] = typer.Option(None, help="Shots per UTC day."),
          qpu_seconds_per_day: Optional[float] = typer.Option(None, help="QPU seconds per UTC day."),
          priorities: Optional[str] = typer.Option(None, help="Comma-separated classes, e.g. emergency,high,normal,batch.")
          ) -> None:
    """Show a tenant's quota and today's usage; with options, change the quota first."""
    from pydantic import ValidationError

    from ray_qalloc.tenants import Quota

    ts = _tenants()
    q = ts.quota(tenant)
    changes = {k: v for k, v in (("max_active_jobs", max_active_jobs), ("shots_per_day", shots_per_day),
                                 ("qpu_seconds_per_day", qpu_seconds_per_day)) if v is not None}
    if priorities is not None:
        changes["priorities"] = [p.strip() for p in priorities.split(",") if p.strip()]
    if changes:
        try:
            q = Quota(**{**q.model_dump(), **changes})
            ts.set_quota(tenant, q)
        except ValidationError as exc:
            _fail(QAllocError(f"invalid quota: {exc.errors()[0]['msg']}", field=str(exc.errors()[0]['loc'][0])))
        except QAllocError as exc:
            _fail(exc)
    data = {"tenant": tenant, "quota": q.model_dump(mode="json"), "usage": ts.usage(tenant)}
    if _json_out():
        _print_json(data)
        return
    t = Table("", "limit", "used today / now")
    t.add_row("active jobs", str(q.max_active_jobs), str(data["usage"]["active_jobs"]))
    t.add_row("shots per day", str(q.shots_per_day), str(data["usage"]["shots_today"]))
    t.add_row("QPU seconds per day", f"{q.qpu_seconds_per_day:g}", f"{data['usage']['qpu_seconds_today']:.1f}")
    t.add_row("priorities", ", ".join(data["quota"]["priorities"]), "")
    console.print(t)


@app.command()
def serve(host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 for all)."),
          port: int = typer.Option(8000, help="HTTP port."),
          num_cpus: Optional[int] = typer.Option(None, help="CPUs for a local Ray (default: all).")) -> None:
    """Start the HTTP API on Ray Serve (local Ray, embedded defaults) and serve until Ctrl-C."""
    import signal
    import threading

    import ray

    from ray_qalloc import serving
    from ray_qalloc.session import connect

    # Ctrl-C (or SIGTERM) at any point, start-up included, ends in the same orderly stop.
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    settings = _settings()
    try:
        qa = connect(settings=settings, num_cpus=num_cpus)
        url = serving.start(settings, host=host, port=port)
        syslog = serving.start_listener(settings)
    except QAllocError as exc:
        _fail(exc)
    if syslog is not None:
        err_console.print(f"syslog listener on {settings.events.syslog.host} (tcp {syslog.tcp_port}, udp "
                          f"{syslog.udp_port}) for tenant {settings.events.syslog.tenant!r}")
    err_console.print(f"ray-qalloc API on [bold]{url}[/bold]  (docs: {url}/docs, spec: {url}/openapi.json)\n"
                      f"create a token:  qalloc token create TENANT\n"
                      f"submit:          curl -H 'Authorization: Bearer $TOKEN' -H 'Content-Type: application/json' "
                      f"-d '{{\"qasm\": \"...\"}}' {url}/v1/jobs\n"
                      "Ctrl-C stops the server; accepted jobs stay in the store.")
    done.wait()
    err_console.print("stopping: no new runs; running jobs get up to 30 s to finish, queued ones stay stored")
    if syslog is not None:
        syslog.stop()   # flushes what it received
    serving.stop()
    qa.shutdown(drain_s=30.0)
    if ray.is_initialized():
        ray.shutdown()


@app.command()
def openapi(out: Optional[Path] = typer.Option(None, "--out", help="Write here instead of stdout.")) -> None:
    """The API's OpenAPI document (the committed copy is docs/openapi.json)."""
    from ray_qalloc.api import openapi_document

    text = openapi_document()
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
        err_console.print(f"wrote {out}")


@app.command()
def calibration(device: str = typer.Argument(..., help="QPU backend name, e.g. qpu_torino."),
                window: float = typer.Option(6.0, help="Trend window, hours."),
                period: float = typer.Option(900.0, help="Calibration refresh period, seconds (staleness)."),
                stale_after: float = typer.Option(2.0, help="Stale after this many periods without a calibration."),
                all_couplers: bool = typer.Option(False, "--all-couplers", help="List every coupler, not only those in alarm."),
                series_url: Optional[str] = typer.Option(None, "--series-url", envvar="QALLOC_CALSERIES_URL",
                                                         help="SQLAlchemy URL of the calibration series "
                                                              "(default: calibration.db under the data dir).")) -> None:
    """DEVICE's calibration as the quantum monitor recorded it: per-qubit values, trends, drift flags, staleness."""
    from ray_qalloc.monitor.calseries import CalibrationSeries
    from ray_qalloc.monitor.cli import calibration_report, default_series_url, report_data

    try:
        series = CalibrationSeries(series_url or default_series_url(_settings().data_dir))
        try:
            if _json_out():
                _print_json(report_data(device, series, window_s=window * 3600, period_s=period,
                                        max_stale_periods=stale_after))
            else:
                calibration_report(device, series, None, console, window_s=window * 3600, period_s=period,
                                   max_stale_periods=stale_after, all_couplers=all_couplers)
        finally:
            series.close()
    except QAllocError as exc:
        _fail(exc)


def _add_operator_commands() -> None:
    from ray_qalloc.cli_ops import audit, backend_app, sinks

    app.add_typer(backend_app, name="backend")
    app.command("audit")(audit)
    app.command("sinks")(sinks)
    from ray_qalloc.cli_config import alerts, config_app

    app.add_typer(config_app, name="config")
    app.command("alerts")(alerts)


_add_operator_commands()

if __name__ == "__main__":  # pragma: no cover
    app()


model_app = typer.Typer(help="Cost-model versions: list, roll back, restore (each audited and announced).",
                        no_args_is_help=True)
app.add_typer(model_app, name="model")


def _model_ops() -> tuple[Any, Any, Any]:
    """Settings, the audited admin state and the alert outbox of this data directory."""
    from ray_qalloc.adminstate import AdminState
    from ray_qalloc.alerts.outbox import Outbox
    from ray_qalloc.alerts.service import LOG_SINK

    s = _settings()
    store = _store()
    sinks = [LOG_SINK, *(n for n, c in s.alerts.sink_configs().items() if "alerts" in c.records)]
    return s, AdminState(store.engine), Outbox(store.engine, sinks)


@model_app.command("versions")
def model_versions() -> None:
    """Every model version: active, available, retired, candidate."""
    from ray_qalloc.costmodel.versions import versions

    rows = versions(_settings().models_dir)
    if _json_out():
        _print_json(rows)
        return
    for r in rows:
        typer.echo(f"{r['version']:<36} {r['state']:<10} rows={r['n_rows']} cv_rmse_log={r['cv_rmse_log']}")


@model_app.command("rollback")
def model_rollback(to: Optional[str] = typer.Argument(None, help="Version to serve (default: the previous one)."),
                   reason: str = typer.Option("", help="Why (kept in the audit trail).")) -> None:
    """Retire the version in service (nothing is deleted); the allocator swaps within seconds."""
    from ray_qalloc.costmodel.versions import rollback

    s, admin, outbox = _model_ops()
    try:
        out = rollback(s.models_dir, to, actor="cli", admin=admin, outbox=outbox, detail=reason)
    except QAllocError as exc:
        _fail(exc)
        return
    _print_json(out) if _json_out() else typer.echo(f"retired {', '.join(out['retired'])}; serving {out['active']}")


@model_app.command("restore")
def model_restore(version: str = typer.Argument(..., help="A retired version.")) -> None:
    """Bring a retired version back (it serves if it is the newest)."""
    from ray_qalloc.costmodel.versions import restore

    s, admin, outbox = _model_ops()
    try:
        path = restore(s.models_dir, version, actor="cli", admin=admin, outbox=outbox)
    except QAllocError as exc:
        _fail(exc)
        return
    typer.echo(f"restored {path.name}")
