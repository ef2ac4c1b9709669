"""``qalloc backend cordon|drain|uncordon|window|status`` and ``qalloc audit``: operators'
commands, over the HTTP API with an admin token (``QALLOC_URL``, ``QALLOC_TOKEN``).

Why over HTTP and not through Ray: an operator steers a running service from wherever the API
is reachable, with the same token checks and audit trail as any other admin call; the CLI
needs neither Ray nor the cluster's data directory.

``qalloc sinks`` is the exception: it only reads (each sink's forwarding position and
deliveries, from the job store's database, like ``qalloc status``), so it answers where the
store is reachable even when the API or the allocator is down — which is when it is needed.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any, Optional

import typer
from rich.table import Table

from ray_qalloc import cli
from ray_qalloc.exceptions import QAllocError

backend_app = typer.Typer(help="Take backends out of service and back (admin token; QALLOC_URL, QALLOC_TOKEN).",
                          no_args_is_help=True)

URL = typer.Option(None, "--url", envvar="QALLOC_URL", help="The API (default http://127.0.0.1:8000).")
TOKEN = typer.Option(None, "--token", envvar="QALLOC_TOKEN", help="An admin token.")


def _client(url: Optional[str], token: Optional[str]) -> Any:
    from ray_qalloc.client import Client

    try:
        return Client(url, token, retries=1)
    except QAllocError as exc:
        cli._fail(exc)


def _when(ts: Optional[float]) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _parse_time(text: str) -> float:
    """Unix seconds, ``+30m``/``+2h``/``+1d`` from now, or an ISO 8601 time (UTC if no zone)."""
    text = text.strip()
    if text.startswith("+") and text[-1:] in "smhd":
        try:
            return time.time() + float(text[1:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[text[-1]]
        except ValueError:
            pass
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a time: give Unix seconds, +30m / +2h / +1d, "
                                 "or ISO 8601 (2026-12-24T08:00Z).") from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def _show(status: dict[str, Any]) -> None:
    if cli._json_out():
        cli._print_json(status)
        return
    t = Table(title="maintenance" + ("" if status.get("drained", True) else " (runs still going)"))
    for col in ("backend", "state", "reason", "by", "since", "windows", "running", "waiting for it"):
        t.add_column(col)
    for r in status["backends"]:
        state = "draining" if r["draining"] else "cordoned" if r["cordoned"] else \
            "in window" if r["in_window"] else "scheduled" if r["windows"] else "in service"
        windows = ", ".join(f"{_when(w['start'])} → {_when(w['end'])}" for w in r["windows"])
        t.add_row(r["backend"], state, r["reason"], r["by"], _when(r["since"]), windows,
                  str(len(r["running"])), str(len(r["waiting_for_it"])))
    cli.console.print(t)


def _run(fn: Any, *args: Any, **kw: Any) -> Any:
    try:
        return fn(*args, **kw)
    except QAllocError as exc:
        cli._fail(exc)


@backend_app.command("cordon")
def cordon(name: str = typer.Argument(..., help="A pool, a pool's method (pool/method) or a QPU."),
           reason: str = typer.Option("", "--reason", help="Shown in explain and the audit trail."),
           url: Optional[str] = URL, token: Optional[str] = TOKEN) -> None:
    """No new runs start on NAME; running jobs finish; queued jobs go to their next-best backend."""
    _show(_run(_client(url, token).cordon, name, reason))


@backend_app.command("drain")
def drain(name: str = typer.Argument(...), reason: str = typer.Option("", "--reason"),
          wait: float = typer.Option(60.0, "--wait", help="Seconds to wait for its running jobs."),
          url: Optional[str] = URL, token: Optional[str] = TOKEN) -> None:
    """Cordon NAME and wait until nothing runs there (exit code 1 if runs were still going)."""
    out = _run(_client(url, token).drain, name, reason, wait)
    _show(out)
    if not out.get("drained"):
        raise typer.Exit(1)


@backend_app.command("uncordon")
def uncordon(name: str = typer.Argument(...), url: Optional[str] = URL, token: Optional[str] = TOKEN) -> None:
    """NAME takes new runs again."""
    _show(_run(_client(url, token).uncordon, name))


@backend_app.command("window")
def window(name: str = typer.Argument(...),
           start: str = typer.Option(..., "--start", help="Unix seconds, +2h, or ISO 8601."),
           end: str = typer.Option(..., "--end", help="Unix seconds, +4h, or ISO 8601."),
           reason: str = typer.Option("", "--reason"),
           clear: bool = typer.Option(False, "--clear", help="Remove NAME's windows instead."),
           url: Optional[str] = URL, token: Optional[str] = TOKEN) -> None:
    """Announce a maintenance window: no run starts on NAME that would not end before it."""
    c = _client(url, token)
    if clear:
        _show(_run(c.clear_windows, name))
    else:
        _show(_run(c.add_window, name, _parse_time(start), _parse_time(end), reason))


@backend_app.command("status")
def status(name: Optional[str] = typer.Argument(None), url: Optional[str] = URL,
           token: Optional[str] = TOKEN) -> None:
    """Backends under maintenance (or NAME's state)."""
    _show(_run(_client(url, token).maintenance, name))


def audit(key: Optional[str] = typer.Option(None, "--key", help="Only changes of this key (e.g. maintenance)."),
          limit: int = typer.Option(50, "--limit"), url: Optional[str] = URL, token: Optional[str] = TOKEN) -> None:
    """Operators' changes, newest first: who, when, what."""
    rows = _run(_client(url, token).audit, key, limit)
    if cli._json_out():
        cli._print_json(rows)
        return
    t = Table("when", "actor", "action", "key", "detail")
    for r in rows:
        t.add_row(_when(r["at"]), r["actor"], r["action"], r["key"], r["detail"])
    cli.console.print(t)


def _sinks_view(settings: Any) -> list[dict[str, Any]]:
    """Every configured sink: what it is, what it receives, how far forwarding got, and its
    alert deliveries (from the outbox), read from the store's database."""
    from ray_qalloc.alerts.outbox import Outbox
    from ray_qalloc.integration.forwarder import sink_status
    from ray_qalloc.store import make_engine

    configs = settings.alerts.sink_configs()
    engine = make_engine(settings.resolved_store_url)
    try:
        forwarded = {r["sink"]: r for r in sink_status(engine, {n: c.forwarded() for n, c in configs.items()
                                                                if c.forwarded()})}
        alerts = Outbox(engine, ["log"]).counts()     # every sink with delivery rows
    finally:
        engine.dispose()
    out = []
    for name, c in configs.items():
        f = forwarded.get(name, {})
        out.append({"sink": name, "type": c.type, "format": c.format, "records": list(c.records),
                    "position": f.get("position"), "lag": f.get("lag"), "attempts": f.get("attempts", 0),
                    "next_attempt_at": f.get("next_attempt_at"), "last_error": f.get("last_error"),
                    "last_error_at": f.get("last_error_at"), "last_delivered_at": f.get("last_delivered_at"),
                    "delivered": f.get("delivered", 0) if f else None, "dead": f.get("dead", 0) if f else None,
                    "alerts": (alerts.get(name, {"pending": 0, "delivered": 0, "dead": 0})
                               if "alerts" in c.records else None)})
    return out


def sinks() -> None:
    """Each sink: type, format, what it receives, and how far job and audit forwarding got
    (position, records behind, delivered / dead-lettered, last error, next attempt) beside its
    alert deliveries. Reads the job store directly: no API or Ray needed."""
    try:
        view = _sinks_view(cli._settings())
    except QAllocError as exc:
        cli._fail(exc)
    except ValueError as exc:      # a sink's configuration (QALLOC_ALERTS) does not validate
        cli._fail(QAllocError(str(exc)))
    if cli._json_out():
        cli._print_json(view)
        return
    if not view:
        cli.console.print("no sink is configured (alerts.sinks)")
        return
    t = Table(title="sinks (jobs / audit: forwarded from the change feed; alerts: the outbox)")
    for col in ("sink", "type", "format", "records", "position", "lag", "delivered", "dead", "alerts p/d/x",
                "last error", "next attempt"):
        t.add_column(col, justify="right" if col in ("lag", "delivered", "dead") else "left")
    for r in view:
        a = r["alerts"]
        t.add_row(r["sink"], r["type"], r["format"], ",".join(r["records"]), r["position"] or "",
                  "" if r["lag"] is None else str(r["lag"]), "" if r["delivered"] is None else str(r["delivered"]),
                  "" if r["dead"] is None else str(r["dead"]),
                  "" if a is None else f"{a['pending']}/{a['delivered']}/{a['dead']}",
                  (r["last_error"] or "")[:80], _when(r["next_attempt_at"]))
    cli.console.print(t)
