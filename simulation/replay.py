"""A real doorbell driven from outside: who visits, the porch video, enrolment.

One implementation for the two places that replay visitors through a doorbell:
the live recognition at the end of `make demo` (simulation/live.py, the
doorbell's pipeline in this process) and `make bench-edge` / `make pi-check`
(bench/edge.py, a whole `python -m edge` process, possibly in a chroot).
Both enrol with the doorbell's own `python -m edge enroll` command and show
each visitor for FACE_FRAMES frames, then an empty porch for GAP_FRAMES.
Starting and stopping the processes is simulation/processes.py's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edge.camera import LORES_FOLDER
from edge.frames import small_size
from edge.recognition_config import CameraConfig
from fedbell.faces.dataset import Sample
from fedbell.faces.detection import Detector, largest
from fedbell.faces.features import read_photo
from fedbell.faces.images import UInt8Image, crop_face, to_grey
from fedbell.faces.openset import UNKNOWN
from fedbell.faces.synthetic import make_scene

FACE_FRAMES = 8
"""Frames in which a visitor stands at the door."""
GAP_FRAMES = 6
"""Frames of empty porch after each visitor."""
FRAMES_PER_VISIT = FACE_FRAMES + GAP_FRAMES
ONE_STREAM_FRAME = (640, 480)


# --- who visits --------------------------------------------------------------------------


@dataclass(frozen=True)
class Visit:
    truth: str
    """Who walks up: a name, or "unknown" for a stranger."""
    photo: Path


@dataclass(frozen=True)
class People:
    enroll: dict[str, list[Path]]
    visits: list[Visit]
    """One unseen photo per enrolled person, then a stranger's."""


def pick_people(dataset: Path, strangers: Path, gallery: int, per_person: int) -> People:
    """The people of `dataset` with the most photos: `per_person` to enroll, one to visit.

    0 per person: a fifth of the gallery, 2 to 8, so there are always at least two
    people (one person alone gives training nothing to tell apart)."""
    per_person = per_person or max(2, min(8, gallery // 5))
    folders = sorted(
        (p for p in dataset.iterdir() if p.is_dir()),
        key=lambda p: (-len(list(p.iterdir())), p.name),
    )
    enroll: dict[str, list[Path]] = {}
    visits: list[Visit] = []
    for folder in folders:
        photos = sorted(folder.iterdir())
        if len(photos) < 2:
            break
        take = min(per_person, len(photos) - 1, gallery - sum(map(len, enroll.values())))
        if take <= 0:
            break
        enroll[folder.name.lower()] = photos[:take]
        visits.append(Visit(folder.name.lower(), photos[-1]))
    stranger = sorted(p for p in strangers.rglob("*") if p.is_file())[0]
    return People(enroll, [*visits, Visit(UNKNOWN, stranger)])


def plan_visits(
    newcomer: str, newcomer_visit: Path, residents: Sequence[Sample], strangers: Sequence[Sample]
) -> list[Visit]:
    """The demo's visitors: the newcomer, residents (photos their gallery lacks), strangers."""
    visits = [Visit(newcomer, newcomer_visit)]
    visits += [Visit(s.person, s.path) for s in residents]
    return [*visits, *(Visit(UNKNOWN, s.path) for s in strangers)]


# --- the porch video -----------------------------------------------------------------------


def visitor_face(photo: Path, detector: Detector | None = None) -> UInt8Image:
    """What walks up to the door: the photo in grey, or (with a detector) its largest
    face with some head around it: a whole photo pasted in would make a face far
    smaller than a doorbell sees at its door."""
    image = read_photo(photo)
    faces = detector.detect(image) if detector is not None else []
    if faces:
        return crop_face(image, largest(faces).box, 0.3)
    return to_grey(image)


def write_porch(
    folder: Path,
    faces: Sequence[UInt8Image],
    rng: np.random.Generator,
    *,
    full: tuple[int, int] | None = None,
    empty: Path | None = None,
) -> None:
    """Numbered porch frames of each face in turn, an empty porch in between, as the
    doorbell's camera records them.

    `full`: two streams, as Picamera2 gives them: the main stream at `full` as
    uncompressed BMPs (a camera's buffer, read only to cut a chip) and, in `lores/`
    beside them under the same stems, each frame's small stream as the default
    camera's is (`camera.width` wide) as JPEG; edge.camera.FolderSource replays the
    pair. None: one stream of 640x480 JPEGs. Each face image is pasted 140-220 px square
    on a 640-pixel-wide frame, scaled with the frame's width: a visitor at ring distance
    (an LFW face found by `visitor_face` is 75-130 px wide on the default lores stream,
    2.4 times that on its main stream). `empty`: also write as many frames of an empty
    porch there, under the same names."""
    frame_size = full or ONE_STREAM_FRAME
    zoom = frame_size[0] / ONE_STREAM_FRAME[0]
    side = (round(140 * zoom), round(220 * zoom))
    suffix = ".bmp" if full else ".jpg"
    lores_size = None if full is None else small_size(*full, CameraConfig().width)
    jpeg = [cv2.IMWRITE_JPEG_QUALITY, 90]

    def write(where: Path, name: str, frame: UInt8Image) -> None:
        where.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(where / f"{name}{suffix}"), frame, [] if full else jpeg)
        if lores_size is not None:
            # Area averaging, as the ISP's scaler filters (not a replay cost: written once).
            small = cv2.resize(frame, lores_size, interpolation=cv2.INTER_AREA)
            (where / LORES_FOLDER).mkdir(exist_ok=True)
            cv2.imwrite(str(where / LORES_FOLDER / f"{name}.jpg"), small, jpeg)

    index = 0
    for face in faces:
        for k in range(FRAMES_PER_VISIT):
            name = f"{index:05d}"
            shown = [face] if k < FACE_FRAMES else []
            write(folder, name, make_scene(shown, rng, frame_size, side).frame)
            if empty is not None:
                write(empty, name, make_scene([], rng, frame_size).frame)
            index += 1


# --- the doorbell's own commands --------------------------------------------------------------


def run_python(
    python: Sequence[str],
    *args: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 300.0,
) -> subprocess.CompletedProcess[str]:
    """`python args...` with the doorbell's Python (`python`: the command that starts it,
    e.g. through a chroot), its output captured; the exit code is the caller's to judge."""
    return subprocess.run(
        [*python, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def enroll(
    config: str,
    photos: str,
    *,
    person: str | None = None,
    python: Sequence[str] = (sys.executable,),
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 300.0,
) -> tuple[float, str]:
    """(seconds, what it printed) of the doorbell's `edge enroll --from-folder`: `photos`
    of `person`, or (no person) a folder of <person>/<photo>."""
    started = time.monotonic()
    who = [] if person is None else ["--person", person]
    done = run_python(
        python,
        *("-m", "edge", "enroll", "--config", config, *who, "--from-folder", photos),
        cwd=cwd,
        env=env,
        timeout=timeout,
    )
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        raise RuntimeError(f"edge enroll failed ({done.returncode}):\n{output}")
    return time.monotonic() - started, output
