"""bench.cluster's check that a secure round counted each masked input once (no broker)."""

from __future__ import annotations

import numpy as np

from aggregator.secure import mean_delta
from aggregator.secure_rounds import secagg_plan
from bench.cluster_secure import sum_check
from edge.secure import secure_update
from fedbell.wire import masking
from fedbell.wire.protocol import RoundAnnouncement, TrainingPlan

SHAPES = [(16, 8), (8,)]
LINEAGE = "abc"


def test_sum_check_passes_the_exact_sum_and_catches_one_input_twice_or_lost() -> None:
    dimension = sum(int(np.prod(shape)) for shape in SHAPES)
    plan = secagg_plan(
        round_id=3,
        lineage=LINEAGE,
        dimension=dimension,
        cohort=6,
        density=0.25,
        clip_norm=0.02,
        noise_multiplier=0.0,
        min_cohort=5,
    )
    survivors = tuple(f"d{i}" for i in range(6))
    plan = plan.model_copy(update={"survivors": survivors})
    unmask = RoundAnnouncement(
        round=3,
        base_version=2,
        lineage=LINEAGE,
        phase="unmask",
        selected=survivors,
        deadline=0.0,
        codec="topk",
        train=TrainingPlan(),
        secagg=plan,
    )
    rng = np.random.default_rng(0)
    values = [
        secure_update(
            [rng.normal(0, 0.01, size=shape).astype(np.float32) for shape in SHAPES],
            plan,
            3,
            LINEAGE,
            rng,
        ).values
        for _ in survivors
    ]
    total = np.zeros(plan.size, dtype=np.uint32)
    for one in values:
        total += one  # modulo 2^32, as the masks cancel
    subset = masking.shared_subset(dimension, plan.density, 3, LINEAGE)
    before = [rng.normal(size=shape).astype(np.float32) for shape in SHAPES]
    moved = mean_delta(total, len(survivors), plan, subset, SHAPES)  # the aggregator's step
    after = [b + d for b, d in zip(before, moved, strict=True)]

    assert sum_check(before, after, unmask, total)["counted_once"]
    assert not sum_check(before, after, unmask, total + values[0])["counted_once"]  # twice
    assert not sum_check(before, after, unmask, total - values[0])["counted_once"]  # lost
    assert not sum_check(before, after, unmask, None)["counted_once"]
