"""The replay `make demo` and `make bench-edge` both drive a doorbell with (simulation/replay)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.camera import LORES_FOLDER
from fedbell.faces.openset import UNKNOWN
from simulation.processes import Child, Fleet
from simulation.replay import FRAMES_PER_VISIT, enroll, pick_people, write_porch


def photo_folders(root: Path, counts: dict[str, int]) -> Path:
    for person, count in counts.items():
        (root / person).mkdir(parents=True)
        for index in range(count):
            (root / person / f"{index:02d}.jpg").write_bytes(b"not read here")
    return root


def test_the_people_with_most_photos_are_enrolled_and_visit_with_a_photo_they_lack(
    tmp_path: Path,
) -> None:
    dataset = photo_folders(tmp_path / "people", {"Ann": 5, "Bob": 4, "Cy": 1, "Dee": 3})
    strangers = photo_folders(tmp_path / "strangers", {"Zed": 2})
    people = pick_people(dataset, strangers, gallery=6, per_person=3)
    assert {person: len(photos) for person, photos in people.enroll.items()} == {
        "ann": 3,
        "bob": 3,
    }
    assert [(visit.truth, visit.photo.name) for visit in people.visits] == [
        ("ann", "04.jpg"),
        ("bob", "03.jpg"),
        (UNKNOWN, "00.jpg"),
    ]
    for person, photos in people.enroll.items():
        visit = next(v for v in people.visits if v.truth == person)
        assert visit.photo not in photos


@pytest.mark.parametrize("full", [None, (1280, 720)])
def test_the_porch_video_shows_each_face_then_an_empty_porch(
    tmp_path: Path, full: tuple[int, int] | None
) -> None:
    """One stream: 640x480 JPEGs. Two: the main stream as BMPs and, under the same stems in
    lores/, the default camera's small stream (640 px wide, the main stream's aspect)."""
    faces = [np.full((120, 100), shade, np.uint8) for shade in (60, 200)]
    visits, empty = tmp_path / "visits", tmp_path / "empty"
    write_porch(visits, faces, np.random.default_rng(0), full=full, empty=empty)
    names = sorted(path.name for path in visits.iterdir() if path.is_file())
    assert len(names) == 2 * FRAMES_PER_VISIT
    assert names == sorted(path.name for path in empty.iterdir() if path.is_file())
    frame = cv2.imread(str(visits / names[0]))
    assert frame is not None
    if full is None:
        assert names[0] == "00000.jpg"
        assert frame.shape[:2] == (480, 640)
        assert not (visits / LORES_FOLDER).exists()
        return
    assert names[0] == "00000.bmp"
    assert frame.shape[:2] == (720, 1280)
    lores = sorted(path.name for path in (visits / LORES_FOLDER).iterdir())
    assert lores == [name.replace(".bmp", ".jpg") for name in names]
    small = cv2.imread(str(visits / LORES_FOLDER / lores[0]))
    assert small is not None
    assert small.shape[:2] == (360, 640)


def test_a_failed_enrolment_says_what_the_command_printed(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-config.yaml"
    with pytest.raises(RuntimeError, match="edge enroll failed") as raised:
        enroll(str(missing), str(tmp_path), person="ann", timeout=120)
    assert "no-such-config.yaml" in str(raised.value)


def test_a_fleet_runs_any_command_in_its_folder_and_stops_it(tmp_path: Path) -> None:
    """bench-edge's doorbell is a command (a chroot, say), not only `python -m module`."""
    script = "import os, time; print(os.getcwd(), flush=True); time.sleep(60)"
    log = tmp_path / "child.log"
    with Fleet(stop_timeout=5) as fleet:
        child = fleet.launch(Child("child", [sys.executable, "-c", script], log, cwd=tmp_path))
        deadline = time.monotonic() + 30
        while not log.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert child.running()
    assert child.process.poll() is not None
    assert log.read_text().strip() == str(tmp_path)
