"""A pass loop on a daemon thread: what the alert dispatcher and the SIEM forwarder both run.

Why one helper: both deliver from durable rows with per-sink backoff, so both want the same
loop — a pass when woken, when the earliest backoff ends, and at least every ``interval_s``
(rows other processes committed are found by reading) — and the same stop. Two copies of it
would drift apart the first time one is fixed.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)


class PassThread:
    """Runs ``one_pass() -> next due time (clock seconds) or None`` on a daemon thread."""

    def __init__(self, name: str, one_pass: Callable[[], float | None], clock: Callable[[], float],
                 what: str) -> None:
        self.name, self._pass, self._clock, self.what = name, one_pass, clock, what
        self.woken = threading.Event()
        self.stopping = threading.Event()     # passes may check it to end early
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        self.woken.set()

    def start(self, interval_s: float = 1.0) -> None:
        if self._thread is not None:
            return
        self.stopping.clear()

        def loop() -> None:
            while not self.stopping.is_set():
                self.woken.clear()
                try:
                    due = self._pass()
                    wait = interval_s if due is None else min(interval_s, max(due - float(self._clock()), 0.0))
                except Exception:  # noqa: BLE001 - the database may be briefly unavailable; try again
                    log.exception("%s failed", self.what)
                    wait = interval_s
                self.woken.wait(wait)

        self._thread = threading.Thread(target=loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self.stopping.set()
        self.woken.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
