"""Which global model (the head) the doorbell installs, and handing it to the recognizer.

A model arriving on the global topic passes these gates, in order, before
anything changes: it parses and verifies (`parse_global`, signed when keys are
configured); a new lineage must not be older than the current one
(`refuse_older_lineage`); within a lineage it must be newer, and must not
serve this house's gallery far worse than the installed head; and its head
must fit the backbone. Only then is it stored, installed and announced.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from edge.artifacts import leave_one_out
from edge.backbone_download import refuse_older_lineage
from edge.parts import DoorbellParts
from edge.recognizer import Head, RecognizerError
from fedbell.errors import RejectedMessage
from fedbell.faces import last_level
from fedbell.faces.embedding import feature_width
from fedbell.wire.codecs import MODEL_GROWTH, model_decode_limit
from fedbell.wire.messages import GlobalModel, parse_global

log = logging.getLogger(__name__)

NewLineage = Callable[[GlobalModel | None, GlobalModel], None]
"""Called (with the lock held) when a model of another lineage is about to be installed:
the current model (None if there is none) and the new one."""


def decode_limit(current: GlobalModel | None) -> int:
    """The most a global model may inflate to: from the shapes this node expects, not from
    the header's claim. That is its current model's, with room to grow, or the same head
    with dlib's last level (an aggregator set to `rounds.trainable: last_level` starts a
    new lineage whose model holds 21 times a head's values)."""
    if current is None:
        return model_decode_limit(None)
    with_level = MODEL_GROWTH * 4 * (last_level.VALUES + int(current.weights[-1].size))
    return max(model_decode_limit(current.weights), with_level)


class ModelInstaller:
    """The installed global model: the gates a new one passes, and installing it."""

    def __init__(
        self,
        parts: DoorbellParts,
        *,
        changed: threading.Condition,
        on_new_lineage: NewLineage,
        on_installed: Callable[[], None],
    ) -> None:
        """`changed` guards the model (and the round state beside it) and is notified when
        a new model is installed; `on_installed` runs after that (the status goes out)."""
        self.parts = parts
        self.changed = changed
        self._on_new_lineage = on_new_lineage
        self._on_installed = on_installed
        self._model: GlobalModel | None = parts.state.load_global()
        if self._model is not None:
            self.give_head(self._model)

    @property
    def model(self) -> GlobalModel | None:
        return self._model

    @property
    def version(self) -> int | None:
        model = self._model
        return None if model is None else model.version

    def on_global(self, payload: bytes) -> None:
        """A global model message: install it, or raise RejectedMessage (nothing changed)."""
        current = self._model
        model = parse_global(
            payload,
            site=self.parts.config.site,
            max_bytes=self.parts.config.mqtt.max_message_bytes,
            keys=self.parts.keys,
            max_decoded_bytes=decode_limit(current),
        )
        new_lineage = current is None or model.lineage != current.lineage
        if new_lineage and current is not None:
            refuse_older_lineage(current, model.lineage, model.epoch)
        if not new_lineage and current is not None and model.version <= current.version:
            log.info("global model v%d ignored: already at v%d", model.version, current.version)
            return
        if not new_lineage and current is not None:
            self._refuse_if_worse_on_gallery(current, model)
        # Refused (and counted) before anything changes if its head cannot serve.
        self.give_head(model, strict=True)
        try:
            self.parts.state.save_global(model)
        except OSError as err:  # keep serving; the retained copy restores it after a restart
            self.parts.counters["store_failed"] += 1
            log.error("could not store global model v%d: %s", model.version, err)
        with self.changed:
            if new_lineage:
                self._on_new_lineage(current, model)
            self._model = model
            self.changed.notify_all()
        log.info(
            "global model v%d from round %d (lineage %s, threshold %.3f)",
            model.version,
            model.round,
            model.lineage,
            model.threshold,
        )
        self._on_installed()

    def _refuse_if_worse_on_gallery(self, current: GlobalModel, model: GlobalModel) -> None:
        """RejectedMessage if the new head serves this house far worse than the installed
        one: leave-one-out on the gallery and the stranger store, open-set at each head's
        own threshold (issue 13 item 1, issue 18 item 2). A new lineage is never refused
        (a reset must not deadlock), nor is a gallery too small to score."""
        drop = self.parts.config.accept.max_gallery_accuracy_drop
        features = self.parts.artifacts.gallery_features
        if drop is None or features is None or model.backbone != current.backbone:
            return
        if features.features.shape[1:] != (feature_width(model.weights),):
            return  # a head that cannot take these features: give_head refuses it (bad_shapes)
        backbone = self.parts.recognizer.backbone
        store = self.parts.strangers
        strangers = None if backbone is None else store.features(backbone.sha256, backbone.size)
        before = leave_one_out(features, current.weights, current.threshold, strangers)
        after = leave_one_out(features, model.weights, model.threshold, strangers)
        if before is None or after is None or after >= before - drop:
            return
        raise RejectedMessage(
            "worse_on_gallery",
            f"global model v{model.version} decides {after:.0%} of this gallery and its "
            f"strangers right at its threshold {model.threshold:.3f} (leave-one-out), "
            f"v{current.version} {before:.0%}: more than {drop:.0%} worse "
            f"(accept.max_gallery_accuracy_drop); keeping v{current.version}",
        )

    def give_head(self, model: GlobalModel, strict: bool = False) -> None:
        """Hand a global model's head and threshold to the recognizer.

        `strict`: a head the recognizer refuses raises RejectedMessage (a new model);
        otherwise it is counted and logged (the stored model, at start-up)."""
        try:
            self.parts.recognizer.set_head(Head.of(model))
        except RecognizerError as err:
            if strict:
                raise RejectedMessage("bad_shapes", str(err)) from None
            self.parts.counters["bad_shapes"] += 1
            log.warning("stored model v%d unusable: %s", model.version, err)
