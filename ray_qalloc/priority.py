"""The priority classes, most urgent first: the one place their order is written down.

Why one module: the queue orders by it (``placement/scheduler.py``), intake validates
against it (``jobs.Priority``) and the selector weighs by it; separate copies of the order
drift apart the first time a class is added.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

CLASSES: tuple[str, ...] = ("emergency", "high", "normal", "batch")
EMERGENCY, HIGH, NORMAL, BATCH = CLASSES
DEFAULT: str = NORMAL
# The class a job of an unknown or missing class is served as.

RANK: Mapping[str, int] = MappingProxyType({c: i for i, c in enumerate(CLASSES)})


def rank(name: str) -> int:
    """0 for the most urgent class; an unknown name ranks as ``DEFAULT`` (never ahead of real classes)."""
    return RANK.get(name, RANK[DEFAULT])


def known(name: str) -> str:
    """``name`` if it is a class, else ``DEFAULT``: what the queue serves a job as."""
    return name if name in RANK else DEFAULT
