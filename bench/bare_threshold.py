"""What threshold a bare install (no stranger folder) can ship: issue 18 item 1.

    python -m bench.bare_threshold [--people 400] [--rounds 30] [--target 0.02]

On real photos (`bench.data.load_bench`: LFW people under doorbell conditions,
training houses, test houses of people no model has seen, `lfw_strangers` as
a public bank of stranger features), for the start head and after `--rounds`
federated rounds of the product's own loop (`bench.federated.run_arm`):

- the threshold at which at most `--target` of never-seen strangers get in
  (every test house's probes of the other test houses' members, best match
  against the house's prototypes): what a perfect calibration would ship;
- the share of those strangers the fixed default (0.75) lets in;
- the share the start head's threshold lets in once the head has trained
  (a fallback fixed per lineage);
- the share let in at a threshold calibrated on the public stranger bank for
  the head (`shipped_threshold`, what an aggregator shipping that bank of
  features would publish).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
from collections.abc import Sequence

import numpy as np

from aggregator.config import DEFAULT_THRESHOLD
from bench import households
from bench.data import load_bench, scorer
from bench.federated import Arm, run_arm
from fedbell.wire.codecs import Weights


def stranger_scores(bench: households.Bench, head: Weights) -> np.ndarray:
    """Each never-seen stranger probe's best similarity to a test house's prototypes."""
    trials = households.house_trials(bench.test, [head])
    return np.concatenate([t.stranger_score for t in trials])


def let_in(scores: np.ndarray, threshold: float) -> float:
    return float(np.mean(scores >= threshold))


def figures(
    bench: households.Bench, head: Weights, target: float, fallback: float
) -> dict[str, float]:
    scores = stranger_scores(bench, head)
    perfect = float(np.quantile(scores, 1 - target, method="higher"))
    bank = households.shipped_threshold(bench, head, target, households.GALLERY_SIZE)
    return {
        "strangers": len(scores),
        f"threshold_for_{target:.0%}": round(perfect, 4),
        "let_in_at_0.75": round(let_in(scores, DEFAULT_THRESHOLD), 4),
        "let_in_at_start_threshold": round(let_in(scores, fallback), 4),
        "bank_threshold": round(bank, 4),
        "let_in_at_bank_threshold": round(let_in(scores, bank), 4),
        "open_set_accuracy_at_bank": round(
            households.evaluate(bench, [head], bank).open_set_accuracy, 4
        ),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--people", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--target", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    loaded = load_bench(people=args.people, seed=args.seed, calibration=500, negatives=500)
    bench = loaded.bench
    print(loaded.description)
    start_scores = stranger_scores(bench, bench.start)
    fallback = float(np.quantile(start_scores, 1 - args.target, method="higher"))
    start = figures(bench, bench.start, args.target, fallback)
    print("start head:", json.dumps(start))

    outcome = run_arm(
        bench.train, bench.start, Arm("federated"), args.rounds, scorer(bench), evaluate_every=10
    )
    trained = figures(bench, outcome.weights, args.target, fallback)
    print(f"after {args.rounds} rounds:", json.dumps(trained))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
