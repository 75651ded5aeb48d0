"""Face chips for dlib's face-recognition network (see `fedbell.faces.dlib_resnet`).

dlib's network was trained on 150×150 RGB chips cut by dlib's own
`get_face_chip(image, shape, size=150, padding=0.25)`: a similarity transform
fitted to five landmarks. A descriptor is only as good as its chip is like
those, so both functions here aim at the same geometry:

* `align_by_eyes`: a rotation + scale + translation that puts the two eye
  centres exactly where dlib's chips put them on average (for detectors with
  eye keypoints, e.g. BlazeFace);
* `chip_from_box`: an upright square derived from a box, placed where dlib's
  chip lands on average relative to OpenCV's frontal Haar box (for detectors
  without landmarks).

"Right eye" is the subject's right eye, which is on the LEFT of the image
(smaller x) for a face looking at the camera; "left eye" is on the image right.
Images follow OpenCV's convention: grey (H, W), BGR (H, W, 3) or BGRA
(H, W, 4); the chip is RGB, uint8, (150, 150, 3), as dlib's network wants.
Outside the image is black, as in dlib's chips.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

CHIP_SIZE = 150

# Where dlib's get_face_chip(size=150, padding=0.25) puts the eye centres, in
# chip pixels (x, y). Measured, not derived: dlib 20.0.1 (dlib-bin wheel), HOG
# detector + 5-point shape predictor on the 385 single-face photos among 400
# random LFW strangers (../shared/datasets/lfw_strangers); each eye centre is
# the mean of its two corner landmarks, mapped into the chip by the chip's own
# transform, then averaged over faces (spread about 1.4 px each way). dlib's
# five-point template alone would say (47.7, 47.1) and (100.3, 47.1); the fit
# to all five points, nose included, moves the eyes up and together a little.
RIGHT_EYE = (47.08, 46.64)  # subject's right eye: image left
LEFT_EYE = (99.97, 46.58)  # subject's left eye: image right

# Where dlib's chip lies relative to a box from OpenCV's
# haarcascade_frontalface_default (scaleFactor 1.1, minNeighbors 5), measured
# on the 361 of those photos with exactly one Haar box (medians): the chip's
# centre is the box centre moved right by 0.008 and down by 0.088 of the box
# size, and the chip's side is 0.993 box widths (spread: 0.02, 0.02, 0.08).
BOX_SHIFT = (0.008, 0.088)
BOX_SIDE = 0.993

# Shrinking by more than this with bilinear sampling skips pixels (aliasing);
# dlib downsamples through an image pyramid then, we pre-shrink with INTER_AREA.
_MAX_BILINEAR_SHRINK = 2.0

Image = npt.NDArray[Any]
Chip = npt.NDArray[np.uint8]


def to_rgb(image: Image) -> npt.NDArray[np.uint8]:
    """An RGB uint8 copy of a grey, BGR or BGRA image (grey replicated to 3 channels)."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (3, 4)):
        raise ValueError(f"expected a grey, BGR or BGRA image, got shape {img.shape}")
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"empty image {img.shape}")
    if img.dtype != np.uint8:
        img = np.clip(np.nan_to_num(img), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        return np.ascontiguousarray(np.repeat(img[:, :, None], 3, axis=2))
    code = cv2.COLOR_BGR2RGB if img.shape[2] == 3 else cv2.COLOR_BGRA2RGB
    return np.ascontiguousarray(cv2.cvtColor(img, code), dtype=np.uint8)


def eyes_transform(
    right_eye: tuple[float, float], left_eye: tuple[float, float]
) -> npt.NDArray[np.float64]:
    """The 2×3 similarity matrix taking image points to chip points (eyes to template)."""
    src = np.asarray([right_eye, left_eye], dtype=np.float64)
    dst = np.asarray([RIGHT_EYE, LEFT_EYE], dtype=np.float64)
    if src.shape != (2, 2) or not np.all(np.isfinite(src)):
        raise ValueError(f"eye points must be two finite (x, y) pairs, got {right_eye}, {left_eye}")
    d_src, d_dst = src[1] - src[0], dst[1] - dst[0]
    distance = math.hypot(*d_src)
    if distance < 1.0:
        raise ValueError(f"eyes {distance:.2f} px apart: not a face")
    # As complex numbers the similarity is z ↦ a·z + b with a = d_dst / d_src.
    a = complex(*d_dst) / complex(*d_src)
    linear = np.array([[a.real, -a.imag], [a.imag, a.real]])
    shift = dst[0] - linear @ src[0]
    return np.hstack([linear, shift[:, None]])


def align_by_eyes(
    image: Image, right_eye: tuple[float, float], left_eye: tuple[float, float]
) -> Chip:
    """The 150×150 RGB chip with the eye centres where dlib's chips have them.

    `right_eye` is the subject's right eye (image left), `left_eye` the
    subject's left eye (image right), both (x, y) in image pixels.
    """
    return warp_to_chip(image, eyes_transform(right_eye, left_eye))


def box_transform(box: tuple[float, float, float, float]) -> npt.NDArray[np.float64]:
    """The 2×3 matrix taking image points to chip points for a face box (x, y, w, h)."""
    x, y, w, h = (float(v) for v in box)
    if not (w > 0 and h > 0 and all(math.isfinite(v) for v in (x, y, w, h))):
        raise ValueError(f"face box must have a positive, finite size, got {box}")
    centre_x = x + w / 2 + BOX_SHIFT[0] * w
    centre_y = y + h / 2 + BOX_SHIFT[1] * h
    scale = CHIP_SIZE / (BOX_SIDE * w)  # chip pixels per image pixel
    middle = (CHIP_SIZE - 1) / 2
    return np.array(
        [[scale, 0.0, middle - scale * centre_x], [0.0, scale, middle - scale * centre_y]]
    )


def chip_from_box(image: Image, box: tuple[float, float, float, float]) -> Chip:
    """The 150×150 RGB chip for a detector box (x, y, w, h) without landmarks.

    Without eyes there is no rotation: the face lands where dlib's chip has it
    on average for an upright face; tilted heads stay tilted.
    """
    return warp_to_chip(image, box_transform(box))


def warp_to_chip(image: Image, matrix: npt.NDArray[np.float64]) -> Chip:
    """Apply an image→chip 2×3 similarity matrix (bilinear, black outside).

    Only the region the chip samples is converted to RGB: from a full-resolution
    frame (1536×864) that is a few per cent of it, not a 4 MB copy per face.
    """
    checked = np.asarray(image)
    if checked.ndim == 3 and checked.shape[2] == 1:
        checked = checked[:, :, 0]
    if checked.ndim not in (2, 3) or checked.shape[0] < 1 or checked.shape[1] < 1:
        raise ValueError(f"expected a grey, BGR or BGRA image, got shape {checked.shape}")
    matrix = np.asarray(matrix, dtype=np.float64)
    x0, y0, x1, y1 = _seen_region(matrix, *checked.shape[:2])
    rgb = to_rgb(checked[y0:y1, x0:x1])
    matrix = matrix @ np.array([[1.0, 0.0, x0], [0.0, 1.0, y0], [0.0, 0.0, 1.0]])
    scale = math.sqrt(abs(np.linalg.det(matrix[:, :2])))
    if scale * _MAX_BILINEAR_SHRINK < 1.0:
        # A big face: average it down first (an image pyramid, as dlib does).
        rgb, matrix = _shrink(rgb, matrix, scale)
    chip = cv2.warpAffine(
        rgb,
        matrix,
        (CHIP_SIZE, CHIP_SIZE),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0),
    )
    return np.ascontiguousarray(chip, dtype=np.uint8)


def _seen_region(
    matrix: npt.NDArray[np.float64], height: int, width: int
) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the image pixels a chip's bilinear samples can reach, with a
    2-pixel margin, clipped to the image (at least one pixel)."""
    inverse = cv2.invertAffineTransform(matrix)
    corners = np.array([[0, 0, 1], [CHIP_SIZE, 0, 1], [0, CHIP_SIZE, 1], [CHIP_SIZE] * 2 + [1]])
    seen = corners @ inverse.T
    x0 = int(np.clip(np.floor(seen[:, 0].min()) - 2, 0, width - 1))
    y0 = int(np.clip(np.floor(seen[:, 1].min()) - 2, 0, height - 1))
    x1 = int(np.clip(np.ceil(seen[:, 0].max()) + 2, x0 + 1, width))
    y1 = int(np.clip(np.ceil(seen[:, 1].max()) + 2, y0 + 1, height))
    return x0, y0, x1, y1


def _shrink(
    rgb: npt.NDArray[np.uint8], matrix: npt.NDArray[np.float64], scale: float
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float64]]:
    x0, y0, x1, y1 = _seen_region(matrix, *rgb.shape[:2])
    crop = rgb[y0:y1, x0:x1]
    factor = scale * _MAX_BILINEAR_SHRINK  # < 1: leaves a 2× bilinear step at most
    size = (max(1, round(crop.shape[1] * factor)), max(1, round(crop.shape[0] * factor)))
    small = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
    fx, fy = size[0] / crop.shape[1], size[1] / crop.shape[0]
    # small pixel centre u ↔ crop coordinate (u + 0.5) / f - 0.5 (INTER_AREA's convention)
    to_crop = np.array([[1 / fx, 0, 0.5 / fx - 0.5 + x0], [0, 1 / fy, 0.5 / fy - 0.5 + y0]])
    full = np.vstack([to_crop, [0, 0, 1]])
    return np.asarray(small, np.uint8), matrix @ full
