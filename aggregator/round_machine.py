"""The round state machine: operator commands, starting a round, its deadlines, automatic rounds.

A round is started by a command (`start_round`, `train` step by step) or by
the automatic schedule, moves on at its deadline or when every selected
doorbell answered (`tick`), and ends in `Releases` (published, aggregated for
a step-by-step `publish`, or abandoned). A secure round's phases are
`SecureRounds`'.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aggregator.accumulator import SecureSum, make_accumulator
from aggregator.calibration import calibration_plan
from aggregator.federation import Federation
from aggregator.releases import Releases
from aggregator.rounds import Round, announce, select_devices
from aggregator.secure import SecurePhases
from aggregator.secure_rounds import SecureRounds
from fedbell.errors import RejectedMessage
from fedbell.wire.protocol import Command

log = logging.getLogger("aggregator")


@dataclass
class AutoRounds:
    """Automatic rounds: how many are left, and when the next may start."""

    remaining: int
    pause_s: float
    clock: Callable[[], float]
    next_at: float = float("inf")
    """Armed once connected (`arm`), then a pause after every round's end."""
    waiting_logged: bool = False

    def arm(self) -> None:
        if self.next_at == float("inf"):
            self.next_at = self.clock() + self.pause_s

    def round_ended(self) -> None:
        self.next_at = self.clock() + self.pause_s


@dataclass(eq=False)
class RoundMachine:
    """Starts rounds and moves them on; `Releases` ends them."""

    federation: Federation
    releases: Releases
    secure: SecureRounds
    auto: AutoRounds

    def command(self, command: Command) -> None:
        """Carry out an operator's command; RejectedMessage says why it cannot be."""
        log.info("command %s", command.model_dump_json(exclude_defaults=True))
        if command.cmd == "start_round":
            self.start(command, manual=False)
        elif command.cmd == "auto":
            self.auto.remaining = command.rounds
            self.auto.next_at = self.federation.clock()
            self.auto.waiting_logged = False
            log.info("automatic mode: %d rounds", command.rounds)
        elif command.cmd == "stop":
            self.auto.remaining = 0
            log.info("automatic mode off (an open round still finishes)")
        elif command.cmd == "train":
            self.start(command, manual=True)
        elif command.cmd == "send":
            self._send()
        elif command.cmd == "aggregate":
            self._aggregate()
        else:
            self._publish()

    def start(self, command: Command | None, manual: bool) -> None:
        """Select the doorbells, announce a new round (a secure one in its `keys` phase;
        a calibration round while a candidate waits for its threshold)."""
        fed = self.federation
        if (current := fed.open_round()) is not None:
            raise RejectedMessage("round_in_progress", f"round {current.id} is {current.status}")
        round_id = fed.last_round + 1
        rounds = fed.config.rounds
        selected = self._select(round_id, command.devices if command is not None else None)
        candidate = fed.candidate
        plan = None
        if rounds.secure_aggregation:
            plan = self.secure.plan(round_id, len(selected), calibration=candidate is not None)
        now = fed.clock()
        announcement = announce(
            round_id=round_id,
            base_version=fed.model.version,
            lineage=fed.model.lineage,
            selected=selected,
            now=now,
            settings=rounds,
            manual=manual,
            secagg=plan,
        )
        if candidate is not None:
            calibrate = calibration_plan(fed, candidate)
            announcement = announcement.model_copy(update={"calibrate": calibrate})
        elif plan is not None and fed.exporter.uncalibrated:  # the doorbells will calibrate
            train = rounds.train.model_copy(update={"hold_out_strangers": True})
            announcement = announcement.model_copy(update={"train": train})
        shapes = [w.shape for w in fed.model.weights]
        fed.round = Round(
            announcement=announcement,
            manual=manual,
            started_at=now,
            accumulator=SecureSum()
            if plan is not None
            else make_accumulator(rounds, shapes, sparse=rounds.codec == "topk"),
            strategy=rounds.strategy,
            weighting=rounds.weighting,
        )
        fed.round.candidate, fed.candidate = candidate, None
        if plan is not None:
            fed.round.secure = SecurePhases.start(
                plan, round_id, fed.model.lineage, selected, fed.trusted_keys
            )
        fed.last_round = round_id
        fed.pending = None
        fed.announce(announcement)
        kind = " (step by step)" if manual else ""
        if candidate is not None:
            kind = f" (calibrating version {candidate.release.version})"
        log.info(
            "round %d started%s: base version %d, devices %s, deadline in %.0fs",
            round_id,
            kind,
            fed.model.version,
            ", ".join(selected),
            rounds.timeout_s,
        )

    def _select(self, round_id: int, requested: Sequence[str] | None) -> tuple[str, ...]:
        """The round's doorbells: online, trusted, not struck, at least the quorum."""
        fed = self.federation
        rounds = fed.config.rounds
        # A doorbell without a trusted key (revoked, or not provisioned here) could
        # only send updates that are refused: selecting it would make the round wait.
        keys = fed.trusted_keys
        selectable = [device for device in fed.online if keys is None or device in keys]
        if struck := fed.strikes.left_out(selectable):
            log.warning(
                "round %d: leaving out %s: in far more rounds the accuracy bars refused "
                "than the others",
                round_id,
                ", ".join(sorted(struck)),
            )
            selectable = [device for device in selectable if device not in struck]
        selected = select_devices(selectable, requested, rounds.max_devices, rounds.seed, round_id)
        if requested and (absent := sorted(set(requested) - set(fed.online))):
            log.warning("round %d: requested devices not online: %s", round_id, ", ".join(absent))
        if len(selected) < rounds.quorum:
            raise RejectedMessage(
                "not_enough_devices",
                f"{len(selected)} online devices selectable "
                f"({', '.join(sorted(fed.online)) or 'none online'}), quorum is "
                f"{rounds.quorum}" + (" (min_cohort)" if rounds.secure_aggregation else ""),
            )
        return selected

    def _manual_round(self, action: str) -> Round:
        current = self.federation.open_round()
        if current is None:
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
        fed = self.federation
        announcement = current.set_phase("send", deadline=fed.clock() + fed.config.rounds.timeout_s)
        fed.announce(announcement)
        log.info("round %d: send phase", current.id)

    def _aggregate(self) -> None:
        current = self._manual_round("aggregate")
        if current.status != "collecting":
            raise RejectedMessage("bad_state", f"aggregate: round {current.id} is {current.status}")
        if current.secure is not None:
            raise RejectedMessage(
                "bad_state",
                f"aggregate: secure round {current.id} is in phase {current.secure.phase}; it "
                "aggregates itself once its sum is unmasked",
            )
        quorum = self.federation.config.rounds.quorum
        if len(current.received) < quorum:
            if self.federation.clock() > current.announcement.deadline:
                self.releases.abandon()
                return
            raise RejectedMessage(
                "below_quorum", f"aggregate: {len(current.received)} updates, quorum is {quorum}"
            )
        self.releases.aggregate()

    def _publish(self) -> None:
        current = self._manual_round("publish")
        pending = self.federation.pending
        if current.status != "aggregated" or pending is None:
            raise RejectedMessage(
                "bad_state", f"publish: round {current.id} is {current.status}, nothing aggregated"
            )
        self.releases.publish(pending)

    def tick(self) -> None:
        """Close rounds whose time has come; start the next automatic round."""
        fed = self.federation
        now = fed.clock()
        if fed.candidate is not None and fed.open_round() is None:
            self._start_calibration()
        current = fed.round
        if current is not None and current.announcement.secagg and current.status == "collecting":
            self.secure.tick(current, now)
        elif (current := fed.open_round()) is not None:
            step = current.next_step(now, fed.config.rounds.quorum)
            if step == "aggregate":
                self.releases.aggregate()
            elif step == "abandon":
                self.releases.abandon()
        if self.auto.remaining > 0 and fed.open_round() is None and now >= self.auto.next_at:
            self._start_auto_round()

    def _start_calibration(self) -> None:
        """The round that calibrates the held candidate, at once (not an automatic round);
        if it cannot start (too few doorbells, the privacy budget), the candidate is dropped
        and the model stays."""
        fed = self.federation
        assert fed.candidate is not None
        try:
            self.start(None, manual=False)
        except RejectedMessage as err:
            version, fed.candidate = fed.candidate.release.version, None
            fed.reject(err, "calibration round")
            log.warning(
                "version %d not published: no calibration round (%s); model stays at version %d",
                version,
                err.detail,
                fed.model.version,
            )

    def _start_auto_round(self) -> None:
        try:
            self.start(None, manual=False)
        except RejectedMessage as err:
            if err.reason == "privacy_budget_spent":
                self.federation.reject(err, "automatic round")
                self.auto.remaining = 0  # no later round fits either
                return
            if not self.auto.waiting_logged:  # once, not every second while waiting
                log.info("automatic round waits: %s", err.detail)
                self.auto.waiting_logged = True
            self.auto.next_at = self.federation.clock() + 1.0
            return
        self.auto.waiting_logged = False
        self.auto.remaining -= 1

    def seconds_to_next_event(self) -> float:
        """How long the main loop may sleep without missing a deadline or a round."""
        fed = self.federation
        wake = self.auto.next_at if self.auto.remaining > 0 else float("inf")
        if (current := fed.open_round()) is not None:
            wake = min(wake, current.announcement.deadline)
        return max(0.0, wake - fed.clock())
