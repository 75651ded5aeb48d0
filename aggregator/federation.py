"""What the parts of the coordinator share: the model, the round, the counters, the ways out.

The coordinator (`aggregator.coordinator`) is split by reason to change:
`Intake` (messages in), `RoundMachine` (rounds started, commands, time),
`SecureRounds` (a secure round's phases) and `Releases` (aggregate, the
accuracy bars, publish or abandon). Each reads and writes one `Federation`:
the committed model and round, who is online, the rejection counters, and
the three ways out, always in this order: commit to disk, then publish
(QoS 1, retained), and a reply to the operator.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from aggregator.accumulator import Step
from aggregator.config import AggregatorConfig
from aggregator.export import Candidate, Exporter, Release
from aggregator.persistence import OPEN, Persistence, SavedModel
from aggregator.privacy import PrivacyLedger
from aggregator.rejections import RejectionLog
from aggregator.rounds import Round
from aggregator.strikes import Strikes
from fedbell.errors import RejectedMessage
from fedbell.wire.protocol import DeviceStatus, Reply, RoundAnnouncement, to_json
from fedbell.wire.signing import sign_announcement
from fedbell.wire.topics import Topics

log = logging.getLogger("aggregator")

Publish = Callable[[str, bytes], None]


class Federation:
    """The aggregator's state as every part of the coordinator sees it."""

    def __init__(
        self,
        persistence: Persistence,
        model: SavedModel,
        *,
        publish: Publish,
        clock: Callable[[], float],
        trusted_keys: dict[str, Ed25519PublicKey] | None,
    ) -> None:
        self.persistence = persistence
        self.config: AggregatorConfig = persistence.config
        self.exporter: Exporter = persistence.exporter
        self.topics = Topics(self.config.site, self.config.mqtt.topic_root)
        self.publish = publish
        self.clock = clock
        self.trusted_keys = trusted_keys
        self.model = model
        """The published (committed) model; a round's release replaces it."""
        self.round: Round | None = None
        self.last_round = 0
        self.pending: Release | None = None
        """A step-by-step round's release, aggregated but not yet published."""
        self.next_step: Step | None = None
        """The pending release's step: its optimiser becomes the model's once published."""
        self.candidate: Candidate | None = None
        """A release waiting for the next round, a calibration round, to give it its threshold
        (memory only: aggregator/calibration.py); the round then holds it."""
        self.dirty = False
        """Updates were accepted since the last commit (see `Coordinator.persist`)."""
        self.online: dict[str, DeviceStatus] = {}
        self.rejected: Counter[str] = Counter()
        """Every rejection since start, by reason."""
        self.rejection_log = RejectionLog()
        self.strikes = Strikes()
        """Rounds refused by the accuracy bars, counted against who took part."""
        self.privacy = PrivacyLedger(self.config.rounds.privacy)

    def open_round(self) -> Round | None:
        """The round, if it is still open (collecting or aggregated)."""
        current = self.round
        return current if current is not None and current.status in OPEN else None

    def count(self, reason: str, number: int = 1) -> None:
        """Count rejections since start and in the open round (its metrics)."""
        self.rejected[reason] += number
        if (current := self.open_round()) is not None:
            current.rejected[reason] += number

    def reject(self, err: RejectedMessage, source: str) -> None:
        """Count a refusal and log it (rate-limited): no publish, however many come."""
        self.count(err.reason)
        self.rejection_log.note(err, source)

    def reply(self, **fields: Any) -> None:
        """Tell the operator (console, `mosquitto_sub`) what became of a command or update."""
        self.publish(self.topics.reply, to_json(Reply(time=self.clock(), **fields)))

    def round_payload(self, announcement: RoundAnnouncement) -> bytes:
        """A round message, signed like the models when the aggregator has a key."""
        key = self.exporter.signer.key
        if key is not None:
            announcement = sign_announcement(announcement, self.config.site, key)
        return to_json(announcement)

    def announce(self, announcement: RoundAnnouncement) -> None:
        """Commit, then publish a round message (counted in bytes_down)."""
        payload = self.round_payload(announcement)
        if self.round is not None:
            self.round.announce_bytes += len(payload)
        self.commit()
        self.publish(self.topics.round, payload)

    def commit(self, model: SavedModel | None = None) -> None:
        """Write the model, the round and the counters that go with them to disk."""
        if self.dirty and (current := self.open_round()) is not None:
            # The round record names the received devices: its accumulator goes with it.
            self.persistence.save_accumulator(current)
        self.dirty = False
        self.persistence.commit(
            model or self.model, self.round, self.last_round, self.privacy.rounds
        )

    def houses(self) -> int:
        """The houses of the federation, for delta and the sampling rate."""
        keys = self.trusted_keys
        return self.privacy.houses(len(keys) if keys else None, len(self.online))

    def status_payload(self, state: str = "online") -> bytes:
        """The aggregator's own status message: its model, last round and rejections."""
        return to_json(
            DeviceStatus(
                state="online" if state == "online" else "offline",
                model_version=self.model.version,
                last_round=self.last_round,
                detail="aggregator",
                rejected=dict(self.rejected),
            )
        )

    def summary(self) -> str:
        """One line for `systemctl status` and a command's reply."""
        return f"model version {self.model.version}{self.round_summary()}"

    def round_summary(self) -> str:
        current = self.open_round()
        if current is None:
            return ""
        return (
            f", round {current.id} {current.status} with "
            f"{len(current.received)}/{len(current.selected)} updates"
        )
