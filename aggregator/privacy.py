"""The federation's house-level privacy ledger: epsilon per round, in total, and the budget.

Each secure round whose sum the aggregator unmasks is one release of a Gaussian
mechanism on the houses' clipped updates (noise multiplier z: the sum carries
noise of standard deviation z x clip_norm, added by the doorbells), with houses
sampled at rate selected/houses. `aggregator.accountant` (dp-accounting's RDP
accountant) turns that into epsilon at delta = 1/houses. A round counts once
its sum is unmasked, whether or not its model is then published: the
aggregator has seen the sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from aggregator.accountant import Budget
from aggregator.config import PrivacySettings
from fedbell.errors import RejectedMessage


@dataclass
class PrivacyLedger:
    settings: PrivacySettings
    rounds: int = 0
    """Secure rounds whose noised sum was unmasked so far (saved with the state)."""

    @property
    def noised(self) -> bool:
        return self.settings.noise_multiplier > 0

    def houses(self, provisioned: int | None, online: int) -> int:
        """How many houses the federation has: configured, provisioned, or seen online
        (at least 2: delta = 1/houses must stay below 1)."""
        if self.settings.houses is not None:
            return max(2, self.settings.houses)
        return max(2, provisioned if provisioned else online)

    def budget(self, selected: int, houses: int, rounds: int | None = None) -> Budget:
        """The accountant's budget for rounds of `selected` of `houses` houses."""
        limit = self.settings.epsilon_budget
        return Budget(
            noise_multiplier=self.settings.noise_multiplier,
            sampling_rate=min(1.0, selected / houses),
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
            f"multiplier {budget.noise_multiplier:g}, {self.rounds} noised rounds so far)",
        )
