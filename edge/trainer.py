"""Local training: start from the round's base model, return trained − base.

The Keras model is built once and reused across rounds, because building it
costs more than a small round's training on a Pi; it is rebuilt only when the
site's label count changes. TensorFlow is imported on first use, so a node
that is never selected never pays for it.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedbell import model as face_model
from fedbell.codecs import Weights
from fedbell.faces import normalize_face
from fedbell.messages import GlobalModel, check_specs
from fedbell.model import STRANGER, Images, LabelIds, TrainParams
from fedbell.synthetic import stranger_faces

log = logging.getLogger(__name__)


def round_seed(device: str, round_id: int) -> int:
    """A seed that differs per device and round but is reproducible for both."""
    return zlib.crc32(f"{device}:{round_id}".encode()) & 0x7FFFFFFF


@dataclass(frozen=True)
class TrainedDelta:
    names: tuple[str, ...]
    delta: Weights
    num_examples: int
    loss: float
    seconds: float


def with_strangers(
    images: Images, labels: LabelIds, share: float, seed: int
) -> tuple[Images, LabelIds]:
    """The gallery plus generated strangers labelled STRANGER (outlier exposure)."""
    count = max(4, round(share * len(images))) if share > 0 else 0
    if count == 0:
        return images, labels
    faces = np.stack([normalize_face(f) for f in stranger_faces(count, seed)])
    return (
        np.concatenate([images, faces]).astype(np.float32),
        np.concatenate([labels, np.full(count, STRANGER, dtype=np.int64)]),
    )


class Trainer:
    """Owns the node's one Keras model; not thread-safe (the node's worker calls it)."""

    def __init__(self, threads: int, stranger_share: float = 0.0) -> None:
        self._threads = threads
        self._stranger_share = stranger_share
        self._model: Any = None
        self._classes = 0

    def _model_for(self, classes: int) -> Any:
        if self._model is None:
            face_model.limit_threads(self._threads)
        if self._model is None or self._classes != classes:
            log.info("trainer: building the model for %d labels", classes)
            self._model = face_model.build_model(classes)
            self._classes = classes
        return self._model

    def train_delta(
        self, base: GlobalModel, images: Images, labels: LabelIds, params: TrainParams
    ) -> TrainedDelta:
        """Train a copy of `base` on these crops; RejectedMessage if `base` does not fit.

        `base` must have exactly the local model's tensors: a model with other
        names or shapes would make a delta the aggregator cannot add.
        """
        started = time.monotonic()
        model = self._model_for(len(base.labels))
        names = tuple(face_model.weight_names(model))
        check_specs(
            face_model.tensor_specs(base.names, base.weights),
            face_model.tensor_specs(names, face_model.get_weights(model)),
        )
        face_model.set_weights(model, base.weights)
        train_images, train_labels = with_strangers(
            images, labels, self._stranger_share, params.seed
        )
        loss = face_model.train(model, train_images, train_labels, params)
        trained = face_model.get_weights(model)
        delta = [
            np.asarray(t - b, dtype=np.float32) for t, b in zip(trained, base.weights, strict=True)
        ]
        return TrainedDelta(
            names=names,
            delta=delta,
            num_examples=len(images),
            loss=loss,
            seconds=time.monotonic() - started,
        )
