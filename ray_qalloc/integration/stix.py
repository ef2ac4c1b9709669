"""STIX 2.1 bundles → ``SecurityEvent`` (one per object that carries threat meaning).

Validation is the OASIS ``stix2`` library's (``stix2.parse(obj, allow_custom=True,
version="2.1")``), object by object, so one bad object costs only itself. ``stix2`` is an
optional extra (``pip install 'ray-qalloc[siem]'``), imported here lazily: the core package
never needs it.

Which objects become events (severity: ``events.severity_from_stix``):

==================  ====================================  =============================
STIX type           OCSF class                            observables from
==================  ====================================  =============================
sighting            2004 Detection Finding (Findings)     the sighted indicator's pattern,
                                                          ``observed_data_refs`` → SCOs
indicator           0 Base Event                          its ``pattern`` (STIX patterns)
observed-data       0 Base Event                          ``object_refs`` → SCOs
malware             0 Base Event                          ``sample_refs`` → SCOs
attack-pattern, threat-actor, intrusion-set, campaign, tool, vulnerability,
infrastructure, report: 0 Base Event, no observables
==================  ====================================  =============================

Other objects (identities, relationships, marking definitions, SCOs, notes...) are context:
they are validated and used to resolve references (``created_by_ref`` → product vendor,
SCOs → observables, relationships → ``extensions["relationships"]``), and give no event.

Pattern observables come from ``stix2patterns``' ``inspect()``: only ``=`` and ``IN``
comparisons give values (``LIKE``/``MATCHES`` are not values). ``extensions`` holds the
STIX object's properties; ``raw`` is the object's canonical JSON, so an object ingested
again in another bundle keeps its event id.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from ray_qalloc.exceptions import ConfigError, InvalidEvent
from ray_qalloc.integration import times
from ray_qalloc.integration.errors import clip, invalid
from ray_qalloc.integration.events import (SEVERITY_NAMES, STIX_SEVERITY, Observable, Product,
                                           SecurityEvent, event_id, severity_from_stix, utc_now)
from ray_qalloc.integration.jsontext import canonical, load_json

FMT = "stix"
_HASHES = {"MD5": "md5", "SHA-1": "sha1", "SHA1": "sha1", "SHA-256": "sha256", "SHA256": "sha256",
           "SHA-512": "sha512", "SHA512": "sha512"}
#: (SCO type, first property) → observable kind; used for patterns and for SCOs.
_SCO_KIND = {("ipv4-addr", "value"): "ip", ("ipv6-addr", "value"): "ip",
             ("domain-name", "value"): "domain", ("url", "value"): "url",
             ("mac-addr", "value"): "mac", ("email-addr", "value"): "email",
             ("file", "name"): "file_name", ("process", "name"): "process",
             ("process", "pid"): "pid", ("user-account", "user_id"): "user",
             ("user-account", "account_login"): "user", ("network-traffic", "src_port"): "port",
             ("network-traffic", "dst_port"): "port"}
_LITERAL = re.compile(r"'((?:[^'\\]|\\.)*)'|(-?\d+)")
_UNESC = re.compile(r"\\(.)")
_ID = re.compile(r"[a-z0-9][a-z0-9-]*--[0-9a-fA-F-]{36}")


def _stix2() -> tuple[ModuleType, Any]:
    """Import ``stix2`` and the pattern inspector, or say how to install them."""
    try:
        import stix2
        from stix2patterns.pattern import Pattern
    except ImportError:
        raise ConfigError("STIX input needs the 'stix2' package, which is not installed.",
                          fix="pip install 'ray-qalloc[siem]'", field="content_type") from None
    return stix2, Pattern


def _pattern_observables(pattern: str, Pattern: Any) -> list[Observable]:
    try:
        comparisons = Pattern(pattern).inspect().comparisons
    except Exception:  # already validated by stix2; a second failure gives no observables
        return []
    out: list[Observable] = []
    for sco_type, items in comparisons.items():
        for path, op, literal in items:
            if op not in ("=", "IN") or not path:
                continue
            first = path[0]
            if sco_type == "file" and first == "hashes" and len(path) > 1:
                kind: str | None = _HASHES.get(str(path[1]).upper(), "hash")
            elif sco_type == "network-traffic" and first in ("src_ref", "dst_ref") and path[-1] == "value":
                kind = "ip"
            else:
                kind = _SCO_KIND.get((sco_type, str(first)))
            if kind is None:
                continue
            name = f"pattern:{sco_type}:" + ".".join(str(p) for p in path)
            for s, n in _LITERAL.findall(literal):
                value = _UNESC.sub(r"\1", s) if s else n
                if value:
                    out.append(Observable.of(kind, value, name))
    return out


def _sco_observables(sco: dict[str, Any], objects: dict[str, dict[str, Any]], name: str
                     ) -> list[Observable]:
    t = sco.get("type")
    out: list[Observable] = []
    if t == "file":
        for algo, value in (sco.get("hashes") or {}).items():
            if isinstance(value, str):
                out.append(Observable.of(_HASHES.get(str(algo).upper(), "hash"), value, f"{name}.hashes"))
    if t == "network-traffic":
        for ref in ("src_ref", "dst_ref"):
            target = objects.get(sco.get(ref))  # type: ignore[arg-type]
            if target is not None and isinstance(target.get("value"), str):
                out.append(Observable.of("ip", target["value"], f"{name}.{ref}"))
    for (st, prop), kind in _SCO_KIND.items():
        value = sco.get(prop) if st == t else None
        if isinstance(value, (str, int)) and not isinstance(value, bool) and value != "":
            out.append(Observable.of(kind, str(value), f"{name}.{prop}"))
    return out


def _refs(obj: dict[str, Any], key: str) -> list[str]:
    refs = obj.get(key)
    return [r for r in refs if isinstance(r, str)] if isinstance(refs, list) else []


def _time(obj: dict[str, Any]) -> dt.datetime:
    for key in ("last_seen", "first_seen", "last_observed", "valid_from", "published",
                "modified", "created"):
        value = obj.get(key)
        if isinstance(value, str):
            return times.parse_iso(value)
    raise ValueError("no time stamp")


def _event(obj: dict[str, Any], objects: dict[str, dict[str, Any]],
           rels: dict[str, list[dict[str, Any]]], Pattern: Any, tenant: str,
           now: dt.datetime) -> SecurityEvent:
    t: str = obj["type"]
    observables: list[Observable] = []
    if t == "indicator" and obj.get("pattern_type") == "stix":
        observables += _pattern_observables(obj["pattern"], Pattern)
    elif t == "sighting":
        target = objects.get(obj["sighting_of_ref"])
        if target is not None and target.get("type") == "indicator" and target.get("pattern_type") == "stix":
            observables += _pattern_observables(target["pattern"], Pattern)
        for od_ref in _refs(obj, "observed_data_refs"):
            od = objects.get(od_ref) or {}
            for ref in _refs(od, "object_refs"):
                if ref in objects:
                    observables += _sco_observables(objects[ref], objects, ref)
    elif t == "observed-data":
        for ref in _refs(obj, "object_refs"):
            if ref in objects:
                observables += _sco_observables(objects[ref], objects, ref)
        legacy = obj.get("objects")
        if isinstance(legacy, dict):
            for key, sco in legacy.items():
                if isinstance(sco, dict):
                    observables += _sco_observables(sco, legacy, f"objects.{key}")
    elif t == "malware":
        for ref in _refs(obj, "sample_refs"):
            if ref in objects:
                observables += _sco_observables(objects[ref], objects, ref)
    message = obj.get("name") or obj.get("description")
    if t == "sighting":
        target = objects.get(obj["sighting_of_ref"]) or {}
        message = obj.get("description") or f"Sighting of {target.get('name') or obj['sighting_of_ref']}"
    elif t == "indicator" and not message:
        message = obj.get("pattern")
    creator = objects.get(obj.get("created_by_ref"))  # type: ignore[arg-type]
    extensions = dict(obj)
    related = [{"relationship_type": r.get("relationship_type"), "target_ref": r.get("target_ref"),
                "target_name": (objects.get(r.get("target_ref")) or {}).get("name")}  # type: ignore[arg-type]
               for r in rels.get(obj["id"], ())]
    if related:
        extensions["relationships"] = related
    sid = severity_from_stix(t)
    finding = t == "sighting"
    raw = canonical(obj, FMT)
    return SecurityEvent.fast(
        id=event_id(raw), tenant=tenant, time=_time(obj), received_at=now,
        class_uid=2004 if finding else 0, class_name="Detection Finding" if finding else "Base Event",
        category_uid=2 if finding else 0, category_name="Findings" if finding else "Uncategorized",
        severity_id=sid, severity=SEVERITY_NAMES[sid], activity_name=t,
        message=message if isinstance(message, str) else None, event_code=obj["id"],
        product=Product.of(creator.get("name") if creator else None, "STIX",
                           obj.get("spec_version", "2.1")),
        observables=observables, format=FMT, syslog=None, raw=raw,
        extensions=extensions)


def _stix_error(exc: Exception, i: int) -> InvalidEvent:
    prop = getattr(exc, "prop_name", None)
    props = getattr(exc, "properties", None)
    if prop is None and props:
        prop = ",".join(str(p) for p in props)
    field = f"objects[{i}].{prop}" if prop else f"objects[{i}]"
    reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
    err = invalid(FMT, field, str(reason)[:200], "send STIX 2.1 objects as the specification "
                  "defines them (check with the OASIS stix2-validator).")
    err.details["index"] = i
    return err


def iter_stix(text: str, *, tenant: str = "default", received_at: dt.datetime | None = None
              ) -> Iterator[SecurityEvent | InvalidEvent]:
    """An event, or the error for it, per meaningful object of a STIX 2.1 bundle.

    A bundle that is not JSON, not a bundle object, or has no ``objects`` list raises
    ``InvalidEvent``; a single STIX object is read as a bundle of one.
    """
    stix2, Pattern = _stix2()
    doc = load_json(text, FMT)
    if not isinstance(doc, dict):
        raise invalid(FMT, "type", f"expected a bundle object, got {type(doc).__name__}",
                      "send one STIX 2.1 bundle: {\"type\": \"bundle\", \"id\": ..., \"objects\": [...]}.")
    if doc.get("type") == "bundle":
        objs = doc.get("objects", [])
        if not isinstance(objs, list):
            raise invalid(FMT, "objects", "the bundle's 'objects' is not a list",
                          "send the bundle's objects as a JSON array.")
        if not isinstance(doc.get("id"), str) or not doc["id"].startswith("bundle--"):
            raise invalid(FMT, "id", f"{clip(str(doc.get('id')))} is not a bundle id",
                          "give the bundle an id 'bundle--<uuid>'.")
    elif isinstance(doc.get("type"), str):
        objs = [doc]
    else:
        raise invalid(FMT, "type", "the object has no 'type'", "send a STIX 2.1 bundle.")
    now = received_at or utc_now()
    objects: dict[str, dict[str, Any]] = {}
    valid: list[tuple[int, dict[str, Any]]] = []
    for i, obj in enumerate(objs):
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) or not _ID.fullmatch(obj["id"]):
            yield _stix_error(ValueError("not a STIX object with an 'id' like 'type--<uuid>'"), i)
            continue
        try:
            stix2.parse(obj, allow_custom=True, version="2.1")
        except Exception as exc:  # stix2 raises many types (STIXError, ValueError, TypeError...)
            yield _stix_error(exc, i)
            continue
        objects[obj["id"]] = obj
        valid.append((i, obj))
    rels: dict[str, list[dict[str, Any]]] = {}
    for obj in objects.values():
        if obj.get("type") == "relationship" and isinstance(obj.get("source_ref"), str):
            rels.setdefault(obj["source_ref"], []).append(obj)
    for i, obj in valid:
        if obj.get("type") not in STIX_SEVERITY:
            continue
        try:
            yield _event(obj, objects, rels, Pattern, tenant, now)
        except InvalidEvent as exc:
            exc.details["index"] = i
            yield exc
        except (ValueError, TypeError, KeyError) as exc:
            yield _stix_error(exc, i)


def parse_stix(text: str, *, tenant: str = "default",
               received_at: dt.datetime | None = None) -> list[SecurityEvent]:
    """Parse a STIX 2.1 bundle; the first bad object raises ``InvalidEvent``."""
    out: list[SecurityEvent] = []
    for item in iter_stix(text, tenant=tenant, received_at=received_at):
        if isinstance(item, InvalidEvent):
            raise item
        out.append(item)
    return out
