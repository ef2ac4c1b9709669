"""Building the one typed error every parser raises, so messages read the same everywhere.

A parser knows three things about a bad record: which field, why, and what the sender
should change. ``invalid`` puts them in an ``InvalidEvent`` whose message reads
``"<format> record: field '<field>': <reason>. To fix: <fix>"``.
"""

from __future__ import annotations

from ray_qalloc.exceptions import InvalidEvent


def invalid(fmt: str, field: str, reason: str, fix: str) -> InvalidEvent:
    """An ``InvalidEvent`` naming the format, the field and the reason (``details.format``)."""
    return InvalidEvent(f"{fmt} record: field {field!r}: {reason}.", fix=fix, field=field,
                        format=fmt)


def clip(text: str, n: int = 60) -> str:
    """A short, printable excerpt of untrusted text for an error message."""
    return repr(text if len(text) <= n else text[:n] + "...")
