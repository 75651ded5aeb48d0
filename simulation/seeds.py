"""What the federation buys, over several seeds: start, federated and central side by side.

The demo's MQTT run is one deal of people into houses, scored on at most 40
held-out people: a point or two either way is noise. So beside it the same
learning runs in one process (`bench.federated.run_arm`: the product's client
and server steps, signed envelopes, the aggregator's checks and selection, the
head as doorbells decode it) on households dealt with other seeds, as many
rounds and epochs as the demo's. Each seed's start, federated and central heads
are scored with the aggregator's own function on that seed's held-out people;
the gain is federated minus start, per seed, and the verdict says whether every
seed agrees it is a gain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import mean

import numpy as np
from rich.console import Console
from rich.table import Table

from aggregator.config import EvaluationSettings
from aggregator.export import evaluation_samples
from bench.federated import Arm, Score, run_arm
from bench.households import House
from fedbell.faces.dataset import Sample
from fedbell.faces.detection import Detector
from fedbell.faces.embedding import TrainParams, train_head
from fedbell.faces.features import Backbone
from fedbell.wire.codecs import Weights
from simulation.baseline import features_of, scorer
from simulation.config import SimulationConfig
from simulation.data import load_households
from simulation.stack import CACHE_DIR


@dataclass(frozen=True)
class SeedResult:
    seed: int
    start: float
    federated: float
    central: float

    @property
    def gain(self) -> float:
        return self.federated - self.start


def run_seed(
    dataset: Path,
    strangers: Sequence[Sample],
    start: Weights,
    config: SimulationConfig,
    seed: int,
    *,
    backbone: Backbone,
    detector: Detector,
    cache: Path,
) -> SeedResult:
    """One deal of people into houses: the three heads, scored alike."""
    homes = load_households(dataset, config.nodes, seed)
    houses = []
    for gallery in homes.galleries:
        features, persons = features_of(gallery, detector, backbone, cache)
        names = sorted(set(persons))
        labels = np.array([names.index(p) for p in persons], np.int64)
        empty = np.zeros((0, features.shape[1]), np.float32)  # the demo's doorbells saw nobody
        houses.append(House(features, labels, empty))
    score = scorer(
        features_of(homes.held_out, detector, backbone, cache),
        features_of(strangers, detector, backbone, cache)[0],
    )

    def release(head: Weights) -> Score:
        accuracy, threshold = score(head)
        return Score(float("nan") if accuracy is None else accuracy, threshold)

    plan = TrainParams(
        epochs=config.epochs,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        seed=seed,
    )
    arm = Arm("demo", codec=config.codec)
    federated = run_arm(houses, start, arm, config.rounds, release, params=plan)
    union = np.concatenate([h.features for h in houses])
    offsets = np.cumsum([0] + [int(h.labels.max()) + 1 for h in houses[:-1]])
    labels = np.concatenate([h.labels + o for h, o in zip(houses, offsets, strict=True)])
    central = train_head(
        start,
        union,
        labels,
        np.zeros((0, union.shape[1]), np.float32),
        replace(plan, epochs=config.rounds * config.epochs),  # as many epochs as all rounds
    ).head
    return SeedResult(
        seed,
        federated.start.open_set_accuracy,
        federated.final.open_set_accuracy,
        release(central).open_set_accuracy,
    )


def compare(
    console: Console,
    config: SimulationConfig,
    dataset: Path,
    strangers: Path,
    start: Weights,
    *,
    backbone: Backbone,
    detector: Detector,
) -> list[SeedResult]:
    """The same learning over `config.seeds` deals of households, from `config.seed`."""
    if not config.seeds:
        return []
    stranger_samples = evaluation_samples(strangers, EvaluationSettings().max_strangers)
    results = []
    for seed in range(config.seed, config.seed + config.seeds):
        with console.status(f"seed {seed}: the same learning in one process, on a new deal"):
            results.append(
                run_seed(
                    dataset,
                    stranger_samples,
                    start,
                    config,
                    seed,
                    backbone=backbone,
                    detector=detector,
                    cache=CACHE_DIR,
                )
            )
    return results


def seed_table(results: Sequence[SeedResult]) -> Table:
    table = Table(title="start, federated and central, same learning, households dealt anew")
    for header in ("seed", "start", "federated", "central", "gain (points)"):
        table.add_column(header, justify="right")
    for r in results:
        table.add_row(
            str(r.seed),
            f"{r.start:.1%}",
            f"{r.federated:.1%}",
            f"{r.central:.1%}",
            f"{100 * r.gain:+.1f}",
        )
    return table


def verdict(results: Sequence[SeedResult]) -> str:
    """One line: the gain over the start and its spread, and whether it is one."""
    gains = [100 * r.gain for r in results]
    spread = ", ".join(f"{g:+.1f}" for g in gains)
    line = (
        f"over {len(results)} seeds the federation's gain over its start is "
        f"{mean(gains):+.1f} points (per seed {spread})"
    )
    if min(gains) > 0:
        return f"{line}: every seed gains."
    return (
        f"{line}: on this data the federation does not reliably beat its start "
        "(the seeds disagree, or it loses)."
    )
