"""A visit's chips: cut from the full-resolution stream, scored, the best ones decide.

The doorbell detects and tracks faces on a small frame (fast) and cuts each
aligned chip from the full-resolution frame of the same instant (pixels: a
face 40 px wide in a 640-pixel frame is 96 px wide in a 1536-pixel one).
`scale_face` maps a face found on the small frame onto the large one.

A visit is decided from its best chips, not its first: `chip_quality` scores
a chip by the pixels the face had, the chip's sharpness and how frontal the
face looks, and `visit_embedding` averages the embeddings of the `keep` best.
The live pipeline (`edge.pipeline.Track`) and the open-set benchmark
(`bench.openset_visits`) both decide visits with these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from edge.frames import FramePair
from fedbell.faces.detection import Face
from fedbell.faces.embedding import normalize
from fedbell.faces.features import Chip, face_chip

FULL_DETAIL_PX = 100.0
"""A face box this wide fills dlib's 150-pixel chip (its face spans ~100 px): wider adds
no detail, narrower is upsampled and scores lower."""

SHARPNESS_HALF = 60.0
"""Laplacian variance (of the half-size grey chip) at which sharpness scores 0.5."""

MIN_FRONTAL = 0.05
"""The frontal score never reaches 0: a profile is still a face, only a poor one."""


def scale_face(face: Face, sx: float, sy: float) -> Face:
    """`face` found on a small frame, in the pixels of a frame `sx` × `sy` times larger."""
    if not (sx > 0 and sy > 0):
        raise ValueError(f"scale factors must be positive, got {sx}, {sy}")
    x, y, w, h = face.box
    box = (
        round(x * sx),
        round(y * sy),
        max(1, round(w * sx)),
        max(1, round(h * sy)),
    )

    def point(p: tuple[float, float] | None) -> tuple[float, float] | None:
        return None if p is None else (p[0] * sx, p[1] * sy)

    return Face(box, face.score, point(face.right_eye), point(face.left_eye))


@dataclass(frozen=True)
class Cut:
    """The chips of one frame's faces, and where they were cut from."""

    chips: list[Chip]
    qualities: list[float]
    """`chip_quality` of each chip."""
    face_px: list[int]
    """Each face's width in the pixels its chip was cut from."""
    full_resolution: bool
    """The chips were cut from the full-resolution frame (else from the small one)."""
    mismatched: bool
    """The pair's two streams were not captured together."""


def cut_chips(pair: FramePair, faces: Sequence[Face]) -> Cut:
    """The chips of the faces found on `pair.small`: cut from the full frame when both were
    captured together, else from the small frame (a full frame of another instant may show
    the face elsewhere). A frame without faces never reads its full frame (a replay decodes
    it only here)."""
    source, scale = pair.small, (1.0, 1.0)
    mismatched = pair.two_streams and not pair.matched
    if faces and pair.matched and pair.full_frame is not None:
        source, scale = pair.full_frame, pair.scale()
    chips, qualities, widths = [], [], []
    for face in faces:
        placed = face if source is pair.small else scale_face(face, *scale)
        chip = face_chip(source, placed)
        chips.append(chip)
        qualities.append(chip_quality(placed, chip))
        widths.append(placed.box[2])
    return Cut(chips, qualities, widths, source is not pair.small, mismatched)


def chip_quality(face: Face, chip: npt.NDArray[np.uint8]) -> float:
    """How much a chip is worth to a visit, in (0, 1]: size × sharpness × frontality.

    `face` is in the pixels of the image the chip was cut from. Size: the box
    width against FULL_DETAIL_PX. Sharpness: the Laplacian variance of the
    chip halved (the halving averages away most sensor noise, which would
    otherwise look like detail). Frontality: how far the eyes' midpoint sits
    from the box centre, in box widths (a turned head moves the eyes to one
    side); a detector without eyes is taken as frontal (Haar finds frontal faces).
    """
    size = min(1.0, face.box[2] / FULL_DETAIL_PX)
    grey = cv2.cvtColor(np.asarray(chip, np.uint8), cv2.COLOR_RGB2GRAY)
    half = cv2.resize(grey, (grey.shape[1] // 2, grey.shape[0] // 2), interpolation=cv2.INTER_AREA)
    variance = float(cv2.Laplacian(half, cv2.CV_32F).var())
    sharpness = variance / (variance + SHARPNESS_HALF)
    frontal = 1.0
    if face.right_eye is not None and face.left_eye is not None:
        middle = (face.right_eye[0] + face.left_eye[0]) / 2
        offset = abs(middle - (face.box[0] + face.box[2] / 2)) / face.box[2]
        frontal = max(MIN_FRONTAL, 1.0 - 3.0 * offset)
    return max(1e-6, size * sharpness * frontal)


def best_indices(qualities: Sequence[float], keep: int) -> list[int]:
    """Indices of the `keep` best chips, best first (the earlier chip wins a tie)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    order = sorted(range(len(qualities)), key=lambda i: (-qualities[i], i))
    return order[:keep]


def visit_embedding(
    embeddings: npt.ArrayLike, qualities: Sequence[float], keep: int
) -> npt.NDArray[np.float32]:
    """What a visit says: the normalised mean of the embeddings of its `keep` best chips."""
    array = np.asarray(embeddings, np.float32)
    if array.ndim != 2 or len(array) == 0 or len(array) != len(qualities):
        raise ValueError(
            f"a visit needs one quality per embedding, got {array.shape} and {len(qualities)}"
        )
    chosen = array[best_indices(qualities, keep)]
    return np.asarray(normalize(chosen.mean(axis=0, keepdims=True))[0], np.float32)
