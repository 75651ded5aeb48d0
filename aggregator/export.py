"""What the aggregator publishes for a model version: the head, its threshold, its score.

The backbone (dlib's face network as TFLite) is converted once and published
once per lineage; each round's release is only the head, the unknown-visitor
threshold calibrated for it on real stranger photos (on a site without them,
by the doorbells: aggregator/calibration.py), and its open-set accuracy on a
held-out folder of people. Faces of both folders are detected,
aligned and run through the backbone once at start (cached in the state
folder): a release is then a few matrix products.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aggregator.backbone import BackboneModels, backbone_models
from aggregator.config import START_HEAD_THRESHOLD, AggregatorConfig, EvaluationSettings
from aggregator.gates import bars_finer_than_a_face
from aggregator.quiet import native_noise_dropped
from fedbell.faces import dlib_resnet, last_level
from fedbell.faces.dataset import Sample, list_samples
from fedbell.faces.detection import make_detector
from fedbell.faces.embedding import HEAD_NAMES, LAST_LEVEL_NAMES, Features
from fedbell.faces.features import Backbone, FaceSet, cached_features, photo_chips
from fedbell.faces.openset import evaluate_head
from fedbell.wire.backbone import BackboneMessages, build_backbone
from fedbell.wire.codecs import Weights, decode_tensors, encode_tensors
from fedbell.wire.envelope import Codec, TensorSpec
from fedbell.wire.messages import Signer, build_global

log = logging.getLogger(__name__)

MIN_STRANGER_FACES = 40
"""Half calibrates, half scores: fewer than 20 each says nothing about a 1 % rate."""


def evaluation_samples(folder: Path | None, limit: int | None) -> list[Sample]:
    """A folder's photos, at most `limit` of them: a fixed sample, so features are cached."""
    if folder is None:
        return []
    samples = list_samples(folder)
    if limit is not None and len(samples) > limit:
        rng = np.random.default_rng(0)  # the same strangers every start: cacheable
        picked = sorted(rng.choice(len(samples), size=limit, replace=False))
        samples = [samples[i] for i in picked]
    return samples


def as_received(names: Sequence[str], weights: Weights, codec: Codec) -> Weights:
    """The head as a doorbell decodes it from a global model sent in `codec`.

    Doorbells train from and recognise with this head, so it is the one whose
    threshold is calibrated and whose accuracy is scored. The aggregator itself
    keeps the exact float head as the base of the next round: re-quantising its
    own base would round away every round's change smaller than half an int8 step.
    """
    specs, body = encode_tensors(names, weights, codec)
    return decode_tensors(specs, body, codec, "zstd")


@dataclass(frozen=True)
class Release:
    """One model version, ready to publish and to save."""

    version: int
    round: int
    weights: Weights
    global_payload: bytes
    accuracy: float | None
    threshold: float


@dataclass(frozen=True)
class Candidate:
    """A round's release held unpublished until the doorbells calibrate it
    (aggregator/calibration.py)."""

    release: Release
    trained_by: tuple[str, ...]
    """The training round's doorbells: a refused candidate counts against them (strikes)."""


class Exporter:
    """Owns the backbone, the evaluation faces and the building of model messages."""

    def __init__(self, config: AggregatorConfig, signer: Signer) -> None:
        self.config = config
        self.signer = signer
        settings = config.evaluation
        cache = config.cache_dir or config.state_dir / "cache"
        weights = dlib_resnet.load()
        # rounds.trainable: the head alone on the pooled features, or dlib's last level
        # too, on the level's inputs (the backbone the doorbells run then stops before it).
        self.trains_last_level = config.rounds.trainable == "last_level"
        self.names = LAST_LEVEL_NAMES if self.trains_last_level else HEAD_NAMES
        self._initial = last_level.start_model(weights, with_level=self.trains_last_level)
        with native_noise_dropped():
            detector = make_detector(settings.detector, fallback=True)
        strangers = evaluation_samples(settings.strangers, settings.max_strangers)
        held_out = evaluation_samples(settings.dataset, None)
        found, stranger_chips, missed = photo_chips(strangers, detector)
        self.backbone_models: BackboneModels = backbone_models(
            cache, stranger_chips, until_last_level=self.trains_last_level
        )
        with native_noise_dropped():
            backbone = Backbone(self.backbone_models.float_model, num_threads=config.threads)
        self.strangers: Features | None = None
        if len(stranger_chips) >= MIN_STRANGER_FACES:
            self.strangers = cached_features(cache, found, backbone, stranger_chips)
            log.info(
                "strangers %s: %d faces (%d photos without one)",
                settings.strangers,
                len(stranger_chips),
                missed,
            )
        elif settings.strangers is not None:
            log.warning("strangers %s: too few faces to calibrate on", settings.strangers)
        self.held_out: FaceSet | None = None
        if held_out:
            kept, chips, missed = photo_chips(held_out, detector)
            self.held_out = FaceSet(
                tuple(s.person for s in kept), cached_features(cache, kept, backbone, chips), missed
            )
            log.info("evaluation set %s: %d faces", settings.dataset, len(chips))
            if chips and (finer := bars_finer_than_a_face(len(chips), config.rounds)):
                log.warning(
                    "evaluation set %s: %d faces, so one face moves accuracy by about %.1f "
                    "points, more than %s: a round may be refused for one face named "
                    "differently; add faces to the set or raise the bar",
                    settings.dataset,
                    len(chips),
                    100 / len(chips),
                    " and ".join(finer),
                )

    def initial_weights(self) -> Weights:
        """Version 0 of a lineage: dlib's own projection (and last level), so it starts as
        dlib's descriptor."""
        return [w.copy() for w in self._initial]

    def specs(self, weights: Sequence[np.ndarray]) -> tuple[TensorSpec, ...]:
        return tuple(
            TensorSpec(name=n, shape=tuple(int(d) for d in w.shape))
            for n, w in zip(self.names, weights, strict=True)
        )

    @property
    def backbone_sha256(self) -> str:
        return self.backbone_models.sha256

    def backbone_messages(self, lineage: str, epoch: int) -> BackboneMessages:
        """A lineage's backbone: its manifest, signed now with the current key, and chunks.

        Built at every (re)connection rather than stored: after a key rotation
        (`provision remove-login aggregator` + `add-aggregator`) the manifest
        carries the new key's signature, so a re-imaged doorbell still installs it.
        """
        return build_backbone(
            site=self.config.site,
            signer=self.signer,
            version=0,
            round_id=0,
            float_model=self.backbone_models.float_model,
            int8_model=self.backbone_models.int8_model,
            lineage=lineage,
            epoch=epoch,
        )

    def _evaluate(self, weights: Weights) -> tuple[float | None, float]:
        """(open-set accuracy or None, threshold) of a head as the doorbells will hold it:
        with an int8 downlink the threshold (a cosine near 0.94) is calibrated on the
        decoded head, not on the float one it was quantised from."""
        settings: EvaluationSettings = self.config.evaluation
        held = self.held_out
        return evaluate_head(
            as_received(self.names, weights, self.config.rounds.downlink_codec),
            None if held is None else (held.features, held.persons),
            self.strangers,
            target_far=settings.target_false_accept,
            gallery_size=settings.gallery_size,
            default_threshold=(
                START_HEAD_THRESHOLD if settings.require_calibration else settings.default_threshold
            ),
        )

    @functools.cached_property
    def start_accuracy(self) -> float | None:
        """Open-set accuracy of a lineage's version 0 (the evaluation set is fixed per run)."""
        return self.accuracy(self.initial_weights())

    @property
    def uncalibrated(self) -> bool:
        """A site that must calibrate with neither strangers nor an evaluation set: it has
        no way to set a trained head's threshold and no gate for it here (with secure
        aggregation the doorbells calibrate it: aggregator/calibration.py)."""
        settings = self.config.evaluation
        return settings.require_calibration and self.strangers is None and self.held_out is None

    def accuracy(self, weights: Weights) -> float | None:
        """Open-set accuracy of a head on the evaluation set (None without one)."""
        return self._evaluate(weights)[0] if self.held_out is not None else None

    def release(
        self,
        weights: Weights,
        version: int,
        round_id: int,
        lineage: str,
        epoch: int,
        *,
        threshold: float | None = None,
    ) -> Release:
        """A version ready to publish: scored and calibrated here, or at `threshold` (set by
        the doorbells' federated calibration; then no accuracy: there is no evaluation set)."""
        accuracy: float | None = None
        if threshold is None:
            accuracy, threshold = self._evaluate(weights)
        global_payload = build_global(
            site=self.config.site,
            signer=self.signer,
            version=version,
            round_id=round_id,
            names=self.names,
            weights=weights,
            lineage=lineage,
            epoch=epoch,
            threshold=threshold,
            backbone=self.backbone_sha256,
            codec=self.config.rounds.downlink_codec,
        )
        return Release(
            version=version,
            round=round_id,
            weights=weights,
            global_payload=global_payload,
            accuracy=accuracy,
            threshold=threshold,
        )
