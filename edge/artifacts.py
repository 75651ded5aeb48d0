"""The doorbell's TFLite artifact: which one recognises visitors, and how well it does.

The aggregator publishes every model version twice: as weights, which the
node trains on, and as a TFLite artifact, which the recognizer runs. This
module handles the second: it picks the configured flavour, hot-swaps the
recognizer, stores the artifact for the next start and scores it on the local
gallery.

`load_stored` runs once at start, before the node connects; `accept` runs on
paho's thread and only claims the version; `install` and `score_gallery` are
slow (an interpreter to load, the gallery to run) and run as jobs on the
node's worker.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable

import numpy as np

from edge.config import EdgeConfig
from edge.gallery import Gallery
from edge.recognizer import ModelArtifact, Recognizer, RecognizerError
from edge.state import NodeState, StoredArtifact
from fedbell.messages import TfliteArtifact

log = logging.getLogger(__name__)


class Artifacts:
    """Installs TFLite artifacts into the recognizer, stores them and scores them."""

    def __init__(
        self,
        config: EdgeConfig,
        recognizer: Recognizer,
        *,
        state: NodeState,
        gallery: Gallery,
        counters: Counter[str],
        on_scored: Callable[[], None],
    ) -> None:
        self.config = config
        self.recognizer = recognizer
        self.state = state
        self.gallery = gallery
        self.counters = counters
        """The node's counters: refused and unstorable artifacts are counted there."""
        self.on_scored = on_scored
        """Called once `detail` describes a new artifact, to publish the status."""
        self.gallery_accuracy: float | None = None
        self.detail = ""
        """The last artifact's score, for the node's status."""
        self._stored = state.load_artifact()
        # Guards `_known_version`: paho's thread claims versions, the worker
        # gives back one that failed to install.
        self._lock = threading.Lock()
        # The newest version installed or queued: older re-publications are skipped.
        self._known_version = None if self._stored is None else self._stored.version
        self._installed_version = self._known_version

    def load_stored(self) -> StoredArtifact | None:
        """Install the artifact the last run stored; return it if it loaded, to be scored."""
        stored = self._stored
        if stored is None:
            return None
        if not self._load(stored):  # unusable, so not known: a retained copy may replace it
            with self._lock:
                self._known_version = self._installed_version = None
            return None
        return stored

    def accept(self, artifact: TfliteArtifact) -> bool:
        """Whether `artifact` is newer than any known one; if so, it becomes the known one."""
        with self._lock:
            known = self._known_version
            if known is not None and artifact.version <= known:
                log.info("TFLite v%d ignored: already have v%d", artifact.version, known)
                return False
            self._known_version = artifact.version
        return True

    def install(self, artifact: TfliteArtifact) -> None:
        """Swap an accepted artifact into the recognizer, store it and score it."""
        if self.config.inference.flavour == "int8":
            model, flavour = (
                (artifact.int8_model, "int8")
                if artifact.int8_model
                else (artifact.float_model, "float")
            )
        else:
            model, flavour = (
                (artifact.float_model, "float")
                if artifact.float_model
                else (artifact.int8_model, "int8")
            )
        stored = StoredArtifact(
            version=artifact.version,
            round=artifact.round,
            flavour=flavour,
            model=model,
            labels=artifact.labels,
            threshold=artifact.threshold,
        )
        if not self._load(stored):
            with self._lock:  # let a corrected re-publication of this version in
                self._known_version = self._installed_version
            return
        try:
            self.state.save_artifact(stored)
        except OSError as err:
            self.counters["store_failed"] += 1
            log.error("could not store TFLite v%d: %s", stored.version, err)
        self.score_gallery(stored)

    def _load(self, stored: StoredArtifact) -> bool:
        try:
            self.recognizer.swap(
                ModelArtifact(
                    tflite=stored.model,
                    labels=stored.labels,
                    threshold=stored.threshold,
                    version=stored.version,
                )
            )
        except RecognizerError as err:
            self.counters["bad_artifact"] += 1
            log.warning("TFLite v%d refused, keeping the current one: %s", stored.version, err)
            return False
        self._installed_version = stored.version
        return True

    def score_gallery(self, stored: StoredArtifact) -> None:
        """Run the new artifact on the local gallery: the first sign of a bad model."""
        data = self.gallery.training_set(stored.labels, self.config.training.max_images_per_person)
        if len(data) == 0:
            self.gallery_accuracy = None
            self.detail = f"TFLite v{stored.version}: no gallery images of its labels"
        else:
            probabilities = self.recognizer.probabilities_batch(list(data.images))
            hits = np.argmax(probabilities, axis=1) == data.labels
            self.gallery_accuracy = float(np.mean(hits))
            self.detail = (
                f"TFLite v{stored.version} ({stored.flavour}): gallery accuracy "
                f"{self.gallery_accuracy:.2f} on {len(data)} images"
            )
        log.info("%s", self.detail)
        self.on_scored()
