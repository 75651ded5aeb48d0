"""Open-set recognition on never-seen people, under doorbell conditions (issue 11).

    python -m bench.openset [--conditions near|far|clean] [--enrol clean|doorbell]
                            [--visit-frames 5] [--rounds 60] [--seeds 0 1]
                            [--houses-per-round 20] [--test-dataset DIR]

The headline is per visit, as the doorbell decides (issue 20, `bench.openset_visits`):
each probe and each stranger is a visit of `--visit-frames` frames of one scene
(`bench.openset_frames`), decided from its best `--keep` chips by the doorbell's
own `edge.chips.visit_embedding`, with the threshold calibrated on stranger visits,
against galleries enrolled from clean photos (`--enrol doorbell`: from camera
frames). `near` (the default, what the default two-stream doorbell captures):
faces cut from the full-resolution stream at ring distance; `far` (formerly
`doorbell`): faces from a 640x480 frame. The per-frame figures below (frame 0
of each visit, galleries enrolled from frames) are the second row.

Households are built from real photographs. `lfw_dev`'s people are split into
two disjoint sets: training houses (3-6 people each, a few hundred houses; a
sample of them trains each round) and test houses, whose people no model has
seen. Each test house enrols up to 5 photos per member (always leaving one to
probe); the rest of its members' photos must be named right, and every photo
of the other test houses' people must come out "unknown". `lfw_strangers`
(one photo per person, nobody of lfw_dev) is split in two: the aggregator's
calibration folder, and strangers seen at the doorbells (the negatives of
the doorbells' training, a seeded sample per house).

Every photo goes through what a doorbell does: the whole photo is degraded
by `fedbell.faces.conditions.doorbell_conditions` (unless `--conditions clean`),
then BlazeFace finds the face and its eyes, `fedbell.faces.features.face_chip`
aligns it and the frozen backbone (dlib's ResNet on LiteRT) computes its
features. The backbone never changes, so features are cached under
`reports/cache/`, keyed by photo, conditions, seed and backbone hash.

Arms, on the same split and features:

- `start`: dlib's own projection, no training (version 0 of every lineage);
- `federated`: rounds of the doorbells' own client step
  (`edge.trainer.train_delta`), each update through the real wire path (the
  product's default codec, top-k with error feedback kept per doorbell,
  `build_update` → `parse_update`) and the aggregator's own server step
  (`make_accumulator` / `next_step`);
- `central`: the same `train_head` on the union of the training houses (the
  upper bound);
- `local_only`: each test house adapts the start head on its own enrolment
  photos (and its own strangers) alone, and keeps the start threshold.

Each arm's threshold is `calibrate_threshold` on the calibration strangers
under the same conditions, ringing at pretend houses of 5 of the held-out
people (150 dev people in no house, enrolled as test houses enrol: the
aggregator's `evaluation.dataset`), for 1 % false accepts per visit (the
aggregator's defaults). Prints a table and writes `reports/openset.json`.

Measured (`make bench-openset`, seeds 0 and 1, 60 rounds × 20 of 202-211
training houses, 99-102 test houses of 402-419 never-seen people, ~445
member probes and ~122,000 stranger visits per seed; BlazeFace finds 90 % of
the degraded faces; the product's defaults, top-k 5 % up and the int8 head
down; open-set accuracy / TAR at 1 % FAR, mean of the seeds): start 0.787 /
0.593, federated 0.803 / 0.630 (seeds 0.810, 0.797), central 0.831 / 0.684,
local_only 0.513 / 0.049; every threshold lets 0.9-1.0 % of the test
strangers in. Issue 11's bar is NOT met. Before the threshold was calibrated
at houses of held-out people's prototypes it was calibrated at houses of
single stranger photos, which let 3.8 % of strangers in at dlib's projection
and so lifted the start arm to 0.847. The federated head gains 4 points of
TAR over dlib's projection and ends within 3 points of central, but the
frozen features bound every head near 0.68-0.71 TAR under these conditions:
a residual adapter, a wider head, training dlib's last residual blocks
centrally (with a second degradation and flips as augmentation) measured no
better, see README "What the learning buys". With `--conditions clean`
(seed 0, the earlier calibration) every arm but local_only sat at 0.97 /
0.95: the doorbell conditions cost dlib's projection 36 points of TAR.
local_only collapses (0.51): any adaptation moves the similarity scale, and
a doorbell alone has no stranger folder to recalibrate the threshold it was
shipped with. A doorbell update is 3.7 kB (top-k 5 % with error feedback,
signed), the int8 global head 32.6 kB; enrolling a person from 5 photos
takes 40 ms and a face 9 ms (detect, align, backbone, head; one thread of
this x86 machine, medians).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from aggregator.export import as_received
from bench import federated
from bench.openset_features import (
    ENROL_PER_PERSON,
    FeatureCache,
    Photo,
    backbone_model,
    extract_features,
    photos_of,
    start_head,
    time_doorbell,
)
from edge.recognition_config import RecognitionConfig
from edge.trainer import round_seed, train_delta
from fedbell.faces.calibration import calibrate_threshold
from fedbell.faces.embedding import HEAD_NAMES, Features, TrainParams, embed, train_head
from fedbell.faces.openset import OpenSetResult, Trial, prototype, score_trials, trial
from fedbell.wire.codecs import Weights
from fedbell.wire.envelope import TensorSpec

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
SITE = "bench"
LINEAGE = "openset-bench"
MAX_BYTES = 1 << 26
TARGET_FAR = 0.01
"""The shipped threshold: at most 1 % of the strangers who ring are taken for someone..."""
GALLERY_SIZE = 5
"""...in a house of 5 people."""
HOUSE_SIZES = (3, 6)
NEGATIVES_PER_HOUSE = 32
"""Strangers a doorbell has seen at its door (delivery people, visitors), as negatives."""
BAR = {"open_set_accuracy": 0.85, "tar_at_far_1pct": 0.80, "vs_central": 3.0, "vs_others": 5.0}
ARMS = ("start", "federated", "central", "local_only")


# --- the split -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """Who lives where: person keys per house, and stranger photo keys per use."""

    train_houses: tuple[tuple[str, ...], ...]
    test_houses: tuple[tuple[str, ...], ...]
    calibration: tuple[str, ...]
    negatives: tuple[str, ...]
    residents: tuple[str, ...] = ()
    """The aggregator's held-out people: pretend residents when it calibrates the threshold."""

    def people(self) -> list[str]:
        """Everyone whose photos the bench needs features of."""
        return [p for house in self.train_houses + self.test_houses for p in house] + list(
            self.residents
        )


def make_houses(people: Sequence[str], rng: np.random.Generator) -> list[tuple[str, ...]]:
    """People in a seeded order cut into houses of HOUSE_SIZES[0]..HOUSE_SIZES[1] people.

    A remainder too small to be a house joins the previous houses one by one.
    """
    order = [people[i] for i in rng.permutation(len(people))]
    houses: list[list[str]] = []
    low, high = HOUSE_SIZES
    while len(order) >= low:
        size = min(int(rng.integers(low, high + 1)), len(order))
        houses.append(order[:size])
        order = order[size:]
    for index, person in enumerate(order):
        if houses:
            houses[-1 - index % len(houses)].append(person)
    return [tuple(h) for h in houses]


def split_people(
    dev_people: Sequence[str],
    stranger_photos: Sequence[str],
    seed: int,
    *,
    test_people: Sequence[str] | None = None,
    test_fraction: float = 0.3,
    calibration: int = 1000,
    negatives: int = 1500,
    residents: int = 150,
) -> Split:
    """Disjoint training and test houses, and stranger photos for calibration and negatives.

    With `test_people` (another dataset), every dev person but the residents
    trains and the test houses are made of those; otherwise `test_fraction` of
    the dev people are held out as test houses. `residents` dev people are
    the aggregator's held-out folder (in no house). Deterministic for a seed;
    the order of the inputs does not matter.
    """
    rng = np.random.default_rng([seed, 11])
    dev = sorted(set(dev_people))
    if test_people is None:
        order = [dev[i] for i in rng.permutation(len(dev))]
        held = round(test_fraction * len(order))
        test, train = sorted(order[:held]), order[held:]
    else:
        test, train = sorted(set(test_people)), [dev[i] for i in rng.permutation(len(dev))]
    if not 0 <= residents < len(train):
        raise ValueError(f"{residents} residents out of {len(train)} training people")
    held_out, train = sorted(train[:residents]), sorted(train[residents:])
    if set(test) & set(train):
        raise ValueError("a person is both in a training and in a test house")
    strangers = sorted(set(stranger_photos))
    order = [strangers[i] for i in rng.permutation(len(strangers))]
    if len(order) < calibration + 2:
        raise ValueError(f"{len(order)} stranger photos, need more than {calibration}")
    return Split(
        train_houses=tuple(make_houses(train, rng)),
        test_houses=tuple(make_houses(test, rng)),
        calibration=tuple(sorted(order[:calibration])),
        negatives=tuple(sorted(order[calibration : calibration + negatives])),
        residents=tuple(held_out),
    )


# --- households as features ------------------------------------------------------------------


@dataclass(frozen=True)
class House:
    """One training doorbell: its people's features (labels 0..P-1) and its strangers."""

    features: Features
    labels: npt.NDArray[np.int64]
    negatives: Features


@dataclass(frozen=True)
class TestHouse:
    """One test doorbell: enrolment and probe photos of its members, and its strangers."""

    enrol: Features
    enrol_labels: npt.NDArray[np.int64]
    probes: Features
    probe_labels: npt.NDArray[np.int64]
    negatives: Features


@dataclass(frozen=True)
class Bench:
    """Everything the arms share: houses, stranger features, the start head."""

    train: tuple[House, ...]
    test: tuple[TestHouse, ...]
    calibration: Features
    negatives: Features
    start: Weights
    residents: tuple[Features, ...] = ()
    """Enrolment photos of each of the aggregator's held-out people (`Split.residents`)."""
    backbone: str = "0" * 64
    """sha256 of the backbone the features came from (global models name it)."""


def _negatives(pool: Features, rng: np.random.Generator, count: int) -> Features:
    if len(pool) == 0:
        return pool
    return pool[rng.choice(len(pool), size=min(count, len(pool)), replace=False)]


def build_bench(
    split: Split,
    features: dict[str, list[Features]],
    stranger_features: dict[str, Features],
    start: Weights,
    *,
    seed: int,
    negatives_per_house: int = NEGATIVES_PER_HOUSE,
) -> Bench:
    """Houses from per-person feature lists (photos where a face was found, in order).

    A training person with no face found is left out; a test person needs two
    photos (one to enrol, one to probe) to be a member, and with one is left
    out too (their photo still probes the other houses as a stranger's? no:
    every stranger probe comes from members, so the pools match across arms).
    """
    rng = np.random.default_rng([seed, 13])
    width = start[0].shape[0]
    empty = np.zeros((0, width), np.float32)
    negative_pool = np.asarray(
        [stranger_features[k] for k in split.negatives if k in stranger_features], np.float32
    ).reshape(-1, width)
    calibration = np.asarray(
        [stranger_features[k] for k in split.calibration if k in stranger_features], np.float32
    ).reshape(-1, width)
    train = []
    for people in split.train_houses:
        rows, labels = [], []
        for person in people:
            photos = features.get(person, [])
            if len(photos):
                rows.append(np.asarray(photos, np.float32))
                labels.append(np.full(len(photos), len(rows) - 1, np.int64))
        if rows:
            train.append(
                House(
                    np.concatenate(rows),
                    np.concatenate(labels),
                    _negatives(negative_pool, rng, negatives_per_house),
                )
            )
    test = []
    for people in split.test_houses:
        enrol: list[Features] = []
        probes: list[Features] = []
        enrol_labels: list[npt.NDArray[np.int64]] = []
        probe_labels: list[npt.NDArray[np.int64]] = []
        for person in people:
            faces = np.asarray(features.get(person, []), np.float32).reshape(-1, width)
            if len(faces) < 2:
                continue
            count = min(ENROL_PER_PERSON, len(faces) - 1)
            label = len(enrol)
            enrol.append(faces[:count])
            enrol_labels.append(np.full(count, label, np.int64))
            probes.append(faces[count:])
            probe_labels.append(np.full(len(faces) - count, label, np.int64))
        if enrol:
            test.append(
                TestHouse(
                    np.concatenate(enrol),
                    np.concatenate(enrol_labels),
                    np.concatenate(probes),
                    np.concatenate(probe_labels),
                    _negatives(negative_pool, rng, negatives_per_house),
                )
            )
    if not train or len(test) < 2:
        raise ValueError(f"{len(train)} training and {len(test)} test houses: too few")
    residents = []
    for person in split.residents:
        faces = np.asarray(features.get(person, []), np.float32).reshape(-1, width)
        if len(faces) >= 2:  # enrolled like a test house's member: one photo left over
            residents.append(faces[: min(ENROL_PER_PERSON, len(faces) - 1)])
    return Bench(
        tuple(train),
        tuple(test),
        calibration,
        negative_pool if len(negative_pool) else empty,
        start,
        tuple(residents),
    )


# --- scoring ---------------------------------------------------------------------------------


def house_trials(test: Sequence[TestHouse], heads: Sequence[Weights]) -> list[Trial]:
    """One trial per test house with its own head (`heads[i]`, or one head for all).

    A house's strangers are every probe and enrolment photo of the other test
    houses' members.
    """
    trials = []
    everyone = [np.concatenate([h.enrol, h.probes]) for h in test]
    shared = len(heads) == 1
    all_embedded = [embed(e, heads[0]) for e in everyone] if shared else None
    for index, house in enumerate(test):
        head = heads[0] if shared else heads[index]
        enrolled = embed(house.enrol, head)
        prototypes = np.stack(
            [
                prototype(enrolled[house.enrol_labels == p])
                for p in range(int(house.enrol_labels.max()) + 1)
            ]
        )
        if all_embedded is not None:
            strangers = np.concatenate([e for j, e in enumerate(all_embedded) if j != index])
        else:
            strangers = embed(
                np.concatenate([e for j, e in enumerate(everyone) if j != index]), head
            )
        trials.append(trial(prototypes, embed(house.probes, head), house.probe_labels, strangers))
    return trials


def shipped_threshold(bench: Bench, head: Weights, target_far: float, gallery_size: int) -> float:
    """What the aggregator would ship with `head`: calibrated on its stranger folder, in
    pretend houses of its held-out people (of other strangers when it has too few)."""
    residents = None
    if len(bench.residents) >= gallery_size:
        residents = np.stack([prototype(embed(faces, head)) for faces in bench.residents])
    return calibrate_threshold(
        embed(bench.calibration, head), target_far, gallery_size, residents=residents
    )


def evaluate(bench: Bench, heads: Sequence[Weights], threshold: float) -> OpenSetResult:
    return score_trials(house_trials(bench.test, heads), threshold)


# --- arms ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmSettings:
    rounds: int = 60
    houses_per_round: int = 20
    target_far: float = TARGET_FAR
    gallery_size: int = GALLERY_SIZE
    central_epochs: int = 20
    local_epochs: int | None = None
    """Epochs of local_only adaptation (default: the round plan's)."""
    params: TrainParams = field(default_factory=TrainParams)
    server_optimizer: Literal["none", "fedavgm", "fedadam"] = "none"
    """The aggregator's `rounds.server_optimizer` (its default: none)."""


@dataclass
class RoundRecord:
    round: int
    open_set_accuracy: float
    tar_at_far_1pct: float
    threshold: float
    bytes_up: int
    bytes_down: int
    seconds: float


@dataclass
class ArmOutcome:
    name: str
    result: OpenSetResult
    threshold: float
    seconds: float
    rounds: list[RoundRecord] = field(default_factory=list)
    heads: tuple[Weights, ...] = ()
    """The head(s) scored: one for every house, or one per test house (local_only)."""


def _specs(head: Weights) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(name=n, shape=tuple(int(d) for d in w.shape))
        for n, w in zip(HEAD_NAMES, head, strict=True)
    )


def run_start(bench: Bench, settings: ArmSettings) -> ArmOutcome:
    started = time.perf_counter()
    threshold = shipped_threshold(bench, bench.start, settings.target_far, settings.gallery_size)
    result = evaluate(bench, [bench.start], threshold)
    seconds = time.perf_counter() - started
    return ArmOutcome("start", result, threshold, seconds, heads=(bench.start,))


def run_federated(
    bench: Bench,
    settings: ArmSettings,
    seed: int,
    progress: Callable[[RoundRecord], None] | None = None,
) -> ArmOutcome:
    """Rounds of the product's client and server steps over the training houses.

    The loop is `bench.federated.run_arm`, the one every benchmark shares: the
    aggregator's device selection, its round checks and default clipping, the
    doorbell's `train_delta` with top-k error feedback, signed envelopes both
    ways (so byte counts are what a doorbell sends and receives; only the
    broker hop is left out), and the aggregator's `next_step`.
    """
    started = time.perf_counter()

    def score(weights: Weights) -> federated.Score:
        # The aggregator calibrates each version's threshold before it publishes it.
        threshold = shipped_threshold(bench, weights, settings.target_far, settings.gallery_size)
        result = evaluate(bench, [weights], threshold)
        return federated.Score(result.open_set_accuracy, threshold, result.tar_at_far_1pct)

    def record(row: federated.RoundResult) -> RoundRecord:
        return RoundRecord(
            row.round,
            row.open_set_accuracy,
            row.tar_at_far_1pct,
            row.threshold,
            row.bytes_up,
            row.bytes_down,
            row.seconds,
        )

    arm = federated.Arm("federated", server=settings.server_optimizer)
    outcome = federated.run_arm(
        bench.train,
        bench.start,
        arm,
        settings.rounds,
        score,
        params=replace(settings.params, seed=seed),
        houses_per_round=settings.houses_per_round,
        backbone=bench.backbone,
        progress=None if progress is None else lambda _arm, row: progress(record(row)),
    )
    # Scored as the doorbells run it: the head decoded from the downlink codec.
    threshold = outcome.final.threshold
    received = as_received(HEAD_NAMES, outcome.weights, arm.downlink_codec)
    result = evaluate(bench, [received], threshold)
    records = [record(row) for row in outcome.rounds]
    seconds = time.perf_counter() - started
    return ArmOutcome("federated", result, threshold, seconds, records, heads=(received,))


def run_central(bench: Bench, settings: ArmSettings, seed: int) -> ArmOutcome:
    """The same trainer on the union of the training houses (people relabelled globally)."""
    started = time.perf_counter()
    rows, labels, offset = [], [], 0
    for house in bench.train:
        rows.append(house.features)
        labels.append(house.labels + offset)
        offset += int(house.labels.max()) + 1
    plan = settings.params
    params = replace(plan, epochs=settings.central_epochs, prox_mu=0.0, seed=seed)
    head = train_head(
        bench.start, np.concatenate(rows), np.concatenate(labels), bench.negatives, params
    ).head
    threshold = shipped_threshold(bench, head, settings.target_far, settings.gallery_size)
    result = evaluate(bench, [head], threshold)
    return ArmOutcome("central", result, threshold, time.perf_counter() - started, heads=(head,))


def run_local_only(bench: Bench, settings: ArmSettings, seed: int) -> ArmOutcome:
    """Each test house adapts the start head on its own enrolment photos and strangers."""
    started = time.perf_counter()
    plan = settings.params
    heads = []
    for index, house in enumerate(bench.test):
        params = replace(
            plan, epochs=settings.local_epochs or plan.epochs, seed=round_seed(f"test{index}", seed)
        )
        heads.append(
            train_delta(bench.start, house.enrol, house.enrol_labels, house.negatives, params)
        )
    trained = [
        [np.asarray(b + d, np.float32) for b, d in zip(bench.start, t.delta, strict=True)]
        for t in heads
    ]
    # No aggregator: the house keeps the threshold shipped with the start model.
    threshold = shipped_threshold(bench, bench.start, settings.target_far, settings.gallery_size)
    result = score_trials(house_trials(bench.test, trained), threshold)
    seconds = time.perf_counter() - started
    return ArmOutcome("local_only", result, threshold, seconds, heads=tuple(trained))


def run_arm(name: str, bench: Bench, settings: ArmSettings, seed: int) -> ArmOutcome:
    if name == "start":
        return run_start(bench, settings)
    if name == "federated":
        return run_federated(bench, settings, seed, _print_round(seed))
    if name == "central":
        return run_central(bench, settings, seed)
    if name == "local_only":
        return run_local_only(bench, settings, seed)
    raise ValueError(f"unknown arm {name!r}")


def _print_round(seed: int) -> Callable[[RoundRecord], None]:
    def show(record: RoundRecord) -> None:
        if record.round % 5 == 0 or record.round == 1:
            print(
                f"  seed {seed}  federated round {record.round:>3}  "
                f"open-set {record.open_set_accuracy:.3f}"
                f"  TAR@1% {record.tar_at_far_1pct:.3f}  up {record.bytes_up} B",
                flush=True,
            )

    return show


def report(
    *,
    test_dataset: str,
    conditions: str,
    seeds: Sequence[int],
    outcomes: dict[int, dict[str, ArmOutcome]],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The JSON report: issue 11's schema (arms averaged over seeds; the first seed's
    rounds), plus per-seed figures and whatever `extra` holds."""
    arms = []
    for name in ARMS:
        per_seed = [outcomes[s][name] for s in seeds if name in outcomes[s]]
        if not per_seed:
            continue
        arms.append(
            {
                "name": name,
                **{
                    key: float(np.mean([getattr(o.result, key) for o in per_seed]))
                    for key in ("open_set_accuracy", "rank1", "tar_at_far_1pct", "unknown_rejected")
                },
                "threshold": float(np.mean([o.threshold for o in per_seed])),
                # What the arm would score with a threshold that let exactly 1 % of these
                # strangers in: open-set accuracy free of how well the calibration transfers.
                "open_set_accuracy_at_far_1pct": float(
                    np.mean([(o.result.tar_at_far_1pct + 0.99) / 2 for o in per_seed])
                ),
                "false_accepts": float(np.mean([1 - o.result.unknown_rejected for o in per_seed])),
                "per_seed": [
                    {
                        "seed": s,
                        "open_set_accuracy": o.result.open_set_accuracy,
                        "rank1": o.result.rank1,
                        "tar_at_far_1pct": o.result.tar_at_far_1pct,
                        "unknown_rejected": o.result.unknown_rejected,
                        "threshold": o.threshold,
                        "members": o.result.members,
                        "strangers": o.result.strangers,
                        "seconds": o.seconds,
                    }
                    for s, o in zip(seeds, per_seed, strict=True)
                ],
            }
        )
    federated = outcomes[seeds[0]].get("federated")
    rounds = [
        {
            "round": r.round,
            "open_set_accuracy": r.open_set_accuracy,
            "tar_at_far_1pct": r.tar_at_far_1pct,
            "threshold": r.threshold,
            "bytes_up": r.bytes_up,
            "bytes_down": r.bytes_down,
        }
        for r in (federated.rounds if federated else [])
    ]
    return {
        "test_dataset": test_dataset,
        "conditions": conditions,
        "seeds": list(seeds),
        "arms": arms,
        "rounds": rounds,
        "rounds_per_seed": {
            str(s): [
                {"round": r.round, "open_set_accuracy": r.open_set_accuracy, "bytes_up": r.bytes_up}
                for r in outcomes[s]["federated"].rounds
            ]
            for s in seeds
            if "federated" in outcomes[s]
        },
        **extra,
    }


# --- the run ---------------------------------------------------------------------------------


def _run_arm_task(task: tuple[str, Bench, ArmSettings, int]) -> ArmOutcome:
    name, bench, settings, seed = task
    return run_arm(name, bench, settings, seed)


def run_arms(
    benches: dict[int, Bench], settings: ArmSettings, jobs: int, arms: Sequence[str] = ARMS
) -> dict[int, dict[str, ArmOutcome]]:
    """Every arm on every seed's bench, `jobs` processes at a time (federated first: longest)."""
    order = sorted(arms, key=lambda a: a != "federated")
    tasks = [(arm, benches[s], settings, s) for s in benches for arm in order]
    if jobs <= 1:
        results = [_run_arm_task(t) for t in tasks]
    else:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_run_arm_task, tasks))
    outcomes: dict[int, dict[str, ArmOutcome]] = {s: {} for s in benches}
    for (arm, _, _, seed), outcome in zip(tasks, results, strict=True):
        outcomes[seed][arm] = outcome
    return outcomes


def bar_verdict(arms: dict[str, dict[str, float]]) -> list[str]:
    """Issue 11's bar, line by line, on the figures averaged over seeds."""
    fed = arms["federated"]
    lines = []

    def check(ok: bool, text: str) -> None:
        lines.append(f"{'PASS' if ok else 'FAIL'}  {text}")

    check(
        fed["open_set_accuracy"] >= BAR["open_set_accuracy"],
        f"federated open-set accuracy {fed['open_set_accuracy']:.3f} >= {BAR['open_set_accuracy']}",
    )
    check(
        fed["tar_at_far_1pct"] >= BAR["tar_at_far_1pct"],
        f"federated TAR at 1 % FAR {fed['tar_at_far_1pct']:.3f} >= {BAR['tar_at_far_1pct']}",
    )
    if "central" in arms:
        gap = 100 * (arms["central"]["open_set_accuracy"] - fed["open_set_accuracy"])
        check(gap <= BAR["vs_central"], f"federated {gap:+.1f} points below central (<= 3)")
    for other in ("start", "local_only"):
        if other in arms:
            lead = 100 * (fed["open_set_accuracy"] - arms[other]["open_set_accuracy"])
            check(lead >= BAR["vs_others"], f"federated {lead:+.1f} points above {other} (>= 5)")
    return lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DATASETS / "lfw_dev")
    parser.add_argument("--strangers", type=Path, default=DATASETS / "lfw_strangers")
    parser.add_argument("--test-dataset", type=Path, default=None)
    parser.add_argument(
        "--conditions",
        choices=("near", "far", "clean", "doorbell"),
        default="near",
        help="near: faces cut from the full-resolution stream at ring distance (the default "
        "doorbell's two streams); far: faces from a 640x480 frame (doorbell is its old name); "
        "clean: the photos themselves",
    )
    parser.add_argument(
        "--enrol",
        choices=("clean", "doorbell"),
        default="clean",
        help="galleries enrolled from clean photos (as the README enrols) or camera frames",
    )
    parser.add_argument(
        "--enrol-mirrored",
        action="store_true",
        help="each enrolment photo also enrols its mirror image (measured: see README)",
    )
    parser.add_argument(
        "--visit-frames",
        type=int,
        default=RecognitionConfig().visit_frames or RecognitionConfig().confirm_frames,
        help="frames filmed per visit (default: what the default doorbell decides after)",
    )
    parser.add_argument(
        "--keep",
        type=int,
        default=RecognitionConfig().confirm_frames,
        help="best chips a visit is decided from (the doorbell's confirm_frames)",
    )
    parser.add_argument("--rounds", type=int, default=ArmSettings.rounds)
    parser.add_argument("--houses-per-round", type=int, default=ArmSettings.houses_per_round)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--calibration-strangers", type=int, default=1000)
    parser.add_argument("--negative-strangers", type=int, default=1500)
    parser.add_argument("--central-epochs", type=int, default=ArmSettings.central_epochs)
    parser.add_argument("--detector", choices=("blazeface", "haar"), default="blazeface")
    parser.add_argument(
        "--server-optimizer", choices=("none", "fedavgm", "fedadam"), default="none"
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cache", type=Path, default=ROOT / "reports" / "cache")
    parser.add_argument("--report", type=Path, default=ROOT / "reports" / "openset.json")
    return parser


@dataclass(frozen=True)
class Prepared:
    """The photos of a run and each seed's bench."""

    everyone: dict[str, list[Photo]]
    benches: dict[int, Bench]
    detection: dict[int, dict[str, Any]]


def prepare(args: argparse.Namespace, backbone: bytes, head: Weights) -> Prepared:
    """Split, compute (or read) features and build each seed's bench."""
    sha = hashlib.sha256(backbone).hexdigest()
    dev = photos_of(args.dataset)
    test = photos_of(args.test_dataset) if args.test_dataset else {}
    strangers = {p.key: p for photos in photos_of(args.strangers).values() for p in photos}
    everyone = {**dev, **test}
    benches: dict[int, Bench] = {}
    detection: dict[int, dict[str, Any]] = {}
    for seed in args.seeds:
        split = split_people(
            sorted(dev),
            sorted(strangers),
            seed,
            test_people=sorted(test) if test else None,
            test_fraction=args.test_fraction,
            calibration=args.calibration_strangers,
            negatives=args.negative_strangers,
        )
        people = split.people()
        photos = [photo for person in people for photo in everyone[person]]
        photos += [strangers[k] for k in split.calibration + split.negatives]
        cache = FeatureCache.open(args.cache, args.conditions, seed, sha)
        extract_features(
            photos,
            cache,
            backbone,
            conditions=args.conditions,
            seed=seed,
            detector=args.detector,
            jobs=args.jobs,
        )
        found = {p.key for p in photos if cache.flags[p.key] > 0}
        per_person = {
            person: [cache.features[p.key] for p in everyone[person] if p.key in found]
            for person in people
        }
        stranger_features = {
            k: cache.features[k] for k in split.calibration + split.negatives if k in found
        }
        bench = build_bench(split, per_person, stranger_features, head, seed=seed)
        benches[seed] = replace(bench, backbone=sha)
        flags = np.asarray([cache.flags[p.key] for p in photos])
        detection[seed] = {
            "photos": len(photos),
            "detection_rate": float(np.mean(flags > 0)),
            "aligned_by_eyes": float(np.mean(flags == 2)),
            "skipped_no_face": int(np.sum(flags == 0)),
            "train_people": len({p for h in split.train_houses for p in h}),
            "train_houses": len(bench.train),
            "test_houses": len(bench.test),
            "test_members": int(sum(int(h.enrol_labels.max()) + 1 for h in bench.test)),
            "member_probes": int(sum(len(h.probes) for h in bench.test)),
            "calibration_strangers": len(bench.calibration),
            "calibration_residents": len(bench.residents),
            "negative_strangers": len(bench.negatives),
        }
    return Prepared(everyone, benches, detection)


def print_table(data: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    table = Table(title=title)
    several = len(data["seeds"]) > 1
    columns = [
        "arm",
        "open-set acc.",
        "rank-1",
        "TAR @ 1 % FAR",
        "unknown rejected",
        "threshold",
        "open-set at 1 % FAR",
    ]
    for column in columns + (["open-set per seed"] if several else []):
        table.add_column(column)
    for arm in data["arms"]:
        row = [
            arm["name"],
            *(
                f"{arm[k]:.3f}"
                for k in (
                    "open_set_accuracy",
                    "rank1",
                    "tar_at_far_1pct",
                    "unknown_rejected",
                    "threshold",
                    "open_set_accuracy_at_far_1pct",
                )
            ),
        ]
        if several:
            row.append(" ".join(f"{s['open_set_accuracy']:.3f}" for s in arm["per_seed"]))
        table.add_row(*row)
    console.print(table)
    if data["rounds"]:
        last = data["rounds"][-1]
        console.print(
            f"last round: {last['bytes_up']} B up ({last['bytes_up'] // data['houses_per_round']}"
            f" B per doorbell), {last['bytes_down']} B down; enrolling a person from 5 photos "
            f"takes {data['enroll_ms']:.0f} ms, a face {data['embed_ms']:.0f} ms (median, one "
            f"thread; best {data['enroll_ms_best']:.0f} / {data['embed_ms_best']:.0f} ms)"
        )
    for line in data["bar"]:
        console.print(line)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = time.perf_counter()
    backbone = backbone_model(args.cache)
    head = start_head()
    # Visits are scored beside frames (issue 20); the module needs this one's names.
    from bench import openset_visits

    prepared, visit_benches = openset_visits.prepare_visits(args, backbone, head)
    for seed, figures in prepared.detection.items():
        print(f"seed {seed}: {figures}", flush=True)
    settings = ArmSettings(
        rounds=args.rounds,
        houses_per_round=args.houses_per_round,
        central_epochs=args.central_epochs,
        server_optimizer=args.server_optimizer,
    )
    outcomes = run_arms(prepared.benches, settings, args.jobs)
    scored = openset_visits.score_visits(
        visit_benches, outcomes, head, settings.target_far, settings.gallery_size
    )
    timing_person = next(
        (ps for _, ps in sorted(prepared.everyone.items()) if len(ps) >= ENROL_PER_PERSON), []
    )
    enroll_ms, embed_ms, enroll_best, embed_best = time_doorbell(
        timing_person[:ENROL_PER_PERSON],
        backbone,
        head,
        conditions="clean" if args.conditions == "clean" else "doorbell",
        seed=args.seeds[0],
        detector=args.detector,
    )
    test_name = (
        args.test_dataset.name if args.test_dataset else f"{args.dataset.name} (held-out people)"
    )
    detection = prepared.detection.values()
    data = report(
        test_dataset=test_name,
        conditions=args.conditions,
        seeds=args.seeds,
        outcomes=outcomes,
        extra={
            "enroll_ms": enroll_ms,
            "embed_ms": embed_ms,
            "enroll_ms_best": enroll_best,
            "embed_ms_best": embed_best,
            "detector": args.detector,
            "detection": {str(s): d for s, d in prepared.detection.items()},
            "detection_rate": float(np.mean([d["detection_rate"] for d in detection])),
            "skipped_no_face": int(sum(d["skipped_no_face"] for d in detection)),
            "backbone_sha256": hashlib.sha256(backbone).hexdigest(),
            "target_far": settings.target_far,
            "gallery_size": settings.gallery_size,
            "rounds_run": settings.rounds,
            "houses_per_round": settings.houses_per_round,
            "train_params": asdict(settings.params),
            "central_epochs": settings.central_epochs,
            "server_optimizer": settings.server_optimizer,
            "seconds": time.perf_counter() - started,
        },
    )
    data["bar"] = bar_verdict({a["name"]: a for a in data["arms"]})
    openset_visits.add_visit_figures(data, scored, args.seeds, args.visit_frames, args.enrol)
    data["enrolment_mirrored"] = args.enrol_mirrored
    openset_visits.print_visit_table(data)
    print_table(
        data,
        f"Per frame (the second row): never-seen people ({test_name}), {args.conditions} "
        f"conditions, {args.rounds} rounds × {args.houses_per_round} houses, seeds {args.seeds}",
    )
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(data, indent=2))
    print(f"wrote {args.report} in {data['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
