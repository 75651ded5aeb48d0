"""The privacy benchmark's people, houses and candidate pools (issue 22).

Features come from `bench.data.prepare` (its split, its doorbell conditions,
its cache under reports/cache, so `make bench-openset` and this share one
computation). A person's first min(5, n - 1) photos are what their house enrols
and trains on (under doorbell conditions), the rest are the attacker's: photos
of the same people from elsewhere (social media: clean, by default), never
trained on; a candidate is the mean of the attacker's photos of them. Everyone is cut the same
way, residents or not, so the pool cannot give a resident away by how many
photos the attacker holds.

Two kinds of houses:

- attacked houses (single updates, round sums, visitors): exactly
  `HOUSE_SIZE` residents drawn from the attacked people; the non-resident
  candidates are other attacked people. The attacker's shadow simulations use
  the public people only. By default the eligible people of the dataset are
  cut 2:1 into attacked and public; with `--test-dataset` the attacked are
  that folder's people and the public ones the dataset's.
- the federation (utility and published heads): `bench.openset`'s training
  people, recombined into `population` houses of 3-6 (`bench.households.make_houses`
  over fresh shuffles, so each person lives in several houses; a house's
  members are always distinct). Scored on `bench.openset`'s never-seen test
  houses; the published-heads attack's non-residents are people of those
  test houses and the aggregator's held-out people (never in the federation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from bench.households import House, make_houses
from bench.openset_features import ENROL_PER_PERSON
from fedbell.faces.embedding import Features

HOUSE_SIZE = 4
"""Residents per attacked house (the issue's measurement)."""


@dataclass(frozen=True)
class Person:
    enrol: Features
    """The photos the house enrols and trains on."""
    held: Features
    """The attacker's photos of this person (never trained on)."""

    @property
    def candidate(self) -> npt.NDArray[np.float32]:
        return np.asarray(self.held.mean(axis=0), np.float32)


def people_of(
    photos: dict[str, list[str]],
    house_features: dict[str, npt.NDArray[np.float32]],
    attacker_features: dict[str, npt.NDArray[np.float32]],
) -> dict[str, Person]:
    """Each person's photos (keys, in file order) cut in two: the first min(5, n - 1) are
    the house's, the rest the attacker's; each side keeps those whose face was found
    under its own conditions (`*_features` hold only those). A person needs one of each."""
    people = {}
    for person, keys in sorted(photos.items()):
        count = min(ENROL_PER_PERSON, len(keys) - 1)
        enrol = [house_features[k] for k in keys[:count] if k in house_features]
        held = [attacker_features[k] for k in keys[count:] if k in attacker_features]
        if enrol and held:
            people[person] = Person(np.asarray(enrol, np.float32), np.asarray(held, np.float32))
    return people


def house(
    members: Sequence[Person], negatives: Features, visitors: Sequence[Features] = ()
) -> House:
    """A doorbell's training data: its residents' enrolment photos, labels 0..P-1, and
    the strangers seen at its door (`visitors` first, then `negatives`)."""
    width = members[0].enrol.shape[1]
    seen = np.concatenate([*visitors, negatives]) if visitors else negatives
    return House(
        np.concatenate([m.enrol for m in members]),
        np.concatenate([np.full(len(m.enrol), i, np.int64) for i, m in enumerate(members)]),
        np.asarray(seen, np.float32).reshape(-1, width),
    )


def strangers_at_door(pool: Features, rng: np.random.Generator, count: int) -> Features:
    """`count` stranger photos a doorbell has seen (`NEGATIVES_PER_HOUSE` by default)."""
    return pool[rng.choice(len(pool), size=min(count, len(pool)), replace=False)]


def population(
    people: Sequence[str], houses: int, rng: np.random.Generator
) -> list[tuple[str, ...]]:
    """`houses` houses of 3-6 people: `bench.households.make_houses` over fresh shuffles of `people`
    until there are enough (each person in about houses * 4.5 / len(people) houses)."""
    made: list[tuple[str, ...]] = []
    while len(made) < houses:
        made.extend(make_houses(people, rng))
    return made[:houses]


@dataclass(frozen=True)
class Pool:
    """One trial's candidates: their features and which ones are the targets."""

    features: Features
    targets: npt.NDArray[np.bool_]


def pool(
    people: dict[str, Person],
    targets: Sequence[str],
    others: Sequence[str],
    rng: np.random.Generator,
) -> Pool:
    """The targets' candidate features mixed (shuffled) with the others'."""
    keys = [*targets, *others]
    order = rng.permutation(len(keys))
    return Pool(
        np.stack([people[keys[i]].candidate for i in order]),
        np.asarray([i < len(targets) for i in order], np.bool_),
    )


def draw(
    keys: Sequence[str], count: int, rng: np.random.Generator, exclude: set[str] | None = None
) -> list[str]:
    """`count` distinct keys not in `exclude`, seeded."""
    allowed = [k for k in keys if not exclude or k not in exclude]
    if count > len(allowed):
        raise ValueError(f"need {count} people, only {len(allowed)} to draw from")
    return [allowed[i] for i in rng.choice(len(allowed), size=count, replace=False)]


def attacked_and_public(
    eligible: Sequence[str], test_people: Sequence[str] | None, seed: int
) -> tuple[list[str], list[str]]:
    """(attacked, public): the test dataset's people against the rest, or a seeded 2:1 cut."""
    if test_people is not None:
        tested = set(test_people)
        return sorted(k for k in eligible if k in tested), sorted(
            k for k in eligible if k not in tested
        )
    order = sorted(eligible)
    shuffled = [order[i] for i in np.random.default_rng([seed, 31]).permutation(len(order))]
    cut = 2 * len(shuffled) // 3
    return sorted(shuffled[:cut]), sorted(shuffled[cut:])


def centre_of(people: dict[str, Person], keys: Sequence[str]) -> npt.NDArray[np.float32]:
    """The middle of the public feature cloud: what the attacker centres candidates on."""
    return np.asarray(np.mean([people[k].candidate for k in keys], axis=0), np.float32)
