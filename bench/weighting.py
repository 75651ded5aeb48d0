"""What weighing every house the same costs in accuracy (issue 18 item 3), on real faces.

    python -m bench.weighting [--rounds 30] [--houses-per-round 20] [--seeds 0]
                              [--people N] [--cache DIR]

Training houses of LFW people under doorbell conditions (`bench.data`) run THE
round loop of plain rounds (`bench.federated.run_arm`: the real `train_delta`,
signed updates in the default codec, the aggregator's intake, accumulator and
server step) twice from the same start head, with the same seed: once with
`rounds.weighting` houses (the default: every update weighs the same) and once
with examples (each update weighs the examples its doorbell trained on, at most
`rounds.max_examples`). All doorbells are honest, so the example counts are
true: what is measured is what trusting them would buy. Printed per seed: the
spread of the training houses' example counts, each arm's open-set accuracy and
TAR at 1 % FAR after the last round, and the difference in points.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
from collections.abc import Sequence

import numpy as np

from bench.arms import Arm, ArmResult, RoundResult
from bench.data import add_data_arguments, load_benches, scorer
from bench.federated import run_arm

ARMS = (Arm("houses", weighting="houses"), Arm("examples", weighting="examples"))


def _progress(arm: Arm, result: RoundResult) -> None:
    print(
        f"  {arm.name:<9} round {result.round:>3}  open-set {result.open_set_accuracy:.3f}  "
        f"TAR@1%FAR {result.tar_at_far_1pct:.3f}  {result.seconds:.1f}s",
        flush=True,
    )


def _summary(result: ArmResult) -> dict[str, float]:
    return {
        "open_set_accuracy": round(result.final.open_set_accuracy, 4),
        "tar_at_far_1pct": round(result.final.tar_at_far_1pct, 4),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--houses-per-round", type=int, default=20)
    parser.add_argument("--evaluate-every", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args(argv)
    for seed, loaded in load_benches(args, args.seeds).items():
        bench = loaded.bench
        counts = np.asarray([len(house.features) for house in bench.train])
        print(loaded.description)
        print(
            f"examples per training house: min {counts.min()}, median {np.median(counts):.0f}, "
            f"max {counts.max()} ({len(counts)} houses)",
            flush=True,
        )
        score = scorer(bench)
        results = {
            arm.name: run_arm(
                bench.train,
                bench.start,
                arm,
                args.rounds,
                score,
                houses_per_round=args.houses_per_round,
                evaluate_every=args.evaluate_every,
                progress=_progress,
            )
            for arm in ARMS
        }
        summary = {name: _summary(result) for name, result in results.items()}
        houses, examples = results["houses"].final, results["examples"].final
        summary["houses_minus_examples_points"] = {
            "open_set_accuracy": round(
                100 * (houses.open_set_accuracy - examples.open_set_accuracy), 2
            ),
            "tar_at_far_1pct": round(100 * (houses.tar_at_far_1pct - examples.tar_at_far_1pct), 2),
        }
        start = results["houses"].start
        print(
            f"seed {seed}: start {start.open_set_accuracy:.4f} / {start.tar_at_far_1pct:.4f}",
            json.dumps(summary),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
