"""Choosing the similarity threshold below which a visitor is "unknown".

A false accept is a stranger named as a resident: their embedding reaches the
threshold against one of the house's prototypes. The aggregator calibrates on
real photos of strangers it is given (one person per photo, nobody of any
house): it builds many pretend houses of `gallery_size` residents, shows each
the photo of a stranger, and takes the threshold that at most `target_far` of
those visits reach. So the shipped threshold means "in a house of
`gallery_size` people, at most `target_far` of the strangers who ring are
taken for someone", which is the rate a household cares about, rather than a
per-comparison rate that grows with the number of people enrolled.

The pretend residents are enrolled the way a house enrols: prototypes made
from a few photos of each person (the aggregator's held-out people). Without
them, other strangers' single photos stand in, and the threshold comes out
too lenient: a prototype averages several photos, sits nearer the middle of
the embedding's cone, and so sits nearer every stranger too (with dlib's
descriptors under doorbell conditions, one-photo houses let 3.8 % of strangers
in at a 1 % target; `make bench-openset`).

Pure numpy; the doorbell applies the threshold it receives, or its own.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fedbell.faces.embedding import Embeddings

MIN_THRESHOLD = -1.0
MAX_THRESHOLD = 1.0
MIN_STRANGERS = 20
"""Fewer stranger photos than this cannot say anything about a 1 % rate."""


def threshold_for_far(scores: npt.ArrayLike, target_far: float) -> float:
    """The lowest threshold at which at most `target_far` of `scores` reach it."""
    if not 0.0 <= target_far < 1.0:
        raise ValueError(f"target_far must be in [0, 1), got {target_far}")
    values = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError("threshold_for_far needs finite scores")
    allowed = int(np.floor(target_far * values.size + 1e-9))
    if allowed >= values.size:
        return MIN_THRESHOLD
    # Just above the (allowed+1)-th highest score: that one and all below it fail.
    return float(min(MAX_THRESHOLD, np.nextafter(values[allowed], np.inf)))


def _checked(rows: Embeddings, what: str, least: int) -> npt.NDArray[np.float32]:
    array = np.asarray(rows, dtype=np.float32)
    if array.ndim != 2 or len(array) < least:
        raise ValueError(f"calibration needs at least {least} {what}, got {len(array)}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} have NaN or infinite values")
    return array


def stranger_visits(
    strangers: Embeddings,
    gallery_size: int,
    galleries_per_probe: int = 8,
    seed: int = 0,
    residents: Embeddings | None = None,
) -> npt.NDArray[np.float64]:
    """Best similarity of each stranger to pretend houses of `gallery_size` people.

    The houses are drawn from `residents` (prototypes, one row per person)
    when given, else from the other strangers' photos.
    """
    array = _checked(strangers, "stranger embeddings", MIN_STRANGERS)
    people = array if residents is None else _checked(residents, "resident prototypes", 1)
    if residents is not None and people.shape[1] != array.shape[1]:
        raise ValueError(
            f"resident prototypes have width {people.shape[1]}, strangers {array.shape[1]}"
        )
    # A stranger never visits a house they live in (only when strangers stand in).
    available = len(people) - (1 if residents is None else 0)
    if not 1 <= gallery_size <= available:
        raise ValueError(f"gallery_size {gallery_size} must be in [1, {available}]")
    rng = np.random.default_rng(seed)
    similarity = array @ people.T
    scores = []
    for probe in range(len(array)):
        candidates = np.arange(len(people))
        if residents is None:
            candidates = np.delete(candidates, probe)
        for _ in range(galleries_per_probe):
            gallery = rng.choice(candidates, size=gallery_size, replace=False)
            scores.append(float(similarity[probe, gallery].max()))
    return np.asarray(scores, dtype=np.float64)


def calibrate_threshold(
    strangers: Embeddings,
    target_far: float,
    gallery_size: int = 5,
    seed: int = 0,
    residents: Embeddings | None = None,
) -> float:
    """The similarity threshold that lets at most `target_far` of strangers in.

    `residents`: prototypes of people enrolled as houses enrol them (see the
    module docstring); without them, stranger photos stand in.
    """
    visits = stranger_visits(strangers, gallery_size, seed=seed, residents=residents)
    return threshold_for_far(visits, target_far)
