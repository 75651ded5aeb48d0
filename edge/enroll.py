"""Enrollment: capture a person's face crops into the gallery.

`python -m edge enroll --config X --person NAME [--from-folder DIR] [--count N]`
reads frames from the configured camera (or a folder of photos), keeps the
largest face of each, and stores the 8-bit grey *crop* as
`<gallery>/<person>/<image>.png`. Normalisation is applied later by
training, exactly as for recognition, so it lives in one place.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import yaml

from edge.camera import FolderSource, FrameSource, open_raw_source
from edge.detector import FaceDetector
from edge.feedback import check_person_name
from edge.recognition_config import CameraConfig, DetectionConfig
from fedbell.faces import crop_face

log = logging.getLogger(__name__)


class EnrollError(RuntimeError):
    """Enrollment could not capture what was asked."""


@dataclass(frozen=True)
class EnrollSettings:
    """The parts of the node config enrollment needs."""

    camera: CameraConfig
    detection: DetectionConfig
    gallery: Path


@dataclass(frozen=True)
class EnrollResult:
    saved: list[Path]
    frames: int
    frames_without_face: int


def enroll(
    source: FrameSource,
    detector: FaceDetector,
    gallery: Path,
    person: str,
    *,
    count: int = 10,
    every_nth_frame: int = 1,
    max_frames: int = 10_000,
) -> EnrollResult:
    """Save up to `count` face crops of `person` from `source`.

    every_nth_frame > 1 spaces captures out on a live camera, so the gallery
    gets varied poses rather than ten copies of the same instant.
    """
    check_person_name(person)
    folder = gallery / person
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    saved: list[Path] = []
    frames = without_face = 0
    while len(saved) < count and frames < max_frames:
        frame = source.read()
        if frame is None:
            break
        frames += 1
        if (frames - 1) % every_nth_frame:
            continue
        boxes = detector.detect(frame)
        if not boxes:
            without_face += 1
            continue
        crop = crop_face(frame, boxes[0], detector.config.margin)
        path = folder / f"{stamp}-{len(saved):03d}.png"
        if not cv2.imwrite(str(path), crop):
            raise EnrollError(f"could not write {path}")
        saved.append(path)
        log.info("enroll %s: saved %s", person, path)
    return EnrollResult(saved, frames, without_face)


def load_enroll_settings(path: Path) -> EnrollSettings:
    """Read `camera:`, `detection:` and `gallery:` from the node's YAML config."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise EnrollError(f"{path}: cannot read config: {err}") from err
    if not isinstance(raw, dict) or "gallery" not in raw:
        raise EnrollError(f"{path}: expected a mapping with a 'gallery:' folder")
    return EnrollSettings(
        CameraConfig(**(raw.get("camera") or {})),
        DetectionConfig(**(raw.get("detection") or {})),
        Path(raw["gallery"]),
    )


def add_enroll_parser(
    subparsers: Any,
    load_settings: Callable[[Path], EnrollSettings] = load_enroll_settings,
) -> argparse.ArgumentParser:
    """Add `enroll` to the node CLI; the parsed args carry `func` to run it."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "enroll", help="capture a person's face crops into the gallery"
    )
    parser.add_argument("--config", type=Path, required=True, help="the node's YAML config")
    parser.add_argument("--person", required=True, help="gallery name of the person")
    parser.add_argument(
        "--from-folder", type=Path, help="take faces from these photos instead of the camera"
    )
    parser.add_argument("--count", type=int, default=10, help="crops to save (default 10)")
    parser.add_argument(
        "--every", type=int, default=5, help="camera only: use every Nth frame (default 5)"
    )
    parser.set_defaults(func=lambda args: run_enroll(args, load_settings))
    return parser


def run_enroll(
    args: argparse.Namespace, load_settings: Callable[[Path], EnrollSettings] = load_enroll_settings
) -> int:
    settings = load_settings(args.config)
    detector = FaceDetector(settings.detection)
    if args.from_folder is not None:
        source: FrameSource = FolderSource(args.from_folder)
        every = 1
    else:
        source = open_raw_source(settings.camera)
        every = max(1, args.every)
    try:
        result = enroll(
            source, detector, settings.gallery, args.person, count=args.count, every_nth_frame=every
        )
    finally:
        source.close()
    print(
        f"saved {len(result.saved)} crops of {args.person} in "
        f"{settings.gallery / args.person} ({result.frames} frames read, "
        f"{result.frames_without_face} without a face)"
    )
    return 0 if len(result.saved) == args.count else 1


def enroll_main(
    argv: Sequence[str] | None = None,
    load_settings: Callable[[Path], EnrollSettings] = load_enroll_settings,
) -> int:
    """`enroll` as a standalone command (argv without the word `enroll`)."""
    parser = argparse.ArgumentParser(prog="python -m edge")
    subparsers = parser.add_subparsers(required=True)
    add_enroll_parser(subparsers, load_settings)
    args = parser.parse_args(["enroll", *(argv or [])])
    try:
        return int(args.func(args))
    except Exception as err:  # a CLI reports, it does not print a traceback
        parser.exit(2, f"enroll: {err}\n")
