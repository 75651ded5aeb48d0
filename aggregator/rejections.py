"""Rejected messages in the log: the first of each reason at once, then a summary.

A doorbell login can send thousands of junk messages a second; one log line
each made rejection the aggregator's most expensive path and flooded the
journal. Every rejection is still counted (the coordinator's counters, the
round's metrics, the aggregator's status); the log gets the first of each
reason, then at most one line per reason every `interval_s` saying how many
more there were and the last one.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from fedbell.errors import RejectedMessage

log = logging.getLogger("aggregator")


class RejectionLog:
    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self.clock = clock
        self._logged_at: dict[str, float] = {}
        self._held: Counter[str] = Counter()
        self._last: dict[str, str] = {}

    def note(self, err: RejectedMessage, source: str) -> None:
        """Log this rejection now, or hold it for the next summary of its reason."""
        now = self.clock()
        logged = self._logged_at.get(err.reason)
        if logged is None or now - logged >= self.interval_s:
            self._logged_at[err.reason] = now
            held = self._held.pop(err.reason, 0)
            more = (
                f" (and {held} more {err.reason} in the last {now - logged:.0f}s)"
                if held and logged
                else ""
            )
            log.warning("rejected %s: %s%s", source, err, more)
            return
        self._held[err.reason] += 1
        self._last[err.reason] = f"{source}: {err.detail}"

    def flush(self) -> None:
        """Summarise reasons whose held rejections are due (called every main-loop turn)."""
        now = self.clock()
        for reason, held in list(self._held.items()):
            logged = self._logged_at.get(reason, now)
            if now - logged < self.interval_s:
                continue
            del self._held[reason]
            self._logged_at[reason] = now
            log.warning(
                "rejected %d more messages (%s) in the last %.0fs; the last: %s",
                held,
                reason,
                now - logged,
                self._last.pop(reason, ""),
            )
