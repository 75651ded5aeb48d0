"""The federation's house-level privacy ledger: the noise, epsilon per round and in total.

Each secure round whose sum the aggregator unmasks is one release of a Gaussian
mechanism on the houses' clipped updates (noise multiplier z: the sum carries
noise of standard deviation z x secure_clip_norm, added by the doorbells), with
houses sampled at rate selected/houses. `aggregator.accountant` (dp-accounting's
RDP accountant) turns that into epsilon at delta = 1/houses. A round counts once
its sum is unmasked, whether or not its model is then published: the aggregator
has seen the sum.

By default z is derived, not set: the smallest with which `planned_rounds`
rounds of this round's size spend at most `epsilon_budget`, so the budget runs
out after about that many rounds and the refusal below stops them. The ledger
counts rounds and prices all of them at the current round's size: exact when
every round selects as many houses (max_devices), an estimate otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from aggregator.accountant import Budget, noise_multiplier_for
from aggregator.config import PrivacySettings
from fedbell.errors import RejectedMessage
from fedbell.wire.protocol import SecAggPlan

DROWNED = 1.4
"""Noise in a round's mean this many times the clip (the most a house's update can be) leaves
no signal. Measured (`bench.privacy`'s utility runs at 20, 100 and 1,000 houses a round and
epsilon 1-8, docs/privacy.md; open-set accuracy from a start of 0.791): at 0.4-0.6 times
the clip the head learned as without noise (0.819, 0.816, 0.796), at 1.0-1.1 it learned less
(0.810, 0.787, 0.768), and every run at 1.45-3.5 ended below its start (0.726-0.759)."""


@dataclass
class PrivacyLedger:
    settings: PrivacySettings
    rounds: int = 0
    """Secure rounds whose noised sum was unmasked so far (saved with the state)."""

    @property
    def noised(self) -> bool:
        z = self.settings.noise_multiplier
        return self.settings.epsilon_budget is not None if z is None else z > 0

    def houses(self, provisioned: int | None, online: int) -> int:
        """How many houses the federation has: configured, provisioned, or seen online
        (at least 2: delta = 1/houses must stay below 1)."""
        if self.settings.houses is not None:
            return max(2, self.settings.houses)
        return max(2, provisioned if provisioned else online)

    def noise_multiplier(self, selected: int, houses: int) -> float:
        """z of a round of `selected` of `houses` houses: rounds.privacy.noise_multiplier, else
        the smallest with which planned_rounds such rounds stay within epsilon_budget (0
        without a budget)."""
        settings = self.settings
        if settings.noise_multiplier is not None:
            return settings.noise_multiplier
        if settings.epsilon_budget is None:
            return 0.0
        return noise_multiplier_for(
            settings.epsilon_budget, _rate(selected, houses), settings.planned_rounds, 1 / houses
        )

    def budget(self, selected: int, houses: int, rounds: int | None = None) -> Budget:
        """The accountant's budget for rounds of `selected` of `houses` houses."""
        limit = self.settings.epsilon_budget
        return Budget(
            noise_multiplier=self.noise_multiplier(selected, houses),
            sampling_rate=_rate(selected, houses),
            delta=1.0 / houses,
            limit=math.inf if limit is None else limit,
            rounds=self.rounds if rounds is None else rounds,
        )

    def epsilon(self, rounds: int, selected: int, houses: int) -> float | None:
        """Epsilon after `rounds` noised rounds of `selected` of `houses` (None: no noise,
        which is an infinite epsilon)."""
        if not self.noised:
            return None
        return self.budget(selected, houses, rounds).spent

    def check_budget(self, selected: int, houses: int) -> None:
        """RejectedMessage(privacy_budget_spent) if one more round would pass the budget."""
        budget = self.budget(selected, houses)
        if budget.allows_another_round():
            return
        raise RejectedMessage(
            "privacy_budget_spent",
            f"one more round of {selected} of {houses} houses would take epsilon from "
            f"{budget.spent:.3g} to {budget.next_round_epsilon():.3g}, past "
            f"rounds.privacy.epsilon_budget {budget.limit:g} (delta 1/{houses}, noise "
            f"multiplier {budget.noise_multiplier:.3g}, {self.rounds} noised rounds so far)",
        )

    def outlook(self, plan: SecAggPlan, selected: int, houses: int) -> tuple[str, bool]:
        """(one line on the privacy of rounds of `selected` of `houses` under `plan`, whether
        their noise drowns the updates)."""
        if not self.noised:
            return (
                "house-level DP is off (rounds.privacy.epsilon_budget: null): a round's sum "
                "carries no noise, epsilon is infinite",
                False,
            )
        settings = self.settings
        budget = self.budget(selected, houses, settings.planned_rounds)
        # the noise of the mean of all `selected` answers, against the clip
        ratio = plan.noise_std * math.sqrt(plan.size / selected) / plan.clip_norm
        line = (
            f"house-level DP: epsilon {budget.spent:.3g} after {settings.planned_rounds} rounds "
            f"of {selected} of {houses} houses (delta 1/{houses}, budget "
            f"{budget.limit:g}): noise multiplier {budget.noise_multiplier:.3g}, a round's sum "
            f"carries noise {budget.noise_multiplier:.3g} x secure_clip_norm {plan.clip_norm:g} "
            f"and its mean {ratio:.2f} x the clip"
        )
        if ratio < DROWNED:
            return line, False
        return (
            f"{line}: too few houses a round for this noise to leave any signal, the "
            "federation will not learn; a site this small sets rounds.privacy.epsilon_budget: "
            "null (no DP), a larger one selects more houses a round (rounds.max_devices) or "
            "raises the budget",
            True,
        )


def _rate(selected: int, houses: int) -> float:
    return min(1.0, selected / houses)
