"""The two numbers beside the federation: where it started and what pooling would give.

`start` is the starting model (dlib's projection, no training); `central` is
the same head trained by the same client step on the union of every house's
gallery, as many epochs as the federation ran in all — what sending every
face to one server would buy, which is exactly what fedbell refuses to do.
Both are scored with the aggregator's own function on the same held-out
people and strangers, with the backbone the aggregator published.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aggregator.config import EvaluationSettings
from aggregator.export import MIN_STRANGER_FACES
from fedbell.faces.dataset import Sample
from fedbell.faces.detection import Detector
from fedbell.faces.embedding import Features, TrainParams, train_head
from fedbell.faces.features import Backbone, cached_features, photo_chips
from fedbell.faces.openset import evaluate_head


@dataclass(frozen=True)
class Baselines:
    start: float | None
    central: float | None
    head_params: int


def features_of(
    samples: Sequence[Sample], detector: Detector, backbone: Backbone, cache: Path
) -> tuple[Features, list[str]]:
    """Backbone features of the photos with a face, and whose each is (cached by photo)."""
    kept, chips, _ = photo_chips(samples, detector)
    return cached_features(cache, kept, backbone, chips), [s.person for s in kept]


Scorer = Callable[[Sequence[np.ndarray]], tuple[float | None, float]]


def scorer(held: tuple[Features, list[str]], strangers: Features) -> Scorer:
    """A head's (open-set accuracy, threshold) as the aggregator scores and calibrates it,
    with its default settings, on these held-out people and strangers."""
    settings = EvaluationSettings()  # the aggregator's defaults, as the simulation runs it
    calibrating = strangers if len(strangers) >= MIN_STRANGER_FACES else None

    def score(head: Sequence[np.ndarray]) -> tuple[float | None, float]:
        return evaluate_head(
            head,
            held,
            calibrating,
            target_far=settings.target_false_accept,
            gallery_size=settings.gallery_size,
            default_threshold=settings.default_threshold,
        )

    return score


def baselines(
    start_head: Sequence[np.ndarray],
    galleries: Sequence[Sequence[Sample]],
    held_out: Sequence[Sample],
    strangers: Sequence[Sample],
    *,
    backbone: Backbone,
    detector: Detector,
    params: TrainParams,
    cache: Path,
) -> Baselines:
    union = [s for gallery in galleries for s in gallery]
    train, persons = features_of(union, detector, backbone, cache)
    names = sorted(set(persons))
    labels = np.array([names.index(p) for p in persons], dtype=np.int64)
    score = scorer(
        features_of(held_out, detector, backbone, cache),
        features_of(strangers, detector, backbone, cache)[0],
    )
    empty = np.zeros((0, train.shape[1]), np.float32)
    central_head = train_head(start_head, train, labels, empty, params).head
    return Baselines(
        start=score(start_head)[0],
        central=score(central_head)[0],
        head_params=int(sum(np.asarray(w).size for w in start_head)),
    )
