"""A secure round on the coordinator: each doorbell's secagg message in, each phase out.

`SecureRounds` drives the phases (`aggregator.secure.SecurePhases`) from the
messages and the clock, announces each phase, routes the inboxes, turns the
unmasked sum into the round's accumulator (`mean_delta`) and hands it to
`Releases.aggregate` (a calibration round's sum to `Calibrations`), or abandons
the round (fail closed). `secagg_plan` is a
secure round's plan, the one the bench's in-process loop announces too.

A refused secagg message (key advert, share, masked input, unmask answer) costs
a count and a rate-limited log line, like a refused plain update: no reply, so
a login sending junk cannot make the aggregator publish once per message.
"""

from __future__ import annotations

import logging
import math

from aggregator.accumulator import SecureSum
from aggregator.calibration import Calibrations
from aggregator.config import DEFAULT_MAX_DROPOUT
from aggregator.federation import Federation
from aggregator.releases import Releases
from aggregator.rounds import Round
from aggregator.secure import SecurePhases, mean_delta
from fedbell.errors import RejectedMessage
from fedbell.faces import histograms
from fedbell.wire import dp, house_inboxes, masking
from fedbell.wire.protocol import SecAggPlan
from fedbell.wire.secagg import SecAggParams

log = logging.getLogger("aggregator")


class SecureRounds:
    """The phases of the federation's secure rounds (see the module docstring)."""

    def __init__(self, federation: Federation, releases: Releases) -> None:
        self.federation = federation
        self.releases = releases
        self.calibrations = Calibrations(federation, releases)

    def plan(self, round_id: int, selected: int, calibration: bool = False) -> SecAggPlan:
        """A new secure round's plan, once the privacy budget allows it; a calibration
        round masks its whole histogram vector, clipped to the norm one house can reach,
        under the same noise multiplier (the ledger counts it like any round)."""
        fed = self.federation
        houses = fed.houses()
        fed.privacy.check_budget(selected, houses)
        plan = self._plan(round_id, selected, houses, calibration)
        self._log_privacy(plan, selected, houses, f"round {round_id}: ")
        return plan

    def log_expected_privacy(self) -> None:
        """At start-up, one line on the privacy of the rounds the configuration plans (all
        houses, or max_devices of them), if the houses are known before any is online."""
        fed = self.federation
        if fed.privacy.noised and not (fed.trusted_keys or fed.config.rounds.privacy.houses):
            log.info(
                "house-level DP: the houses are not known until doorbells come online (no "
                "provisioned keys, no rounds.privacy.houses): each round's noise is set then"
            )
            return
        houses = fed.houses()
        selected = min(fed.config.rounds.max_devices or houses, houses)
        try:
            fed.privacy.check_budget(selected, houses)
        except RejectedMessage as err:
            log.warning("house-level DP: no secure round will start: %s", err.detail)
        self._log_privacy(self._plan(fed.last_round + 1, selected, houses), selected, houses)

    def _plan(
        self, round_id: int, selected: int, houses: int, calibration: bool = False
    ) -> SecAggPlan:
        fed = self.federation
        rounds = fed.config.rounds
        dimension = sum(int(w.size) for w in fed.model.weights)
        return secagg_plan(
            round_id=round_id,
            lineage=fed.model.lineage,
            dimension=histograms.VECTOR_SIZE if calibration else dimension,
            cohort=selected,
            density=1.0 if calibration else rounds.secure_density,
            clip_norm=histograms.VECTOR_NORM if calibration else rounds.secure_clip_norm,
            noise_multiplier=fed.privacy.noise_multiplier(selected, houses),
            min_cohort=rounds.min_cohort,
            max_dropout=rounds.privacy.max_dropout,
        )

    def _log_privacy(self, plan: SecAggPlan, selected: int, houses: int, prefix: str = "") -> None:
        line, drowned = self.federation.privacy.outlook(plan, selected, houses)
        (log.warning if drowned else log.info)("%s%s", prefix, line)

    def on_message(self, topic: str, payload: bytes) -> None:
        """A doorbell's message in a secure round; the phase moves on once all answered."""
        fed = self.federation
        try:
            leaf, device, house = fed.topics.secagg_origin(topic)
        except ValueError as err:
            raise RejectedMessage("bad_topic", str(err)) from None
        current = fed.round
        late_unmask = leaf == "unmask" and current is not None and current.secure is not None
        if late_unmask and current is not None and current.status != "collecting":
            # the sum was rebuilt from the other survivors' answers: this one is not needed
            log.info("round %d: unmask answer of %s after the sum; not needed", current.id, device)
            return
        try:
            if current is None or current.secure is None or current.status != "collecting":
                raise RejectedMessage("no_round", f"no secure round is collecting ({leaf})")
            if fed.clock() > current.announcement.deadline:
                raise RejectedMessage(
                    "late", f"{leaf} after phase {current.secure.phase}'s deadline"
                )
            current.secure.handle(leaf, device, payload, house)
        except RejectedMessage as err:
            fed.reject(err, f"secagg {leaf} from {device}")  # counted, not answered
            return
        if leaf == "masked":  # the doorbell's update, as the console shows it
            fed.reply(about="secagg", ok=True, device=device, round=current.id, size=len(payload))
        if current.secure.complete() or current.secure.sum_ready():
            self._advance(current)

    def tick(self, current: Round, now: float) -> None:
        """End the phase whose deadline passed (or abandon a round a restart left open)."""
        if current.secure is None:
            self.releases.abandon(
                f"secure round {current.id} was open when the aggregator restarted: its key "
                "agreement lives in memory only, so it cannot be unmasked (fail closed)"
            )
        elif current.secure.complete() or now > current.announcement.deadline:
            self._advance(current)

    def _advance(self, current: Round) -> None:
        """End a secure round's phase: next phase, the sum, or abandon below min_cohort."""
        fed = self.federation
        secure, plan = current.secure, current.announcement.secagg
        assert secure is not None
        assert plan is not None
        arrived, cohort = secure.done(secure.leaf), fed.config.rounds.min_cohort
        if secure.phase != "unmask" and len(arrived) < cohort:  # unmask: shares decide
            self._abandon(
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
            plan = self._next_plan(secure, plan)
        except RejectedMessage as err:
            self._abandon(err)
            return
        phase = secure.advance()
        deadline = fed.clock() + fed.config.rounds.timeout_s
        fed.announce(current.set_phase(phase, deadline=deadline, secagg=plan))
        log.info("round %d: phase %s (%d doorbells)", current.id, phase, len(secure.expected()))

    def _next_plan(self, secure: SecurePhases, plan: SecAggPlan) -> SecAggPlan:
        """What the next phase's announcement carries (and the inboxes before `send`)."""
        fed = self.federation
        server = secure.server
        if secure.phase == "keys":
            return plan.model_copy(update={"roster": server.roster().decode()})
        if secure.phase == "shares":
            by_house: dict[str, list[tuple[str, bytes]]] = {}
            for device in secure.done("shares"):
                inbox = server.inbox(device)
                secure.bytes_down += len(inbox)
                house = secure.houses.get(device)
                if house is None:  # on the house's own broker
                    fed.publish(fed.topics.secagg_inbox(device), inbox)
                else:  # across the federation tier, to its house's hub only
                    by_house.setdefault(house, []).append((device, inbox))
            for house, inboxes in by_house.items():
                for part, bundle in enumerate(house_inboxes.pack(server.params.round_id, inboxes)):
                    fed.publish(fed.topics.house_inboxes(house, part), bundle)
            return plan.model_copy(update={"roster": None, "holders": server.holders})
        request = server.unmask_request()
        survivors = secure.done("masked")
        dropped = tuple(d for d in secure.done("shares") if d not in survivors)
        return plan.model_copy(
            update={"survivors": survivors, "dropped": dropped, "unmask_request": request.decode()}
        )

    def _unmask(self, current: Round, secure: SecurePhases, plan: SecAggPlan) -> None:
        """The server step of a secure round: the unmasked sum, as the round's mean delta."""
        fed = self.federation
        total, survivors = secure.server.result()
        secure.unmasked = True
        if fed.privacy.noised:
            fed.privacy.rounds += 1  # the aggregator has seen this noised sum
        if current.announcement.calibrate is not None:
            current.received = list(survivors)
            log.info(
                "round %d: unmasked the histograms of %d doorbells", current.id, len(survivors)
            )
            self.calibrations.on_sum(current, masking.decode_sum(total, plan.scale), len(survivors))
            return
        subset = masking.shared_subset(plan.dimension, plan.density, current.id, fed.model.lineage)
        mean = mean_delta(total, len(survivors), plan, subset, [w.shape for w in fed.model.weights])
        assert isinstance(current.accumulator, SecureSum)
        current.accumulator.set_mean(mean, len(survivors))
        current.received = list(survivors)
        fed.dirty = True
        log.info("round %d: unmasked the sum of %d doorbells", current.id, len(survivors))
        self.releases.aggregate()

    def _abandon(self, err: RejectedMessage) -> None:
        self.federation.count(err.reason)
        self.releases.abandon(f"{err.reason}: {err.detail}")


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
    max_dropout: float = DEFAULT_MAX_DROPOUT,
) -> SecAggPlan:
    """A secure round's plan as the aggregator announces it: the round's shared subset
    of the head's `dimension` values, the masking parameters for `cohort` doorbells,
    clipping, and each doorbell's share of the privacy noise.

    The fewest survivors the round may unmask is min_cohort, and with noise also
    (1 - max_dropout) of the cohort; the noise is split among that many, so any
    unmasked sum carries at least noise_multiplier x clip_norm, and no more than
    sqrt(1 / (1 - max_dropout)) times it when every doorbell answers.
    """
    subset = masking.shared_subset(dimension, density, round_id, lineage)
    fewest = min_cohort
    if noise_multiplier > 0:
        fewest = max(min_cohort, math.floor(cohort * (1 - max_dropout)))
    fewest = min(fewest, cohort)
    noise_std = dp.noise_std_per_doorbell(noise_multiplier, clip_norm, fewest)
    params = SecAggParams.for_cohort(
        round_id=round_id,
        lineage=lineage,
        cohort=cohort,
        size=len(subset),
        clip_norm=clip_norm,
        noise_std=noise_std,
        min_cohort=fewest,
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
