"""The benchmarks' data: households of backbone features, and how a release is scored.

Real photos (`Photos`: a dataset's people, optionally a seeded sample of
them, another dataset of test people, the stranger photos) are split by
`bench.households.split_people` (training houses of 3-6 people, test houses
of people no model has seen, stranger photos for calibration and as the
doorbells' negatives) and go through `bench.openset_features` (doorbell
conditions, BlazeFace, alignment, the frozen backbone on LiteRT; features
cached under reports/cache, shared by every benchmark) into a
`bench.households.Bench` (`Extraction.featurize`). A release is scored as
the aggregator scores it (`scorer`): threshold calibrated on the calibration
strangers for 1 % false accepts in a house of 5, open-set accuracy of the
test houses at that threshold (`bench.households.evaluate`).

`synthetic_bench` builds the same structure from generated features (people
as clusters in feature space), for tests and for a machine without
../shared/datasets.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.federated import Score, Scorer
from bench.households import (
    GALLERY_SIZE,
    TARGET_FAR,
    Bench,
    Split,
    build_bench,
    evaluate,
    shipped_threshold,
    split_people,
)
from bench.openset_features import (
    Conditions,
    FeatureCache,
    Photo,
    backbone_model,
    extract_features,
    photos_of,
    start_model,
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
class Photos:
    """The photos a run draws on: people per key, test people, strangers by photo key."""

    dev: dict[str, list[Photo]]
    test: dict[str, list[Photo]]
    strangers: dict[str, Photo]

    @classmethod
    def of(
        cls,
        dataset: Path,
        strangers: Path,
        *,
        test_dataset: Path | None = None,
        people: int | None = None,
        seed: int = 0,
    ) -> Photos:
        """The folders' photos (`people`: a seeded sample of the dataset's people, to keep
        a run short)."""
        for folder in (dataset, strangers, *([test_dataset] if test_dataset else [])):
            if not folder.is_dir():
                raise DatasetMissing(f"{folder} is not here (see ../shared/datasets/README.md)")
        dev = photos_of(dataset)
        if people is not None and people < len(dev):
            rng = np.random.default_rng([seed, 23])
            names = sorted(dev)
            dev = {names[i]: dev[names[i]] for i in sorted(rng.choice(len(names), people, False))}
        return cls(
            dev,
            photos_of(test_dataset) if test_dataset else {},
            {p.key: p for photos in photos_of(strangers).values() for p in photos},
        )

    @property
    def everyone(self) -> dict[str, list[Photo]]:
        return {**self.dev, **self.test}

    def split(
        self, seed: int, *, test_fraction: float = 0.3, calibration: int, negatives: int
    ) -> Split:
        """`split_people` of these photos (the test dataset's people, if any, are the test
        houses)."""
        return split_people(
            sorted(self.dev),
            sorted(self.strangers),
            seed,
            test_people=sorted(self.test) if self.test else None,
            test_fraction=test_fraction,
            calibration=calibration,
            negatives=negatives,
        )


@dataclass(frozen=True)
class Featured:
    """A split's bench built from backbone features, and what the detector made of it."""

    bench: Bench
    photos: list[Photo]
    flags: npt.NDArray[np.int64]
    """Per photo: 0 no face found, 1 a face without eyes, 2 a face aligned by the eyes."""


@dataclass(frozen=True)
class Extraction:
    """How features are computed: the backbone, its cache, the conditions photos are
    taken under, the face detector and the worker processes."""

    backbone: bytes
    cache: Path
    conditions: Conditions
    detector: str = "blazeface"
    jobs: int = 2

    def featurize(self, split: Split, photos: Photos, head: Weights, seed: int) -> Featured:
        """The split's households as features: computed once per photo, conditions, seed
        and backbone, then read from the cache; photos where no face was found are left
        out."""
        sha = hashlib.sha256(self.backbone).hexdigest()
        everyone = photos.everyone
        wanted = [photo for person in split.people() for photo in everyone[person]]
        wanted += [photos.strangers[k] for k in split.calibration + split.negatives]
        features = FeatureCache.open(self.cache, self.conditions, seed, sha)
        extract_features(
            wanted,
            features,
            self.backbone,
            conditions=self.conditions,
            seed=seed,
            detector=self.detector,
            jobs=self.jobs,
        )
        found = {p.key for p in wanted if features.flags[p.key] > 0}
        per_person = {
            person: [features.features[p.key] for p in everyone[person] if p.key in found]
            for person in split.people()
        }
        stranger_features = {
            k: features.features[k] for k in split.calibration + split.negatives if k in found
        }
        bench = build_bench(split, per_person, stranger_features, head, seed=seed)
        flags = np.asarray([features.flags[p.key] for p in wanted], np.int64)
        return Featured(replace(bench, backbone=sha), wanted, flags)


@dataclass(frozen=True)
class Prepared:
    """The photos of a run and each seed's bench."""

    everyone: dict[str, list[Photo]]
    benches: dict[int, Bench]
    detection: dict[int, dict[str, Any]]


def detected(flags: npt.NDArray[np.int64]) -> dict[str, Any]:
    """What the detector made of a run's photos (per photo: 0 no face, 1 a face without
    eyes, 2 a face aligned by the eyes)."""
    return {
        "photos": len(flags),
        "detection_rate": float(np.mean(flags > 0)),
        "aligned_by_eyes": float(np.mean(flags == 2)),
        "skipped_no_face": int(np.sum(flags == 0)),
    }


def photos_and_splits(args: argparse.Namespace) -> tuple[Photos, dict[int, Split]]:
    """The run's photos and each seed's split, from the command line."""
    photos = Photos.of(args.dataset, args.strangers, test_dataset=args.test_dataset)
    splits = {
        seed: photos.split(
            seed,
            test_fraction=args.test_fraction,
            calibration=args.calibration_strangers,
            negatives=args.negative_strangers,
        )
        for seed in args.seeds
    }
    return photos, splits


def prepare(args: argparse.Namespace, backbone: bytes, head: Weights) -> Prepared:
    """Split, compute (or read) features and build each seed's bench."""
    photos, splits = photos_and_splits(args)
    extraction = Extraction(backbone, args.cache, args.conditions, args.detector, args.jobs)
    benches: dict[int, Bench] = {}
    detection: dict[int, dict[str, Any]] = {}
    for seed, split in splits.items():
        featured = extraction.featurize(split, photos, head, seed)
        bench = benches[seed] = featured.bench
        detection[seed] = {
            **detected(featured.flags),
            "train_people": len({p for h in split.train_houses for p in h}),
            "train_houses": len(bench.train),
            "test_houses": len(bench.test),
            "test_members": int(sum(int(h.enrol_labels.max()) + 1 for h in bench.test)),
            "member_probes": int(sum(len(h.probes) for h in bench.test)),
            "calibration_strangers": len(bench.calibration),
            "calibration_residents": len(bench.residents),
            "negative_strangers": len(bench.negatives),
        }
    return Prepared(photos.everyone, benches, detection)


@dataclass(frozen=True)
class Loaded:
    bench: Bench
    description: str
    backbone_sha256: str


def scorer(
    bench: Bench, target_far: float = TARGET_FAR, gallery_size: int = GALLERY_SIZE
) -> Scorer:
    """Score a head as the aggregator would release it (threshold, then open-set accuracy)."""

    def score(weights: Weights) -> Score:
        threshold = shipped_threshold(bench, weights, target_far, gallery_size)
        result = evaluate(bench, [weights], threshold)
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
    photos = Photos.of(dataset, strangers, people=people, seed=seed)
    backbone = backbone_model(cache)
    split = photos.split(seed, calibration=calibration, negatives=negatives)
    extraction = Extraction(backbone, cache, conditions, detector, jobs)
    featured = extraction.featurize(split, photos, start_model(), seed)
    bench = featured.bench
    description = (
        f"{dataset.name} ({len(photos.dev)} people: {len(bench.train)} training houses, "
        f"{len(bench.test)} test houses of never-seen people), strangers {strangers.name}, "
        f"{conditions} conditions, seed {seed}"
    )
    return Loaded(bench, description, bench.backbone)


DATA_FLAGS = [
    "dataset",
    "strangers",
    "conditions",
    "people",
    "calibration",
    "negatives",
    "jobs",
    "cache",
]
"""`load_bench`'s keywords, read from the command line."""


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of a benchmark on real photos, as `load_benches` reads them."""
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--strangers", type=Path, default=DEFAULT_STRANGERS)
    parser.add_argument(
        "--people", type=int, default=None, help="a seeded sample of the dataset's people"
    )
    parser.add_argument("--calibration", type=int, default=1000, help="calibration strangers")
    parser.add_argument("--negatives", type=int, default=1500, help="strangers seen at doors")
    parser.add_argument("--conditions", choices=("doorbell", "clean"), default="doorbell")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cache", type=Path, default=CACHE)


def load_benches(args: argparse.Namespace, seeds: Sequence[int]) -> dict[int, Loaded]:
    """Each seed's houses from the flags of `add_data_arguments` (features computed here,
    once, before any worker starts)."""
    data = {flag: getattr(args, flag) for flag in DATA_FLAGS}
    return {seed: load_bench(**data, seed=seed) for seed in seeds}


def synthetic_bench(
    seed: int,
    *,
    people: int = 120,
    dim: int = 32,
    embedding: int = 16,
    strangers: int = 200,
    spread: float = 0.8,
) -> Bench:
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
    split = split_people(
        names,
        keys,
        seed,
        calibration=strangers // 2,
        negatives=strangers // 2 - 1,
        residents=people // 10,
    )
    start = [(rng.normal(size=(dim, embedding)) / np.sqrt(dim)).astype(np.float32)]
    return build_bench(split, features, stranger_features, start, seed=seed)
