"""From pixels to backbone features: detect, align, run the frozen backbone.

Every path that turns an image into something the head embeds — enrollment,
live recognition, a doorbell's training set, the aggregator's calibration
and the benchmarks — goes through `face_chip` and `Backbone.features`, so a
face is prepared exactly one way everywhere.

The backbone is a TFLite model run with LiteRT (no TensorFlow): the
aggregator converts dlib's network once and ships it; it never changes
during a lineage, so features of a gallery are computed once and kept.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from fedbell.faces import last_level
from fedbell.faces.align import CHIP_SIZE, align_by_eyes, chip_from_box
from fedbell.faces.dataset import Sample
from fedbell.faces.detection import Detector, Face, largest
from fedbell.faces.embedding import Features
from fedbell.faces.litert import interpreter_factory

log = logging.getLogger(__name__)

Chip = npt.NDArray[np.uint8]
"""An aligned face, (CHIP_SIZE, CHIP_SIZE, 3) RGB."""


class BackboneError(ValueError):
    """A backbone model that cannot be loaded or does not have the expected shape."""


def read_photo(path: Path) -> npt.NDArray[np.uint8]:
    """A photo from disk as OpenCV reads it (BGR, or grey), or a ValueError naming it."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"{path}: not an image OpenCV can read")
    if image.dtype != np.uint8:
        raise ValueError(f"{path}: {image.dtype} pixels, expected 8-bit")
    return np.asarray(image, dtype=np.uint8)


MIN_EYE_SPREAD = 0.1
"""Eyes closer than this share of the box's width are not a face's eyes to align by."""


def face_chip(image: npt.NDArray[Any], face: Face) -> Chip:
    """The aligned chip of one detected face: by the eyes when the detector gave them, by
    the box when it gave none or eyes almost on one point. BlazeFace does that on a few
    degraded far frames (eyes 0.9 px apart on a 40 px face, seen in `make bench-openset`):
    aligning by them would blow a pixel up to the whole chip, and refusing the face would
    lose the frame's other faces with it."""
    right, left = face.right_eye, face.left_eye
    if right is not None and left is not None:
        spread = math.hypot(left[0] - right[0], left[1] - right[1])
        if spread >= max(1.0, MIN_EYE_SPREAD * face.box[2]):
            return align_by_eyes(image, right, left)
    return chip_from_box(image, face.box)


ENROL_MIRRORED = True
"""Enrolment from photos also enrols each photo's mirror image: +1.0 point of visit TAR
under `far` and +1.4 under `near` for the start head (`python -m bench.openset`, issue 20)."""


def mirror_image(image: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """The photo flipped left to right, for enrolment: the same person seen from the
    other side (the detector then finds and aligns the mirrored face anew; flipping a
    chip instead would move dlib's slightly off-centre eye template)."""
    return np.ascontiguousarray(np.asarray(image)[:, ::-1])


def enrolment_chips(
    image: npt.NDArray[Any], detector: Detector, *, mirrored: bool = ENROL_MIRRORED
) -> list[Chip]:
    """What one photo enrols: the chip of its largest face and, `mirrored`, that of its
    mirror image (nothing when the photo shows no face)."""
    chip = find_chip(image, detector)
    if chip is None:
        return []
    if not mirrored:
        return [chip]
    flipped = find_chip(mirror_image(image), detector)
    return [chip] if flipped is None else [chip, flipped]


def is_chip(image: npt.NDArray[Any]) -> bool:
    """A stored gallery crop is already an aligned chip (enrollment writes them so)."""
    return image.shape[:2] == (CHIP_SIZE, CHIP_SIZE)


def find_chip(image: npt.NDArray[Any], detector: Detector) -> Chip | None:
    """The largest face of a photo as a chip; a stored chip is taken as it is."""
    faces = detector.detect(image)
    if faces:
        return face_chip(image, largest(faces))
    if is_chip(image):
        return chip_from_box(image, (0, 0, CHIP_SIZE, CHIP_SIZE))
    return None


class Backbone:
    """One backbone TFLite model on LiteRT: aligned chips in, features out."""

    def __init__(self, tflite: bytes, num_threads: int = 1) -> None:
        self.sha256 = hashlib.sha256(tflite).hexdigest()
        try:
            self._interpreter = interpreter_factory()(model_content=tflite, num_threads=num_threads)
            self._interpreter.allocate_tensors()
        except Exception as err:  # LiteRT raises ValueError/RuntimeError on bad bytes
            raise BackboneError(f"backbone {self.sha256[:12]}: not a usable model: {err}") from err
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise BackboneError(f"backbone {self.sha256[:12]}: expected one input and one output")
        shape = tuple(int(v) for v in inputs[0]["shape"])
        if shape[1:] != (CHIP_SIZE, CHIP_SIZE, 3):
            raise BackboneError(
                f"backbone {self.sha256[:12]}: input {shape}, expected [n, {CHIP_SIZE}, "
                f"{CHIP_SIZE}, 3]"
            )
        if np.dtype(inputs[0]["dtype"]) != np.float32:
            raise BackboneError(f"backbone {self.sha256[:12]}: input must be float32")
        self._input = int(inputs[0]["index"])
        self._output = int(outputs[0]["index"])
        # A backbone cut before dlib's last level (the aggregator's `rounds.trainable:
        # last_level`) gives that level's input; a doorbell keeps only what the level reads.
        self.ends_before_last_level = tuple(outputs[0]["shape"][1:]) == last_level.INPUT_SHAPE
        self.size = (
            last_level.LEVEL_INPUTS
            if self.ends_before_last_level
            else int(np.prod(outputs[0]["shape"][1:]))
        )
        self._lock = threading.Lock()  # an interpreter runs one invoke at a time

    def features(self, chips: Sequence[Chip]) -> Features:
        """(N, size) features of aligned chips."""
        out = np.zeros((len(chips), self.size), dtype=np.float32)
        for i, chip in enumerate(chips):
            if chip.shape != (CHIP_SIZE, CHIP_SIZE, 3):
                raise ValueError(f"chip {i} has shape {chip.shape}, expected a {CHIP_SIZE} chip")
            with self._lock:
                self._interpreter.set_tensor(self._input, chip[None].astype(np.float32))
                self._interpreter.invoke()
                result = np.asarray(self._interpreter.get_tensor(self._output))
            out[i] = (
                last_level.compact(result)[0] if self.ends_before_last_level else result.reshape(-1)
            )
        if not np.all(np.isfinite(out)):
            raise BackboneError(f"backbone {self.sha256[:12]}: produced NaN or infinite features")
        return out


@dataclass(frozen=True)
class FaceSet:
    """Features of a folder's faces, one row per photo where a face was found."""

    persons: tuple[str, ...]
    features: Features
    missed: int


def photo_chips(
    samples: Sequence[Sample], detector: Detector
) -> tuple[list[Sample], list[Chip], int]:
    """(the photos a face was found in, their chips, how many had none)."""
    kept, chips, missed = [], [], 0
    for sample in samples:
        try:
            chip = find_chip(read_photo(sample.path), detector)
        except ValueError as err:
            log.warning("%s: %s", sample.path, err)
            chip = None
        if chip is None:
            missed += 1
            continue
        kept.append(sample)
        chips.append(chip)
    return kept, chips, missed


def cached_features(
    cache_dir: Path, samples: Sequence[Sample], backbone: Backbone, chips: Sequence[Chip]
) -> Features:
    key = hashlib.sha256(backbone.sha256.encode())
    for sample in samples:
        key.update(f"{sample.path}:{sample.path.stat().st_mtime_ns}".encode())
    """The backbone's features of these chips, from `cache_dir` when computed before."""
    path = cache_dir / f"features-{key.hexdigest()[:16]}.npy"
    if path.is_file():
        cached = np.load(path)
        if cached.shape == (len(chips), backbone.size):
            return np.asarray(cached, dtype=np.float32)
    features = backbone.features(chips)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, features)
    return features
