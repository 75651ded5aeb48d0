"""Is every thread the doorbell depends on alive and making progress?

The node pings systemd's watchdog only while this says yes, so a dead or
stuck thread ends in a restart instead of a doorbell that looks up but hears
nothing (a dead MQTT network thread), trains nothing (a dead worker) or sees
nothing (a dead camera thread). "Stuck" means one piece of work has run far
longer than it ever should:

- an MQTT callback: they only parse, check and queue (CALLBACK_STALL_S);
- a worker job: a training round of the bounded plan, an artifact install
  (JOB_STALL_S);
- the camera loop: it reads a frame, or waits for a reconnect, at least every
  half second (CAMERA_STALL_S), unless its replay ended.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

CALLBACK_STALL_S = 60.0
JOB_STALL_S = 3600.0
CAMERA_STALL_S = 60.0

Clock = Callable[[], float]


@dataclass
class Activity:
    """The piece of work a thread is doing now, and since when (thread-safe)."""

    clock: Clock = time.monotonic
    _since: float | None = None
    _what: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @contextmanager
    def running(self, what: str) -> Iterator[None]:
        with self._lock:
            self._since, self._what = self.clock(), what
        try:
            yield
        finally:
            with self._lock:
                self._since, self._what = None, ""

    def overdue(self, limit_s: float) -> str | None:
        """What has been running longer than `limit_s` (a stable text); None if nothing."""
        with self._lock:
            since, what = self._since, self._what
        if since is None:
            return None
        return f"{what} running for over {limit_s:g}s" if self.clock() - since > limit_s else None


@dataclass
class Limits:
    callback_s: float = CALLBACK_STALL_S
    job_s: float = JOB_STALL_S
    camera_s: float = CAMERA_STALL_S


def thread_problem(
    name: str, thread: threading.Thread | None, activity: Activity, limit_s: float
) -> str | None:
    """Why `thread` cannot be counted on (dead, or stuck in one piece of work), or None."""
    if thread is None or not thread.is_alive():
        return f"{name} thread is dead"
    stuck = activity.overdue(limit_s)
    return f"{name} thread is stuck: {stuck}" if stuck else None


def camera_problem(
    thread: threading.Thread | None,
    ended: bool,
    last_read: float | None,
    limit_s: float,
    clock: Clock = time.monotonic,
) -> str | None:
    """The camera loop's problem: dead although its source did not end, or stuck."""
    if thread is None:
        return None  # not started (no camera, or start-up not that far)
    if not thread.is_alive():
        return None if ended else "camera thread is dead"
    if last_read is not None and clock() - last_read > limit_s:
        return f"camera thread is stuck: no frame read for over {limit_s:g}s"
    return None
