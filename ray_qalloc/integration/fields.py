"""Reading typed values out of flat key=value records (CEF extensions, LEEF attributes).

Why shared: CEF and LEEF name their fields differently but carry the same kinds of value;
one checker keeps "what is an IP address, a port, a time" the same for both. Checks are
regexes first (most values are IPv4 and small ints), the ``ipaddress`` module only for IPv6.
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


def observables_from(ext: dict[str, str], keys: dict[str, str], fmt: str,
                     prefix: str = "extension") -> list[Observable]:
    """Typed observables from a flat key/value record, checking IPs and ports."""
    out: list[Observable] = []
    for key, value in ext.items():
        kind = keys.get(key)
        if kind is None or value == "":
            continue
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
        out.append(Observable.of(kind, value, key))
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
    return Observable.of("ip" if is_ip(host) else "hostname", host, name)
