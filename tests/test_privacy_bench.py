"""bench.privacy without ../shared: the span attack on generated people, and the schema.

People are generated clusters in a 32-d feature space (as `bench.data.synthetic_bench`
makes them), the head a random projection to 16: no photo, no backbone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from aggregator.config import RoundSettings
from bench import privacy, privacy_rows
from bench.data import synthetic_bench
from bench.federated import Secure
from bench.privacy_attacks import (
    SUBSPACE_RANKS,
    Observed,
    Replay,
    residents_in_top,
    span_scores,
)
from bench.privacy_data import Person, centre_of
from bench.privacy_report import report
from bench.privacy_utility import Privacy, run_setting
from fedbell.faces.embedding import TrainParams
from tests.test_openset_bench import assert_types

DIM, EMBEDDING, HOUSE = 32, 16, 4


def _people(count: int, seed: int) -> dict[str, Person]:
    rng = np.random.default_rng(seed)
    people = {}
    for i in range(count):
        centre = rng.normal(size=DIM)
        photos = (centre + 0.5 * rng.normal(size=(7, DIM))).astype(np.float32)
        people[f"p{i:03d}"] = Person(photos[:5], photos[5:])
    return people


@pytest.fixture(scope="module")
def context() -> privacy_rows.Context:
    rng = np.random.default_rng(3)
    return privacy_rows.Context(
        people=_people(100, 4),
        strangers=rng.normal(size=(200, DIM)).astype(np.float32),
        base=[(rng.normal(size=(DIM, EMBEDDING)) / np.sqrt(DIM)).astype(np.float32)],
        params=TrainParams(),
        candidates=40,
        house_size=HOUSE,
    )


def _span_hits(seen: list[Observed], centre: np.ndarray) -> float:
    return float(
        np.mean(
            [
                residents_in_top(span_scores(s.change, s.candidates, centre), s.targets, HOUSE)
                for s in seen
            ]
        )
    )


def test_the_span_attack_finds_residents_in_an_update_and_nothing_in_a_masked_input(
    context: privacy_rows.Context,
) -> None:
    keys = sorted(context.people)
    centre = centre_of(context.people, keys)
    chance = HOUSE / context.candidates  # 0.1
    raw = privacy_rows.collect(privacy_rows.single(context, lambda d: d[0]), keys, 12, seed=0)
    assert all(math.isclose(float(np.mean(s.targets)), chance) for s in raw)
    assert _span_hits(raw, centre) >= chance + 0.3

    traffic: list[tuple[int, int]] = []
    masked = privacy_rows.collect(
        privacy_rows.masked(context, Secure(clip_norm=1.0), 8, traffic), keys, 16, seed=1
    )
    assert len(masked) == 16  # two secure rounds of 8 houses, one view of each house
    assert _span_hits(masked, centre) <= chance + 0.15
    assert traffic
    assert all(up > 0 and down > 0 for up, down in traffic)


def test_privacy_json_has_the_issue_schema(context: privacy_rows.Context, tmp_path: Path) -> None:
    keys = sorted(context.people)
    attacked, public = keys[:50], keys[50:]
    row = privacy_rows.run_row(
        "float32_update",
        "one house's raw delta",
        None,
        privacy_rows.single(context, lambda d: d[0]),
        attacked=attacked,
        public=public,
        trials=4,
        shadow_trials=4,
        base=context.base[0],
        centre=centre_of(context.people, public),
        replay=Replay(context.base[0], context.strangers[:32]),
        top=HOUSE,
        seed=0,
    )
    assert set(row.by_attack) == {"span", "movement", "replay", "subspace", "shadow"}
    assert row.extra["subspace_directions"] in SUBSPACE_RANKS
    bench = synthetic_bench(0)
    privacy = Privacy(8.0, houses_per_round=5, houses=len(bench.train), rounds=2)
    run = run_setting(
        "secagg+dp",
        bench,
        privacy,
        clip_norm=0.5,
        density=0.05,
        params=TrainParams(epochs=2),
        seed=0,
        keep_heads=True,
    )
    assert run.noise_multiplier > 0
    assert len(run.heads) == 3  # the start and one per round
    assert [len(h) for h in run.rounds_houses] == [5, 5]
    data = report(
        test_dataset="generated",
        candidates=context.candidates,
        house_size=HOUSE,
        rows=[row],
        runs=[run],
        traffic=[(1000, 500)],
        extra={},
    )
    path = tmp_path / "privacy.json"
    path.write_text(json.dumps(data))
    loaded = json.loads(path.read_text())
    assert_types(
        loaded,
        {
            "test_dataset": str,
            "candidates": int,
            "house_size": int,
            "chance": float,
            "bytes_up": int,
            "bytes_down": int,
        },
    )
    (first,) = loaded["rows"]
    assert first["view"] == "float32_update"
    assert first["epsilon"] is None
    assert 0.0 <= first["residents_in_top"] <= 1.0
    (utility,) = loaded["utility"]
    assert utility["setting"] == "secagg+dp"
    assert isinstance(utility["epsilon"], float)
    assert utility["epsilon"] <= 8.0 * 1.05
    assert utility["houses_per_round"] == 5
    for key in ("open_set_accuracy", "tar_at_far_1pct"):
        assert 0.0 <= utility[key] <= 1.0


def test_the_default_dp_setting_is_read_from_the_product_config(tmp_path: Path) -> None:
    """Issue 22's bars are checked at the product's default, not a benchmark constant: the
    example config's epsilon budget, planned rounds, secure clip and density."""
    product = RoundSettings()
    args = privacy._parser().parse_args([])
    privacy.product_defaults(args)
    assert args.default_epsilon == product.privacy.epsilon_budget == 8.0
    assert args.rounds == product.privacy.planned_rounds
    assert (args.clip_norm, args.secure_density) == (
        product.secure_clip_norm,
        product.secure_density,
    )
    assert args.epsilons == [1.0, 4.0, 8.0, math.inf]
    only = privacy._parser().parse_args(["--only-default", "--clip-norm", "0.05"])
    privacy.product_defaults(only)
    assert (only.epsilons, only.clip_norm) == ([8.0], 0.05)
    config = tmp_path / "aggregator.yaml"
    config.write_text(
        "site: s\nstate_dir: /tmp/x\nrounds:\n  privacy:\n    epsilon_budget: 2\n"
        "    planned_rounds: 30\n"
    )
    other = privacy._parser().parse_args(["--config", str(config)])
    privacy.product_defaults(other)
    assert (other.default_epsilon, other.rounds, other.epsilons[-1]) == (2.0, 30, 2.0)
    config.write_text("site: s\nstate_dir: /tmp/x\nrounds:\n  privacy:\n    noise_multiplier: 1\n")
    with pytest.raises(SystemExit, match="noise_multiplier is set"):
        privacy.product_defaults(privacy._parser().parse_args(["--config", str(config)]))
