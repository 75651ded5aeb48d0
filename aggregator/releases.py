"""How a round ends: aggregated into a release, held by the accuracy bars, published or abandoned.

bytes_down of a round: the payload bytes the broker delivers to the selected
devices for that round, i.e. (every round message of the round + the global
model envelope + the TFLite envelope) × number of selected devices.
bytes_up: the sum of the payload sizes of the accepted updates (with secure
aggregation, every secagg message the doorbells sent).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

from aggregator.accumulator import SecureSum, next_step
from aggregator.export import Candidate, Release
from aggregator.federation import Federation
from aggregator.gates import accuracy_bar
from aggregator.history import history_before
from aggregator.rounds import Round
from fedbell.wire.protocol import RoundMetrics, to_json

log = logging.getLogger("aggregator")


class Releases:
    """The end of a round; `on_round_ended` hears of each (automatic rounds pause after it)."""

    def __init__(self, federation: Federation, on_round_ended: Callable[[], None]) -> None:
        self.federation = federation
        self.on_round_ended = on_round_ended

    def release(self) -> Release:
        """The open round's result: the server step, exported and scored (not published)."""
        fed = self.federation
        assert fed.round is not None
        fed.next_step = next_step(
            fed.model.weights, fed.round.accumulator, fed.round.received, fed.model.optimizer
        )
        return fed.exporter.release(
            fed.next_step.weights,
            fed.model.version + 1,
            fed.round.id,
            fed.model.lineage,
            fed.model.epoch,
        )

    def aggregate(self) -> None:
        """Aggregate the round; publish it, or hold it for `publish` if step by step."""
        fed = self.federation
        current = fed.round
        assert current is not None
        release = self.release()
        log.info(
            "round %d: aggregated %d updates (%d examples) into version %d, accuracy %s",
            current.id,
            len(current.received),
            current.examples,
            release.version,
            _percent(release.accuracy),
        )
        if fed.exporter.uncalibrated and current.announcement.secagg is not None:
            self._hold_for_calibration(current, release)
            return
        if self._refuse_worse(current, release):
            return
        if fed.next_step is not None and fed.next_step.dropped:
            log.warning(
                "round %d: %s left out the updates of %s",
                current.id,
                fed.config.rounds.strategy,
                ", ".join(fed.next_step.dropped),
            )
        if not current.manual:
            self.publish(release)
            return
        current.status = "aggregated"
        fed.pending = release
        metrics = self._metrics(current, "aggregated", release, extra_down=0)
        fed.persistence.save_metrics(metrics)
        fed.commit()
        fed.publish(fed.topics.metrics, metrics)

    def _hold_for_calibration(self, current: Round, release: Release) -> None:
        """Close the round with its release held, for the next round to calibrate on the
        doorbells (aggregator/calibration.py; the round machine starts it). Step-by-step
        rounds too: the calibration round publishes what passes."""
        fed = self.federation
        fed.candidate = Candidate(release, tuple(current.received))
        current, closed = self._end("closed")
        detail = (
            f"version {release.version} waits for its threshold: the next round scores it "
            "on the doorbells' strangers and residents (federated calibration)"
        )
        metrics = self._metrics(current, "aggregated", release, extra_down=0, detail=detail)
        fed.persistence.save_metrics(metrics)
        fed.commit()
        fed.publish(fed.topics.metrics, metrics)
        fed.publish(fed.topics.round, closed)
        log.info("round %d closed: %s", current.id, detail)

    def _refuse_worse(self, current: Round, release: Release) -> bool:
        """Abandon the round if its release scores far worse than the published model
        (max_accuracy_drop) or than the lineage's start (max_accuracy_loss: a reference
        small steps cannot walk down).

        Both are re-scored on the same evaluation set (a few matrix products), so the
        bars hold across restarts. The model, its optimiser
        moments and the doorbells stay where they are; the next round starts from
        the published version again.
        """
        fed = self.federation
        if fed.exporter.uncalibrated:
            fed.count("uncalibrated")
            self.abandon(
                f"version {release.version} has no calibrated threshold and no gate: turn on "
                "rounds.secure_aggregation (the doorbells then calibrate it on their "
                "strangers), or give the aggregator stranger photos (evaluation.strangers, "
                "40 faces or more) and people in no house (evaluation.dataset); until then "
                f"doorbells keep version {fed.model.version} (evaluation.require_calibration)"
            )
            return True
        if release.accuracy is None:
            return False
        refusal = accuracy_bar(
            release.accuracy,
            fed.exporter.accuracy(fed.model.weights),
            fed.exporter.start_accuracy,
            fed.config.rounds,
        )
        if refusal is None:
            return False
        reference = (
            f"version {fed.model.version}'s"
            if refusal.reason == "accuracy_drop"
            else "the lineage's start (version 0)"
        )
        fed.count(refusal.reason)
        fed.strikes.round_ended(current.received, refused=True)
        self.abandon(
            f"version {release.version} scores {_percent(release.accuracy)} on the "
            f"evaluation set, more than {100 * refusal.bar:.1f} points below {reference} "
            f"{_percent(refusal.reference)} (rounds.max_{refusal.reason}): not published"
        )
        return True

    def publish(self, release: Release, detail: str = "") -> None:
        """Commit the release as the new model, then publish it and close the round."""
        fed = self.federation
        current, closed = self._end("closed")
        fed.strikes.round_ended(current.received, refused=False)
        assert fed.next_step is not None  # set with the release by `release`
        model = fed.persistence.save_release(
            release, fed.next_step.optimizer, fed.model.lineage, fed.model.epoch
        )
        # The backbone went out once for the lineage: a round sends only the head.
        down = len(release.global_payload)
        metrics = self._metrics(current, "published", release, extra_down=down, detail=detail)
        fed.persistence.save_metrics(metrics)
        fed.commit(model)
        fed.model = model
        fed.pending = None
        for topic, payload in (
            (fed.topics.global_model, release.global_payload),
            (fed.topics.metrics, metrics),
            (fed.topics.round, closed),
            (fed.topics.aggregator_status, fed.status_payload()),
        ):
            fed.publish(topic, payload)
        log.info(
            "round %d closed: published version %d (threshold %.3f, %d bytes up, "
            "%d bytes down, %.1fs)",
            current.id,
            release.version,
            release.threshold,
            current.bytes_up + (current.secure.bytes_up if current.secure else 0),
            (current.announce_bytes + down) * len(current.selected),
            fed.clock() - current.started_at,
        )
        self.on_round_ended()

    def abandon(self, why: str | None = None) -> None:
        """Close the round without a release: the model stays where it is."""
        fed = self.federation
        current, abandoned = self._end("abandoned")
        why = why or (
            f"{len(current.received)} of {len(current.selected)} updates, quorum is "
            f"{fed.config.rounds.quorum}"
        )
        metrics = self._metrics(current, "abandoned", None, extra_down=0, detail=why)
        fed.persistence.save_metrics(metrics)
        fed.commit()
        fed.pending = None
        fed.publish(fed.topics.metrics, metrics)
        fed.publish(fed.topics.round, abandoned)
        log.warning(
            "round %d abandoned: %s; model stays at version %d", current.id, why, fed.model.version
        )
        self.on_round_ended()

    def _end(self, phase: Literal["closed", "abandoned"]) -> tuple[Round, bytes]:
        """The round, ended in `phase`, and its last round message (counted in bytes_down)."""
        current = self.federation.round
        assert current is not None
        payload = self.federation.round_payload(current.set_phase(phase))
        current.announce_bytes += len(payload)
        current.status = phase
        return current, payload

    def _metrics(
        self,
        current: Round,
        outcome: str,
        release: Release | None,
        extra_down: int,
        detail: str = "",
    ) -> bytes:
        fed = self.federation
        secure, privacy = current.secure, self._privacy_fields(current)
        dropped = list(fed.next_step.dropped) if release and fed.next_step else []
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
                    "seconds": round(fed.clock() - current.started_at, 3),
                    "rejected": dict(current.rejected),
                    "dropped": dropped,
                    "secure": current.announcement.secagg is not None,
                    **privacy,
                    "detail": detail,
                    "history": history_before(fed.persistence.last_metrics(), current.id),
                }
            )
        )

    def _privacy_fields(self, current: Round) -> dict[str, float | None]:
        """Epsilon of this round (if its noised sum was unmasked) and of all rounds so far."""
        fed = self.federation
        if current.announcement.secagg is None or not fed.privacy.noised:
            return {"epsilon": None, "epsilon_total": None}
        selected, houses = len(current.selected), fed.houses()
        unmasked = (
            current.secure.unmasked
            if current.secure is not None
            else isinstance(current.accumulator, SecureSum) and current.accumulator.count > 0
        )
        return {
            "epsilon": fed.privacy.epsilon(1, selected, houses) if unmasked else 0.0,
            "epsilon_total": fed.privacy.epsilon(fed.privacy.rounds, selected, houses),
        }


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
