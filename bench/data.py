"""The benchmarks' data: households of backbone features, and how a release is scored.

Real photos go through `bench.openset`'s split (training houses of 3-6 people,
test houses of people no model has seen, stranger photos for calibration and
as the doorbells' negatives) and `bench.openset_features` (doorbell conditions,
BlazeFace, alignment, the frozen backbone on LiteRT; features cached under
reports/cache, shared with `make bench-openset`). A release is scored as the
aggregator scores it: threshold calibrated on the calibration strangers for
1 % false accepts in a house of 5, open-set accuracy of the test houses at
that threshold (`bench.openset.evaluate`).

`synthetic_bench` builds the same structure from generated features (people
as clusters in feature space), for tests and for a machine without
../shared/datasets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench import openset
from bench.federated import Score, Scorer
from bench.openset_features import (
    Conditions,
    FeatureCache,
    backbone_model,
    extract_features,
    photos_of,
    start_head,
)
from fedbell.wire.codecs import Weights

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
DEFAULT_DATASET = DATASETS / "lfw_dev"
DEFAULT_STRANGERS = DATASETS / "lfw_strangers"
CACHE = ROOT / "reports" / "cache"


class DatasetMissing(FileNotFoundError):
    """A photo folder the benchmark needs is not on this machine."""


@dataclass(frozen=True)
class Loaded:
    bench: openset.Bench
    description: str
    backbone_sha256: str


def scorer(bench: openset.Bench) -> Scorer:
    """Score a head as the aggregator would release it (threshold, then open-set accuracy)."""

    def score(weights: Weights) -> Score:
        threshold = openset.shipped_threshold(
            bench, weights, openset.TARGET_FAR, openset.GALLERY_SIZE
        )
        result = openset.evaluate(bench, [weights], threshold)
        return Score(result.open_set_accuracy, threshold, result.tar_at_far_1pct)

    return score


def load_bench(
    *,
    dataset: Path = DEFAULT_DATASET,
    strangers: Path = DEFAULT_STRANGERS,
    conditions: Conditions = "doorbell",
    seed: int = 0,
    people: int | None = None,
    calibration: int = 1000,
    negatives: int = 1500,
    detector: str = "blazeface",
    jobs: int = 2,
    cache: Path = CACHE,
) -> Loaded:
    """Houses of real photos (`people`: a seeded sample of the dataset's people, to keep
    a run short), their features computed once and cached."""
    for folder in (dataset, strangers):
        if not folder.is_dir():
            raise DatasetMissing(f"{folder} is not here (see ../shared/datasets/README.md)")
    backbone = backbone_model(cache)
    sha = hashlib.sha256(backbone).hexdigest()
    dev = photos_of(dataset)
    if people is not None and people < len(dev):
        rng = np.random.default_rng([seed, 23])
        names = sorted(dev)
        dev = {names[i]: dev[names[i]] for i in sorted(rng.choice(len(names), people, False))}
    stranger_photos = {p.key: p for ps in photos_of(strangers).values() for p in ps}
    split = openset.split_people(
        sorted(dev), sorted(stranger_photos), seed, calibration=calibration, negatives=negatives
    )
    members = split.people()
    photos = [photo for person in members for photo in dev[person]]
    photos += [stranger_photos[k] for k in split.calibration + split.negatives]
    features = FeatureCache.open(cache, conditions, seed, sha)
    extract_features(
        photos, features, backbone, conditions=conditions, seed=seed, detector=detector, jobs=jobs
    )
    found = {p.key for p in photos if features.flags[p.key] > 0}
    per_person = {
        person: [features.features[p.key] for p in dev[person] if p.key in found]
        for person in members
    }
    stranger_features = {
        k: features.features[k] for k in split.calibration + split.negatives if k in found
    }
    bench = openset.build_bench(split, per_person, stranger_features, start_head(), seed=seed)
    description = (
        f"{dataset.name} ({len(dev)} people: {len(bench.train)} training houses, "
        f"{len(bench.test)} test houses of never-seen people), strangers {strangers.name}, "
        f"{conditions} conditions, seed {seed}"
    )
    return Loaded(bench, description, sha)


def synthetic_bench(
    seed: int,
    *,
    people: int = 120,
    dim: int = 32,
    embedding: int = 16,
    strangers: int = 200,
    spread: float = 0.8,
) -> openset.Bench:
    """Generated people (clusters in a `dim`-d feature space) split into houses like the
    real ones; the start head a random projection to `embedding` dimensions."""
    rng = np.random.default_rng([seed, 29])
    names = [f"synthetic/person{i:03d}" for i in range(people)]
    centres = rng.normal(size=(people, dim))
    features = {
        name: [
            (centres[i] + spread * rng.normal(size=dim)).astype(np.float32)
            for _ in range(int(rng.integers(3, 9)))
        ]
        for i, name in enumerate(names)
    }
    keys = [f"synthetic_strangers/s{i}/s{i}.jpg" for i in range(strangers)]
    stranger_features = {k: rng.normal(size=dim).astype(np.float32) for k in keys}
    split = openset.split_people(
        names,
        keys,
        seed,
        calibration=strangers // 2,
        negatives=strangers // 2 - 1,
        residents=people // 10,
    )
    start = [(rng.normal(size=(dim, embedding)) / np.sqrt(dim)).astype(np.float32)]
    return openset.build_bench(split, features, stranger_features, start, seed=seed)
