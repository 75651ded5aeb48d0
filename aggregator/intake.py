"""What comes in: commands, doorbell statuses, updates and secagg messages, each checked.

Every message is dispatched by its topic; a refusal (RejectedMessage) is
counted and logged, rate-limited (`aggregator.rejections`). Only a command is
answered either way (the operator asked); a refused update or secagg message
costs a count, never a publish, so junk from a login cannot make the
aggregator publish once per message.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from aggregator.federation import Federation
from aggregator.round_machine import RoundMachine
from aggregator.secure_rounds import SecureRounds
from aggregator.strategy import InconsistentUpdate
from fedbell.errors import RejectedMessage
from fedbell.wire.envelope import TensorSpec
from fedbell.wire.messages import parse_update
from fedbell.wire.protocol import Command, DeviceStatus, parse_json

log = logging.getLogger("aggregator")


class Intake:
    """Checks each message and hands it to the part it is for."""

    def __init__(
        self,
        federation: Federation,
        rounds: RoundMachine,
        secure: SecureRounds,
        specs: Sequence[TensorSpec],
    ) -> None:
        self.federation = federation
        self.rounds = rounds
        self.secure = secure
        self.specs = specs
        """The tensors an update must carry: the model's names, shapes and types."""

    def on_message(self, topic: str, payload: bytes) -> None:
        """Dispatch one message; a RejectedMessage is logged and counted here."""
        topics = self.federation.topics
        if topic == topics.control:
            self._command(payload)
            return
        if topic.startswith(f"{topics.base}/update/"):
            handler, kind = self._on_update, "update"
        elif topic.startswith(f"{topics.base}/status/"):
            handler, kind = self._on_status, "status"
        elif topic.startswith(f"{topics.base}/secagg/"):
            handler, kind = self.secure.on_message, "secagg"
        else:
            return
        try:
            handler(topic, payload)
        except RejectedMessage as err:
            self.federation.reject(err, f"{kind} on {topic}")

    def _command(self, payload: bytes) -> None:
        """Carry out a command and reply either way: a refusal is not only in the log."""
        fed = self.federation
        command: Command | None = None
        try:
            command = parse_json(payload, Command)
            self.rounds.command(command)
        except RejectedMessage as err:
            fed.reject(err, "command")
            cmd = command.cmd if command is not None else None
            fed.reply(about="command", ok=False, cmd=cmd, reason=err.reason, detail=err.detail)
            return
        fed.reply(about="command", ok=True, cmd=command.cmd, detail=fed.summary())

    def _on_status(self, topic: str, payload: bytes) -> None:
        online = self.federation.online
        device = self._device(topic)
        was_online = device in online
        status = parse_json(payload, DeviceStatus) if payload else None
        if status is not None and status.state == "online":
            online[device] = status
            if not was_online:
                log.info(
                    "device %s online (model version %s, %d faces)",
                    device,
                    status.model_version,
                    status.gallery_size,
                )
        elif was_online:
            del online[device]
            log.info("device %s offline", device)

    def _device(self, topic: str) -> str:
        try:
            return self.federation.topics.device_of(topic)
        except ValueError as err:
            raise RejectedMessage("bad_topic", str(err)) from None

    def _on_update(self, topic: str, payload: bytes) -> None:
        fed = self.federation
        device = self._device(topic)
        try:
            update = parse_update(
                payload,
                site=fed.config.site,
                device=device,
                expected=self.specs,
                max_bytes=fed.config.mqtt.max_message_bytes,
                keys=fed.trusted_keys,
            )
            current = fed.open_round()
            if current is None:
                raise RejectedMessage(
                    "no_round", f"no round is open (update for round {update.round})"
                )
            current.check(update, fed.clock(), fed.config.rounds.max_update_norm)
            current.accept(update, len(payload))
        except (RejectedMessage, InconsistentUpdate) as err:
            # Counted, not answered: a retained reply per junk update cost a publish each.
            reason = (
                err
                if isinstance(err, RejectedMessage)
                else RejectedMessage("inconsistent", str(err))
            )
            fed.reject(reason, f"update from {device}")
            return
        fed.reply(about="update", ok=True, device=device, round=current.id, size=len(payload))
        claimed, cap = update.num_examples, fed.config.rounds.max_examples
        capped = current.weighting == "examples" and claimed > cap
        del update  # streaming strategies keep only the running sum
        fed.dirty = True  # committed by `persist` (batched), or by the round's next commit
        log.info(
            "round %d: accepted update from %s (%d examples), %d/%d updates",
            current.id,
            device,
            claimed,
            len(current.received),
            len(current.selected),
        )
        if capped:
            fed.count("examples_capped")
            log.warning(
                "round %d: %s claims %d examples, weighed as %d (rounds.max_examples)",
                current.id,
                device,
                claimed,
                cap,
            )
