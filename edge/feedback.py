"""Recent event face chips, kept briefly so a resident can label them.

A label command names the person of a recent visitor event; its aligned chip
then joins the gallery, so the very next visit is named (no round needed), and
the next training round learns from it. Chips stay in memory only, bounded in
number and age, so a doorbell never accumulates faces nobody asked it to keep.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from edge.gallery import IGNORE, Gallery, GalleryError
from edge.gallery import check_person_name as _check_name
from fedbell.errors import RejectedMessage
from fedbell.wire import safejson

log = logging.getLogger(__name__)

__all__ = ["IGNORE", "FeedbackError", "RecentCrops", "apply_label", "check_person_name"]


class FeedbackError(ValueError):
    """A label command that cannot be applied; the message says why."""


def check_person_name(name: str) -> str:
    """A gallery folder name: letters, digits, '_' and '-', no path tricks."""
    try:
        return _check_name(name)
    except GalleryError as err:
        raise FeedbackError(str(err)) from None


@dataclass(frozen=True)
class StoredCrop:
    png: bytes
    """The chip, PNG-encoded: lossless (the gallery stores PNG too) and half the size
    of the array (~32 of 66 kB for a 150x150 chip), which matters with up to
    `event_crops_max` (200) of them held for an hour."""
    stored_at: float
    predicted: str

    @property
    def crop(self) -> npt.NDArray[np.uint8]:
        """The chip exactly as it was stored."""
        return np.asarray(cv2.imdecode(np.frombuffer(self.png, np.uint8), cv2.IMREAD_UNCHANGED))


def _png(crop: npt.NDArray[np.uint8]) -> bytes:
    ok, encoded = cv2.imencode(".png", crop)
    if not ok:
        raise ValueError(f"a crop of shape {crop.shape} cannot be stored as PNG")
    return encoded.tobytes()


class RecentCrops:
    """event_id → the aligned RGB chip of that event, oldest evicted first."""

    def __init__(
        self,
        max_count: int = 200,
        max_age_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_count = max_count
        self._max_age = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._crops: OrderedDict[str, StoredCrop] = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._crops)

    def add(self, event_id: str, crop: npt.NDArray[np.uint8], predicted: str) -> None:
        if self._max_count == 0:
            return
        with self._lock:
            self._crops[event_id] = StoredCrop(_png(crop), self._clock(), predicted)
            self._expire()
            while len(self._crops) > self._max_count:
                self._crops.popitem(last=False)

    def take(self, event_id: str) -> StoredCrop:
        """Remove and return the crop of `event_id` (FeedbackError if unknown or expired)."""
        with self._lock:
            self._expire()
            stored = self._crops.pop(event_id, None)
        if stored is None:
            raise FeedbackError(
                f"event {event_id!r} is unknown or older than "
                f"{self._max_age:.0f}s (or beyond the last {self._max_count})"
            )
        return stored

    def _expire(self) -> None:
        cutoff = self._clock() - self._max_age
        while self._crops:
            oldest = next(iter(self._crops.values()))
            if oldest.stored_at >= cutoff:
                break
            self._crops.popitem(last=False)


def apply_label(
    store: RecentCrops,
    gallery: Gallery,
    payload: bytes,
    on_named: Callable[[str], object] | None = None,
) -> Path | None:
    """Handle one label command; returns the stored chip's path (None for "ignore").

    `on_named(event_id)` runs once the visitor is in the gallery: the stranger
    store forgets them, so nobody trains as their own stranger.

    payload: JSON `{"event_id": "...", "person": "alice"}` or `"person": "ignore"`.
    """
    try:
        message = safejson.loads(payload)  # bounded size and depth: never RecursionError
    except RejectedMessage as err:
        raise FeedbackError(f"label command is not acceptable JSON: {err}") from None
    if not isinstance(message, dict):
        raise FeedbackError("label command must be a JSON object")
    event_id, person = message.get("event_id"), message.get("person")
    if not isinstance(event_id, str) or not isinstance(person, str):
        raise FeedbackError('label command needs string "event_id" and "person"')
    if person != IGNORE:
        check_person_name(person)
    stored = store.take(event_id)
    if person == IGNORE:
        log.info("label: event %s ignored (was %s)", event_id, stored.predicted)
        return None
    try:
        (path,) = gallery.add(person, [stored.crop], prefix=f"event-{event_id[:32]}")
    except (GalleryError, OSError) as err:
        raise FeedbackError(f"event {event_id}: could not add it to {person}: {err}") from err
    log.info("label: event %s stored as %s (was %s)", event_id, path, stored.predicted)
    if on_named is not None:
        on_named(event_id)
    return path
