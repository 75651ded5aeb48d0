"""The aggregator's brain: commands, updates and statuses in; rounds and models out.

It knows nothing about MQTT: the service hands it (topic, payload) pairs on
one thread and gives it a `publish(topic, payload)` function (always QoS 1,
retained). Every state change is committed to disk (see `persistence`) before
it is published, so a restart republishes what was committed and carries on
from there.

`Coordinator` wires its parts around one shared `Federation` (the state) and
is what the service, the tests and the simulations hold:

    Intake         messages in: commands, statuses, updates, secagg messages
    RoundMachine   starting rounds, operator commands, deadlines, automatic rounds
    SecureRounds   a secure round's phases, from key adverts to the unmasked sum
    Releases       aggregate, the accuracy bars, publish or abandon, the metrics
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from aggregator.config import AggregatorConfig
from aggregator.export import Exporter
from aggregator.federation import Federation, Publish
from aggregator.intake import Intake
from aggregator.persistence import Persistence
from aggregator.releases import Releases
from aggregator.round_machine import AutoRounds, RoundMachine
from aggregator.secure_rounds import SecureRounds
from aggregator.sizes import measure
from aggregator.state import StateStore
from fedbell.wire.messages import resign

log = logging.getLogger("aggregator")


class Coordinator:
    """The aggregator's parts, wired; the service and the tests read the state in `federation`."""

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
        # Refused before the state is touched: a message over the broker's limit would
        # otherwise fail mid-round (rounds.trainable: last_level is 21 times the head).
        log.info("largest messages of a round: %s", measure(config, exporter).describe())
        persistence = Persistence(config, exporter, store)
        loaded = persistence.load()
        resumed = loaded or persistence.initialise()
        model = resumed.model
        fed = Federation(
            persistence, model, publish=publish, clock=clock, trusted_keys=trusted_keys
        )
        self.federation = fed
        self.auto = AutoRounds(config.auto_rounds, config.rounds.auto_pause_s, clock)
        self.releases = Releases(fed, on_round_ended=self.auto.round_ended)
        self.secure = SecureRounds(fed, self.releases)
        self.rounds = RoundMachine(fed, self.releases, self.secure, self.auto)
        self.intake = Intake(fed, self.rounds, self.secure, exporter.specs(model.weights))
        self._backbone_sent: tuple[str, int] | None = None
        """(lineage, epoch) of the backbone this process published to the broker, if any."""
        fed.round, fed.last_round = resumed.round, resumed.last_round
        fed.privacy.rounds = resumed.noised_rounds
        if loaded is not None:
            if fed.round is not None and fed.round.status == "aggregated":
                # Recompute the unpublished result: the release is not saved until published.
                fed.pending = self.releases.release()
            log.info(
                "state loaded: model version %d, last round %d%s",
                model.version,
                fed.last_round,
                fed.round_summary(),
            )
        if config.rounds.secure_aggregation:
            self.secure.log_expected_privacy()

    @property
    def auto_remaining(self) -> int:
        return self.auto.remaining

    def summary(self) -> str:
        """One line for `systemctl status`."""
        return self.federation.summary()

    def status_payload(self, state: str = "online") -> bytes:
        return self.federation.status_payload(state)

    def count(self, reason: str, number: int = 1) -> None:
        """Count rejections since start and in the open round (its metrics)."""
        self.federation.count(reason, number)

    # -- the service's calls ---------------------------------------------------

    def connected(self, session_kept: bool = False) -> None:
        """Subscribed: publish the committed state, arm automatic rounds.

        session_kept: the broker still had this client's session (CONNACK's
        session present), so it kept what it had stored, our retained messages
        with it. The backbone (28 MB) this process already published then stays
        where it is: sent again after every reconnection, a node lost on the
        federation tier made the tier push it to every house again (20 x 28 MB
        mid-round; docs/many-houses.md). The small messages are still republished.
        """
        fed = self.federation
        backbone = (fed.model.lineage, fed.model.epoch)
        with_backbone = not session_kept or self._backbone_sent != backbone
        for topic, payload in self.retained_messages(with_backbone=with_backbone):
            fed.publish(topic, payload)
        if with_backbone:
            self._backbone_sent = backbone
        fed.publish(fed.topics.aggregator_status, fed.status_payload())
        self.auto.arm()

    def retained_messages(self, with_backbone: bool = True) -> list[tuple[str, bytes]]:
        """What to (re)publish after (re)connecting: the committed public state."""
        fed = self.federation
        topics = {"global": fed.topics.global_model, "metrics": fed.topics.metrics}
        # Signed now with the current key: after a rotation (`provision remove-login
        # aggregator` + `add-aggregator`) a re-imaged doorbell trusts only the new one.
        signer, limit = fed.exporter.signer, fed.config.mqtt.max_message_bytes
        messages = [
            (topics[name], resign(payload, signer, limit) if name == "global" else payload)
            for name, payload in fed.persistence.retained_payloads(topics)
        ]
        if with_backbone:
            backbone = fed.exporter.backbone_messages(fed.model.lineage, fed.model.epoch)
            messages += backbone.publications(fed.topics)
        if fed.round is not None:
            messages.append((fed.topics.round, fed.round_payload(fed.round.announcement)))
        return messages

    def on_message(self, topic: str, payload: bytes) -> None:
        """Dispatch one message; a RejectedMessage is logged and counted, not raised."""
        self.intake.on_message(topic, payload)

    def tick(self) -> None:
        """Summarise held rejections, close rounds whose time has come, start automatic ones."""
        self.federation.rejection_log.flush()
        self.rounds.tick()

    def seconds_to_next_event(self) -> float:
        """How long the main loop may sleep without missing a deadline or a round."""
        return self.rounds.seconds_to_next_event()

    def persist(self) -> None:
        """Commit the updates accepted since the last commit, if any.

        Accepting an update only changes memory: writing the accumulator and
        state.json after every one capped throughput at ~150 updates/s. The
        service calls this every `persist_interval_s` (or sooner when many
        MQTT acks wait) and acknowledges the updates only afterwards, so the
        broker redelivers what a crash lost before it reached the disk.
        """
        if self.federation.dirty:
            self.federation.commit()
