"""``qalloc config get|set|unset`` and ``qalloc alerts``: live configuration and alerts over the
HTTP API with an admin token (``QALLOC_URL``, ``QALLOC_TOKEN``), like ``qalloc backend``.

``VALUE`` is read as JSON where it parses (``2``, ``true``, ``null``, ``{"emergency": 2}``) and
as a plain string otherwise, so ``qalloc config set placement.coherence_budget 2`` sets a
number and ``qalloc config set alerts.sinks.hook.url http://x`` a string.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import typer
from rich.table import Table

from ray_qalloc import cli
from ray_qalloc.cli_ops import TOKEN, URL, _client, _run, _when

config_app = typer.Typer(help="Read and change the running allocator's settings (admin token).",
                         no_args_is_help=True)


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _lookup(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            raise typer.BadParameter(f"there is no setting {key!r}", param_hint="KEY")
        tree = tree[part]
    return tree


@config_app.command("get")
def get(key: Optional[str] = typer.Argument(None, help="A dotted key (placement.coherence_budget); all when left out."),
        url: Optional[str] = URL, token: Optional[str] = TOKEN) -> None:
    """The value in force (secrets masked); without KEY, every live key and what was overridden."""
    view = _run(_client(url, token).config)
    if key is not None:
        value = _lookup(view["settings"], key)
        if cli._json_out():
            cli._print_json({"key": key, "value": value})
        else:
            cli.console.print(json.dumps(value, indent=2) if isinstance(value, (dict, list)) else repr(value)
                              if isinstance(value, str) else json.dumps(value))
        return
    if cli._json_out():
        cli._print_json(view)
        return
    t = Table("live key", "value", "overridden", "takes effect")
    for k, why in sorted(view["live_keys"].items()):
        value = _lookup(view["settings"], k)
        over = "yes" if any(o == k or o.startswith(k + ".") for o in view["overrides"]) else ""
        shown = json.dumps(value)
        t.add_row(k, shown if len(shown) < 60 else shown[:57] + "...", over, why)
    cli.console.print(t)


@config_app.command("set", context_settings={"ignore_unknown_options": True})
def set_(key: str = typer.Argument(..., help="A dotted live key."), value: str = typer.Argument(..., help="JSON, or a string."),
         url: Optional[str] = URL, token: Optional[str] = TOKEN) -> None:
    """Change one setting on the running allocator (validated, audited, kept across restarts)."""
    _print_change(_run(_client(url, token).set_config, {key: parse_value(value)}))


@config_app.command("unset")
def unset(key: str = typer.Argument(..., help="A key whose live override goes (back to the start-up value)."),
          url: Optional[str] = URL, token: Optional[str] = TOKEN) -> None:
    """Remove a live override."""
    _print_change(_run(_client(url, token).set_config, {}, [key]))


def _print_change(out: dict[str, Any]) -> None:
    if cli._json_out():
        cli._print_json(out)
        return
    for key, d in out["changed"].items():
        cli.console.print(f"{key}: {json.dumps(d['old'])} → {json.dumps(d['new'])}  ({out['applies'].get(key, '')})")


def alerts(limit: int = typer.Option(20, "--limit", help="Newest events to show."),
           url: Optional[str] = URL, token: Optional[str] = TOKEN) -> None:
    """Firing alerts, the newest alert events and each sink's deliveries."""
    view = _run(_client(url, token).alerts, limit)
    if cli._json_out():
        cli._print_json(view)
        return
    if not view["enabled"]:
        cli.console.print("alerting is off (alerts.enabled=false)")
        return
    t = Table("firing since", "rule", "severity", "labels", "what")
    for a in view["firing"]:
        t.add_row(_when(a["fired_at"]), a["rule"], a["severity"], ", ".join(f"{k}={v}" for k, v in a["labels"].items()),
                  a["text"])
    cli.console.print(t if view["firing"] else "no alert is firing")
    e = Table("at", "status", "rule", "summary")
    for ev in view["recent"]:
        e.add_row(_when(ev.get("at")), ev["status"], ev["rule"], ev.get("summary", ""))
    cli.console.print(e)
    s = Table("sink", "pending", "delivered", "dead")
    for name, c in sorted(view["sinks"].items()):
        s.add_row(name, str(c.get("pending", 0)), str(c.get("delivered", 0)), str(c.get("dead", 0)))
    cli.console.print(s)
