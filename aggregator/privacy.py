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

from dataclasses import dataclass

from aggregator.accountant import epsilon
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
        """How many houses the federation has: configured, provisioned, or seen online."""
        if self.settings.houses is not None:
            return self.settings.houses
        return max(1, provisioned if provisioned else online)

    def epsilon(self, rounds: int, selected: int, houses: int) -> float | None:
        """Epsilon after `rounds` noised rounds of `selected` of `houses` (None: no noise)."""
        if not self.noised or rounds == 0:
            return None if not self.noised else 0.0
        rate = min(1.0, selected / max(houses, 1))
        return float(epsilon(self.settings.noise_multiplier, rate, rounds, 1.0 / houses))

    def check_budget(self, selected: int, houses: int) -> None:
        """RejectedMessage(privacy_budget_spent) if one more round would pass the budget."""
        budget = self.settings.epsilon_budget
        if budget is None:
            return
        after = self.epsilon(self.rounds + 1, selected, houses)
        if after is not None and after > budget:
            spent = self.epsilon(self.rounds, selected, houses) or 0.0
            raise RejectedMessage(
                "privacy_budget_spent",
                f"one more round of {selected} of {houses} houses would take epsilon from "
                f"{spent:.3g} to {after:.3g}, past rounds.privacy.epsilon_budget {budget:g} "
                f"(delta 1/{houses}, noise multiplier {self.settings.noise_multiplier:g}, "
                f"{self.rounds} noised rounds so far)",
            )
