"""Synthetic face identities, for tests and demos that must not need real photos.

Each identity is a handful of stable features (face shape, eye spacing, brows,
nose, mouth, hair, skin tone); each image of it varies shift, scale, rotation,
lighting, noise and expression. The drawing follows the light/dark pattern a
Haar frontal-face cascade looks for: dark eye band and brows over lighter
cheeks, a light nose bridge between the eyes, a dark mouth, all on an oval
lit from the front, so OpenCV finds these faces when pasted into a frame.

Everything is deterministic given the `numpy.random.Generator` passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

UInt8Image = npt.NDArray[np.uint8]
FloatArray = npt.NDArray[np.float64]

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class IdentityParams:
    """The stable features of one synthetic person (all in face-relative units)."""

    face_width: float  # half-width of the face oval, fraction of image side
    face_height: float  # half-height of the face oval
    skin: float  # skin brightness 0..255
    eye_spacing: float  # half distance between eye centres
    eye_height: float  # eye line, fraction of image side from the top
    eye_size: float
    brow_gap: float  # brow above eye
    brow_thickness: float
    brow_slant: float  # radians; positive = angry, negative = worried
    nose_length: float
    nose_width: float
    mouth_width: float
    mouth_height: float  # vertical position
    lip_thickness: float
    hair: float  # hair brightness
    hair_line: float  # how far the hair comes down the forehead
    hair_style: int  # 0 short, 1 side parting, 2 long at the sides
    background: float


@dataclass(frozen=True)
class Scene:
    """A BGR frame and the boxes (x, y, w, h) of the faces pasted into it."""

    frame: UInt8Image
    boxes: tuple[Box, ...]


def make_identity(rng: np.random.Generator) -> IdentityParams:
    """A random but stable person: the features that tell people apart."""
    face_width = float(rng.uniform(0.26, 0.34))
    return IdentityParams(
        face_width=face_width,
        face_height=float(rng.uniform(0.36, 0.43)),
        skin=float(rng.uniform(150, 215)),
        eye_spacing=face_width * float(rng.uniform(0.36, 0.46)),
        eye_height=float(rng.uniform(0.40, 0.46)),
        eye_size=float(rng.uniform(0.035, 0.055)),
        brow_gap=float(rng.uniform(0.035, 0.06)),
        brow_thickness=float(rng.uniform(0.012, 0.03)),
        brow_slant=float(rng.uniform(-0.35, 0.35)),
        nose_length=float(rng.uniform(0.10, 0.16)),
        nose_width=float(rng.uniform(0.035, 0.065)),
        mouth_width=float(rng.uniform(0.07, 0.13)),
        mouth_height=float(rng.uniform(0.70, 0.76)),
        lip_thickness=float(rng.uniform(0.012, 0.03)),
        hair=float(rng.uniform(20, 110)),
        hair_line=float(rng.uniform(0.10, 0.20)),
        hair_style=int(rng.integers(0, 3)),
        background=float(rng.uniform(90, 200)),
    )


def _ellipse(
    canvas: FloatArray,
    centre: tuple[float, float],
    axes: tuple[float, float],
    value: float,
    angle_deg: float = 0.0,
) -> None:
    """Fill an anti-aliased ellipse in place (coordinates in pixels, subpixel)."""
    shift = 4  # cv2 subpixel precision: coordinates are multiplied by 2**shift
    scale = 1 << shift
    cv2.ellipse(
        canvas,
        (round(centre[0] * scale), round(centre[1] * scale)),
        (max(1, round(axes[0] * scale)), max(1, round(axes[1] * scale))),
        angle_deg,
        0,
        360,
        value,
        thickness=-1,
        lineType=cv2.LINE_AA,
        shift=shift,
    )


def _draw_face(p: IdentityParams, size: int, expression: float, lighting: float) -> FloatArray:
    """The upright, centred face of `p` on a size×size canvas, float 0..255."""
    s = float(size)
    canvas = np.full((size, size), p.background, dtype=np.float64)
    cx, cy = s / 2.0, s * 0.52
    # Hair first: a larger dark ellipse behind the top of the face.
    if p.hair_style == 2:
        _ellipse(canvas, (cx, cy), (p.face_width * s * 1.25, p.face_height * s * 1.1), p.hair)
    _ellipse(
        canvas, (cx, cy - s * 0.06), (p.face_width * s * 1.12, p.face_height * s * 1.02), p.hair
    )
    # Face oval, lit from the front: brighter in the middle, darker at the rim.
    face = np.zeros_like(canvas)
    _ellipse(face, (cx, cy), (p.face_width * s, p.face_height * s), 1.0)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    radial = ((xs - cx) / (p.face_width * s)) ** 2 + ((ys - cy) / (p.face_height * s)) ** 2
    shade = p.skin * (1.08 - 0.28 * np.clip(radial, 0.0, 1.0))
    canvas = canvas * (1.0 - face) + shade * face
    # Hair line over the forehead (a band cut by the face oval's top).
    top = cy - p.face_height * s
    hair_bottom = top + p.hair_line * s * 0.9
    fringe = np.zeros_like(canvas)
    if p.hair_style == 1:  # side parting: the fringe slopes across the forehead
        pts = np.array(
            [
                [cx - s * 0.4, top - s * 0.1],
                [cx + s * 0.4, top - s * 0.1],
                [cx + s * 0.4, hair_bottom - s * 0.03],
                [cx - s * 0.4, hair_bottom + s * 0.04],
            ],
            dtype=np.int32,
        )
        cv2.fillPoly(fringe, [pts], 1.0, lineType=cv2.LINE_AA)
    else:
        cv2.rectangle(fringe, (0, 0), (size - 1, int(hair_bottom)), 1.0, thickness=-1)
    fringe *= face
    canvas = canvas * (1.0 - fringe) + p.hair * fringe
    # Eye sockets: the dark band across the eyes over lighter cheeks is the
    # strongest feature the cascade keys on, so shade it softly first.
    eye_y = p.eye_height * s
    band = np.exp(-(((ys - eye_y + s * 0.015) / (s * 0.05)) ** 2)) * face
    canvas *= 1.0 - 0.22 * band
    for side in (-1.0, 1.0):
        ex = cx + side * p.eye_spacing * s
        _ellipse(canvas, (ex, eye_y), (p.eye_size * s * 1.7, p.eye_size * s * 1.1), p.skin * 0.55)
        _ellipse(canvas, (ex, eye_y), (p.eye_size * s, p.eye_size * s * 0.55), p.skin * 0.9)
        _ellipse(canvas, (ex, eye_y), (p.eye_size * s * 0.5, p.eye_size * s * 0.5), 25.0)
        # Brows: thick dark bars whose slant is part of the identity.
        by = eye_y - p.brow_gap * s - expression * s * 0.01
        half = p.eye_size * s * 1.6
        dy = np.tan(p.brow_slant) * half * side
        pts = np.array([[ex - half, by + dy], [ex + half, by - dy]], dtype=np.float64)
        cv2.line(
            canvas,
            tuple(np.round(pts[0]).astype(int)),
            tuple(np.round(pts[1]).astype(int)),
            p.hair * 0.8,
            thickness=max(1, round(p.brow_thickness * s)),
            lineType=cv2.LINE_AA,
        )
    # Nose: a light bridge between the eyes, shadowed on one side, dark nostrils.
    nose_top, nose_tip = eye_y, eye_y + p.nose_length * s
    bridge = np.array(
        [
            [cx - p.nose_width * s * 0.35, nose_top],
            [cx + p.nose_width * s * 0.35, nose_top],
            [cx + p.nose_width * s * 0.5, nose_tip],
            [cx - p.nose_width * s * 0.5, nose_tip],
        ],
        dtype=np.int32,
    )
    cv2.fillPoly(canvas, [bridge], min(255.0, p.skin * 1.15), lineType=cv2.LINE_AA)
    for side in (-1.0, 1.0):
        _ellipse(
            canvas,
            (cx + side * p.nose_width * s * 0.45, nose_tip),
            (p.nose_width * s * 0.28, p.nose_width * s * 0.16),
            p.skin * 0.45,
        )
    # Mouth: dark lips; expression opens (positive) or presses (negative) them.
    my = p.mouth_height * s
    opening = max(0.0, expression) * s * 0.025
    _ellipse(canvas, (cx, my), (p.mouth_width * s, p.lip_thickness * s + opening), p.skin * 0.5)
    if opening > 0.5:
        _ellipse(canvas, (cx, my), (p.mouth_width * s * 0.8, opening * 0.7), 40.0)
    # Smile/frown: raise or lower the mouth corners.
    corner_dy = -expression * s * 0.02
    for side in (-1.0, 1.0):
        _ellipse(
            canvas,
            (cx + side * p.mouth_width * s * 0.95, my + corner_dy),
            (s * 0.012, s * 0.012),
            p.skin * 0.5,
        )
    # Directional light: a left-right brightness ramp.
    ramp = 1.0 + lighting * (xs - cx) / s
    return np.asarray(canvas * ramp, dtype=np.float64)


def render_face(params: IdentityParams, rng: np.random.Generator, size: int = 96) -> UInt8Image:
    """One photo of `params`: a face filling most of a size×size grey image.

    Variation per image: shift, scale, small rotation, overall brightness and
    contrast, directional light, expression, blur and sensor noise.
    """
    expression = float(rng.uniform(-1.0, 1.0))
    lighting = float(rng.uniform(-0.35, 0.35))
    drawn = _draw_face(params, size, expression, lighting)
    angle = float(rng.uniform(-5.0, 5.0))
    scale = float(rng.uniform(0.9, 1.1))
    shift = rng.uniform(-0.05, 0.05, size=2) * size
    matrix = np.asarray(
        cv2.getRotationMatrix2D((size / 2.0, size / 2.0), angle, scale), dtype=np.float64
    )
    matrix[:, 2] += shift
    warped = cv2.warpAffine(
        drawn, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    blur = float(rng.uniform(0.3, 1.2)) * size / 96.0
    warped = cv2.GaussianBlur(warped, (0, 0), blur)
    gain, offset = float(rng.uniform(0.75, 1.2)), float(rng.uniform(-25, 25))
    noisy = warped * gain + offset + rng.normal(0.0, 4.0, size=warped.shape)
    return np.asarray(np.clip(noisy, 0, 255), dtype=np.uint8)


def make_identities(count: int, seed: int) -> list[IdentityParams]:
    """`count` identities, the same ones for the same seed."""
    rng = np.random.default_rng(seed)
    return [make_identity(rng) for _ in range(count)]


def person_name(index: int) -> str:
    """The gallery folder name of synthetic person `index`."""
    return f"person{index:02d}"


def make_dataset(
    root: Path, persons: int, images_per_person: int, seed: int, size: int = 96
) -> list[str]:
    """Write `<root>/<person>/<i>.png` for each identity; returns the person names."""
    identities = make_identities(persons, seed)
    rng = np.random.default_rng(seed + 1)
    names = []
    for index, identity in enumerate(identities):
        name = person_name(index)
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(images_per_person):
            image = render_face(identity, rng, size)
            if not cv2.imwrite(str(folder / f"{i}.png"), image):
                raise OSError(f"could not write {folder / f'{i}.png'}")
        names.append(name)
    return names


def make_scene(
    faces: Sequence[UInt8Image],
    rng: np.random.Generator,
    frame_size: tuple[int, int] = (640, 480),
    face_side: tuple[int, int] = (140, 220),
) -> Scene:
    """A BGR frame with `faces` pasted side by side on a plain porch background."""
    width, height = frame_size
    canvas = _porch(rng, width, height)
    boxes: list[Box] = []
    slot = width // max(1, len(faces))
    for index, face in enumerate(faces):
        side = int(rng.integers(face_side[0], face_side[1] + 1))
        side = min(side, slot - 4, height - 4)
        x = index * slot + int(rng.integers(0, max(1, slot - side)))
        y = int(rng.integers(0, max(1, height - side)))
        canvas[y : y + side, x : x + side] = cv2.resize(
            face, (side, side), interpolation=cv2.INTER_LINEAR
        )
        boxes.append((x, y, side, side))
    return Scene(np.asarray(cv2.cvtColor(canvas, cv2.COLOR_GRAY2BGR), np.uint8), tuple(boxes))


def _porch(rng: np.random.Generator, width: int, height: int) -> UInt8Image:
    """A smooth grey background with a few doorframe-like bars, no face-like blobs."""
    base = np.full((height, width), float(rng.uniform(80, 160)), dtype=np.float64)
    ramp = np.linspace(-20, 20, width)[None, :] * float(rng.uniform(-1, 1))
    image = base + ramp
    for _ in range(3):
        x = int(rng.integers(0, width))
        cv2.rectangle(
            image,
            (x, 0),
            (x + int(rng.integers(8, 30)), height),
            float(rng.uniform(40, 220)),
            thickness=-1,
        )
    image += rng.normal(0.0, 3.0, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_visitor_video(
    path: Path,
    visitors: Sequence[IdentityParams],
    rng: np.random.Generator,
    *,
    frames_per_visitor: int = 12,
    gap_frames: int = 4,
    fps: float = 10.0,
    frame_size: tuple[int, int] = (640, 480),
) -> list[tuple[int, int]]:
    """An MJPG .avi in which each visitor stands at the door for a few frames.

    Between visitors come `gap_frames` empty porch frames, so a pipeline sees
    each arrival as a new visit. Returns (first_frame, last_frame) per visitor.
    """
    width, height = frame_size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (width, height))
    if not writer.isOpened():
        raise OSError(f"OpenCV cannot write an MJPG video to {path}")
    spans: list[tuple[int, int]] = []
    frame_index = 0
    try:
        for visitor in visitors:
            start = frame_index
            for _ in range(frames_per_visitor):
                scene = make_scene([render_face(visitor, rng, 96)], rng, frame_size)
                writer.write(scene.frame)
                frame_index += 1
            spans.append((start, frame_index - 1))
            for _ in range(gap_frames):
                writer.write(cv2.cvtColor(_porch(rng, width, height), cv2.COLOR_GRAY2BGR))
                frame_index += 1
    finally:
        writer.release()
    return spans


STRANGER_SEED_OFFSET = 1_000_003
"""Strangers come from a seed space no site's generated residents use."""


def stranger_faces(count: int, seed: int, size: int = 96) -> list[UInt8Image]:
    """Faces of `count` people nobody enrolled, framed like a detector's crops.

    Two uses: outlier exposure (a node trains the model to be unsure on them,
    so open-set confidence means something) and calibrating the unknown-visitor
    threshold when no real stranger photos are available. A Haar crop frames
    a face with a few percent of jitter in scale and position; the random
    crop below reproduces that without running the detector.
    """
    rng = np.random.default_rng(seed + STRANGER_SEED_OFFSET)
    faces = []
    for identity in make_identities(count, seed + STRANGER_SEED_OFFSET):
        face = render_face(identity, rng, size)
        side = int(size * rng.uniform(0.85, 1.0))
        x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        faces.append(np.ascontiguousarray(face[y : y + side, x : x + side]))
    return faces
