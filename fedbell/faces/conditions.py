"""Doorbell conditions: a seeded degradation of a whole photo, as a doorbell camera sees it.

Photos of people in the wild (LFW) are sharp, well lit, in colour, with the
face about 110 px wide. A doorbell's camera is none of these: at night it
sees in grey through infra-red, by day it faces the light or the dusk, its
small sensor is noisy, a visitor moves, stands one to three metres away
(a face 30–70 px wide in a 640×480 frame), and the frame reaches the
recogniser through a video encoder. `doorbell_conditions` applies all of that
to the WHOLE photo, before detection, so the detector and the aligner see
what a doorbell sees:

1. blur (motion or focus): a Gaussian of σ 0.5–1.6 px at the photo's scale;
2. distance: the photo is scaled down so that an LFW face (≈110 px) becomes
   32–65 px wide (factor 0.29–0.59, area interpolation) — the frame stays
   at that resolution, like the part of a doorbell frame around the visitor;
3. night vision in half of the photos: grey (an IR camera has no colour),
   with the IR illuminator's uneven light (brighter centre, vignetting to
   55–85 % at the corners);
4. low light: exposure 0.35–0.9 of the original and a gamma of 1.0–1.8
   (dark shadows, faces at dusk or against the light);
5. sensor noise after the camera's own denoising: shot noise (Poisson-like,
   σ = 0.25–0.55·√signal) plus read noise of σ 1.5–4.5 grey levels;
6. compression: JPEG at quality 35–75 (a video stream's I-frame).

Every parameter is drawn from `rng`, so one photo under one seed is always
degraded the same way (the benchmark seeds it from the photo's path and the
run's seed). The output is a uint8 BGR image (three equal channels at night),
as a camera delivers it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

Image = npt.NDArray[np.uint8]

LFW_FACE_PX = 110.0
"""Width of a face in an LFW photo (250×250), roughly."""


@dataclass(frozen=True)
class DoorbellSetting:
    """The parameters drawn for one photo (returned for reports and tests)."""

    blur_sigma: float
    face_px: float
    night: bool
    vignette: float
    exposure: float
    gamma: float
    read_noise: float
    shot_noise: float
    jpeg_quality: int


def draw_setting(rng: np.random.Generator) -> DoorbellSetting:
    """One photo's conditions, from the ranges in the module docstring."""
    return DoorbellSetting(
        blur_sigma=float(rng.uniform(0.5, 1.6)),
        face_px=float(rng.uniform(32.0, 65.0)),
        night=bool(rng.random() < 0.5),
        vignette=float(rng.uniform(0.55, 0.85)),
        exposure=float(rng.uniform(0.35, 0.9)),
        gamma=float(rng.uniform(1.0, 1.8)),
        read_noise=float(rng.uniform(1.5, 4.5)),
        shot_noise=float(rng.uniform(0.25, 0.55)),
        jpeg_quality=int(rng.integers(35, 76)),
    )


def apply_setting(
    image: npt.NDArray[Any], setting: DoorbellSetting, rng: np.random.Generator
) -> Image:
    """`image` (uint8 BGR or grey) degraded by `setting`; `rng` draws the noise."""
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or min(array.shape[:2]) < 8:
        raise ValueError(
            f"expected a uint8 photo at least 8 px wide, got {array.dtype} {array.shape}"
        )
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    pixels = np.asarray(
        cv2.GaussianBlur(array[..., :3].astype(np.float32), (0, 0), setting.blur_sigma), np.float32
    )
    factor = min(1.0, setting.face_px / LFW_FACE_PX)
    height, width = pixels.shape[:2]
    size = (max(8, round(width * factor)), max(8, round(height * factor)))
    pixels = np.asarray(cv2.resize(pixels, size, interpolation=cv2.INTER_AREA), np.float32)
    if setting.night:
        grey = cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY)
        ys, xs = np.mgrid[0 : grey.shape[0], 0 : grey.shape[1]].astype(np.float32)
        radius = np.hypot(
            (xs - (grey.shape[1] - 1) / 2) / max(1.0, grey.shape[1] / 2),
            (ys - (grey.shape[0] - 1) / 2) / max(1.0, grey.shape[0] / 2),
        ) / np.sqrt(2.0)
        grey = grey * (1.0 - (1.0 - setting.vignette) * radius**2)
        pixels = np.stack([grey] * 3, axis=-1)
    pixels = 255.0 * setting.exposure * (np.clip(pixels, 0, 255) / 255.0) ** setting.gamma
    # Shot noise ~ sqrt(signal) (scaled per photo), read noise constant; one draw for all
    # channels at night (a monochrome sensor), per channel by day.
    shape = pixels.shape[:2] + ((1,) if setting.night else (3,))
    noise = rng.standard_normal(shape).astype(np.float32)
    sigma = np.sqrt(setting.shot_noise**2 * pixels + setting.read_noise**2)
    pixels = pixels + sigma * noise
    degraded = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    ok, buffer = cv2.imencode(".jpg", degraded, [cv2.IMWRITE_JPEG_QUALITY, setting.jpeg_quality])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 BGR image
        raise RuntimeError("JPEG encoding failed")
    decoded = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    return np.ascontiguousarray(decoded, dtype=np.uint8)


def doorbell_conditions(image: npt.NDArray[Any], rng: np.random.Generator) -> Image:
    """`image` (a whole uint8 BGR or grey photo) as a doorbell would capture it."""
    return apply_setting(image, draw_setting(rng), rng)
