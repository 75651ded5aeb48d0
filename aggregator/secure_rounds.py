"""The coordinator's secure rounds: each doorbell's secagg message in, each phase out.

A mixin of `aggregator.coordinator.Coordinator`, kept apart so each module reads
in one sitting: it drives the phases (`aggregator.secure.SecurePhases`) from
the messages and the clock, announces each phase, routes the inboxes, turns
the unmasked sum into the round's accumulator (`mean_delta`) and hands it to
the coordinator's release path, or abandons the round (fail closed). It also
builds a secure round's plan and keeps the privacy ledger's figures for the
round's metrics. The attributes and methods it uses are the coordinator's,
declared below for the type checker.
"""

from __future__ import annotations

import base64
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from aggregator.accumulator import SecureSum
from aggregator.config import AggregatorConfig
from aggregator.persistence import SavedModel
from aggregator.privacy import PrivacyLedger
from aggregator.rounds import Round
from aggregator.secure import SecurePhases, mean_delta
from fedbell.errors import RejectedMessage
from fedbell.wire import dp, masking
from fedbell.wire.protocol import DeviceStatus, RoundAnnouncement, SecAggPlan
from fedbell.wire.secagg import SecAggParams
from fedbell.wire.topics import Topics

log = logging.getLogger("aggregator")


class SecureRounds:
    """Secure-round handling for the coordinator (see the module docstring)."""

    config: AggregatorConfig
    topics: Topics
    model: SavedModel
    round: Round | None
    online: dict[str, DeviceStatus]
    trusted_keys: dict[str, Ed25519PublicKey] | None
    privacy: PrivacyLedger
    rejected: Counter[str]
    dirty: bool
    publish: Callable[[str, bytes], None]
    clock: Callable[[], float]

    def reject(self, err: RejectedMessage, source: str) -> None:
        raise NotImplementedError

    def _reply(self, **fields: Any) -> None:
        raise NotImplementedError

    def _announce(self, announcement: RoundAnnouncement) -> None:
        raise NotImplementedError

    def _abandon(self, why: str | None = None) -> None:
        raise NotImplementedError

    def _aggregate(self) -> None:
        raise NotImplementedError

    def _on_secagg(self, topic: str, payload: bytes) -> None:
        """A doorbell's message in a secure round; the phase moves on once all answered."""
        try:
            leaf, device = self.topics.secagg_origin(topic)
        except ValueError as err:
            raise RejectedMessage("bad_topic", str(err)) from None
        current = self.round
        late_unmask = leaf == "unmask" and current is not None and current.secure is not None
        if late_unmask and current is not None and current.status != "collecting":
            # the sum was rebuilt from the other survivors' answers: this one is not needed
            log.info("round %d: unmask answer of %s after the sum; not needed", current.id, device)
            return
        try:
            if current is None or current.secure is None or current.status != "collecting":
                raise RejectedMessage("no_round", f"no secure round is collecting ({leaf})")
            if self.clock() > current.announcement.deadline:
                raise RejectedMessage(
                    "late", f"{leaf} after phase {current.secure.phase}'s deadline"
                )
            current.secure.handle(leaf, device, payload)
        except RejectedMessage as err:
            self.reject(err, f"secagg {leaf} from {device}")
            self._reply(
                about="secagg",
                ok=False,
                device=device,
                round=None if current is None else current.id,
                size=len(payload),
                reason=err.reason,
                detail=err.detail,
            )
            return
        if leaf == "masked":  # the doorbell's update, as the console shows it
            self._reply(about="secagg", ok=True, device=device, round=current.id, size=len(payload))
        if current.secure.complete() or current.secure.sum_ready():
            self._advance_secure(current)

    def _houses(self) -> int:
        """The houses of the federation, for delta and the sampling rate."""
        keys = self.trusted_keys
        return self.privacy.houses(len(keys) if keys else None, len(self.online))

    def _secagg_plan(self, round_id: int, selected: int) -> SecAggPlan:
        """A secure round's plan, from the round settings and the model."""
        rounds = self.config.rounds
        assert rounds.clip_norm is not None  # the config requires it with secure aggregation
        return secagg_plan(
            round_id=round_id,
            lineage=self.model.lineage,
            dimension=sum(int(w.size) for w in self.model.weights),
            cohort=selected,
            density=rounds.density,
            clip_norm=rounds.clip_norm,
            noise_multiplier=rounds.privacy.noise_multiplier,
            min_cohort=rounds.min_cohort,
        )

    def _privacy_fields(self, current: Round) -> dict[str, float | None]:
        """Epsilon of this round (if its noised sum was unmasked) and of all rounds so far."""
        if current.announcement.secagg is None or not self.privacy.noised:
            return {"epsilon": None, "epsilon_total": None}
        selected, houses = len(current.selected), self._houses()
        unmasked = (
            current.secure.unmasked
            if current.secure is not None
            else isinstance(current.accumulator, SecureSum) and current.accumulator.count > 0
        )
        return {
            "epsilon": self.privacy.epsilon(1, selected, houses) if unmasked else 0.0,
            "epsilon_total": self.privacy.epsilon(self.privacy.rounds, selected, houses),
        }

    def _tick_secure(self, current: Round, now: float) -> None:
        if current.secure is None:
            self._abandon(
                f"secure round {current.id} was open when the aggregator restarted: its key "
                "agreement lives in memory only, so it cannot be unmasked (fail closed)"
            )
        elif current.secure.complete() or now > current.announcement.deadline:
            self._advance_secure(current)

    def _advance_secure(self, current: Round) -> None:
        """End a secure round's phase: next phase, the sum, or abandon below min_cohort."""
        secure, plan = current.secure, current.announcement.secagg
        assert secure is not None
        assert plan is not None
        arrived, cohort = secure.done(secure.leaf), self.config.rounds.min_cohort
        if secure.phase != "unmask" and len(arrived) < cohort:  # unmask: shares decide
            self._abandon_secure(
                current,
                RejectedMessage(
                    "secagg_below_min_cohort",
                    f"phase {secure.phase}: {len(arrived)} of {len(secure.expected())} "
                    f"doorbells answered, min_cohort is {cohort}: nothing is unmasked",
                ),
            )
            return
        try:
            if secure.phase == "unmask":
                self._unmask(current, secure, plan)
                return
            plan = self._next_plan(current, secure, plan)
        except RejectedMessage as err:
            self._abandon_secure(current, err)
            return
        phase = secure.advance()
        deadline = self.clock() + self.config.rounds.timeout_s
        self._announce(current.set_phase(phase, deadline=deadline, secagg=plan))
        log.info("round %d: phase %s (%d doorbells)", current.id, phase, len(secure.expected()))

    def _next_plan(self, current: Round, secure: SecurePhases, plan: SecAggPlan) -> SecAggPlan:
        """What the next phase's announcement carries (and the inboxes before `send`)."""
        server = secure.server
        if secure.phase == "keys":
            return plan.model_copy(update={"roster": _b64(server.roster())})
        if secure.phase == "shares":
            for device in secure.done("shares"):
                inbox = server.inbox(device)
                secure.bytes_down += len(inbox)
                self.publish(self.topics.secagg_inbox(device), inbox)
            return plan.model_copy(update={"roster": None, "holders": secure.done("shares")})
        request = server.unmask_request()
        survivors = secure.done("masked")
        dropped = tuple(d for d in secure.done("shares") if d not in survivors)
        return plan.model_copy(
            update={"survivors": survivors, "dropped": dropped, "unmask_request": _b64(request)}
        )

    def _unmask(self, current: Round, secure: SecurePhases, plan: SecAggPlan) -> None:
        """The server step of a secure round: the unmasked sum, as the round's mean delta."""
        total, survivors = secure.server.result()
        secure.unmasked = True
        if self.privacy.noised:
            self.privacy.rounds += 1  # the aggregator has seen this noised sum
        subset = masking.shared_subset(plan.dimension, plan.density, current.id, self.model.lineage)
        mean = mean_delta(
            total, len(survivors), plan, subset, [w.shape for w in self.model.weights]
        )
        assert isinstance(current.accumulator, SecureSum)
        current.accumulator.set_mean(mean, len(survivors))
        current.received = list(survivors)
        self.dirty = True
        log.info("round %d: unmasked the sum of %d doorbells", current.id, len(survivors))
        self._aggregate()

    def _abandon_secure(self, current: Round, err: RejectedMessage) -> None:
        self.rejected[err.reason] += 1
        current.rejected[err.reason] += 1
        self._abandon(f"{err.reason}: {err.detail}")


def secagg_plan(
    *,
    round_id: int,
    lineage: str,
    dimension: int,
    cohort: int,
    density: float,
    clip_norm: float,
    noise_multiplier: float,
    min_cohort: int,
) -> SecAggPlan:
    """A secure round's plan as the aggregator announces it: the round's shared subset
    of the head's `dimension` values, the masking parameters for `cohort` doorbells,
    clipping, and each doorbell's share of the privacy noise.

    The noise is split among `min_cohort` doorbells (the fewest whose sum is ever
    unmasked), so any unmasked sum carries at least noise_multiplier x clip_norm.
    """
    subset = masking.shared_subset(dimension, density, round_id, lineage)
    noise_std = dp.noise_std_per_doorbell(noise_multiplier, clip_norm, min_cohort)
    params = SecAggParams.for_cohort(
        round_id=round_id,
        lineage=lineage,
        cohort=cohort,
        size=len(subset),
        clip_norm=clip_norm,
        noise_std=noise_std,
        min_cohort=min(min_cohort, cohort),
    )
    return SecAggPlan(
        min_cohort=params.min_cohort,
        neighbours=params.neighbours,
        threshold=params.share_threshold,
        scale=params.scale,
        dimension=dimension,
        size=params.size,
        density=density,
        clip_norm=clip_norm,
        noise_std=noise_std,
    )


def _b64(payload: bytes) -> str:
    return base64.b64encode(payload).decode()
