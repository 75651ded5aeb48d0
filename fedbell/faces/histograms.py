"""Federated calibration: a threshold from score histograms the doorbells sum in secret.

A site with no stranger photos cannot calibrate a trained head on the aggregator
(issue 18 item 1), but every doorbell holds what calibration needs: the visitors
nobody labelled (its stranger store) and its own residents (its gallery). So a
head is scored where the faces are. Each doorbell turns a candidate head into
one fixed-layout vector (`house_vector`):

    stranger histogram  of the candidate: each stranger's best similarity to the
                        gallery's prototypes (a false accept at any threshold below it)
    genuine histogram   of the candidate: each gallery photo's similarity to its own
                        person's prototype built without it, or MISNAMED when another
                        prototype is nearer (leave-one-out, as edge/artifacts.py scores)
    the same two        for the lineage's start head (the gate's reference, measured on
                        the same houses in the same round)
    stranger count      the store's size / COUNT_CAP (so the sum says how many strangers
                        it rests on)

Each histogram is normalised to sum to 1 (all zeros when it has nothing to count),
so every house weighs the same, whatever its store or gallery holds. The vectors
travel only masked and the aggregator sees only their sum over the round's cohort
(aggregator/calibration.py); `calibrate` turns that sum into the threshold that lets
at most `target_far` of the (house-averaged) strangers in, and the true-accept rates
at it. The aggregator and `bench.bare_threshold` both call `calibrate`.

The strangers that calibrate are not the ones the head trains against: a doorbell of
such a federation keeps half its stranger store out of training (`calibrates`, the
round plan's `hold_out_strangers`). Measured (`bench.bare_threshold`, LFW, 14 houses
of 32 door visitors each): calibrated on the strangers it trained against, the head
after 30 rounds let 2.9 % of never-seen strangers in at a 2 % target, because training
pushed exactly those strangers away.

Bins: BINS equal bins over cosine [-1, 1], width 0.004. A threshold is a bin's
lower edge, so on the summed data its false-accept rate is never above the target;
it falls short of it by at most the mass of one bin (measured in
`bench.bare_threshold`: the share let in at the histogram's threshold against the
exact quantile of the same scores).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NoReturn

import numpy as np
import numpy.typing as npt

from fedbell.errors import RejectedMessage
from fedbell.faces.embedding import Embeddings, Features, embed
from fedbell.faces.openset import best_match, prototype

BINS: Final = 500
"""Histogram bins over cosine similarity [-1, 1]: width 0.004."""
EDGES: Final = np.linspace(-1.0, 1.0, BINS + 1)
"""Bin i holds scores in [EDGES[i], EDGES[i + 1]); the last bin also holds 1.0."""
MISNAMED: Final = -2.0
"""A gallery photo whose nearest prototype is someone else's: below every similarity, so never
a true accept (binned into bin 0)."""
COUNT_CAP: Final = 200
"""A house's stranger count is sent as min(count, COUNT_CAP) / COUNT_CAP (the store's default
size), so it stays within the clip norm; the sum then counts at most COUNT_CAP per house."""
SECTIONS: Final = ("strangers", "genuine", "start_strangers", "start_genuine")
VECTOR_SIZE: Final = len(SECTIONS) * BINS + 1
"""What each doorbell masks in a calibration round: four histograms and the stranger count."""
VECTOR_NORM: Final = math.sqrt(len(SECTIONS) + 1)
"""The largest L2 norm a house's vector can have (each normalised histogram <= 1, the count
<= 1): the calibration round's clip norm, so clipping never changes an honest vector and the
privacy noise is calibrated to what one house can change."""
MIN_STRANGERS: Final = 40
"""Fewest strangers the sum must rest on, the same as a stranger folder needs
(aggregator/export.py MIN_STRANGER_FACES): fewer say nothing about a 1-2 % rate."""

Vector = npt.NDArray[np.float64]


def calibrates(strangers: Features, events: Sequence[str]) -> npt.NDArray[np.bool_]:
    """Which rows of a stranger store calibrate (True) rather than train: about half, by a
    hash of each row's visitor event (of its features when it has none), so a visitor's
    frames stay together and a row keeps its side as the store drops its oldest rows."""
    rows = np.asarray(strangers, np.float32)
    keys = [event.encode() if event else rows[i].tobytes() for i, event in enumerate(events)]
    return np.array([hashlib.sha256(key).digest()[0] % 2 == 1 for key in keys], bool)


def histogram(scores: npt.ArrayLike) -> Vector:
    """Scores binned over [-1, 1] and normalised to sum to 1 (all zeros without scores)."""
    values = np.asarray(scores, np.float64).ravel()
    counts = np.zeros(BINS, np.float64)
    if values.size == 0:
        return counts
    if not np.all(np.isfinite(values)):
        raise ValueError("scores hold NaN or infinity")
    index = np.clip(np.floor((values + 1.0) / 2.0 * BINS), 0, BINS - 1).astype(np.int64)
    np.add.at(counts, index, 1.0)
    return counts / values.size


def stranger_scores(
    strangers: Embeddings, embeddings: Embeddings, labels: npt.NDArray[np.int64]
) -> npt.NDArray[np.float32]:
    """Each stranger's best similarity to the prototypes of the whole gallery."""
    if len(strangers) == 0 or len(embeddings) == 0:
        return np.zeros(0, np.float32)
    everyone = np.stack([prototype(embeddings[labels == p]) for p in np.unique(labels)])
    return best_match(strangers, everyone)[1]


def genuine_scores(
    embeddings: Embeddings, labels: npt.NDArray[np.int64]
) -> npt.NDArray[np.float32]:
    """Leave-one-out: each gallery photo's similarity to its own person's prototype made
    without it, or MISNAMED if another person's prototype is nearer. Photos of a person
    with one photo have no prototype left and are not scored."""
    array = np.asarray(embeddings, np.float32)
    scores = []
    for row in range(len(array)):
        person = int(labels[row])
        others = np.arange(len(array)) != row
        if not np.any(labels[others] == person):
            continue
        present = [int(p) for p in np.unique(labels[others])]
        prototypes = np.stack([prototype(array[others & (labels == p)]) for p in present])
        best, similarity = best_match(array[row : row + 1], prototypes)
        scores.append(float(similarity[0]) if present[int(best[0])] == person else MISNAMED)
    return np.asarray(scores, np.float32)


def house_vector(
    candidate: Sequence[npt.NDArray[np.float32]],
    start: Sequence[npt.NDArray[np.float32]],
    gallery: Features,
    labels: npt.NDArray[np.int64],
    strangers: Features,
) -> Vector:
    """One house's calibration vector (see the module docstring) from backbone features."""
    parts = []
    for head in (candidate, start):
        residents = embed(gallery, head)
        parts += [
            histogram(stranger_scores(embed(strangers, head), residents, labels)),
            histogram(genuine_scores(residents, labels)),
        ]
    count = min(len(strangers), COUNT_CAP) / COUNT_CAP
    return np.concatenate([*parts, [count]])


@dataclass(frozen=True)
class Calibration:
    """What a summed calibration vector says about the candidate and the start head."""

    threshold: float
    """The lowest bin edge at which at most target_far of the strangers reach it."""
    false_accept: float
    """The house-averaged share of strangers at or above it (<= target_far)."""
    true_accept: float
    """The house-averaged share of residents named right at it (leave-one-out)."""
    start_threshold: float
    start_true_accept: float
    """The same for the lineage's start head: the gate's reference."""
    strangers: int
    """Strangers the sum rests on (each house counted up to COUNT_CAP)."""
    houses: float
    """Houses whose stranger store was not empty (the stranger histogram's mass)."""


def _section(summed: Vector, name: str) -> Vector:
    at = SECTIONS.index(name) * BINS
    return summed[at : at + BINS]


def _threshold(strangers: Vector, target_far: float, noise_std: float) -> tuple[float, float]:
    """(lowest edge whose tail, and every tail above it, holds <= target_far of the mass,
    that tail's share). With privacy noise (`noise_std` per summed bin) a bin can be negative
    and a tail of k bins is off by noise_std x sqrt(k) either way: each tail must stay below
    the bar by twice that, scanning down from the top and stopping at the first over it.
    RejectedMessage(calibration_too_noisy) when the margin at the threshold found is the
    whole bar: the noise, not the strangers, would have set it."""
    total = float(strangers.sum())
    tails = np.cumsum(strangers[::-1])[::-1]  # tails[i]: mass at or above EDGES[i]
    margin = 2 * noise_std * np.sqrt(np.arange(BINS, 0, -1))
    over = np.nonzero(tails > target_far * total - margin)[0]
    first = int(over[-1]) + 1 if len(over) else 0
    if first == BINS or target_far * total <= margin[first]:
        _too_noisy(noise_std, target_far, total)
    return float(EDGES[first]), max(float(tails[first] / total), 0.0)


def _too_noisy(noise_std: float, target_far: float, houses: float) -> NoReturn:
    raise RejectedMessage(
        "calibration_too_noisy",
        f"the privacy noise on the sum ({noise_std:.3g} a bin) is larger than the "
        f"{100 * target_far:g} % of {houses:.0f} houses' strangers it must measure: "
        "calibrate with more doorbells a round, or give the aggregator stranger photos",
    )


def _true_accept(genuine: Vector, threshold: float) -> float:
    total = float(genuine.sum())
    if total <= 0:
        return 0.0
    first = int(np.searchsorted(EDGES, threshold, side="left"))
    return float(genuine[first:].sum() / total)


def calibrate(summed: npt.ArrayLike, target_far: float, noise_std: float = 0.0) -> Calibration:
    """The threshold and true-accept rates a summed calibration vector gives; RejectedMessage
    (calibration_too_few_strangers, calibration_no_residents, calibration_too_noisy,
    bad_calibration_sum) when it cannot say. `noise_std`: the privacy noise each value of
    the sum carries (0 without differential privacy)."""
    vector = np.asarray(summed, np.float64)
    if vector.shape != (VECTOR_SIZE,) or not np.all(np.isfinite(vector)):
        raise RejectedMessage(
            "bad_calibration_sum", f"a calibration sum has {VECTOR_SIZE} finite values"
        )
    if not 0 <= target_far < 1:
        raise ValueError(f"target_far {target_far} must be in [0, 1)")
    strangers = round(float(vector[-1]) * COUNT_CAP)
    houses = float(_section(vector, "strangers").sum())
    genuine = float(_section(vector, "genuine").sum())
    if noise_std > 0 and 2 * noise_std >= target_far * abs(houses):
        _too_noisy(noise_std, target_far, houses)
    if strangers < MIN_STRANGERS or houses < 1:
        raise RejectedMessage(
            "calibration_too_few_strangers",
            f"the doorbells' stranger stores hold {strangers} strangers in all, at least "
            f"{MIN_STRANGERS} are needed to calibrate a threshold: let the doorbells see "
            "visitors nobody labels (the store fills itself), or give the aggregator "
            "stranger photos (evaluation.strangers)",
        )
    if genuine < 1:
        raise RejectedMessage(
            "calibration_no_residents",
            "no doorbell could score its own residents (a person needs two photos): "
            "nothing to gate the head with",
        )
    threshold, false_accept = _threshold(_section(vector, "strangers"), target_far, noise_std)
    start = _threshold(_section(vector, "start_strangers"), target_far, noise_std)
    start_threshold = start[0]
    return Calibration(
        threshold=threshold,
        false_accept=false_accept,
        true_accept=_true_accept(_section(vector, "genuine"), threshold),
        start_threshold=start_threshold,
        start_true_accept=_true_accept(_section(vector, "start_genuine"), start_threshold),
        strangers=strangers,
        houses=houses,
    )
