"""Pausing Python's cyclic garbage collector while one batch of events is parsed and stored.

Why: a batch of 2,000 records builds ~60,000 container objects (events, observables, their
dicts, the row tuples) that all stay alive until the batch is committed and answered. The
cyclic collector runs after every 700 container allocations and examines the young objects;
in a batch every one of them survives (events hold no reference cycles, so it never frees
anything), is promoted, and is traversed again by the generation-1 and full collections.
Measured in one process holding the API's modules: a CEF record's parse cost about half again
as much with the collector running as without it (docs/notes.md, "Security events"). Reference
counting still frees everything a batch drops, at once; the collector resumes when the last
batch in the process ends and then sees the batch's objects once.

The pause is process-wide (``gc.disable``) but counted: batches in several threads (the
API's threadpool, the listener's writer) overlap, and only the last one to finish turns the
collector back on — and only if it was on when the first one began, so an application that
runs with the collector off keeps it off. Cyclic garbage made by other threads meanwhile waits
at most one batch (bounded by ``events.max_batch_records``).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["paused_gc"]

_lock = threading.Lock()
_depth = 0
_resume = False


@contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic collector off for the ``with`` block (see the module docstring)."""
    global _depth, _resume
    with _lock:
        if _depth == 0:
            _resume = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _resume:
                gc.enable()
