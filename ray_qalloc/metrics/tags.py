"""Bounded tag domains: every tag value a metric carries comes from a set that cannot grow
without limit.

Why: each distinct tag combination is a time series in Prometheus, kept in memory and on disk
for as long as it is retained. One unbounded tag (a job id, a raw URL path, a tenant name
typed by a user) turns a dashboard into an outage. So every tag key of every metric names a
domain here, and a value outside its domain is *folded* to ``"other"`` instead of becoming a
new series. Folding is cheap after the first sight of a value (one set lookup) because the
dispatcher calls these on its hot path.

Three kinds:

* :class:`Choice` — a fixed set known when the code is written (priority classes, outcomes).
* :class:`Named` — names that follow a pattern but are only known at run time (pools, QPU
  devices, route templates); the first ``cap`` distinct names seen by a process are admitted,
  later ones fold. The cap is per process, and the processes that record a tag see the same
  names, so the cluster-wide count stays near the cap.
* :class:`Index` — a small integer below a bound given with the value (a qubit index below its
  device's size), and below a hard cap whatever the caller says.
"""

from __future__ import annotations

import abc
import re
import threading
from dataclasses import dataclass, field
from typing import Callable

OTHER = "other"
"""What every out-of-domain value becomes."""

NONE = "none"
"""An explicit "not applicable" (no pool yet, no route matched), admitted by every domain."""


def _identity(value: str) -> str:
    return value


class Domain(abc.ABC):
    """The set of values one tag may take. Subclasses implement :meth:`fold`."""

    doc: str = ""

    @abc.abstractmethod
    def fold(self, value: object) -> str:
        """The tag value ``value`` is recorded under (bounded: unknown values fold to a catch-all)."""

    def values(self) -> tuple[str, ...] | None:
        """The complete value set when it is fixed (for dashboards), else None."""
        return None


@dataclass(eq=False)
class Choice(Domain):
    """A fixed set of values. ``aliases`` maps other spellings onto members first
    (``matrix_product_state`` → ``mps``), so callers can pass the names they already hold."""

    members: tuple[str, ...]
    doc: str = ""
    aliases: dict[str, str] = field(default_factory=dict)
    _allowed: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._allowed = frozenset(self.members) | {NONE, OTHER}
        bad = {a: t for a, t in self.aliases.items() if t not in self._allowed}
        if bad:
            raise ValueError(f"aliases point outside the domain: {bad}")

    def fold(self, value: object) -> str:
        if value in self._allowed:   # the common case: one frozenset lookup
            return value  # type: ignore[return-value]
        if value is None:
            return NONE
        text = str(value)
        text = self.aliases.get(text, text)
        return text if text in self._allowed else OTHER

    def values(self) -> tuple[str, ...]:
        return self.members


@dataclass(eq=False)
class Named(Domain):
    """Run-time names matching ``pattern`` (a full match), at most ``cap`` distinct per process.

    ``normalise`` maps what callers hold onto the tag value before the check (a candidate
    ``cpu-1a2b3c4d/mps@2`` onto its pool ``cpu-1a2b3c4d``); its results are cached too, so
    that a caller passing the same raw name again pays one dict lookup. The raw-name cache is
    bounded as well (``cap`` × 8): raw values past it are normalised each time, never stored.
    """

    pattern: str
    cap: int
    doc: str = ""
    normalise: Callable[[str], str] = _identity
    _regex: re.Pattern[str] = field(init=False, repr=False)
    _admitted: set[str] = field(init=False, repr=False)
    _seen: dict[str, str] = field(init=False, repr=False)
    _lock: threading.Lock = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.cap < 1:
            raise ValueError("cap must be at least 1")
        self._regex = re.compile(self.pattern)
        self._admitted = set()
        self._seen = {}
        self._lock = threading.Lock()

    def fold(self, value: object) -> str:
        hit = self._seen.get(value)  # type: ignore[call-overload]
        if hit is not None:
            return hit
        if value is None:
            return NONE
        return self._first_sight(str(value))

    def _first_sight(self, raw: str) -> str:
        text = self.normalise(raw)
        with self._lock:
            if text in (NONE, OTHER) or text in self._admitted:
                folded = text
            elif self._regex.fullmatch(text) and len(self._admitted) < self.cap:
                self._admitted.add(text)
                folded = text
            else:
                folded = OTHER
            if len(self._seen) < self.cap * 8:
                self._seen[raw] = folded
        return folded

    def admitted(self) -> frozenset[str]:
        """The names this process has admitted so far."""
        with self._lock:
            return frozenset(self._admitted)

    def reset(self) -> None:
        """Forget what was admitted (tests; a process that changed clusters)."""
        with self._lock:
            self._admitted.clear()
            self._seen.clear()


@dataclass(eq=False)
class Index(Domain):
    """A non-negative integer below ``bound`` (given per value) and below ``cap`` always."""

    cap: int
    doc: str = ""
    _names: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._names = tuple(str(i) for i in range(self.cap))

    def fold(self, value: object, bound: int | None = None) -> str:
        limit = self.cap if bound is None else min(int(bound), self.cap)
        if isinstance(value, bool) or not isinstance(value, int):
            try:
                value = int(str(value), 10)
            except ValueError:
                return OTHER
        return self._names[value] if 0 <= value < limit else OTHER


def code_class(code: object) -> str:
    """``404`` → ``"4xx"``; anything that is not an HTTP status code → itself (then folded)."""
    try:
        n = int(code)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return str(code)
    return f"{n // 100}xx" if 100 <= n <= 599 else OTHER
