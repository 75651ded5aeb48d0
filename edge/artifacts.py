"""The doorbell's backbone and gallery: what the recognizer runs, and how well it does.

The aggregator publishes the backbone (dlib's network as float and int8
TFLite) once per lineage, retained. This module installs the configured
flavour into the recognizer, stores it for the next start, recomputes the
gallery's features when the backbone changes, hands the gallery to the
recognizer whenever it changes (enrollment, removal, a label: `refresh`,
polled every fraction of a second) and scores it for the status.

`load_stored` runs once at start, before the node connects; `accept` runs on
paho's thread and only claims the artifact; `install` and `refresh` are slow
(an interpreter to load, new chips to run) and run on the node's worker or
the gallery watcher.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import Counter
from collections.abc import Callable

import numpy as np

from edge.config import EdgeConfig
from edge.gallery import Gallery, GalleryFeatures
from edge.recognizer import Recognizer, RecognizerError
from edge.state import NodeState, StoredArtifact
from fedbell.faces.embedding import Features, embed
from fedbell.faces.histograms import MISNAMED, genuine_scores, stranger_scores
from fedbell.wire.codecs import Weights
from fedbell.wire.messages import TfliteArtifact

log = logging.getLogger(__name__)

MIN_PER_PERSON_TO_SCORE = 2
"""Leave-one-out needs another image of the same person to score an image."""

FEW_PHOTOS = 3
"""A person enrolled from fewer photos is named less surely: the status counts them."""


def _photos(count: int) -> str:
    return f"{count} photo{'' if count == 1 else 's'}"


def gallery_summary(gallery: GalleryFeatures, accuracy: float | None) -> str:
    """What an operator can act on: people, photos, how many people have too few photos,
    how many photos look more like someone else. Counts only: the status leaves the
    house, names do not (the doorbell's own log names them)."""
    photos = Counter(gallery.persons[int(label)] for label in gallery.labels)
    few = sorted(person for person in gallery.persons if photos[person] < FEW_PHOTOS)
    people = len(gallery.persons)
    parts = [f"{people} {'person' if people == 1 else 'people'}, {_photos(len(gallery))}"]
    if few:
        log.info("fewer than %d photos: %s", FEW_PHOTOS, ", ".join(few))
        parts.append(f"{len(few)} with fewer than {FEW_PHOTOS} photos: enroll more")
    if gallery.skipped:
        parts.append(f"{_photos(len(gallery.skipped))} without a usable face")
    if accuracy is not None and accuracy < 1.0:
        parts.append(f"{1 - accuracy:.0%} of photos look more like someone else")
    return "; ".join(parts)


def leave_one_out(
    gallery: GalleryFeatures,
    head: Weights,
    threshold: float | None = None,
    strangers: Features | None = None,
) -> float | None:
    """Share of gallery images whose nearest prototype, built without them, is their person's.

    Each image is scored against prototypes made from all other images; a
    person with a single image has no prototype left and is not scored.
    None when nothing can be scored.

    With `threshold` it is scored open-set, as the doorbell decides at the door:
    an image counts only if that prototype is also at least `threshold` similar,
    and each of `strangers` (the stranger store) counts if no prototype of the
    whole gallery reaches the threshold. A head that keeps the ranking but
    names nobody, or lets strangers in, at the threshold it ships with then
    scores as badly as it serves (issue 18 item 2).
    """
    embeddings = embed(gallery.features, list(head))
    genuine = genuine_scores(embeddings, gallery.labels)
    named = genuine > MISNAMED if threshold is None else genuine >= threshold
    hits, total = int(np.sum(named)), len(genuine)
    if threshold is not None and strangers is not None and len(strangers):
        visitors = stranger_scores(embed(strangers, list(head)), embeddings, gallery.labels)
        hits, total = hits + int(np.sum(visitors < threshold)), total + len(visitors)
    return None if total == 0 else hits / total


class Artifacts:
    """Installs backbones into the recognizer, keeps its gallery current, scores it."""

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
        """Called once `detail` describes a new backbone or head, to publish the status.

        Not after a gallery change: enrolling someone sends nothing anywhere; the
        new detail goes out with the next status the node publishes anyway."""
        self.gallery_accuracy: float | None = None
        self.detail = ""
        """The gallery's score, for the node's status."""
        self.gallery_features: GalleryFeatures | None = None
        self._stored = state.load_artifact()
        # Guards the claimed artifact: paho's thread claims, the worker gives back a failure.
        self._lock = threading.Lock()
        # A stored backbone of the other flavour (the config changed) is not "known":
        # the retained artifact is installed again in the configured flavour.
        stored = self._stored
        flavour_changed = stored is not None and stored.flavour != config.inference.flavour
        self._known: tuple[str, int] | None = (
            None if stored is None or flavour_changed else (stored.lineage, stored.version)
        )
        self._installed = self._known
        self._refresh_lock = threading.Lock()
        self._signature: object = None
        self._scored: object = None

    @property
    def backbone_id(self) -> str:
        return self.recognizer.model.backbone_id

    def load_stored(self) -> StoredArtifact | None:
        """Install the backbone the last run stored; return it if it loaded."""
        stored = self._stored
        if stored is None:
            return None
        if not self._load(stored):  # unusable, so not known: a retained copy may replace it
            with self._lock:
                self._known = self._installed = None
            return None
        return stored

    def wants(self, lineage: str, version: int) -> bool:
        """Whether a backbone is worth fetching: another lineage's, or a newer one of this one."""
        with self._lock:
            known = self._known
            return known is None or lineage != known[0] or version > known[1]

    def accept(self, artifact: TfliteArtifact) -> bool:
        """Claim `artifact` for installing, unless it is not wanted (see `wants`)."""
        with self._lock:
            known = self._known
            if known is not None and artifact.lineage == known[0] and artifact.version <= known[1]:
                log.info("backbone v%d ignored: already have v%d", artifact.version, known[1])
                return False
            self._known = (artifact.lineage, artifact.version)
        return True

    def install(self, artifact: TfliteArtifact) -> None:
        """Swap an accepted backbone into the recognizer, store it, redo the gallery."""
        if self.config.inference.flavour == "int8" and artifact.int8_model:
            model, flavour = artifact.int8_model, "int8"
        else:
            model, flavour = artifact.float_model, "float"
        stored = StoredArtifact(
            version=artifact.version,
            round=artifact.round,
            flavour=flavour,
            model=model,
            lineage=artifact.lineage,
            backbone_id=hashlib.sha256(artifact.float_model).hexdigest(),
        )
        if not self._load(stored):
            with self._lock:  # let a corrected re-publication in
                self._known = self._installed
            return
        try:
            self.state.save_artifact(stored)
        except OSError as err:
            self.counters["store_failed"] += 1
            log.error("could not store backbone v%d: %s", stored.version, err)

    def _load(self, stored: StoredArtifact) -> bool:
        current = self.recognizer.backbone
        if current is not None and current.sha256 == hashlib.sha256(stored.model).hexdigest():
            self._installed = (stored.lineage, stored.version)  # same bytes: nothing to redo
            return True
        try:
            self.recognizer.install_backbone(stored.model, stored.backbone_id)
        except RecognizerError as err:
            self.counters["bad_artifact"] += 1
            log.warning("backbone v%d refused, keeping the current one: %s", stored.version, err)
            return False
        self._installed = (stored.lineage, stored.version)
        self.refresh(force=True)
        return True

    def refresh(self, force: bool = False) -> bool:
        """Hand the recognizer the gallery if it changed (cheap when it did not).

        Called by the gallery watcher several times a second, after a label,
        and after a new backbone or head. Returns whether anything was redone.
        """
        with self._refresh_lock:
            model = self.recognizer.model
            backbone = model.backbone
            if backbone is None:
                return False
            signature = (self.gallery.signature(), backbone.sha256)
            if signature == self._signature and not force:
                self._score(publish=True)  # only does anything under a new head
                return False
            try:
                features = self.gallery.features(
                    backbone, self.config.training.max_images_per_person
                )
                self.recognizer.set_gallery(features)
            except (RecognizerError, OSError, ValueError) as err:
                self.counters["gallery_error"] += 1
                log.warning("gallery not updated: %s", err)
                return False
            self._signature = signature
            self.gallery_features = features
            log.info(
                "gallery: %d person(s), %d image(s)%s",
                len(features.persons),
                len(features),
                f", {len(features.skipped)} without a usable face" if features.skipped else "",
            )
            self._score(force=True, publish=force)
            return True

    def _score(self, force: bool = False, publish: bool = False) -> None:
        """Leave-one-out accuracy of the gallery under the current head, for the status."""
        features = self.gallery_features
        model = self.recognizer.model
        key = (id(features), model.key)
        if (key == self._scored and not force) or features is None:
            return
        self._scored = key
        if model.head is None or not model.ready:
            self.gallery_accuracy = None
            self.detail = f"{gallery_summary(features, None)}; waiting for a model"
        else:
            self.gallery_accuracy = leave_one_out(features, model.head.weights)
            summary = gallery_summary(features, self.gallery_accuracy)
            self.detail = f"model v{model.head.version}: {summary}"
        log.info("%s", self.detail)
        if publish:
            self.on_scored()
