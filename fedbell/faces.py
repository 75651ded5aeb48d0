"""The one face-crop normalisation, shared by training, enrollment and recognition.

A model only recognises crops prepared exactly like the crops it was trained
on, so every path that turns pixels into model input goes through
`normalize_face`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

FACE_SIZE = 64
"""Side of the square grey crop the model sees."""

Box = tuple[int, int, int, int]
"""A face box in pixels: x, y, width, height."""

FloatImage = npt.NDArray[np.float32]
UInt8Image = npt.NDArray[np.uint8]


def to_grey(image: npt.NDArray[Any]) -> UInt8Image:
    """An 8-bit single-channel copy of a grey, BGR or BGRA image."""
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
    elif image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim != 2:
        raise ValueError(f"expected a grey or colour image, got shape {image.shape}")
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def normalize_face(crop: npt.NDArray[Any], size: int = FACE_SIZE) -> FloatImage:
    """Grey, resized to size×size, histogram-equalised, scaled to [0, 1].

    Equalisation removes most of the difference between a dim porch at night
    and a sunny afternoon, which otherwise dominates what a small CNN learns.
    """
    grey = to_grey(crop)
    if grey.shape[0] < 2 or grey.shape[1] < 2:
        raise ValueError(f"face crop too small: {grey.shape}")
    interpolation = cv2.INTER_AREA if grey.shape[0] >= size else cv2.INTER_LINEAR
    resized = cv2.resize(grey, (size, size), interpolation=interpolation)
    equalised = cv2.equalizeHist(resized)
    return (equalised.astype(np.float32) / 255.0).astype(np.float32)


def crop_face(frame: npt.NDArray[Any], box: Box, margin: float = 0.1) -> UInt8Image:
    """The grey square around a detected face box, widened by `margin` per side."""
    grey = to_grey(frame)
    x, y, w, h = box
    side = round(max(w, h) * (1.0 + 2.0 * margin))
    cx, cy = x + w / 2.0, y + h / 2.0
    x0 = max(0, round(cx - side / 2.0))
    y0 = max(0, round(cy - side / 2.0))
    x1 = min(grey.shape[1], x0 + side)
    y1 = min(grey.shape[0], y0 + side)
    if x1 - x0 < 2 or y1 - y0 < 2:
        raise ValueError(f"face box {box} lies outside the {grey.shape[1]}x{grey.shape[0]} frame")
    return grey[y0:y1, x0:x1]


def read_image(path: Path) -> UInt8Image:
    """A grey image from disk, or a ValueError naming the file."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError(f"{path}: not an image OpenCV can read")
    return np.asarray(image, dtype=np.uint8)


def load_face(path: Path, size: int = FACE_SIZE) -> FloatImage:
    """A gallery crop from disk, normalised for the model."""
    return normalize_face(read_image(path), size)
