"""One round's state machine, without MQTT or TensorFlow (testable on its own).

A round is announced (phase "train", or in step-by-step mode "train" with
send_when_trained=false and later "send"), collects updates while its status
is "collecting", may then hold an aggregated result ("aggregated", step mode
only, until `publish`), and ends "closed" or "abandoned".

When to stop collecting:
- automatic round: every selected device answered, or the deadline passed
  (aggregate with at least the quorum, abandon below it);
- step-by-step round: the operator says `aggregate`; only a round that can
  no longer reach its quorum (deadline passed, too few updates) is abandoned
  on its own.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from aggregator.accumulator import Accumulator
from aggregator.config import RoundSettings, Strategy, Weighting
from aggregator.export import Candidate
from aggregator.secure import SecurePhases
from aggregator.state import RoundRecord, RoundStatus
from aggregator.strategy import update_norm
from fedbell.errors import RejectedMessage
from fedbell.wire.messages import Update
from fedbell.wire.protocol import Phase, RoundAnnouncement, SecAggPlan

NextStep = Literal["wait", "aggregate", "abandon"]

_RECORDED_AS_IS = (
    "announcement",
    "status",
    "manual",
    "started_at",
    "weighting",
    "examples",
    "bytes_up",
    "announce_bytes",
)
"""The fields a round and its state record (`RoundRecord`) hold alike."""


def select_devices(
    online: Iterable[str],
    requested: Sequence[str] | None,
    max_devices: int | None,
    seed: int,
    round_id: int,
) -> tuple[str, ...]:
    """Online devices (only the requested ones, if any), at most `max_devices`.

    The random cap is seeded by (seed, round id): the same round selects the
    same devices after a restart, and different rounds rotate through them.
    """
    candidates = sorted(set(online) & set(requested) if requested else set(online))
    if max_devices is not None and len(candidates) > max_devices:
        rng = random.Random(f"{seed}:{round_id}")
        candidates = sorted(rng.sample(candidates, max_devices))
    return tuple(candidates)


def announce(
    *,
    round_id: int,
    base_version: int,
    lineage: str,
    selected: Sequence[str],
    now: float,
    settings: RoundSettings,
    manual: bool,
    secagg: SecAggPlan | None = None,
) -> RoundAnnouncement:
    """The first announcement of a round: phase train, or keys for a secure round."""
    return RoundAnnouncement(
        round=round_id,
        base_version=base_version,
        lineage=lineage,
        phase="keys" if secagg is not None else "train",
        secagg=secagg,
        selected=tuple(selected),
        deadline=now + settings.timeout_s,
        codec=settings.codec,
        density=settings.density,
        train=settings.train,
        send_when_trained=not manual,
    )


@dataclass
class Round:
    """A round in progress: what was announced, what arrived, the accumulated updates."""

    announcement: RoundAnnouncement
    manual: bool
    started_at: float
    accumulator: Accumulator
    strategy: Strategy = "fedavg"
    weighting: Weighting = "houses"
    """What an update weighs (`rounds.weighting` when the round started: its accumulator's)."""
    status: RoundStatus = "collecting"
    received: list[str] = field(default_factory=list)
    examples: int = 0
    bytes_up: int = 0
    announce_bytes: int = 0
    """Bytes of round messages sent so far, as each selected device receives them."""
    rejected: Counter[str] = field(default_factory=Counter)
    secure: SecurePhases | None = None
    """A secure round's phases and SecAgg state (memory only; None after a restart)."""
    candidate: Candidate | None = None
    """A calibration round's candidate (memory only): it gets this one round, whatever
    becomes of it, so a round that fails for want of doorbells does not repeat forever."""

    @property
    def id(self) -> int:
        return self.announcement.round

    @property
    def selected(self) -> tuple[str, ...]:
        return self.announcement.selected

    def set_phase(
        self, phase: Phase, deadline: float | None = None, secagg: SecAggPlan | None = None
    ) -> RoundAnnouncement:
        changes: dict[str, object] = {"phase": phase}
        if deadline is not None:
            changes["deadline"] = deadline
        if secagg is not None:
            changes["secagg"] = secagg
        if (calibrate := self.announcement.calibrate) is not None and phase != "keys":
            # the doorbells scored the heads in the keys phase: later phases need not carry them
            changes["calibrate"] = calibrate.model_copy(update={"candidate": None, "start": None})
        self.announcement = self.announcement.model_copy(update=changes)
        return self.announcement

    def check(self, update: Update, now: float, max_norm: float) -> None:
        """Round-level checks of an already validated update; RejectedMessage if it
        does not belong in this round. Never changes the round."""
        if self.status != "collecting":
            raise RejectedMessage("not_collecting", f"round {self.id} is {self.status}")
        if self.announcement.secagg is not None:
            raise RejectedMessage(
                "secure_round",
                f"round {self.id} uses secure aggregation: it takes masked updates on the "
                "secagg topics, never a plain one",
            )
        if update.round != self.id:
            raise RejectedMessage(
                "wrong_round", f"update for round {update.round}, round {self.id} is open"
            )
        if update.device not in self.selected:
            raise RejectedMessage("not_selected", f"not selected for round {self.id}")
        if update.device in self.received:
            raise RejectedMessage("duplicate", f"already sent its update for round {self.id}")
        if update.base_version != self.announcement.base_version:
            raise RejectedMessage(
                "wrong_base",
                f"delta against version {update.base_version}, "
                f"round base is {self.announcement.base_version}",
            )
        if update.codec != self.announcement.codec:
            raise RejectedMessage(
                "wrong_codec", f"codec {update.codec}, round asks for {self.announcement.codec}"
            )
        if now > self.announcement.deadline:
            raise RejectedMessage(
                "late", f"{now - self.announcement.deadline:.1f}s after the deadline"
            )
        norm = update_norm(update.delta)
        if norm > max_norm:
            raise RejectedMessage("norm_too_large", f"L2 norm {norm:.3g} exceeds {max_norm:.3g}")

    def accept(self, update: Update, payload_size: int) -> None:
        """Hand a checked update to the accumulator (the caller then drops it)."""
        self.accumulator.add(update.delta, update.num_examples)
        self.received.append(update.device)
        self.examples += update.num_examples
        self.bytes_up += payload_size

    def next_step(self, now: float, quorum: int) -> NextStep:
        if self.status != "collecting":
            return "wait"
        answered = len(self.received)
        past_deadline = now > self.announcement.deadline
        if self.manual:
            return "abandon" if past_deadline and answered < quorum else "wait"
        if answered == len(self.selected):
            return "aggregate"
        if past_deadline:
            return "aggregate" if answered >= quorum else "abandon"
        return "wait"

    def to_record(self, sum_file: str | None) -> RoundRecord:
        return RoundRecord(
            **{name: getattr(self, name) for name in _RECORDED_AS_IS},
            received=tuple(self.received),
            rejected=dict(self.rejected),
            total_weight=self.accumulator.total,
            strategy=self.strategy,
            sum_file=sum_file,
        )

    @classmethod
    def from_record(
        cls, record: RoundRecord, accumulator: Accumulator, strategy: Strategy
    ) -> Round:
        return cls(
            **{name: getattr(record, name) for name in _RECORDED_AS_IS},
            accumulator=accumulator,
            strategy=strategy,
            received=list(record.received),
            rejected=Counter(record.rejected),
        )
