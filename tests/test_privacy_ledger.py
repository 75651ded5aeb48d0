"""House-level DP on by default (issue 22): the noise the aggregator derives from the
epsilon budget, and what it says about a federation too small for it."""

from __future__ import annotations

import pytest

from aggregator.accountant import epsilon
from aggregator.config import PrivacySettings, RoundSettings
from aggregator.privacy import PrivacyLedger
from aggregator.secure_rounds import secagg_plan
from fedbell.errors import RejectedMessage

DIMENSION = 256 * 128
"""The head's values (bench.openset_features.start_model)."""


def outlook(ledger: PrivacyLedger, selected: int, houses: int) -> tuple[str, bool]:
    rounds = RoundSettings()
    plan = secagg_plan(
        round_id=1,
        lineage="test",
        dimension=DIMENSION,
        cohort=selected,
        density=rounds.secure_density,
        clip_norm=rounds.secure_clip_norm,
        noise_multiplier=ledger.noise_multiplier(selected, houses),
        min_cohort=rounds.min_cohort,
        max_dropout=ledger.settings.max_dropout,
    )
    return ledger.outlook(plan, selected, houses)


@pytest.mark.parametrize(("selected", "houses"), [(100, 2000), (20, 2000), (10, 10), (5, 5)])
def test_the_default_noise_spends_the_budget_over_the_planned_rounds(
    selected: int, houses: int
) -> None:
    """The round trip: the accountant's epsilon after planned_rounds rounds at the derived
    noise multiplier is within the budget and within 0.5 % of it (the bisection's 0.1 % of
    z moves epsilon by less)."""
    settings = PrivacySettings()
    assert (settings.epsilon_budget, settings.planned_rounds) == (8.0, 60)
    ledger = PrivacyLedger(settings)
    assert ledger.noised
    z = ledger.noise_multiplier(selected, houses)
    spent = epsilon(z, selected / houses, settings.planned_rounds, 1 / houses)
    assert 0.995 * 8.0 < spent <= 8.0
    budget = ledger.budget(selected, houses, settings.planned_rounds)
    assert budget.spent == spent
    assert not budget.allows_another_round()  # round 61 is refused


def test_rounds_stop_once_the_planned_rounds_spent_the_budget() -> None:
    ledger = PrivacyLedger(PrivacySettings(planned_rounds=3))
    for _ in range(3):
        ledger.check_budget(10, 10)
        ledger.rounds += 1
    with pytest.raises(RejectedMessage, match=r"past rounds\.privacy\.epsilon_budget 8") as err:
        ledger.check_budget(10, 10)
    assert err.value.reason == "privacy_budget_spent"


def test_an_explicit_noise_multiplier_overrides_and_a_null_budget_turns_dp_off() -> None:
    fixed = PrivacyLedger(PrivacySettings(noise_multiplier=1.5))
    assert fixed.noise_multiplier(100, 2000) == fixed.noise_multiplier(5, 5) == 1.5
    assert fixed.epsilon(60, 100, 2000) == epsilon(1.5, 0.05, 60, 1 / 2000)
    off = PrivacyLedger(PrivacySettings(epsilon_budget=None))
    assert not off.noised
    assert off.noise_multiplier(100, 2000) == 0.0
    assert off.epsilon(60, 100, 2000) is None
    off.check_budget(100, 2000)  # no budget: never refused
    line, drowned = outlook(off, 10, 10)
    assert "off" in line
    assert not drowned


def test_the_outlook_says_when_so_few_houses_drown_in_the_noise() -> None:
    """At 100 of 2,000 houses a round the mean's noise is a fraction of the clip (the
    benchmark's setting, where epsilon 8 cost nothing); at 10 of 10 it is many clips."""
    ledger = PrivacyLedger(PrivacySettings())
    line, drowned = outlook(ledger, 100, 2000)
    assert not drowned
    ratio = float(line.rsplit(" and its mean ", 1)[1].split(" x ")[0])
    assert ratio < 0.7
    assert "epsilon 8 after 60 rounds of 100 of 2000 houses (delta 1/2000" in line
    line, drowned = outlook(ledger, 10, 10)
    assert drowned
    ratio = float(line.split(" and its mean ", 1)[1].split(" x ")[0])
    assert ratio > 5
    assert "rounds.privacy.epsilon_budget: null" in line
    assert f"noise multiplier {ledger.noise_multiplier(10, 10):.3g}, " in line
