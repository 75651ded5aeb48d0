"""The aggregator's brain: commands, updates and statuses in; rounds and models out.

It knows nothing about MQTT: the service hands it (topic, payload) pairs on
one thread and gives it a `publish(topic, payload)` function (always QoS 1,
retained). Every state change is committed to disk (see `persistence`) before
it is published, so a restart republishes what was committed and carries on
from there.

bytes_down of a round: the payload bytes the broker delivers to the selected
devices for that round, i.e. (every round message of the round + the global
model envelope + the TFLite envelope) × number of selected devices.
bytes_up: the sum of the payload sizes of the accepted updates.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from aggregator.accumulator import SecureSum, Step, make_accumulator, next_step
from aggregator.config import AggregatorConfig
from aggregator.export import Exporter, Release
from aggregator.gates import accuracy_bar
from aggregator.history import history_before
from aggregator.persistence import OPEN, Persistence, SavedModel
from aggregator.privacy import PrivacyLedger
from aggregator.rejections import RejectionLog
from aggregator.rounds import Round, announce, select_devices
from aggregator.secure import SecurePhases
from aggregator.secure_rounds import SecureRounds
from aggregator.state import StateStore
from aggregator.strategy import InconsistentUpdate
from aggregator.strikes import Strikes
from fedbell.errors import RejectedMessage
from fedbell.wire.messages import parse_update, resign
from fedbell.wire.protocol import (
    Command,
    DeviceStatus,
    Reply,
    RoundAnnouncement,
    RoundMetrics,
    parse_json,
    to_json,
)
from fedbell.wire.signing import sign_announcement
from fedbell.wire.topics import Topics

log = logging.getLogger("aggregator")

Publish = Callable[[str, bytes], None]


class Coordinator(SecureRounds):
    def __init__(
        self,
        config: AggregatorConfig,
        exporter: Exporter,
        store: StateStore,
        *,
        publish: Publish,
        clock: Callable[[], float],
        trusted_keys: dict[str, Ed25519PublicKey] | None,
    ) -> None:
        self.config = config
        self.topics = Topics(config.site, config.mqtt.topic_root)
        self.exporter = exporter
        self.persistence = Persistence(config, exporter, store)
        self.publish = publish
        self.clock = clock
        self.trusted_keys = trusted_keys
        self.rejected: Counter[str] = Counter()
        """Every rejection since start, by reason."""
        self.rejection_log = RejectionLog()
        self.strikes = Strikes()
        """Rounds refused by the accuracy bars, counted against who took part."""
        self.online: dict[str, DeviceStatus] = {}
        self.auto_remaining = config.auto_rounds
        self.next_auto_at = float("inf")  # armed once connected (see `connected`)
        self._waiting_logged = False
        self.pending: Release | None = None
        self.last_round = 0
        self.round: Round | None = None
        self.dirty = False
        """Updates were accepted since the last commit (see `persist`)."""
        self.next_step: Step | None = None
        """The pending release's step: its optimiser becomes the model's once published."""
        self.privacy = PrivacyLedger(config.rounds.privacy)
        self.model = self._resume()
        self.specs = exporter.specs(self.model.weights)

    # -- state ---------------------------------------------------------------

    def _resume(self) -> SavedModel:
        """The committed model, with its round; a new version 0 on first start."""
        resumed = self.persistence.load()
        if resumed is None:
            return self.persistence.initialise()
        self.round, self.last_round = resumed.round, resumed.last_round
        self.privacy.rounds = resumed.noised_rounds
        if self.round is not None and self.round.status == "aggregated":
            # Recompute the unpublished result: the release is not saved until published.
            self.model = resumed.model
            self.pending = self._release()
        log.info(
            "state loaded: model version %d, last round %d%s",
            resumed.model.version,
            self.last_round,
            self._round_summary(),
        )
        return resumed.model

    def summary(self) -> str:
        """One line for `systemctl status`."""
        return f"model version {self.model.version}{self._round_summary()}"

    def _round_summary(self) -> str:
        if not self._round_open() or self.round is None:
            return ""
        return (
            f", round {self.round.id} {self.round.status} with "
            f"{len(self.round.received)}/{len(self.round.selected)} updates"
        )

    def persist(self) -> None:
        """Commit the updates accepted since the last commit, if any.

        Accepting an update only changes memory: writing the accumulator and
        state.json after every one capped throughput at ~150 updates/s. The
        service calls this every `persist_interval_s` (or sooner when many
        MQTT acks wait) and acknowledges the updates only afterwards, so the
        broker redelivers what a crash lost before it reached the disk.
        """
        if self.dirty:
            self._commit()

    def _commit(self, model: SavedModel | None = None) -> None:
        if self.dirty and self.round is not None and self._round_open():
            # The round record names the received devices: its accumulator goes with it.
            self.persistence.save_accumulator(self.round)
        self.dirty = False
        self.persistence.commit(
            model or self.model, self.round, self.last_round, self.privacy.rounds
        )

    def retained_messages(self) -> list[tuple[str, bytes]]:
        """What to (re)publish after (re)connecting: the committed public state."""
        topics = {"global": self.topics.global_model, "metrics": self.topics.metrics}
        # Signed now with the current key: after a rotation (`provision remove-login
        # aggregator` + `add-aggregator`) a re-imaged doorbell trusts only the new one.
        signer, limit = self.exporter.signer, self.config.mqtt.max_message_bytes
        messages = [
            (topics[name], resign(payload, signer, limit) if name == "global" else payload)
            for name, payload in self.persistence.retained_payloads(topics)
        ]
        backbone = self.exporter.backbone_messages(self.model.lineage, self.model.epoch)
        messages += backbone.publications(self.topics)
        if self.round is not None:
            messages.append((self.topics.round, self._round_payload(self.round.announcement)))
        return messages

    def status_payload(self, state: str = "online") -> bytes:
        return to_json(
            DeviceStatus(
                state="online" if state == "online" else "offline",
                model_version=self.model.version,
                last_round=self.last_round,
                detail="aggregator",
                rejected=dict(self.rejected),
            )
        )

    # -- inputs ----------------------------------------------------------------

    def connected(self) -> None:
        """Subscribed: publish the committed state, arm automatic rounds."""
        for topic, payload in self.retained_messages():
            self.publish(topic, payload)
        self.publish(self.topics.aggregator_status, self.status_payload())
        if self.next_auto_at == float("inf"):
            self.next_auto_at = self.clock() + self.config.rounds.auto_pause_s

    def reject(self, err: RejectedMessage, source: str) -> None:
        self.count(err.reason)
        self.rejection_log.note(err, source)

    def count(self, reason: str, number: int = 1) -> None:
        """Count rejections since start and in the open round (its metrics)."""
        self.rejected[reason] += number
        if self._round_open() and self.round is not None:
            self.round.rejected[reason] += number

    def on_message(self, topic: str, payload: bytes) -> None:
        """Dispatch one message; a RejectedMessage is logged and counted here."""
        if topic == self.topics.control:
            self._command(payload)
            return
        if topic.startswith(f"{self.topics.base}/update/"):
            handler, source = functools.partial(self._on_update, topic), f"update on {topic}"
        elif topic.startswith(f"{self.topics.base}/status/"):
            handler, source = functools.partial(self._on_status, topic), f"status on {topic}"
        elif topic.startswith(f"{self.topics.base}/secagg/"):
            handler, source = functools.partial(self._on_secagg, topic), f"secagg on {topic}"
        else:
            return
        try:
            handler(payload)
        except RejectedMessage as err:
            self.reject(err, source)

    def _reply(self, **fields: Any) -> None:
        """Tell the operator (console, `mosquitto_sub`) what became of a command or update."""
        self.publish(self.topics.reply, to_json(Reply(time=self.clock(), **fields)))

    def _command(self, payload: bytes) -> None:
        """Carry out a command and reply either way: a refusal is not only in the log."""
        command: Command | None = None
        try:
            command = parse_json(payload, Command)
            self._on_control(command)
        except RejectedMessage as err:
            self.reject(err, "command")
            cmd = command.cmd if command is not None else None
            self._reply(about="command", ok=False, cmd=cmd, reason=err.reason, detail=err.detail)
            return
        self._reply(about="command", ok=True, cmd=command.cmd, detail=self.summary())

    def _on_status(self, topic: str, payload: bytes) -> None:
        device = self._device(topic)
        was_online = device in self.online
        status = parse_json(payload, DeviceStatus) if payload else None
        if status is not None and status.state == "online":
            self.online[device] = status
            if not was_online:
                log.info(
                    "device %s online (model version %s, %d faces)",
                    device,
                    status.model_version,
                    status.gallery_size,
                )
        elif was_online:
            del self.online[device]
            log.info("device %s offline", device)

    def _device(self, topic: str) -> str:
        try:
            return self.topics.device_of(topic)
        except ValueError as err:
            raise RejectedMessage("bad_topic", str(err)) from None

    def _on_update(self, topic: str, payload: bytes) -> None:
        device = self._device(topic)
        try:
            update = parse_update(
                payload,
                site=self.config.site,
                device=device,
                expected=self.specs,
                max_bytes=self.config.mqtt.max_message_bytes,
                keys=self.trusted_keys,
            )
        except RejectedMessage as err:
            # Counted, not answered: a retained reply per junk update cost a publish each.
            self.reject(err, f"update from {device}")
            return
        current = self.round
        try:
            if current is None or not self._round_open():
                raise RejectedMessage(
                    "no_round", f"no round is open (update for round {update.round})"
                )
            current.check(update, self.clock(), self.config.rounds.max_update_norm)
            current.accept(update, len(payload))
        except (RejectedMessage, InconsistentUpdate) as err:
            reason = (
                err
                if isinstance(err, RejectedMessage)
                else RejectedMessage("inconsistent", str(err))
            )
            self.reject(reason, f"update from {device}")
            return
        self._reply(about="update", ok=True, device=device, round=current.id, size=len(payload))
        claimed, cap = update.num_examples, self.config.rounds.max_examples
        del update  # streaming strategies keep only the running sum
        self.dirty = True  # committed by `persist` (batched), or by the round's next commit
        log.info(
            "round %d: accepted update from %s (%d examples), %d/%d updates",
            current.id,
            device,
            claimed,
            len(current.received),
            len(current.selected),
        )
        if claimed > cap:
            self.rejected["examples_capped"] += 1
            current.rejected["examples_capped"] += 1
            log.warning(
                "round %d: %s claims %d examples, weighed as %d (rounds.max_examples)",
                current.id,
                device,
                claimed,
                cap,
            )

    def _on_control(self, command: Command) -> None:
        log.info("command %s", command.model_dump_json(exclude_defaults=True))
        if command.cmd == "start_round":
            self._start_round(command, manual=False)
        elif command.cmd == "auto":
            self.auto_remaining = command.rounds
            self.next_auto_at = self.clock()
            self._waiting_logged = False
            log.info("automatic mode: %d rounds", command.rounds)
        elif command.cmd == "stop":
            self.auto_remaining = 0
            log.info("automatic mode off (an open round still finishes)")
        elif command.cmd == "train":
            self._start_round(command, manual=True)
        elif command.cmd == "send":
            self._send()
        elif command.cmd == "aggregate":
            self._aggregate_command()
        else:
            self._publish_command()

    # -- rounds ----------------------------------------------------------------

    def _round_payload(self, announcement: RoundAnnouncement) -> bytes:
        """A round message, signed like the models when the aggregator has a key."""
        key = self.exporter.signer.key
        if key is not None:
            announcement = sign_announcement(announcement, self.config.site, key)
        return to_json(announcement)

    def _round_open(self) -> bool:
        return self.round is not None and self.round.status in OPEN

    def _start_round(self, command: Command | None, manual: bool) -> None:
        if self._round_open() and self.round is not None:
            raise RejectedMessage(
                "round_in_progress", f"round {self.round.id} is {self.round.status}"
            )
        round_id = self.last_round + 1
        rounds = self.config.rounds
        requested = command.devices if command is not None else None
        # A doorbell without a trusted key (revoked, or not provisioned here) could
        # only send updates that are refused: selecting it would make the round wait.
        keys = self.trusted_keys
        selectable = [device for device in self.online if keys is None or device in keys]
        if struck := self.strikes.left_out(selectable):
            log.warning(
                "round %d: leaving out %s: in far more rounds the accuracy bars refused "
                "than the others",
                round_id,
                ", ".join(sorted(struck)),
            )
            selectable = [device for device in selectable if device not in struck]
        selected = select_devices(selectable, requested, rounds.max_devices, rounds.seed, round_id)
        if requested and (absent := sorted(set(requested) - set(self.online))):
            log.warning("round %d: requested devices not online: %s", round_id, ", ".join(absent))
        if len(selected) < rounds.quorum:
            raise RejectedMessage(
                "not_enough_devices",
                f"{len(selected)} online devices selectable "
                f"({', '.join(sorted(self.online)) or 'none online'}), quorum is "
                f"{rounds.quorum}" + (" (min_cohort)" if rounds.secure_aggregation else ""),
            )
        plan = None
        if rounds.secure_aggregation:
            self.privacy.check_budget(len(selected), self._houses())
            plan = self._secagg_plan(round_id, len(selected))
        now = self.clock()
        announcement = announce(
            round_id=round_id,
            base_version=self.model.version,
            lineage=self.model.lineage,
            selected=selected,
            now=now,
            settings=rounds,
            manual=manual,
            secagg=plan,
        )
        shapes = [w.shape for w in self.model.weights]
        self.round = Round(
            announcement=announcement,
            manual=manual,
            started_at=now,
            accumulator=SecureSum()
            if plan is not None
            else make_accumulator(rounds, shapes, sparse=rounds.codec == "topk"),
            strategy=rounds.strategy,
        )
        if plan is not None:
            self.round.secure = SecurePhases.start(
                plan, round_id, self.model.lineage, selected, self.trusted_keys
            )
        self.last_round = round_id
        self.pending = None
        self._announce(announcement)
        log.info(
            "round %d started%s: base version %d, devices %s, deadline in %.0fs",
            round_id,
            " (step by step)" if manual else "",
            self.model.version,
            ", ".join(selected),
            rounds.timeout_s,
        )

    def _announce(self, announcement: RoundAnnouncement) -> None:
        """Commit, then publish a round message (counted in bytes_down)."""
        payload = self._round_payload(announcement)
        if self.round is not None:
            self.round.announce_bytes += len(payload)
        self._commit()
        self.publish(self.topics.round, payload)

    def _manual_round(self, action: str) -> Round:
        current = self.round
        if current is None or not self._round_open():
            raise RejectedMessage("bad_state", f"{action}: no round is open")
        return current

    def _send(self) -> None:
        current = self._manual_round("send")
        if current.announcement.secagg is not None:
            raise RejectedMessage(
                "bad_state",
                f"send: round {current.id} is a secure round: doorbells send their masked "
                "updates in its send phase, which follows the key and share phases",
            )
        if current.status != "collecting" or not current.manual:
            raise RejectedMessage(
                "bad_state",
                f"send: round {current.id} is "
                f"{current.status}{'' if current.manual else ', automatic'}",
            )
        # Nodes start uploading now, so the deadline counts from now.
        announcement = current.set_phase(
            "send", deadline=self.clock() + self.config.rounds.timeout_s
        )
        self._announce(announcement)
        log.info("round %d: send phase", current.id)

    def _aggregate_command(self) -> None:
        current = self._manual_round("aggregate")
        if current.status != "collecting":
            raise RejectedMessage("bad_state", f"aggregate: round {current.id} is {current.status}")
        if current.secure is not None:
            raise RejectedMessage(
                "bad_state",
                f"aggregate: secure round {current.id} is in phase {current.secure.phase}; it "
                "aggregates itself once its sum is unmasked",
            )
        quorum = self.config.rounds.quorum
        if len(current.received) < quorum:
            if self.clock() > current.announcement.deadline:
                self._abandon()
                return
            raise RejectedMessage(
                "below_quorum", f"aggregate: {len(current.received)} updates, quorum is {quorum}"
            )
        self._aggregate()

    def _publish_command(self) -> None:
        current = self._manual_round("publish")
        if current.status != "aggregated" or self.pending is None:
            raise RejectedMessage(
                "bad_state", f"publish: round {current.id} is {current.status}, nothing aggregated"
            )
        self._publish_release(self.pending)

    def _release(self) -> Release:
        assert self.round is not None
        self.next_step = next_step(
            self.model.weights,
            self.round.accumulator,
            self.round.received,
            self.model.optimizer,
        )
        return self.exporter.release(
            self.next_step.weights,
            self.model.version + 1,
            self.round.id,
            self.model.lineage,
            self.model.epoch,
        )

    def _aggregate(self) -> None:
        current = self.round
        assert current is not None
        release = self._release()
        log.info(
            "round %d: aggregated %d updates (%d examples) into version %d, accuracy %s",
            current.id,
            len(current.received),
            current.examples,
            release.version,
            _percent(release.accuracy),
        )
        if self._refuse_worse(current, release):
            return
        if self.next_step is not None and self.next_step.dropped:
            log.warning(
                "round %d: %s left out the updates of %s",
                current.id,
                self.config.rounds.strategy,
                ", ".join(self.next_step.dropped),
            )
        if not current.manual:
            self._publish_release(release)
            return
        current.status = "aggregated"
        self.pending = release
        metrics = self._metrics(current, "aggregated", release, extra_down=0)
        self.persistence.save_metrics(metrics)
        self._commit()
        self.publish(self.topics.metrics, metrics)

    def _refuse_worse(self, current: Round, release: Release) -> bool:
        """Abandon the round if its release scores far worse than the published model
        (max_accuracy_drop) or than the lineage's start (max_accuracy_loss: a reference
        small steps cannot walk down).

        Both are re-scored on the same evaluation set (a few matrix products), so the
        bars hold across restarts. The model, its optimiser
        moments and the doorbells stay where they are; the next round starts from
        the published version again.
        """
        if self.exporter.uncalibrated:
            self.count("uncalibrated")
            self._abandon(
                f"version {release.version} has no calibrated threshold and no gate: give the "
                "aggregator stranger photos (evaluation.strangers, 40 faces or more) and "
                "people in no house (evaluation.dataset); until then doorbells keep version "
                f"{self.model.version} (evaluation.require_calibration)"
            )
            return True
        if release.accuracy is None:
            return False
        refusal = accuracy_bar(
            release.accuracy,
            self.exporter.accuracy(self.model.weights),
            self.exporter.start_accuracy,
            self.config.rounds,
        )
        if refusal is None:
            return False
        reference = (
            f"version {self.model.version}'s"
            if refusal.reason == "accuracy_drop"
            else "the lineage's start (version 0)"
        )
        self.count(refusal.reason)
        self.strikes.round_ended(current.received, refused=True)
        self._abandon(
            f"version {release.version} scores {_percent(release.accuracy)} on the "
            f"evaluation set, more than {100 * refusal.bar:.1f} points below {reference} "
            f"{_percent(refusal.reference)} (rounds.max_{refusal.reason}): not published"
        )
        return True

    def _publish_release(self, release: Release) -> None:
        current = self.round
        assert current is not None
        closed = self._round_payload(current.set_phase("closed"))
        current.announce_bytes += len(closed)
        current.status = "closed"
        self.strikes.round_ended(current.received, refused=False)
        assert self.next_step is not None  # set with the release by `_release`
        model = self.persistence.save_release(
            release, self.next_step.optimizer, self.model.lineage, self.model.epoch
        )
        # The backbone went out once for the lineage: a round sends only the head.
        down = len(release.global_payload)
        metrics = self._metrics(current, "published", release, extra_down=down)
        self.persistence.save_metrics(metrics)
        self._commit(model)
        self.model = model
        self.pending = None
        for topic, payload in (
            (self.topics.global_model, release.global_payload),
            (self.topics.metrics, metrics),
            (self.topics.round, closed),
            (self.topics.aggregator_status, self.status_payload()),
        ):
            self.publish(topic, payload)
        log.info(
            "round %d closed: published version %d (threshold %.3f, %d bytes up, "
            "%d bytes down, %.1fs)",
            current.id,
            release.version,
            release.threshold,
            current.bytes_up + (current.secure.bytes_up if current.secure else 0),
            (current.announce_bytes + down) * len(current.selected),
            self.clock() - current.started_at,
        )
        self._round_ended()

    def _abandon(self, why: str | None = None) -> None:
        current = self.round
        assert current is not None
        abandoned = self._round_payload(current.set_phase("abandoned"))
        current.announce_bytes += len(abandoned)
        current.status = "abandoned"
        why = why or (
            f"{len(current.received)} of {len(current.selected)} updates, quorum is "
            f"{self.config.rounds.quorum}"
        )
        metrics = self._metrics(current, "abandoned", None, extra_down=0, detail=why)
        self.persistence.save_metrics(metrics)
        self._commit()
        self.pending = None
        self.publish(self.topics.metrics, metrics)
        self.publish(self.topics.round, abandoned)
        log.warning(
            "round %d abandoned: %s; model stays at version %d", current.id, why, self.model.version
        )
        self._round_ended()

    def _metrics(
        self,
        current: Round,
        outcome: str,
        release: Release | None,
        extra_down: int,
        detail: str = "",
    ) -> bytes:
        secure, privacy = current.secure, self._privacy_fields(current)
        dropped = list(self.next_step.dropped) if release and self.next_step else []
        if current.announcement.secagg is not None:
            dropped = [d for d in current.selected if d not in current.received]
        return to_json(
            RoundMetrics.model_validate(
                {
                    "round": current.id,
                    "version": release.version if release else 0,
                    "outcome": outcome,
                    "participants": len(current.received),
                    "examples": current.examples,
                    "accuracy": release.accuracy if release else None,
                    "threshold": release.threshold if release else None,
                    "bytes_up": current.bytes_up + (secure.bytes_up if secure else 0),
                    "bytes_down": (current.announce_bytes + extra_down) * len(current.selected)
                    + (secure.bytes_down if secure else 0),
                    "seconds": round(self.clock() - current.started_at, 3),
                    "rejected": dict(current.rejected),
                    "dropped": dropped,
                    "secure": current.announcement.secagg is not None,
                    **privacy,
                    "detail": detail,
                    "history": history_before(self.persistence.last_metrics(), current.id),
                }
            )
        )

    def _round_ended(self) -> None:
        self.next_auto_at = self.clock() + self.config.rounds.auto_pause_s

    # -- time ------------------------------------------------------------------

    def tick(self) -> None:
        """Close rounds whose time has come; start the next automatic round."""
        self.rejection_log.flush()
        now = self.clock()
        current = self.round
        if current is not None and current.announcement.secagg and current.status == "collecting":
            self._tick_secure(current, now)
        elif current is not None and self._round_open():
            step = current.next_step(now, self.config.rounds.quorum)
            if step == "aggregate":
                self._aggregate()
            elif step == "abandon":
                self._abandon()
        if self.auto_remaining > 0 and not self._round_open() and now >= self.next_auto_at:
            self._start_auto_round()

    def _start_auto_round(self) -> None:
        try:
            self._start_round(None, manual=False)
        except RejectedMessage as err:
            if err.reason == "privacy_budget_spent":
                self.reject(err, "automatic round")
                self.auto_remaining = 0  # no later round fits either
                return
            if not self._waiting_logged:  # once, not every second while waiting
                log.info("automatic round waits: %s", err.detail)
                self._waiting_logged = True
            self.next_auto_at = self.clock() + 1.0
            return
        self._waiting_logged = False
        self.auto_remaining -= 1

    def seconds_to_next_event(self) -> float:
        """How long the main loop may sleep without missing a deadline or a round."""
        wake = self.next_auto_at if self.auto_remaining > 0 else float("inf")
        if self.round is not None and self._round_open():
            wake = min(wake, self.round.announcement.deadline)
        return max(0.0, wake - self.clock())


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
