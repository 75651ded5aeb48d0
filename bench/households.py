"""The benchmarks' households: who lives where, their features, and how a head is scored.

Every benchmark of recognition and learning runs on the same structure
(`bench.data` fills it from real photos or generated features):

- the split (`split_people`): a dataset's people cut into disjoint training
  houses (3-6 people) and test houses of people no model has seen, the
  aggregator's held-out residents, and stranger photos for calibration and
  as the doorbells' negatives;
- the households as features (`build_bench`): a `House` per training doorbell
  (features, labels, strangers seen at its door), a `TestHouse` per test
  doorbell (enrolment and probe photos), the calibration strangers, the start
  head;
- scoring as the aggregator scores a release (`shipped_threshold`,
  `evaluate`): the threshold calibrated on the stranger folder for 1 % false
  accepts in a house of 5, open-set accuracy of the test houses at it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from bench.openset_features import ENROL_PER_PERSON
from fedbell.faces.calibration import calibrate_threshold
from fedbell.faces.embedding import Features, embed, feature_width
from fedbell.faces.openset import OpenSetResult, Trial, prototype, score_trials, trial
from fedbell.wire.codecs import Weights

TARGET_FAR = 0.01
"""The shipped threshold: at most 1 % of the strangers who ring are taken for someone..."""
GALLERY_SIZE = 5
"""...in a house of 5 people."""
HOUSE_SIZES = (3, 6)
NEGATIVES_PER_HOUSE = 32
"""Strangers a doorbell has seen at its door (delivery people, visitors), as negatives."""

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
    width = feature_width(start)
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
