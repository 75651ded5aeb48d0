"""The two numbers beside the federation: where it started and what pooling would give.

`start` is the starting model (dlib's projection, no training); `central` is
the same head trained by the same client step on the union of every house's
gallery, as many epochs as the federation ran in all — what sending every
face to one server would buy, which is exactly what fedbell refuses to do.
Both are scored with the aggregator's own function on the same held-out
people and strangers, with the backbone the aggregator published.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def _features(
    samples: Sequence[Sample], detector: Detector, backbone: Backbone, cache: Path
) -> tuple[Features, list[str]]:
    kept, chips, _ = photo_chips(samples, detector)
    return cached_features(cache, kept, backbone, chips), [s.person for s in kept]


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
    train, persons = _features(union, detector, backbone, cache)
    names = sorted(set(persons))
    labels = np.array([names.index(p) for p in persons], dtype=np.int64)
    held = _features(held_out, detector, backbone, cache)
    stranger_features, _ = _features(strangers, detector, backbone, cache)
    empty = np.zeros((0, train.shape[1]), np.float32)
    central_head = train_head(start_head, train, labels, empty, params).head

    settings = EvaluationSettings()  # the aggregator's defaults, as the simulation runs it

    def score(head: Sequence[np.ndarray]) -> float | None:
        return evaluate_head(
            head,
            held,
            stranger_features if len(stranger_features) >= MIN_STRANGER_FACES else None,
            target_far=settings.target_false_accept,
            gallery_size=settings.gallery_size,
            default_threshold=settings.default_threshold,
        )[0]

    return Baselines(
        start=score(start_head),
        central=score(central_head),
        head_params=int(sum(np.asarray(w).size for w in start_head)),
    )
