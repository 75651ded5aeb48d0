"""Choosing the similarity threshold below which a visitor is "unknown".

A false accept is a stranger named as a resident: their embedding reaches the
threshold against one of the house's prototypes. The aggregator calibrates on
real photos of strangers it is given (one person per photo, nobody of any
house): it builds many pretend houses of `gallery_size` strangers, shows each
the photo of another stranger, and takes the threshold that at most
`target_far` of those visits reach. So the shipped threshold means "in a house
of `gallery_size` people, at most `target_far` of the strangers who ring are
taken for someone", which is the rate a household cares about, rather than a
per-comparison rate that grows with the number of people enrolled.

Pure numpy; the doorbell applies the threshold it receives, or its own.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fedbell.embedding import Embeddings

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


def stranger_visits(
    strangers: Embeddings, gallery_size: int, galleries_per_probe: int = 8, seed: int = 0
) -> npt.NDArray[np.float64]:
    """Best similarity of each stranger to pretend galleries of other strangers."""
    array = np.asarray(strangers, dtype=np.float32)
    if array.ndim != 2 or len(array) < MIN_STRANGERS:
        raise ValueError(
            f"calibration needs at least {MIN_STRANGERS} stranger embeddings, got {len(array)}"
        )
    if not 1 <= gallery_size < len(array):
        raise ValueError(f"gallery_size {gallery_size} must be in [1, {len(array) - 1}]")
    if not np.all(np.isfinite(array)):
        raise ValueError("stranger embeddings have NaN or infinite values")
    rng = np.random.default_rng(seed)
    similarity = array @ array.T
    scores = []
    for probe in range(len(array)):
        others = np.delete(np.arange(len(array)), probe)
        for _ in range(galleries_per_probe):
            gallery = rng.choice(others, size=gallery_size, replace=False)
            scores.append(float(similarity[probe, gallery].max()))
    return np.asarray(scores, dtype=np.float64)


def calibrate_threshold(
    strangers: Embeddings, target_far: float, gallery_size: int = 5, seed: int = 0
) -> float:
    """The similarity threshold that lets at most `target_far` of strangers in."""
    return threshold_for_far(stranger_visits(strangers, gallery_size, seed=seed), target_far)
