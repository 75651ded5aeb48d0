"""What threshold a bare install (no stranger folder) can ship: issue 18 item 1.

    python -m bench.bare_threshold [--people 400] [--rounds 30] [--target 0.02]
                                   [--cache reports/cache]

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
  features would publish);
- federated calibration (what a bare secure site ships, aggregator/calibration.py):
  every training house's vector (`histograms.house_vector`: its gallery and the
  calibrating half of its stranger store; the house's door visitors are drawn from
  `lfw_strangers`, `households.NEGATIVES_PER_HOUSE` (32) each, and the houses train
  against the other half, as a bare site's doorbells do) summed and turned into a
  threshold by `histograms.calibrate`, the aggregator's own function; the share of
  never-seen strangers it lets in, the true-accept rate at it, and the binning's
  cost: the share let in at the exact threshold of the same house-averaged scores,
  unbinned.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from aggregator.config import DEFAULT_THRESHOLD
from bench import households
from bench.data import CACHE, load_bench, scorer
from bench.federated import Arm, run_arm
from fedbell.faces import histograms
from fedbell.faces.embedding import embed
from fedbell.wire.codecs import Weights


def stranger_scores(bench: households.Bench, head: Weights) -> np.ndarray:
    """Each never-seen stranger probe's best similarity to a test house's prototypes."""
    trials = households.house_trials(bench.test, [head])
    return np.concatenate([t.stranger_score for t in trials])


def let_in(scores: np.ndarray, threshold: float) -> float:
    return float(np.mean(scores >= threshold))


def house_averaged_threshold(scores: Sequence[np.ndarray], target: float) -> float:
    """The lowest threshold at which at most `target` of each house's strangers, averaged
    over houses, reach it (just above the highest score that must be kept out): what the
    histograms approximate, without bins."""
    candidates = np.unique(np.concatenate(scores))

    def share(threshold: float) -> float:
        return float(np.mean([np.mean(s >= threshold) for s in scores if len(s)]))

    low, high = 0, len(candidates)  # share(candidates[high]) taken as 0
    while low < high:  # share falls as the threshold rises: the first index within target
        middle = (low + high) // 2
        if share(float(candidates[middle])) <= target:
            high = middle
        else:
            low = middle + 1
    return -1.0 if low == 0 else float(np.nextafter(candidates[low - 1], np.inf))


def door_visitors(bench: households.Bench) -> list[np.ndarray]:
    """Each training house's calibrating half of its door visitors (`histograms.calibrates`,
    as the doorbell splits its stranger store; the features stand in for visitor events)."""
    return [h.negatives[_calibrating(h)] for h in bench.train]


def _calibrating(house: households.House) -> npt.NDArray[np.bool_]:
    return histograms.calibrates(house.negatives, [""] * len(house.negatives))


def training_houses(bench: households.Bench) -> list[households.House]:
    """The training houses as a bare site's doorbells train: against the other half only
    (the round plan's hold_out_strangers)."""
    return [dataclasses.replace(h, negatives=h.negatives[~_calibrating(h)]) for h in bench.train]


def federated(bench: households.Bench, head: Weights, target: float) -> dict[str, float]:
    """Federated calibration of `head` by every training house (see the module docstring)."""
    visitors = door_visitors(bench)
    summed = np.sum(
        [
            histograms.house_vector(head, bench.start, h.features, h.labels, door)
            for h, door in zip(bench.train, visitors, strict=True)
        ],
        axis=0,
    )
    result = histograms.calibrate(summed, target)
    door_scores = [
        histograms.stranger_scores(embed(door, head), embed(h.features, head), h.labels)
        for h, door in zip(bench.train, visitors, strict=True)
    ]
    exact = house_averaged_threshold(door_scores, target)
    scores = stranger_scores(bench, head)
    return {
        "federated_houses": len(bench.train),
        "federated_strangers": result.strangers,
        "federated_threshold": round(result.threshold, 4),
        "let_in_at_federated": round(let_in(scores, result.threshold), 4),
        "federated_true_accept": round(result.true_accept, 4),
        "start_true_accept": round(result.start_true_accept, 4),
        "door_far_at_federated": round(result.false_accept, 4),
        "unbinned_threshold": round(exact, 4),
        "let_in_at_unbinned": round(let_in(scores, exact), 4),
        "open_set_accuracy_at_federated": round(
            households.evaluate(bench, [head], result.threshold).open_set_accuracy, 4
        ),
    }


def figures(
    bench: households.Bench, head: Weights, target: float, fallback: float
) -> dict[str, float]:
    scores = stranger_scores(bench, head)
    perfect = float(np.quantile(scores, 1 - target, method="higher"))
    bank = households.shipped_threshold(bench, head, target, households.GALLERY_SIZE)
    return {
        **federated(bench, head, target),
        "strangers": len(scores),
        f"threshold_for_{target:.0%}": round(perfect, 4),
        f"open_set_accuracy_at_{target:.0%}": round(
            households.evaluate(bench, [head], perfect).open_set_accuracy, 4
        ),
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
    parser.add_argument("--cache", type=Path, default=CACHE, help="backbone features, cached")
    args = parser.parse_args(argv)
    loaded = load_bench(
        people=args.people, seed=args.seed, calibration=500, negatives=500, cache=args.cache
    )
    bench = loaded.bench
    print(loaded.description)
    start_scores = stranger_scores(bench, bench.start)
    fallback = float(np.quantile(start_scores, 1 - args.target, method="higher"))
    start = figures(bench, bench.start, args.target, fallback)
    print("start head:", json.dumps(start))

    outcome = run_arm(
        training_houses(bench),
        bench.start,
        Arm("federated"),
        args.rounds,
        scorer(bench),
        evaluate_every=10,
    )
    trained = figures(bench, outcome.weights, args.target, fallback)
    print(f"after {args.rounds} rounds:", json.dumps(trained))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
