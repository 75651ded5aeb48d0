"""The aggregator's inbox: one lane per topic, so a flood is dropped in its own lane.

paho's network thread puts every message here and the main loop takes them
off. A single FIFO let one doorbell login that sent 30,000 junk updates fill
it: the network thread then stopped reading, Mosquitto's queue for the
aggregator (`max_queued_messages`) overflowed and it dropped other doorbells'
updates and the operator's commands (issue 18 item 4). Here:

- each sending topic (`update/<device>`, `status/<device>`) has its own lane
  of at most `per_sender` messages; a message for a full lane is dropped on
  the spot, counted for that sender, and never blocks the network thread, so
  the broker's queue keeps draining;
- the main loop takes the lanes in turn (round robin), so a flooder's lane
  yields one message per turn like any other, and the operator's commands
  (a lane of their own, which may hold `per_sender` x 16) wait at most one
  turn of the lanes; lanes are served in the order they filled, so a command
  is still handled after the statuses that came before it;
- the service's own signals (subscribed, wake up) are served first;
- when all lanes together hold `size` messages the network thread waits (TCP
  holds the broker back, as before) rather than dropping, unless the sender
  already has a message waiting: an honest burst of many doorbells is slowed,
  never dropped, while the one sending more than its share loses the excess.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Generic, TypeVar

T = TypeVar("T")

COMMAND_LANE_FACTOR = 16
"""Commands may wait in larger numbers than one doorbell's messages (a console's burst)."""


class FairInbox(Generic[T]):
    """Bounded per-lane queues taken round robin, signals first; thread-safe."""

    def __init__(self, size: int, per_sender: int) -> None:
        self.size = size
        self.per_sender = per_sender
        self.dropped: Counter[str] = Counter()
        """Messages dropped because their lane was full, by lane (topic)."""
        self._cond = threading.Condition()
        self._signals: deque[T] = deque()
        self._lanes: dict[str, deque[T]] = {}
        self._turns: deque[str] = deque()  # lanes holding messages, in serving order
        self._count = 0

    def signal(self, item: T) -> None:
        """The service's own markers: never dropped, served first."""
        with self._cond:
            self._signals.append(item)
            self._cond.notify_all()

    def put(
        self, item: T, lane: str, stop: threading.Event | None = None, commands: bool = False
    ) -> bool:
        """Queue a sender's message; False if dropped (its lane is full).

        Waits while the inbox is full and the sender has nothing waiting.
        `commands`: the operator's lane, which may hold COMMAND_LANE_FACTOR times more.
        """
        limit = self.per_sender * (COMMAND_LANE_FACTOR if commands else 1)
        with self._cond:
            queue = self._lanes.get(lane)
            while True:
                waiting = 0 if queue is None else len(queue)
                if waiting >= limit or (waiting and self._count >= self.size):
                    self.dropped[lane] += 1
                    return False
                if self._count < self.size or (stop is not None and stop.is_set()):
                    break
                self._cond.wait(timeout=1.0)
                queue = self._lanes.get(lane)
            if queue is None:
                queue = self._lanes[lane] = deque()
            if not queue:
                self._turns.append(lane)
            queue.append(item)
            self._count += 1
            self._cond.notify_all()
            return True

    def get(self, timeout: float) -> T | None:
        """The next message (signals first, then the lanes in turn), or None."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (self._signals or self._turns):
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(timeout=left)
            if self._signals:
                return self._signals.popleft()
            lane = self._turns.popleft()
            queue = self._lanes[lane]
            item = queue.popleft()
            if queue:
                self._turns.append(lane)
            else:
                del self._lanes[lane]
            self._count -= 1
            self._cond.notify_all()
            return item

    def take_dropped(self) -> Counter[str]:
        """The drop counts since the last call (for a periodic summary)."""
        with self._cond:
            dropped, self.dropped = self.dropped, Counter()
            return dropped
