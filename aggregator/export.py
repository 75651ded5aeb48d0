"""What the aggregator publishes for a model version: global weights, TFLite, numbers.

TensorFlow work (evaluation, conversion) happens here, on the main loop
thread, never in paho's network thread.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from aggregator.config import AggregatorConfig, EvaluationSettings
from fedbell import model as fmodel
from fedbell.calibration import calibrate_threshold
from fedbell.codecs import Weights
from fedbell.dataset import list_samples, load_samples
from fedbell.envelope import TensorSpec
from fedbell.faces import FACE_SIZE, normalize_face
from fedbell.messages import Signer, build_global, build_tflite
from fedbell.model import Images, LabelIds
from fedbell.synthetic import stranger_faces

log = logging.getLogger(__name__)

CALIBRATION_STRANGERS = 200
CALIBRATION_STRANGERS = 200
REPRESENTATIVE_SAMPLES = 64
"""Random images for int8 calibration when there is no held-out set."""


@dataclass(frozen=True)
class HeldOut:
    """Faces never trained on: accuracy per round and threshold calibration."""

    images: Images
    labels: LabelIds

    @classmethod
    def load(cls, settings: EvaluationSettings, labels: Sequence[str]) -> HeldOut | None:
        if settings.dataset is None:
            return None
        images, ids = load_samples(list_samples(settings.dataset), labels)
        if len(images) == 0:
            log.warning(
                "evaluation set %s has no images of the labels %s: no accuracy",
                settings.dataset,
                ", ".join(labels),
            )
            return None
        log.info("evaluation set %s: %d images", settings.dataset, len(images))
        return cls(images, ids)


@dataclass(frozen=True)
class Release:
    """One model version, ready to publish and to save."""

    version: int
    round: int
    weights: Weights
    global_payload: bytes
    tflite_payload: bytes
    accuracy: float | None
    threshold: float


class Exporter:
    """Owns the Keras model the aggregator evaluates and converts."""

    def __init__(self, config: AggregatorConfig, signer: Signer) -> None:
        self.config = config
        self.signer = signer
        fmodel.limit_threads(config.threads)
        self.model: Any = fmodel.build_model(len(config.labels), seed=config.model_seed)
        self.names = tuple(fmodel.weight_names(self.model))
        self._initial = fmodel.get_weights(self.model)  # before any release changes them
        self.held_out = HeldOut.load(config.evaluation, config.labels)
        # Faces of nobody in the label set, for calibrating "unknown": generated,
        # since the aggregator never holds photos of real strangers.
        self._strangers = np.stack(
            [
                normalize_face(face)
                for face in stranger_faces(CALIBRATION_STRANGERS, config.model_seed)
            ]
        )

    def initial_weights(self) -> Weights:
        """Version 0: the deterministic weights of `model_seed`."""
        return [w.copy() for w in self._initial]

    def specs(self, weights: Sequence[np.ndarray]) -> tuple[TensorSpec, ...]:
        return fmodel.tensor_specs(self.names, weights)

    def _representative(self) -> Images:
        if self.held_out is not None:
            return self.held_out.images
        rng = np.random.default_rng(self.config.model_seed)
        return rng.random((REPRESENTATIVE_SAMPLES, FACE_SIZE, FACE_SIZE), dtype=np.float32)

    def _evaluate(self) -> tuple[float | None, float]:
        """(accuracy, threshold) of the model's current weights."""
        settings = self.config.evaluation
        if self.held_out is None:
            return None, settings.default_threshold
        probabilities = fmodel.predict(self.model, self.held_out.images)
        accuracy = float(np.mean(np.argmax(probabilities, axis=1) == self.held_out.labels))
        try:
            threshold = calibrate_threshold(
                probabilities,
                settings.target_false_accept,
                fmodel.predict(self.model, self._strangers),
                labels=self.held_out.labels,
            )
        except ValueError as err:  # e.g. a single label: nothing to calibrate against
            log.warning(
                "threshold not calibrated (%s): using %.2f", err, settings.default_threshold
            )
            threshold = settings.default_threshold
        return accuracy, threshold

    def release(self, weights: Weights, version: int, round_id: int) -> Release:
        fmodel.set_weights(self.model, weights)
        accuracy, threshold = self._evaluate()
        float_model, int8_model = fmodel.to_tflite(self.model, self._representative())
        site, labels = self.config.site, self.config.labels
        global_payload = build_global(
            site=site,
            signer=self.signer,
            version=version,
            round_id=round_id,
            names=self.names,
            weights=weights,
            codec=self.config.rounds.downlink_codec,
            meta={"labels": list(labels)},
        )
        tflite_payload = build_tflite(
            site=site,
            signer=self.signer,
            version=version,
            round_id=round_id,
            float_model=float_model,
            int8_model=int8_model,
            labels=labels,
            threshold=threshold,
        )
        limit = self.config.mqtt.max_message_bytes
        for name, payload in (("global model", global_payload), ("tflite", tflite_payload)):
            if len(payload) > limit:
                log.warning(
                    "%s of version %d is %d bytes, over mqtt.max_message_bytes %d: "
                    "nodes will refuse it",
                    name,
                    version,
                    len(payload),
                    limit,
                )
        return Release(
            version=version,
            round=round_id,
            weights=weights,
            global_payload=global_payload,
            tflite_payload=tflite_payload,
            accuracy=accuracy,
            threshold=threshold,
        )
