"""Reading typed values out of flat key=value records (CEF extensions, LEEF attributes).

Why shared: CEF and LEEF name their fields differently but carry the same kinds of value;
one checker keeps "what is an IP address, a port, a time" the same for both. Checks are
regexes first (most values are IPv4 and small ints), the ``ipaddress`` module only for IPv6.

Speed: observables are built once per distinct (kind, key, value) and shared (``observable``):
security streams repeat the same hosts, users, ports and internal addresses, an
``Observable`` is frozen, and building one (a pydantic instance, its dict and field set)
costs more than checking its value. Only values that passed their check are kept, so a bad
value is refused with its own field on every record that carries it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re

from ray_qalloc.integration import times
from ray_qalloc.integration.errors import clip, invalid
from ray_qalloc.integration.events import Observable, hash_kind

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")


def is_ip(value: str) -> bool:
    """True for an IPv4 (dotted quad) or IPv6 address; a regex first, as most are IPv4."""
    if _IPV4.fullmatch(value) is not None:
        return True
    if ":" not in value:
        return False
    try:
        ipaddress.IPv6Address(value)
    except ValueError:
        return False
    return True


#: The shared observables (see the module docstring): at most ``_SHARED_MAX``, emptied when full
#: (a stream of ever-new values costs one dict insert per value, nothing more), and only values
#: of at most ``_SHARED_LEN`` characters (long ones — URLs, command lines — seldom repeat, and
#: the bound keeps the table under ~10 MB). Keys differ in
#: length by who filled them, so they never collide: ``observables_from`` (declared kind, key,
#: value) — the declared kind, as "hash" becomes md5/sha1/... only once checked —,
#: ``observable`` (kind, name, value, None), ``host_observable`` (name, host).
_SHARED: dict[tuple[str | None, ...], Observable] = {}
_SHARED_MAX = 8_192
_SHARED_LEN = 256


def _share(key: tuple[str | None, ...], obs: Observable) -> Observable:
    if len(obs.value) <= _SHARED_LEN:
        if len(_SHARED) >= _SHARED_MAX:
            _SHARED.clear()
        _SHARED[key] = obs
    return obs


def observable(kind: str, value: str, name: str) -> Observable:
    """``Observable.of(kind, value, name)`` for a value already checked, shared while it repeats."""
    key = (kind, name, value, None)
    obs = _SHARED.get(key)
    return obs if obs is not None else _share(key, Observable.of(kind, value, name))


def _checked(kind: str, value: str, key: str, fmt: str, prefix: str) -> Observable:
    """The observable of one typed value; ``InvalidEvent`` naming ``prefix.key`` if it is bad."""
    if kind == "ip":
        if not is_ip(value):
            raise invalid(fmt, f"{prefix}.{key}", f"{clip(value)} is not an IP address",
                          "send an IPv4 or IPv6 address, or leave the key out.")
    elif kind == "port":
        if not (value.isascii() and value.isdigit() and len(value) <= 5 and int(value) <= 65535):
            raise invalid(fmt, f"{prefix}.{key}", f"{clip(value)} is not a port 0-65535",
                          "send the port as a whole number from 0 to 65535.")
    elif kind == "hash":
        kind = hash_kind(value)
    return Observable.of(kind, value, key)


def observables_from(ext: dict[str, str], keys: dict[str, str], fmt: str,
                     prefix: str = "extension") -> list[Observable]:
    """Typed observables from a flat key/value record, in its order, checking IPs and ports."""
    out: list[Observable] = []
    shared = _SHARED
    for key, value in ext.items():
        kind = keys.get(key)
        if kind is None or value == "":
            continue
        cache_key = (kind, key, value)
        obs = shared.get(cache_key)
        if obs is None:
            obs = _checked(kind, value, key, fmt, prefix)
            if len(value) <= _SHARED_LEN:
                if len(shared) >= _SHARED_MAX:
                    shared.clear()
                shared[cache_key] = obs
        out.append(obs)
    return out


def event_time(ext: dict[str, str], keys: tuple[str, ...], fmt: str, fallback: dt.datetime,
               ref: dt.datetime, prefix: str = "extension") -> dt.datetime:
    """The first time key present, parsed; else ``fallback``."""
    for key in keys:
        value = ext.get(key)
        if value:
            try:
                return times.parse_time(value, ref)
            except ValueError as exc:
                raise invalid(fmt, f"{prefix}.{key}", str(exc),
                              "send epoch milliseconds or 'Mmm dd yyyy HH:mm:ss[.SSS] [UTC]'.") from None
    return fallback


def host_observable(host: str, name: str) -> Observable:
    """A syslog HOSTNAME as an observable: ``ip`` when it is an address, else ``hostname``."""
    key = (name, host)
    obs = _SHARED.get(key)
    return obs if obs is not None else _share(key, Observable.of("ip" if is_ip(host) else "hostname", host, name))
