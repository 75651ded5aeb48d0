"""The subspace attack (bench.privacy_attacks) on generated people: it finds the residents
planted in a house's update, picks its rank on other (public) houses, and finds nothing in a
random change of the same size. No photo, no backbone: people are clusters in a 32-d feature
space, the head a random projection to 16, the update the doorbell's own `train_delta`.
"""

from __future__ import annotations

import numpy as np

from bench import privacy_rows
from bench.privacy_attacks import (
    SUBSPACE_RANKS,
    Observed,
    attacks,
    fit_subspace,
    residents_in_top,
)
from bench.privacy_data import centre_of
from tests.test_privacy_bench import HOUSE, context

__all__ = ["context"]  # the generated people, strangers and head of test_privacy_bench


def _hits(
    seen: list[Observed], context: privacy_rows.Context, centre: np.ndarray, rank: int
) -> float:
    subspace = attacks(context.base[0], centre, None, None, rank)["subspace"]
    return float(np.mean([residents_in_top(subspace(s), s.targets, HOUSE) for s in seen]))


def test_the_subspace_attack_finds_planted_residents_and_nothing_in_a_random_change(
    context: privacy_rows.Context,
) -> None:
    keys = sorted(context.people)
    attacked, public = keys[:60], keys[60:]
    centre = centre_of(context.people, public)
    chance = HOUSE / context.candidates  # 0.1
    scenario = privacy_rows.single(context, lambda d: d[0])

    rank = fit_subspace(privacy_rows.collect(scenario, public, 12, seed=1), centre, HOUSE)
    assert rank in SUBSPACE_RANKS

    seen = privacy_rows.collect(scenario, attacked, 16, seed=0)
    assert _hits(seen, context, centre, rank) >= chance + 0.5  # 0.69 when written

    # the same pools, the change replaced by noise of its size: nothing to find
    rng = np.random.default_rng(2)
    noise = [
        Observed(
            (rng.normal(size=s.change.shape) * np.std(s.change)).astype(np.float32),
            s.candidates,
            s.targets,
        )
        for s in seen
    ]
    assert _hits(noise, context, centre, rank) <= chance + 0.1


def test_the_subspace_rank_is_chosen_on_the_houses_it_is_given() -> None:
    """Residents whose features span exactly two directions: the fitted rank is small, and
    the attack then finds all of them."""
    rng = np.random.default_rng(0)
    width, candidates = 24, 20
    seen = []
    for _ in range(6):
        features = rng.normal(size=(candidates, width)).astype(np.float32)
        targets = np.zeros(candidates, np.bool_)
        targets[rng.choice(candidates, 2, replace=False)] = True
        change = features[targets].T @ rng.normal(size=(2, 8))
        seen.append(Observed(change.astype(np.float32), features, targets))
    centre = np.zeros(width, np.float32)
    rank = fit_subspace(seen, centre, 2)
    assert rank == min(SUBSPACE_RANKS)
    subspace = attacks(np.zeros((width, 8), np.float32), centre, None, None, rank)["subspace"]
    assert all(residents_in_top(subspace(s), s.targets, 2) == 1.0 for s in seen)
