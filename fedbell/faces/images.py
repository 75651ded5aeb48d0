"""Small image helpers: face boxes, grey conversion, and the closed-set version's crop.

Model input is prepared in one place only, `fedbell/faces/features.py` (detect,
align, backbone); what remains here is shared by the detectors and by reading
galleries written before the open-world model (`crop_face`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

Box = tuple[int, int, int, int]
"""A face box in pixels: x, y, width, height."""

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
