"""Faces, heads and a recognizer for the doorbell's recognition tests.

The backbone is the real one (dlib's network as TFLite, the `backbone_models`
session fixture in conftest.py); the head is dlib's own projection, exactly
what version 0 of a lineage ships. Faces are generated cartoons
(`fedbell.faces.synthetic`): measured on them, BlazeFace finds 36 of 36 faces
pasted into porch scenes, and dlib's descriptor names 18 of 18 of six
identities right (rank 1) from three enrolled chips each, but with a thin
margin (same person: cosine >= 0.965; others: <= 0.968). So the tests set the
threshold themselves where it matters and assert rank-1 names, not a
calibrated false-accept rate, which only real photos can give.
"""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from edge.gallery import Gallery
from edge.recognizer import Head, Recognizer
from fedbell.faces import dlib_resnet, last_level
from fedbell.faces.detection import BlazeFaceDetector, Detector
from fedbell.faces.features import Chip, face_chip
from fedbell.faces.synthetic import IdentityParams, make_identities, make_scene, render_face

SEED = 11
PERSONS = 6
"""Synthetic identities of the tests: the first ones are enrolled, the others strangers."""
LINEAGE = "test-lineage"

Frame = npt.NDArray[np.uint8]


@functools.cache
def identities() -> tuple[IdentityParams, ...]:
    return tuple(make_identities(PERSONS, SEED))


@functools.cache
def detector() -> Detector:
    return BlazeFaceDetector()


@functools.cache
def projection() -> npt.NDArray[np.float32]:
    """dlib's final projection: the head of version 0."""
    [head] = last_level.start_model(dlib_resnet.load())
    return head


def frames_of(person: int, count: int, seed: int) -> list[Frame]:
    """Porch frames (640×480 BGR) with one face of `person` in each."""
    rng = np.random.default_rng(seed)
    return [
        make_scene([render_face(identities()[person], rng, 96)], rng).frame for _ in range(count)
    ]


def chips_of(person: int, count: int, seed: int) -> list[Chip]:
    """Aligned chips made as enrollment makes them: scene → BlazeFace → align."""
    chips = []
    for frame in frames_of(person, count * 2, seed):
        faces = detector().detect(frame)
        if faces:
            chips.append(face_chip(frame, faces[0]))
        if len(chips) == count:
            return chips
    raise AssertionError(f"BlazeFace found only {len(chips)} of {count} faces of {person}")


def write_frames(folder: Path, frames: list[Frame]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        assert cv2.imwrite(str(folder / f"{i:03d}.png"), frame)


def head(
    version: int = 0,
    backbone: str = "",
    threshold: float = 0.0,
    lineage: str = LINEAGE,
    weights: npt.NDArray[np.float32] | None = None,
) -> Head:
    return Head(
        weights=[projection() if weights is None else weights],
        version=version,
        lineage=lineage,
        backbone=backbone,
        threshold=threshold,
    )


def enrolled_gallery(folder: Path, persons: int) -> Gallery:
    """A gallery with persons 0 .. persons-1 enrolled from three chips each."""
    gallery = Gallery(folder)
    for person in range(persons):
        gallery.add(f"person{person}", chips_of(person, 3, 100 + person))
    return gallery


def ready_recognizer(
    tflite: bytes, backbone_id: str, gallery: Gallery | None = None, threshold: float = 0.0
) -> Recognizer:
    """A recognizer with the backbone, dlib's head and (optionally) a gallery's prototypes."""
    recognizer = Recognizer()
    backbone = recognizer.install_backbone(tflite, backbone_id)
    recognizer.set_head(head(backbone=backbone_id, threshold=threshold))
    if gallery is not None:
        recognizer.set_gallery(gallery.features(backbone))
    return recognizer


Floats = npt.NDArray[np.float32]


def clustered_house(
    seed: int, people: int = 4, photos: int = 5, width: int = 24, out: int = 8
) -> tuple[Floats, npt.NDArray[np.int64], Floats, Floats]:
    """A house's features (its people as clusters), its strangers, and a start head:
    for the head's training step, without a backbone."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(people, width))
    x = np.concatenate([c + 0.7 * rng.normal(size=(photos, width)) for c in centres])
    y = np.repeat(np.arange(people), photos)
    z = rng.normal(size=(7, width))
    head = rng.normal(size=(width, out)) / np.sqrt(width)
    return x.astype(np.float32), y.astype(np.int64), z.astype(np.float32), head.astype(np.float32)
