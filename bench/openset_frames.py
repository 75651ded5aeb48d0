"""Visits as a doorbell captures them: several frames of one scene per photo, as features.

A probe at the door is a visit, not a photo: the visitor walks up while the
camera films. Each photo becomes `frames` frames of one scene: night vision,
the light (vignette, exposure, gamma) and the stream's JPEG quality are drawn
once per photo (the scene); the distance (face size), blur and sensor noise
are drawn again for every frame. Frame 0 under `far` is exactly the frame
`fedbell.faces.conditions.doorbell_conditions` makes (today's frame-level bench).

Conditions:

- `far`: the face as a 640×480 frame has it, 32-65 px wide; detected and cut
  from that frame (one stream);
- `near`: a visitor at ring distance filmed by the two-stream doorbell: the
  face is 80-160 px wide on the full-resolution stream (capped at the photo's
  own ~110 px: no pixels are invented), found by the detector on a copy
  scaled down as the small stream is (`DETECTION_SCALE`), mapped back by
  `edge.chips.scale_face` and cut from the full-resolution frame, as the
  pipeline does;
- `clean`: the photo itself (one frame: a clean visit has nothing to add).

Each frame's chip is scored by `edge.chips.chip_quality` (the doorbell's own
choice of its best chips). Features, flags and qualities are cached in
`reports/cache/openset-frames-<conditions>-s<seed>-<backbone>.npz` under
`<photo key>#<frame>`, computed by `jobs` processes of one thread each.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from bench.openset_features import (
    WORKER,
    CachedFeatures,
    Photo,
    compute_in_workers,
    condition_rng,
)
from edge.recognition_config import CameraConfig
from fedbell.faces.detection import largest
from fedbell.faces.features import mirror_image

VisitConditions = Literal["far", "near", "clean"]
FAR_FACE_PX = (32.0, 65.0)
NEAR_FACE_PX = (80.0, 160.0)
_DEFAULT_CAMERA = CameraConfig()
DETECTION_SCALE = _DEFAULT_CAMERA.width / float(_DEFAULT_CAMERA.full_width or _DEFAULT_CAMERA.width)
"""The small stream's width over the full stream's, in the default doorbell configuration."""


def frame_key(key: str, frame: int) -> str:
    return f"{key}#{frame}"


def frame_image(
    image: npt.NDArray[np.uint8], key: str, seed: int, frame: int, conditions: VisitConditions
) -> npt.NDArray[np.uint8]:
    """Frame `frame` of the visit made from `image` (the photo `key`) under one seed."""
    from fedbell.faces.conditions import apply_setting, draw_setting

    if conditions == "clean":
        return image
    scene_rng = condition_rng(key, seed)
    scene = draw_setting(scene_rng)
    if conditions == "far" and frame == 0:
        return apply_setting(image, scene, scene_rng)  # = doorbell_conditions(image, ...)
    rng = np.random.default_rng([seed, zlib.crc32(key.encode()), frame, 17])
    low, high = FAR_FACE_PX if conditions == "far" else NEAR_FACE_PX
    setting = replace(
        scene,
        blur_sigma=float(rng.uniform(0.5, 1.6)),
        face_px=float(rng.uniform(low, high)),
        read_noise=float(rng.uniform(1.5, 4.5)),
        shot_noise=float(rng.uniform(0.25, 0.55)),
    )
    return apply_setting(image, setting, rng)


def frame_chip(
    image: npt.NDArray[np.uint8], conditions: VisitConditions, detector: Any
) -> tuple[npt.NDArray[np.uint8] | None, int, float]:
    """(chip or None, flag 0 none / 1 box / 2 eyes, quality) of one frame's largest face."""
    import cv2

    from edge.chips import chip_quality, scale_face
    from fedbell.faces.features import face_chip

    small = image
    if conditions == "near":
        height, width = image.shape[:2]
        size = (max(8, round(width * DETECTION_SCALE)), max(8, round(height * DETECTION_SCALE)))
        small = np.asarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA), np.uint8)
    faces = detector.detect(small)
    if not faces:
        return None, 0, 0.0
    face = largest(faces)
    if conditions == "near":
        face = scale_face(face, image.shape[1] / small.shape[1], image.shape[0] / small.shape[0])
    chip = face_chip(image, face)
    return chip, 2 if face.right_eye is not None else 1, chip_quality(face, chip)


FrameBatch = tuple[list[tuple[str, str, int]], VisitConditions, int, bool]
"""(path, photo key, frame index) of each frame, conditions, seed, mirrored."""
Filmed = tuple[npt.NDArray[np.float32], list[int], list[float]]


def _extract(job: FrameBatch) -> Filmed:
    import cv2

    items, conditions, seed, mirrored = job
    out = np.full((len(items), WORKER["backbone"].size), np.nan, np.float32)
    flags, qualities = [], []
    images: dict[str, Any] = {}
    for i, (path, key, frame) in enumerate(items):
        if path not in images:
            images = {path: cv2.imread(path, cv2.IMREAD_COLOR)}
        image = images[path]
        if image is None:
            raise ValueError(f"{path}: not an image OpenCV can read")
        if mirrored:  # the product's enrolment mirror, before the camera's degradations
            image = mirror_image(image)
        degraded = frame_image(image, key, seed, frame, conditions)
        chip, flag, quality = frame_chip(degraded, conditions, WORKER["detector"])
        if chip is not None:
            out[i] = WORKER["backbone"].features([chip])[0]
        flags.append(flag)
        qualities.append(quality)
    return out, flags, qualities


@dataclass
class FrameCache(CachedFeatures):
    """Features, flags and chip qualities per `<photo key>#<frame>`, for one
    (conditions, seed, backbone): an npz under reports/cache."""

    quality: dict[str, float] = field(default_factory=dict)

    @classmethod
    def open(
        cls,
        folder: Path,
        conditions: VisitConditions,
        seed: int,
        backbone_sha: str,
        *,
        mirrored: bool = False,
    ) -> FrameCache:
        tag = "clean" if conditions == "clean" else f"{conditions}-s{seed}"
        tag += "-mirrored" if mirrored else ""
        return cls(folder / f"openset-frames-{tag}-{backbone_sha[:16]}.npz").load()

    def _load_more(self, keys: list[str], data: Any) -> None:
        self.quality.update(zip(keys, (float(q) for q in data["quality"]), strict=True))

    def _more(self, keys: list[str]) -> dict[str, npt.NDArray[Any]]:
        return {"quality": np.asarray([self.quality[k] for k in keys], np.float32)}

    def frames(self, key: str, count: int) -> list[tuple[npt.NDArray[np.float32], float]]:
        """(features, quality) of the frames of photo `key` where a face was found."""
        found = []
        for index in range(count):
            name = frame_key(key, index)
            if self.flags.get(name, 0) > 0:
                found.append((self.features[name], self.quality[name]))
        return found


def extract_frames(
    wanted: Sequence[tuple[Photo, int]],
    cache: FrameCache,
    backbone: bytes,
    *,
    conditions: VisitConditions,
    seed: int,
    detector: str,
    jobs: int,
    chunk: int = 100,
    mirrored: bool = False,
) -> None:
    """Fill `cache` with the first `frames` frames of each (photo, frames) it lacks
    (`mirrored`: of the photo flipped left to right, for mirrored enrolment chips)."""
    missing = [
        (str(photo.path), photo.key, index)
        for photo, count in wanted
        for index in range(1 if conditions == "clean" else count)
        if frame_key(photo.key, index) not in cache.features
    ]
    if not missing:
        return
    print(f"  computing {len(missing)} frames ({conditions}, seed {seed})", flush=True)
    batches = [
        (missing[i : i + chunk], conditions, seed, mirrored) for i in range(0, len(missing), chunk)
    ]

    def store(batch: FrameBatch, result: Filmed) -> int:
        for (_, key, index), row, flag, quality in zip(batch[0], *result, strict=True):
            name = frame_key(key, index)
            cache.features[name] = row
            cache.flags[name] = flag
            cache.quality[name] = quality
        return len(batch[0])

    pool = (backbone, detector, jobs)
    compute_in_workers(batches, _extract, store, cache, pool, unit="frames", save_every=2000)
