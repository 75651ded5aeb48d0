"""A round's local training: its base model, this house's data, the trained delta.

Runs on the node's worker thread. Every reason to sit a round out (the
deadline passed, the base model never came, no backbone for it, an empty
gallery, a head that does not fit, nothing to tell apart) is logged and
answered with None: the round goes on without this doorbell.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field

import numpy as np
import numpy.typing as npt

from edge.gallery import GalleryFeatures, StrangerPart
from edge.installer import ModelInstaller
from edge.parts import DoorbellParts
from edge.state import KeptAdam
from edge.trainer import TrainedDelta, round_seed, train_delta
from fedbell.errors import RejectedMessage
from fedbell.faces import histograms
from fedbell.faces.embedding import AdamMoments, Features, TrainParams
from fedbell.wire.codecs import Weights
from fedbell.wire.envelope import TensorSpec
from fedbell.wire.messages import GlobalModel
from fedbell.wire.protocol import RoundAnnouncement

log = logging.getLogger(__name__)

BASE_POLL_S = 1.0
"""How often waiting for a base model looks at the stop flag, between notifications."""


@dataclass
class RoundTraining:
    """Trains the round's base model's head on the gallery and the stranger store."""

    parts: DoorbellParts
    _: KW_ONLY
    models: ModelInstaller
    stopping: threading.Event
    """Set when the node closes: a training waiting for its base model gives up."""
    trainings: int = field(default=0, init=False)
    """Trainings run (including those whose head then did not move)."""
    kept_adam: KeptAdam | None = field(default=None, init=False)
    """The local Adam's state from this doorbell's last round, kept when the plan says
    `adam_moments: kept` (stored in the state folder, dropped with the lineage)."""

    def __post_init__(self) -> None:
        self.kept_adam = self.parts.state.load_moments()

    def train(
        self,
        announcement: RoundAnnouncement,
        residual: Weights | None,
        ready: Callable[[], None] | None = None,
    ) -> tuple[GlobalModel, TrainedDelta] | None:
        """The client step's training from the round's base model; None to skip the round.

        `ready`: called once the base model and the training data are here, just before
        training (a secure round advertises its keys then)."""
        number = announcement.round
        if time.time() > announcement.deadline:
            log.info("round %d: deadline already passed; skipping", number)
            return None
        base = self._wait_for_base(announcement)
        if base is None:
            return None
        part: StrangerPart = "train" if announcement.train.hold_out_strangers else "all"
        found = self._training_data(number, base, part)
        if found is None:
            return None
        data, strangers = found
        if ready is not None:
            ready()
        plan = announcement.train
        params = TrainParams(
            epochs=plan.epochs,
            batch_size=plan.batch_size,
            learning_rate=plan.learning_rate,
            optimizer=plan.optimizer,
            prox_mu=plan.prox_mu,
            adam_moments=plan.adam_moments,
            seed=round_seed(self.parts.device, number),
        )
        log.info(
            "round %d: training on %d gallery images of %d person(s) and %d strangers "
            "from model v%d",
            number,
            len(data),
            len(data.persons),
            len(strangers),
            base.version,
        )
        try:
            result = train_delta(
                base.weights,
                data.features,
                data.labels,
                strangers,
                params,
                residual=residual,
                moments=self._moments_for(base),
            )
        except ValueError as err:
            self.parts.counters["bad_shapes"] += 1
            log.warning(
                "round %d: base model v%d does not fit this node: %s", number, base.version, err
            )
            return None
        self.trainings += 1
        moments = result.moments if plan.adam_moments == "kept" else None
        self._keep(None if moments is None else KeptAdam(base.lineage, moments))
        if not math.isfinite(result.loss):
            # One person and no strangers: nothing to tell apart, the head did not move.
            log.warning(
                "round %d: nothing to learn from (one person, no strangers yet); skipping", number
            )
            return None
        return base, result

    def forget_moments(self) -> None:
        """A new lineage: the old head's Adam state means nothing to the new one."""
        self._keep(None)

    def _moments_for(self, base: GlobalModel) -> AdamMoments | None:
        """The kept Adam, if it trained a head of `base`'s lineage."""
        kept = self.kept_adam
        return kept.moments if kept is not None and kept.lineage == base.lineage else None

    def _keep(self, kept: KeptAdam | None) -> None:
        """Remember (or, with None, forget) the local Adam's state, in the state folder too."""
        if kept is None and self.kept_adam is None:
            return
        self.kept_adam = kept
        try:
            if kept is None:
                self.parts.state.clear_moments()
            else:
                self.parts.state.save_moments(kept)
        except OSError as err:
            self.parts.counters["store_failed"] += 1
            log.error("could not store the local Adam's state: %s", err)

    def calibration_vector(
        self, announcement: RoundAnnouncement, ready: Callable[[], None]
    ) -> npt.NDArray[np.float64] | None:
        """A calibration round's vector (fedbell/faces/histograms.py): the round's heads
        scored on the stranger store and the gallery; None to sit the round out (the same
        reasons as training, or a plan this doorbell cannot score, counted)."""
        number, plan, calibration = announcement.round, announcement.secagg, announcement.calibrate
        assert plan is not None
        assert calibration is not None
        if time.time() > announcement.deadline:
            log.info("round %d: deadline already passed; skipping", number)
            return None
        base = self._wait_for_base(announcement)
        found = None if base is None else self._training_data(number, base, "calibrate")
        if base is None or found is None:
            return None
        data, strangers = found
        names = zip(base.names, base.weights, strict=True)
        specs = [TensorSpec(name=n, shape=w.shape) for n, w in names]
        try:
            if (plan.dimension, plan.density) != (histograms.VECTOR_SIZE, 1.0):
                raise RejectedMessage(
                    "bad_calibration_plan",
                    f"the plan masks {plan.dimension} values at density {plan.density}, a "
                    f"calibration vector is {histograms.VECTOR_SIZE} at density 1",
                )
            candidate, start = calibration.heads(specs)
            vector = histograms.house_vector(
                candidate, start, data.features, data.labels, strangers
            )
        except (RejectedMessage, ValueError) as err:
            reason = err.reason if isinstance(err, RejectedMessage) else "bad_calibration_plan"
            self.parts.counters[reason] += 1
            log.warning("round %d: cannot score the calibration heads: %s", number, err)
            return None
        ready()
        log.info(
            "round %d: calibration: scored %d gallery images and %d strangers",
            number,
            len(data),
            len(strangers),
        )
        return vector

    def _training_data(
        self, number: int, base: GlobalModel, part: StrangerPart
    ) -> tuple[GalleryFeatures, Features] | None:
        """The gallery's features and the strangers' (`part` of the store), under the base
        model's backbone."""
        backbone = self.parts.recognizer.backbone
        if backbone is None or self.parts.artifacts.backbone_id != base.backbone:
            self.parts.counters["no_backbone"] += 1  # missing, or refused (counted by its reason)
            log.warning(
                "round %d: no backbone %s for model v%d yet; skipping",
                number,
                base.backbone[:12],
                base.version,
            )
            return None
        per_person = self.parts.config.training.max_images_per_person
        data = self.parts.gallery.features(backbone, per_person)
        if len(data) == 0:
            log.warning("round %d: the gallery is empty (nobody enrolled); skipping", number)
            return None
        return data, self.parts.strangers.features(backbone.sha256, backbone.size, part)

    def _wait_for_base(self, announcement: RoundAnnouncement) -> GlobalModel | None:
        """The round's base model, waiting a while for it to arrive; None to skip."""
        wanted = announcement.base_version
        lineage = announcement.lineage  # None: an aggregator that does not name it
        wait_s = self.parts.config.training.base_model_wait_s
        until = min(announcement.deadline, time.time() + wait_s)
        with self.models.changed:
            while True:
                model = self.models.model
                same = model is not None and lineage in (None, model.lineage)
                if model is not None and same and model.version == wanted:
                    return model
                if model is not None and same and model.version > wanted:
                    log.warning(
                        "round %d: base is v%d but this node already has v%d; skipping",
                        announcement.round,
                        wanted,
                        model.version,
                    )
                    return None
                left = until - time.time()
                if left <= 0 or self.stopping.is_set():
                    log.warning(
                        "round %d: base model v%d never arrived (have %s); skipping",
                        announcement.round,
                        wanted,
                        self.models.version,
                    )
                    return None
                self.models.changed.wait(min(left, BASE_POLL_S))
