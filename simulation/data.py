"""The simulation's people: households with a doorbell each, and people in no house.

A dataset's persons are dealt out once, by seed: some live in the houses
(each house's doorbell gallery holds their photos, all but one that is kept
for the live demo's visits), some belong to no house (the aggregator's
held-out people, scored every round), and one is the newcomer whom a doorbell
enrols after the rounds. Galleries are written as symlinks to the source
images, so a real dataset beside the checkout is never copied or modified.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from fedbell.faces.dataset import Sample, list_samples
from fedbell.faces.synthetic import make_identities, make_scene, person_name, render_face

HELD_OUT_SHARE = 0.3
"""Share of the persons kept out of every house, for the aggregator's score..."""
MAX_HELD_OUT = 40
"""...at most: the aggregator runs their photos through the backbone at start."""
MAX_PER_HOUSE = 6
"""A household; a large dataset's other people stay out of the run."""
STRANGER_SEED_OFFSET = 10_007
"""Generated strangers come from another seed, so none of them lives in a house."""


@dataclass(frozen=True)
class Households:
    houses: tuple[tuple[str, ...], ...]
    """The persons of each house; house i has doorbell i."""
    galleries: tuple[tuple[Sample, ...], ...]
    """The photos each doorbell's gallery holds."""
    visits: tuple[Sample, ...]
    """One photo of each house member that no gallery holds: the live demo's visits."""
    held_out: tuple[Sample, ...]
    """Photos of persons in no house: the aggregator's evaluation folder."""
    newcomer: tuple[Sample, ...]
    """Photos of the person enrolled after the rounds (the last one is their visit)."""


def _by_person(samples: Sequence[Sample]) -> dict[str, list[Sample]]:
    people: dict[str, list[Sample]] = {}
    for sample in samples:
        people.setdefault(sample.person, []).append(sample)
    return people


def one_photo_each(samples: Sequence[Sample]) -> list[Sample]:
    """The first photo of each person in `samples`, in their order: the live demo's strangers."""
    return [photos[0] for photos in _by_person(samples).values()]


def split_households(samples: Sequence[Sample], houses: int, seed: int) -> Households:
    """Deal the persons with at least 3 photos into houses, held-out people and a newcomer."""
    people = {p: s for p, s in _by_person(samples).items() if len(s) >= 3}
    names = sorted(people)
    held = min(MAX_HELD_OUT, max(2, round(HELD_OUT_SHARE * len(names))))
    if len(names) < houses + held + 1:
        raise ValueError(
            f"{len(names)} persons with 3+ photos cannot fill {houses} houses, "
            f"{held} held-out people and a newcomer"
        )
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    newcomer, held_out = order[0], order[1 : 1 + held]
    residents = order[1 + held : 1 + held + houses * MAX_PER_HOUSE]
    members = tuple(tuple(sorted(residents[i::houses])) for i in range(houses))
    return Households(
        houses=members,
        galleries=tuple(tuple(s for p in house for s in people[p][:-1]) for house in members),
        visits=tuple(people[p][-1] for house in members for p in house),
        held_out=tuple(s for p in sorted(held_out) for s in people[p]),
        newcomer=tuple(people[newcomer]),
    )


def load_households(root: Path, houses: int, seed: int) -> Households:
    return split_households(list_samples(root), houses, seed)


def write_folder(samples: Sequence[Sample], root: Path) -> None:
    """`<root>/<person>/<image>` links to the source files (copies where links fail)."""
    for sample in samples:
        target = root / sample.person / sample.path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        source = sample.path.resolve()
        try:
            target.symlink_to(source)
        except OSError:  # e.g. a filesystem without symlinks
            shutil.copyfile(source, target)


def write_synthetic(root: Path, persons: int, photos: int, seed: int, size: int = 96) -> None:
    """`<root>/<person>/<n>.png`: generated people at a generated front door."""
    rng = np.random.default_rng(seed + 1)
    for index, identity in enumerate(make_identities(persons, seed)):
        folder = root / person_name(index)
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(photos):
            frame = make_scene([render_face(identity, rng, size)], rng).frame
            cv2.imwrite(str(folder / f"{n:03d}.png"), frame)


def write_strangers(root: Path, count: int, seed: int, size: int = 96) -> None:
    """One generated photo each of `count` people who are nobody in the simulation."""
    rng = np.random.default_rng(seed + STRANGER_SEED_OFFSET)
    for index, identity in enumerate(make_identities(count, seed + STRANGER_SEED_OFFSET)):
        folder = root / f"stranger{index:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        frame = make_scene([render_face(identity, rng, size)], rng).frame
        cv2.imwrite(str(folder / "0.png"), frame)
