"""Open-set identification: enrolled prototypes, a threshold, and how to score it.

A house enrols each person from a few photos; the normalised mean of their
embeddings is the person's prototype. A visitor is the person whose prototype
is most similar, if that similarity reaches the threshold, else "unknown".
The doorbell, the aggregator's evaluation and the benchmarks all decide and
score with these functions, so a figure measures what a doorbell does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedbell.faces.calibration import calibrate_threshold
from fedbell.faces.embedding import Embeddings, Features, embed, normalize

UNKNOWN = "unknown"
"""The name given to a visitor below the threshold."""

Scores = npt.NDArray[np.float32]


def prototype(embeddings: Embeddings) -> npt.NDArray[np.float32]:
    """One person's prototype: the normalised mean of their embeddings."""
    array = np.asarray(embeddings, dtype=np.float32)
    if array.ndim != 2 or len(array) == 0:
        raise ValueError(f"a prototype needs at least one embedding, got shape {array.shape}")
    return np.asarray(normalize(array.mean(axis=0, keepdims=True))[0], dtype=np.float32)


def best_match(
    embeddings: Embeddings, prototypes: Embeddings
) -> tuple[npt.NDArray[np.int64], Scores]:
    """Index of the most similar prototype for each embedding, and that similarity."""
    if len(prototypes) == 0:
        return np.full(len(embeddings), -1, np.int64), np.full(len(embeddings), -1.0, np.float32)
    similarity = np.asarray(embeddings, np.float32) @ np.asarray(prototypes, np.float32).T
    best = np.argmax(similarity, axis=1)
    return best.astype(np.int64), similarity[np.arange(len(best)), best].astype(np.float32)


def identify(
    embedding: npt.NDArray[np.float32],
    prototypes: Embeddings,
    names: Sequence[str],
    threshold: float,
) -> tuple[str, float]:
    """(name or "unknown", similarity to the nearest prototype) for one face."""
    if len(prototypes) != len(names):
        raise ValueError(f"{len(prototypes)} prototypes for {len(names)} names")
    index, score = best_match(np.asarray(embedding, np.float32)[None, :], prototypes)
    similarity = float(score[0])
    if index[0] < 0 or similarity < threshold:
        return UNKNOWN, similarity
    return names[int(index[0])], similarity


@dataclass(frozen=True)
class OpenSetResult:
    """How one gallery did on its members' other photos and on strangers."""

    open_set_accuracy: float
    """Mean of: members named right at the threshold, strangers rejected."""
    rank1: float
    """Members whose nearest prototype is their own, whatever the threshold."""
    tar_at_far_1pct: float
    """Members named right at the threshold that accepts 1 % of these strangers."""
    unknown_rejected: float
    """Strangers below the threshold."""
    members: int
    strangers: int


@dataclass(frozen=True)
class Trial:
    """Scored probes of one gallery: member probes (with truth) and strangers."""

    member_best: npt.NDArray[np.int64]
    member_truth: npt.NDArray[np.int64]
    member_score: Scores
    stranger_score: Scores


def trial(
    prototypes: Embeddings,
    members: Embeddings,
    member_truth: npt.NDArray[np.int64],
    strangers: Embeddings,
) -> Trial:
    best, score = best_match(members, prototypes)
    _, stranger_score = best_match(strangers, prototypes) if len(strangers) else (None, score[:0])
    return Trial(best, np.asarray(member_truth, np.int64), score, stranger_score)


def score_trials(trials: Sequence[Trial], threshold: float) -> OpenSetResult:
    """Pool the trials of many galleries (houses) into one result."""
    right = np.concatenate([t.member_best == t.member_truth for t in trials])
    member_score = np.concatenate([t.member_score for t in trials])
    stranger_score = np.concatenate([t.stranger_score for t in trials])
    if len(right) == 0 or len(stranger_score) == 0:
        raise ValueError("scoring needs member probes and strangers")
    named = right & (member_score >= threshold)
    rejected = stranger_score < threshold
    far_threshold = float(np.quantile(stranger_score, 0.99, method="higher"))
    tar = right & (member_score > far_threshold)
    return OpenSetResult(
        open_set_accuracy=float((named.mean() + rejected.mean()) / 2.0),
        rank1=float(right.mean()),
        tar_at_far_1pct=float(tar.mean()),
        unknown_rejected=float(rejected.mean()),
        members=len(right),
        strangers=len(stranger_score),
    )


ENROLL_PER_PERSON = 5
"""Photos per person that make their prototype in an evaluation; the rest are probes."""


@dataclass(frozen=True)
class Enrolled:
    """Held-out people enrolled as a house enrols them, and their remaining photos as probes."""

    prototypes: npt.NDArray[np.float32]
    probes: npt.NDArray[np.float32]
    truth: npt.NDArray[np.int64]
    """Row of `prototypes` each probe belongs to."""


def enrol_held_out(embeddings: Embeddings, persons: Sequence[str]) -> Enrolled | None:
    """Everyone with two photos or more, enrolled from their first ones (None: too few people).

    Up to ENROLL_PER_PERSON photos enrol a person, and at least one is left to probe.
    """
    array = np.asarray(embeddings, np.float32)
    names = sorted(set(persons))
    rows = {name: [i for i, p in enumerate(persons) if p == name] for name in names}
    enrolled = [n for n in names if len(rows[n]) > 1]
    if len(enrolled) < 2:
        return None
    cut = {n: min(ENROLL_PER_PERSON, len(rows[n]) - 1) for n in enrolled}
    prototypes = np.stack([prototype(array[rows[n][: cut[n]]]) for n in enrolled])
    probes = [i for n in enrolled for i in rows[n][cut[n] :]]
    truth = np.array([k for k, n in enumerate(enrolled) for _ in rows[n][cut[n] :]], np.int64)
    return Enrolled(prototypes, array[probes], truth)


def held_out_accuracy(
    enrolled: Enrolled, strangers: Embeddings | None, threshold: float
) -> float | None:
    """Open-set accuracy on people no house holds: the aggregator's score.

    Strangers are real stranger photos when the aggregator has them; without,
    each person's probes stand in as strangers to a gallery without them.
    """
    members = trial(
        enrolled.prototypes, enrolled.probes, enrolled.truth, np.zeros((0, 1), np.float32)
    )
    if strangers is not None:
        stranger_score = best_match(strangers, enrolled.prototypes)[1]
    else:
        # Each probe against the prototypes of everyone but its own person.
        similarity = enrolled.probes @ enrolled.prototypes.T
        similarity[np.arange(len(enrolled.probes)), enrolled.truth] = -1.0
        stranger_score = similarity.max(axis=1)
    trials = [Trial(members.member_best, enrolled.truth, members.member_score, stranger_score)]
    try:
        return score_trials(trials, threshold).open_set_accuracy
    except ValueError:
        return None


def evaluate_head(
    head: Sequence[npt.NDArray[np.float32]],
    held_out: tuple[Features, Sequence[str]] | None,
    strangers: Features | None,
    *,
    target_far: float,
    gallery_size: int,
    default_threshold: float,
) -> tuple[float | None, float]:
    """(open-set accuracy or None, threshold) of a head: what the aggregator publishes.

    Half the strangers calibrate the threshold against pretend houses of the
    held-out people's prototypes (of other strangers' photos when there are
    fewer than `gallery_size` of them); the other half are scored against the
    held-out people. Without strangers the default threshold holds.
    """
    enrolled = None
    if held_out is not None:
        features, persons = held_out
        enrolled = enrol_held_out(embed(features, head), persons)
    threshold, scoring = default_threshold, None
    if strangers is not None:
        half = len(strangers) // 2
        scoring = embed(strangers[half:], head)
        residents = None
        if enrolled is not None and len(enrolled.prototypes) >= gallery_size:
            residents = enrolled.prototypes
        calibration = embed(strangers[:half], head)
        threshold = calibrate_threshold(calibration, target_far, gallery_size, residents=residents)
    if enrolled is None:
        return None, threshold
    return held_out_accuracy(enrolled, scoring, threshold), threshold
