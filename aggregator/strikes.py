"""Rounds refused by the accuracy bars count against the doorbells that took part.

Once updates are summed (securely or not) the aggregator cannot tell which one
made a release fail its bars; but a hostile doorbell is in every refused round
it takes part in, an honest one only when it shares a round with it. So each
doorbell's refused rounds are counted against the rounds it took part in, and
one whose share stands out is left out of the next rounds' selection:

- at least `MIN_REFUSED` refused rounds, and
- a share of refused rounds above `MARGIN` plus twice the median share of the
  others.

When every doorbell takes part in every round all shares are equal and nobody
is left out (no attribution is possible, and leaving everyone out would hand
the attacker the federation); with rounds of a few doorbells out of many, the
one that spoils them stands out within a few rounds. Kept in memory: a restart
forgives.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable

MIN_REFUSED = 3
MARGIN = 0.2


class Strikes:
    def __init__(self) -> None:
        self.taken: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()

    def round_ended(self, participants: Iterable[str], refused: bool) -> None:
        for device in participants:
            self.taken[device] += 1
            self.refused[device] += int(refused)

    def share(self, device: str) -> float:
        return self.refused[device] / self.taken[device] if self.taken[device] else 0.0

    def left_out(self, devices: Iterable[str]) -> set[str]:
        """The devices whose refused rounds stand out among `devices`."""
        candidates = list(devices)
        out = set()
        for device in candidates:
            if self.refused[device] < MIN_REFUSED:
                continue
            others = [self.share(other) for other in candidates if other != device]
            typical = statistics.median(others) if others else 0.0
            if self.share(device) > MARGIN + 2 * typical:
                out.add(device)
        return out
