"""Enrollment: a person's aligned face chips into the gallery, or a person out of it.

    python -m edge enroll --config X --person NAME [--count N]        # from the camera
    python -m edge enroll --config X --person NAME --from-folder DIR  # DIR's photos
    python -m edge enroll --config X --from-folder DIR               # DIR/<person>/<photo>
    python -m edge enroll --config X --remove NAME

Each frame or photo goes through the doorbell's own detector and alignment
(`fedbell.faces.features.find_chip`), so the gallery holds exactly what live
recognition compares against. A photo also enrols its mirror image
(`fedbell.faces.features.enrolment_chips`, as `bench.openset` enrols). A
running doorbell notices the change within a second
(`edge.gallery.Gallery.signature`): no round, no restart and no message to
the aggregator. What was kept is printed per person, with a
warning below MIN_CHIPS, and every photo without a face is named.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edge.camera import FrameSource, open_raw_source, read_pair
from edge.chips import cut_chips
from edge.gallery import Gallery, GalleryError, check_person_name
from edge.live import make_detector
from edge.recognition_config import CameraConfig, DetectionConfig
from edge.state import NodeState
from fedbell.faces.dataset import IMAGE_SUFFIXES
from fedbell.faces.detection import Detector, largest
from fedbell.faces.features import Backbone, BackboneError, Chip, enrolment_chips, read_photo

log = logging.getLogger(__name__)

MIN_CHIPS = 3
"""Fewer chips than this make a shaky prototype: enrollment warns (a few poses and
lights are what make a person recognisable at the door)."""


class EnrollError(RuntimeError):
    """Enrollment could not do what was asked; the message says what and where."""


@dataclass(frozen=True)
class EnrollSettings:
    """The parts of the node config enrollment needs."""

    camera: CameraConfig
    detection: DetectionConfig
    gallery: Path
    state: Path | None = None
    """The doorbell's state folder: its backbone computes the new chips' features here,
    so the running doorbell only picks them up."""


@dataclass(frozen=True)
class EnrollResult:
    person: str
    saved: list[Path]
    frames: int
    frames_without_face: int
    without_face: list[str] = field(default_factory=list)
    """Photos (by name) in which no face was found; empty for a camera."""
    kind: str = "frames"
    faces: int | None = None
    """Photos or frames a face was kept from (each photo also gives its mirror image's
    chip); None: one chip each, `len(saved)`."""

    @property
    def kept(self) -> int:
        """Faces kept: what makes a prototype steady (a mirror image adds no new pose)."""
        return len(self.saved) if self.faces is None else self.faces


def enroll(
    source: FrameSource,
    detector: Detector,
    gallery: Gallery,
    person: str,
    *,
    count: int = 10,
    every_nth_frame: int = 1,
    max_frames: int = 10_000,
    backbone: Backbone | None = None,
) -> EnrollResult:
    """Save up to `count` chips of `person` from a camera (or any frame source).

    every_nth_frame > 1 spaces captures out on a live camera, so the gallery
    gets varied poses rather than ten copies of the same instant.
    """
    check_person_name(person)
    chips: list[Chip] = []
    frames = without_face = 0
    while len(chips) < count and frames < max_frames:
        pair = read_pair(source)  # two streams: detect on the small, cut from the full
        if pair is None:
            break
        frames += 1
        if (frames - 1) % every_nth_frame:
            continue
        faces = detector.detect(pair.small)
        if not faces:
            without_face += 1
            continue
        chips += cut_chips(pair, [largest(faces)]).chips
    saved = gallery.add(person, chips, backbone=backbone) if chips else []
    return EnrollResult(person, saved, frames, without_face)


def photos_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise EnrollError(f"{folder}: not a folder")
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def enroll_photos(
    photos: Sequence[Path],
    detector: Detector,
    gallery: Gallery,
    person: str,
    count: int | None = None,
    *,
    backbone: Backbone | None = None,
) -> EnrollResult:
    """Save the chips of `person` found in these photos (of at most `count` photos), each
    photo's mirror image's too."""
    check_person_name(person)
    chips: list[Chip] = []
    missing: list[str] = []
    read = faces = 0
    for path in photos:
        if count is not None and faces >= count:
            break
        read += 1
        try:
            found = enrolment_chips(read_photo(path), detector)
        except ValueError as err:  # unreadable: named, counted, the rest go on
            log.warning("enroll %s: %s", person, err)
            found = []
        if not found:
            missing.append(path.name)
            continue
        faces += 1
        chips += found
    saved = gallery.add(person, chips, backbone=backbone) if chips else []
    return EnrollResult(person, saved, read, len(missing), missing, kind="photos", faces=faces)


def enroll_folder(
    folder: Path,
    detector: Detector,
    gallery: Gallery,
    count: int | None = None,
    backbone: Backbone | None = None,
) -> list[EnrollResult]:
    """Every `<folder>/<person>/` of photos; every person name is checked before anything."""
    persons = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not persons:
        raise EnrollError(f"{folder}: no <person>/ folders (or give --person)")
    for person in persons:
        try:
            check_person_name(person.name)
        except GalleryError as err:
            raise EnrollError(f"{person}: {err}") from None
    return [
        enroll_photos(photos_in(person), detector, gallery, person.name, count, backbone=backbone)
        for person in persons
    ]


def report(result: EnrollResult, minimum: int = MIN_CHIPS) -> str:
    """One line per person, plus a warning when too few chips were kept."""
    line = (
        f"{result.person}: kept {len(result.saved)} chip(s) from {result.frames} "
        f"{'photo' if result.kind == 'photos' else 'frame'}(s)"
    )
    if result.kept != len(result.saved):
        line += f" ({result.kept} face(s) and their mirror images)"
    if result.frames_without_face:
        line += f", no face in {result.frames_without_face}"
        if result.without_face:
            line += f" ({', '.join(result.without_face[:10])}"
            line += ", ...)" if len(result.without_face) > 10 else ")"
    if result.kept < minimum:
        line += (
            f"\nWARNING: {result.person} has only {result.kept} new face(s); "
            f"enroll at least {minimum} (different poses and light) to be recognised reliably"
        )
    return line


def stored_backbone(state: Path | None) -> Backbone | None:
    """The backbone the doorbell stored (the one it runs), or None: it computes features itself."""
    if state is None:
        return None
    stored = NodeState(state).load_artifact()
    if stored is None:
        return None
    try:
        return Backbone(stored.model)
    except BackboneError as err:  # the doorbell will refuse it too; enrollment goes on
        log.warning("stored backbone unusable (%s); the doorbell embeds the new chips", err)
        return None


def load_enroll_settings(path: Path) -> EnrollSettings:
    """Read `camera:`, `detection:` and `gallery:` from a YAML file (tests and tools)."""
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
        Path(raw["state_dir"]) if raw.get("state_dir") else None,
    )


def add_enroll_parser(
    subparsers: Any,
    load_settings: Callable[[Path], EnrollSettings] = load_enroll_settings,
) -> argparse.ArgumentParser:
    """Add `enroll` to the node CLI; the parsed args carry `func` to run it."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "enroll", help="add a person's face chips to the gallery, or remove a person"
    )
    parser.add_argument("--config", type=Path, required=True, help="the node's YAML config")
    parser.add_argument("--person", help="gallery name of the person")
    parser.add_argument(
        "--from-folder",
        type=Path,
        help="take faces from these photos instead of the camera; without --person, "
        "from DIR/<person>/<photo>",
    )
    parser.add_argument(
        "--count",
        type=int,
        help="faces to save per person (camera default 10; photos: all, each photo with its "
        "mirror image)",
    )
    parser.add_argument(
        "--every", type=int, default=5, help="camera only: use every Nth frame (default 5)"
    )
    parser.add_argument("--remove", metavar="NAME", help="remove this person from the gallery")
    parser.set_defaults(func=lambda args: run_enroll(args, load_settings))
    return parser


def run_enroll(
    args: argparse.Namespace, load_settings: Callable[[Path], EnrollSettings] = load_enroll_settings
) -> int:
    settings = load_settings(args.config)
    gallery = Gallery(settings.gallery, settings.state)
    if args.remove is not None:
        if args.person or args.from_folder:
            raise EnrollError("--remove takes no --person or --from-folder")
        removed = gallery.remove(args.remove)
        print(f"removed {args.remove} ({removed} image(s)) from {settings.gallery}")
        return 0
    if args.person is None and args.from_folder is None:
        raise EnrollError("give --person NAME (camera or --from-folder), or --remove NAME")
    if args.person is not None:
        check_person_name(args.person)  # before opening a camera
    detector = make_detector(settings.detection)
    backbone = stored_backbone(settings.state)
    if args.from_folder is not None and args.person is None:
        results = enroll_folder(args.from_folder, detector, gallery, args.count, backbone)
    elif args.from_folder is not None:
        photos = photos_in(args.from_folder)
        results = [
            enroll_photos(photos, detector, gallery, args.person, args.count, backbone=backbone)
        ]
    else:
        source = open_raw_source(settings.camera)
        try:
            results = [
                enroll(
                    source,
                    detector,
                    gallery,
                    args.person,
                    count=args.count or 10,
                    every_nth_frame=max(1, args.every),
                    backbone=backbone,
                )
            ]
        finally:
            source.close()
    for result in results:
        print(report(result))
    print(f"gallery: {settings.gallery}")
    short = [r for r in results if r.kept < (args.count or MIN_CHIPS)]
    return 1 if any(not r.saved for r in results) or (args.count and short) else 0


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
