"""Taking part in the aggregator's rounds: which to join, training, holding and sending.

Round messages arrive on paho's thread (`on_round`): they are checked, the
decision to take part is recorded, and the training is queued for the worker.
A plain round's update is sent when trained, or held until its send phase; a
secure round's keys phase trains and its later phases answer through
`SecureParticipant`. What was sent is remembered: the round number (never
twice), the top-k residual (error feedback) and the update itself, sent again
if its round is announced again while open.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from edge.installer import ModelInstaller
from edge.parts import DoorbellParts
from edge.plan import check_announcement
from edge.round_training import RoundTraining
from edge.secure import SecureParticipant
from edge.session import NodeSession
from fedbell.errors import RejectedMessage
from fedbell.wire.codecs import TENSOR_CODECS, Weights
from fedbell.wire.messages import AGGREGATOR, GlobalModel, Signer, build_update
from fedbell.wire.protocol import MAX_ROUND_BYTES, RoundAnnouncement, parse_json
from fedbell.wire.sparsify import with_error_feedback

log = logging.getLogger(__name__)

Job = Callable[[], None]


@dataclass(frozen=True)
class HeldUpdate:
    """An encoded update, until it is sent (perhaps held for its round's send phase)."""

    round: int
    payload: bytes
    residual: Weights | None = None
    """Top-k only: what this update leaves out, kept once the update is sent."""


class RoundParticipant:
    """One doorbell's part in the rounds: the round state, and the jobs that train and send."""

    def __init__(
        self,
        parts: DoorbellParts,
        *,
        session: NodeSession,
        models: ModelInstaller,
        training: RoundTraining,
        signer: Signer,
        submit: Callable[[Job], None],
    ) -> None:
        """`submit` queues a job for the worker thread; `models.changed` guards the round
        state as well as the model."""
        self.parts = parts
        self.device = parts.device
        self.session = session
        self.topics = session.topics
        self.models = models
        self.training = training
        self.signer = signer
        self._submit = submit
        self._changed = models.changed
        self._last_round = parts.state.load_last_round()
        self._rounds_taken: set[int] = set()  # queued, training or held
        self._held: HeldUpdate | None = None
        # The last update sent. Mosquitto acknowledges a QoS 1 publish before it
        # saves it, and a broker restart can lose the aggregator's subscription,
        # so an acknowledged update can still be lost. The round message comes
        # again exactly then (the node resubscribes, the aggregator republishes
        # on reconnect): if its round is still open, the node sends the update
        # once more, and the aggregator counts a duplicate if it already had it.
        self._sent: HeldUpdate | None = None
        self._send_permitted = 0  # highest round whose send phase has been seen
        self._residual = parts.state.load_residual()  # top-k error feedback
        self.secure = SecureParticipant(
            self.device,
            self.topics,
            signer.key,
            publish=lambda topic, payload: session.publish_update(topic, payload, "secagg"),
            on_sent=self._record_sent,
        )

    @property
    def last_round(self) -> int:
        return self._last_round

    @property
    def held_round(self) -> int | None:
        held = self._held
        return None if held is None else held.round

    # --- round messages (paho's thread) ---------------------------------------------

    def on_round(self, payload: bytes) -> None:
        announcement = parse_json(payload, RoundAnnouncement, max_bytes=MAX_ROUND_BYTES)
        # Before anything is recorded or queued: a forged or unsigned round (when
        # signing is configured) or one asking for a plan out of bounds is refused.
        check_announcement(
            announcement,
            site=self.parts.config.site,
            aggregator_key=None if self.parts.keys is None else self.parts.keys[AGGREGATOR],
            require_signature=self.parts.keys is not None,
            limits=self.parts.config.accept,
        )
        if announcement.secagg is not None:
            self._on_secure_round(announcement)
        else:
            self._on_plain_round(announcement)

    def _on_plain_round(self, announcement: RoundAnnouncement) -> None:
        number = announcement.round
        if announcement.phase in ("closed", "abandoned"):
            with self._changed:
                if self._held is not None and self._held.round == number:
                    log.info("round %d %s: dropping the held update", number, announcement.phase)
                    self._held = None
                    self._rounds_taken.discard(number)
            return
        if self.device not in announcement.selected:
            log.info("round %d: not selected", number)
            return
        with self._changed:
            current = self.models.model
            if (
                announcement.lineage is not None
                and current is not None
                and announcement.lineage != current.lineage
            ):
                # Another lineage's round (a reset or an upgrade): our round numbers,
                # held and sent updates belong to the old one. Wait for its base model.
                log.info(
                    "round %d of lineage %s: waiting for its model", number, announcement.lineage
                )
                self._rounds_taken.add(number)
                self._submit(lambda: self._take_part(announcement))
                return
            sent = self._sent
            if sent is not None and sent.round == number:
                log.info("round %d announced again while open: sending its update again", number)
                self.session.client.publish(self.topics.update(self.device), sent.payload, qos=1)
                return
            held = None
            if announcement.phase == "send":
                self._send_permitted = max(self._send_permitted, number)
                if self._held is not None and self._held.round == number:
                    held, self._held = self._held, None
            if held is None:
                if number <= self._last_round or number in self._rounds_taken:
                    log.info("round %d (%s): already taken part", number, announcement.phase)
                    return
                self._rounds_taken.add(number)
        if held is not None:
            log.info("round %d: send phase, sending the held update", number)
            self._send(held)
            return
        self._submit(lambda: self._take_part(announcement))

    def _on_secure_round(self, announcement: RoundAnnouncement) -> None:
        """A secure round's phase: the keys phase trains, later phases answer (worker)."""
        number, phase = announcement.round, announcement.phase
        if phase in ("closed", "abandoned"):
            self._submit(lambda: self.secure.end(number))
            return
        if self.device not in announcement.selected:
            log.info("round %d: not selected", number)
            return
        if phase != "keys":
            self._submit(lambda: self._secure_step(announcement))
            return
        with self._changed:
            taken = number in self._rounds_taken or self.secure.round == number
            if number <= self._last_round or taken:
                log.info("round %d (keys): already taken part", number)
                return
            self._rounds_taken.add(number)
        self._submit(lambda: self._take_part(announcement))

    def start_lineage(self, current: GlobalModel | None, model: GlobalModel) -> None:
        """A reset or an upgrade: the old lineage's rounds, update, residual and local Adam
        mean nothing.

        Called with `models.changed` held, just before `model` is installed.
        """
        log.info(
            "new lineage %s (was %s): accepting v%d, dropping the old model's round state",
            model.lineage,
            None if current is None else current.lineage,
            model.version,
        )
        self._held = self._sent = None
        self._rounds_taken.clear()
        self._send_permitted = 0
        self._last_round = 0
        self._residual = None
        self.training.forget_moments()
        try:
            self.parts.state.save_last_round(0)
            self.parts.state.clear_residual()
        except OSError as err:
            self.parts.counters["store_failed"] += 1
            log.error("could not reset the round state: %s", err)

    # --- worker jobs ------------------------------------------------------------------

    def _secure_step(self, announcement: RoundAnnouncement) -> None:
        try:
            self.secure.step(announcement)
        except RejectedMessage as err:  # e.g. a roster or inbox the library refuses
            self.parts.counters[err.reason] += 1
            log.warning("round %d (%s): %s", announcement.round, announcement.phase, err)

    def _take_part(self, announcement: RoundAnnouncement) -> None:
        try:
            self._train_and_deliver(announcement)
        finally:
            with self._changed:
                if self.held_round != announcement.round:
                    self._rounds_taken.discard(announcement.round)

    def _train_and_deliver(self, announcement: RoundAnnouncement) -> None:
        number = announcement.round
        if announcement.secagg is not None:
            self._train_secure(announcement)
            return
        if announcement.codec not in TENSOR_CODECS:
            self.parts.counters["bad_codec"] += 1
            log.warning(
                "round %d: codec %s is not an update codec; skipping", number, announcement.codec
            )
            return
        # top-k: the unsent remainder goes into training, so it is carried once
        trained = self.training.train(
            announcement, self._residual if announcement.codec == "topk" else None
        )
        if trained is None:
            return
        base, result = trained
        delta, residual = result.delta, None
        if announcement.codec == "topk":
            delta, residual = with_error_feedback(base.names, delta, announcement.density)
        payload = build_update(
            site=self.parts.config.site,
            signer=self.signer,
            round_id=number,
            base_version=base.version,
            num_examples=result.num_examples,
            names=base.names,
            delta=delta,
            codec=announcement.codec,
            density=announcement.density,
            meta={"loss": result.loss, "train_seconds": round(result.seconds, 2)},
        )
        update = HeldUpdate(number, payload, residual)
        with self._changed:
            send_now = announcement.send_when_trained or self._send_permitted >= number
            if not send_now:
                if self._held is not None:  # an older round's update the aggregator never asked for
                    self._rounds_taken.discard(self._held.round)
                self._held = update
        log.info(
            "round %d: trained in %.1f s, loss %.3f, %d bytes%s",
            number,
            result.seconds,
            result.loss,
            len(payload),
            "" if send_now else "; holding for the send phase",
        )
        if send_now:
            self._send(update)

    def _train_secure(self, announcement: RoundAnnouncement) -> None:
        """Keys phase: once the base model and the training data are here, advertise (the
        phase then waits for every doorbell's keys, not its training), train, and prepare
        the masked-ready update for the send phase. A doorbell that cannot train does not
        advertise: the round never waits for its shares."""
        if announcement.calibrate is not None:
            self._calibrate(announcement)
            return
        # no error feedback: the aggregator rescales the subset (edge/secure.py says why)
        trained = self.training.train(
            announcement, None, ready=lambda: self.secure.begin(announcement)
        )
        if trained is None:
            self.secure.end(announcement.round)  # no update: drop out of the round
            return
        self.secure.prepare(announcement, trained[1].delta)
        log.info(
            "round %d: trained in %.1f s, loss %.3f; update ready to mask",
            announcement.round,
            trained[1].seconds,
            trained[1].loss,
        )

    def _calibrate(self, announcement: RoundAnnouncement) -> None:
        """A calibration round's keys phase: score its heads on the stranger store and the
        gallery (nothing is trained), then mask the histograms like an update."""
        vector = self.training.calibration_vector(
            announcement, ready=lambda: self.secure.begin(announcement)
        )
        if vector is None:
            self.secure.end(announcement.round)
            return
        self.secure.prepare_calibration(announcement, vector)
        log.info("round %d: calibration histograms ready to mask", announcement.round)

    def _send(self, update: HeldUpdate) -> None:
        self.session.publish_update(
            self.topics.update(self.device), update.payload, f"round {update.round}"
        )
        with self._changed:
            self._sent = update
        self._record_sent(update.round, update.residual)
        log.info("round %d: update sent (%d bytes)", update.round, len(update.payload))

    def _record_sent(self, number: int, residual: Weights | None) -> None:
        """A round's update is sent: remember the round and keep its error-feedback residual."""
        with self._changed:
            self._last_round = max(self._last_round, number)
            self._rounds_taken.discard(number)
            if residual is not None:
                self._residual = residual
        try:
            self.parts.state.save_last_round(self._last_round)
            if residual is not None:
                self.parts.state.save_residual(residual)
        except OSError as err:
            self.parts.counters["store_failed"] += 1
            log.error("could not record round %d: %s", number, err)
        self.session.publish_status()
