"""Who is at the door: backbone features → the federated head → nearest enrolled prototype.

Three things decide a name, and they change independently:

- the backbone (a TFLite model on LiteRT, float or int8), once per lineage;
- the head and the unknown-visitor threshold, with every global model;
- the prototypes, whenever the gallery changes (enrollment, removal, a label).

They live together in one immutable `Model` snapshot. A change builds the
next snapshot aside (loading an interpreter, embedding the gallery) and swaps
one reference under a lock, so a frame being recognised finishes on the
snapshot it started with, and a bad backbone or head is refused with a clear
error while the current snapshot stays in use.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edge.gallery import GalleryFeatures
from fedbell.faces.embedding import (
    Embeddings,
    Features,
    check_head,
    embed,
    feature_width,
    normalize,
)

# Moved to fedbell/ so the aggregator can use it; re-exported for edge code and tests.
from fedbell.faces.features import Backbone, BackboneError, Chip
from fedbell.faces.litert import interpreter_factory
from fedbell.faces.openset import UNKNOWN, identify, prototype
from fedbell.wire.codecs import Weights
from fedbell.wire.messages import GlobalModel

__all__ = ["UNKNOWN", "Model", "Recognizer", "RecognizerError", "interpreter_factory"]

log = logging.getLogger(__name__)

ModelKey = tuple[str, str, int]
"""(backbone sha256, lineage, head version): embeddings under one key compare."""


class RecognizerError(RuntimeError):
    """A backbone or head that cannot be used, or no model to recognise with yet."""


@dataclass(frozen=True)
class Head:
    """The federated head of one global model version, with what goes with it."""

    weights: Weights
    version: int
    lineage: str
    backbone: str
    """sha256 of the float backbone TFLite this head was trained on."""
    threshold: float

    @classmethod
    def of(cls, model: GlobalModel) -> Head:
        """The head a signed global model ships, with its threshold and backbone."""
        return cls(model.weights, model.version, model.lineage, model.backbone, model.threshold)

    @property
    def inputs(self) -> int:
        """Values per face it takes: pooled features, or a last-level model's level inputs."""
        return feature_width(self.weights)


@dataclass(frozen=True)
class Model:
    """One consistent state of the recogniser; never modified, only replaced."""

    backbone: Backbone | None = None
    backbone_id: str = ""
    """sha256 of the float flavour (the id global models name), whatever flavour runs."""
    head: Head | None = None
    gallery: GalleryFeatures | None = None
    persons: tuple[str, ...] = ()
    prototypes: Embeddings = dataclasses.field(default_factory=lambda: np.zeros((0, 0), np.float32))

    @property
    def ready(self) -> bool:
        """A backbone and the head made for it: faces can be embedded."""
        return (
            self.backbone is not None
            and self.head is not None
            and self.head.backbone == self.backbone_id
        )

    @property
    def key(self) -> ModelKey | None:
        if not self.ready or self.backbone is None or self.head is None:
            return None
        return (self.backbone.sha256, self.head.lineage, self.head.version)

    def embed(self, features: Features) -> Embeddings:
        if self.head is None:
            raise RecognizerError("no head yet: waiting for a global model")
        return embed(features, self.head.weights)


def _prototypes(
    gallery: GalleryFeatures | None, head: Head | None, backbone: Backbone | None
) -> tuple[tuple[str, ...], Embeddings]:
    """Each enrolled person's prototype under this head ((0, D) when anything is missing)."""
    if gallery is None or head is None or backbone is None or len(gallery) == 0:
        return (), np.zeros((0, 0), np.float32)
    if gallery.backbone != backbone.sha256:
        raise RecognizerError("gallery features come from another backbone")
    embeddings = embed(gallery.features, head.weights)
    rows = [prototype(embeddings[gallery.labels == i]) for i in range(len(gallery.persons))]
    return gallery.persons, np.stack(rows).astype(np.float32)


class Recognizer:
    """Names the person in an aligned chip, or "unknown"; hot-swappable and thread-safe."""

    def __init__(
        self,
        threshold_override: float | None = None,
        default_threshold: float = 0.5,
        num_threads: int = 1,
    ) -> None:
        self._override = threshold_override
        self._default = default_threshold
        self._threads = num_threads
        self._lock = threading.Lock()  # guards the reference swap
        self._write = threading.Lock()  # one rebuild at a time, so none is lost
        self._model = Model()
        # A head made for a backbone this doorbell does not run yet (a new lineage's):
        # the pair it has keeps serving until that backbone is installed, so a new
        # backbone that is refused never leaves the doorbell naming nobody.
        self._pending: Head | None = None

    # --- reading -----------------------------------------------------------------

    @property
    def model(self) -> Model:
        with self._lock:
            return self._model

    @property
    def ready(self) -> bool:
        return self.model.ready

    @property
    def version(self) -> int | None:
        head = self.model.head
        return None if head is None else head.version

    @property
    def backbone(self) -> Backbone | None:
        return self.model.backbone

    @property
    def persons(self) -> tuple[str, ...]:
        return self.model.persons

    @property
    def threshold(self) -> float:
        """The house's override, else the global model's calibrated one, else the default."""
        if self._override is not None:
            return self._override
        head = self.model.head
        return self._default if head is None else head.threshold

    # --- changing ----------------------------------------------------------------

    def _replace(self, **changes: object) -> Model:
        """Build the next snapshot from the current one and swap it in (caller holds _write)."""
        current = self.model
        fields = {f.name: getattr(current, f.name) for f in dataclasses.fields(Model)}
        fields.update(changes)
        backbone, head = fields["backbone"], fields["head"]
        gallery = fields["gallery"]
        assert backbone is None or isinstance(backbone, Backbone)
        assert head is None or isinstance(head, Head)
        assert gallery is None or isinstance(gallery, GalleryFeatures)
        # Only a head made for this backbone must fit it: a new lineage's head may
        # arrive before its backbone, and waits (not ready) until it does.
        made_for = head is not None and head.backbone == fields["backbone_id"]
        if backbone is not None and head is not None and made_for and head.inputs != backbone.size:
            raise RecognizerError(
                f"the head of model v{head.version} takes {head.inputs} features but the "
                f"backbone {backbone.sha256[:12]} gives {backbone.size}"
            )
        if gallery is not None and backbone is not None and gallery.backbone != backbone.sha256:
            gallery = fields["gallery"] = None  # stale: computed by the previous backbone
        fields["persons"], fields["prototypes"] = _prototypes(
            gallery, head if made_for else None, backbone
        )
        model = Model(**fields)
        with self._lock:
            self._model = model
        return model

    def install_backbone(self, tflite: bytes, backbone_id: str) -> Backbone:
        """Start running this backbone; RecognizerError (current one kept) if unusable.

        The gallery's features belong to the old backbone and are dropped: the
        caller computes them again and hands them over with `set_gallery`.
        """
        try:
            backbone = Backbone(tflite, self._threads)
            backbone.features([np.zeros((150, 150, 3), np.uint8)])  # fail here, not on a visitor
        except (BackboneError, ValueError) as err:
            raise RecognizerError(f"backbone {backbone_id[:12]} refused: {err}") from err
        with self._write:
            previous = self.model.backbone
            pending = self._pending
            if pending is not None and pending.backbone == backbone_id:
                self._pending = None
                self._replace(backbone=backbone, backbone_id=backbone_id, head=pending)
            else:
                self._replace(backbone=backbone, backbone_id=backbone_id)
        log.info(
            "backbone %s -> %s (%d features)",
            None if previous is None else previous.sha256[:12],
            backbone.sha256[:12],
            backbone.size,
        )
        return backbone

    def set_head(self, head: Head) -> None:
        """Recognise with this head from now on (prototypes recomputed at once)."""
        try:
            check_head(head.weights)
        except ValueError as err:
            raise RecognizerError(f"model v{head.version}: {err}") from err
        with self._write:
            current = self.model
            if current.ready and head.backbone != current.backbone_id:
                self._pending = head
                log.info(
                    "head v%d (lineage %s) waits for its backbone %s; v%s keeps serving",
                    head.version,
                    head.lineage,
                    head.backbone[:12],
                    None if current.head is None else current.head.version,
                )
                return
            self._pending = None
            self._replace(head=head)
        log.info(
            "head v%d (lineage %s), threshold %.3f", head.version, head.lineage, self.threshold
        )

    def set_gallery(self, gallery: GalleryFeatures) -> None:
        """New prototypes from the gallery's features (those of the current backbone)."""
        with self._write:
            backbone = self.model.backbone
            if backbone is None or gallery.backbone != backbone.sha256:
                raise RecognizerError("gallery features do not come from the current backbone")
            if gallery.features.shape[1:] != (backbone.size,):
                raise RecognizerError(
                    f"gallery features have shape {gallery.features.shape}, the backbone "
                    f"gives {backbone.size}"
                )
            self._replace(gallery=gallery)

    # --- recognising ---------------------------------------------------------------

    def features(self, chips: Sequence[Chip], model: Model | None = None) -> Features:
        model = model or self.model
        if model.backbone is None:
            raise RecognizerError("no backbone yet: waiting for the aggregator's TFLite artifact")
        return model.backbone.features(chips)

    def identify(
        self, embedding: npt.NDArray[np.float32], key: ModelKey | None = None
    ) -> tuple[str, float]:
        """(name or "unknown", similarity) of one embedding, against the current prototypes.

        `key` says which model produced the embedding: under any other one the
        similarity means nothing, and the visitor is unknown.
        """
        model = self.model
        if key is not None and key != model.key:
            return UNKNOWN, 0.0
        return self._identify(model, embedding)

    def _identify(self, model: Model, embedding: npt.NDArray[np.float32]) -> tuple[str, float]:
        if not model.ready or len(model.persons) == 0:
            return UNKNOWN, 0.0
        unit = normalize(np.asarray(embedding, np.float32)[None, :])[0]
        return identify(unit, model.prototypes, model.persons, self.threshold)

    def recognize(self, chip: Chip) -> tuple[str, float]:
        """(person or "unknown", cosine similarity to their prototype) for one aligned chip."""
        return self.recognize_batch([chip])[0]

    def recognize_batch(self, chips: Sequence[Chip]) -> list[tuple[str, float]]:
        """`recognize` over many chips, all on one snapshot even if a swap happens meanwhile."""
        model = self.model
        if not model.ready:
            return [(UNKNOWN, 0.0) for _ in chips]
        embeddings = model.embed(self.features(chips, model))
        return [self._identify(model, e) for e in embeddings]
