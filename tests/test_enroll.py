"""Enrollment into the gallery (camera, photos, a folder of people), removal, label feedback."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from aggregator.backbone import BackboneModels
from edge.camera import FolderSource
from edge.enroll import MIN_CHIPS, enroll, enroll_main, enroll_photos, photos_in
from edge.feedback import FeedbackError, RecentCrops, apply_label
from edge.gallery import INCOMING, Gallery, GalleryError
from edge.state import NodeState, StoredArtifact
from fedbell.faces.align import CHIP_SIZE
from fedbell.faces.features import enrolment_chips, mirror_image, read_photo
from tests.recognition_helpers import chips_of, detector, frames_of, write_frames


def photos(folder: Path, count: int, person: int = 0, blank_every: int = 0) -> None:
    """Porch photos of one generated person; every `blank_every`-th has no face."""
    frames = frames_of(person, count, 40 + person)
    for i in range(count):
        if blank_every and i % blank_every == blank_every - 1:
            frames[i] = np.full_like(frames[i], 128)
    write_frames(folder, frames)


def test_enroll_from_a_camera_stores_aligned_chips(tmp_path: Path) -> None:
    photos(tmp_path / "frames", 6, blank_every=3)
    gallery = Gallery(tmp_path / "gallery")
    result = enroll(FolderSource(tmp_path / "frames"), detector(), gallery, "alice", count=3)
    assert len(result.saved) == 3
    assert result.frames_without_face == 1  # frame 2 is a blank wall
    for path in result.saved:
        assert path.parent == tmp_path / "gallery" / "alice"
        chip = gallery.read_chip(path)
        assert chip is not None
        assert chip.shape == (CHIP_SIZE, CHIP_SIZE, 3)


def test_enroll_photos_names_those_without_a_face(tmp_path: Path) -> None:
    photos(tmp_path / "photos", 6, blank_every=2)
    gallery = Gallery(tmp_path / "gallery")
    result = enroll_photos(photos_in(tmp_path / "photos"), detector(), gallery, "bob")
    assert result.kept == 3
    assert len(result.saved) == 6  # each face and its mirror image
    assert result.without_face == ["001.png", "003.png", "005.png"]
    assert gallery.count() == 6


def test_a_photo_enrols_its_mirror_image_as_the_benchmark_does(tmp_path: Path) -> None:
    photos(tmp_path / "photos", 1)
    (path,) = photos_in(tmp_path / "photos")
    image = read_photo(path)
    assert np.array_equal(mirror_image(image)[:, 0], image[:, -1])
    chips = enrolment_chips(image, detector())
    alone = enrolment_chips(image, detector(), mirrored=False)
    (flipped,) = enrolment_chips(mirror_image(image), detector(), mirrored=False)
    assert len(chips) == 2
    assert np.array_equal(chips[0], alone[0])
    # The second chip is the face of the flipped photo, found and aligned anew.
    assert np.array_equal(chips[1], flipped)
    assert not np.array_equal(chips[1], chips[0])
    assert enrolment_chips(np.full_like(image, 128), detector()) == []  # no face, no mirror


def test_enroll_cli_reports_per_person_and_warns_below_the_minimum(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    people = tmp_path / "people"
    photos(people / "carol", 4, person=0)
    photos(people / "dave", 3, person=1, blank_every=2)  # 2 faces, below the minimum
    config = tmp_path / "node.yaml"
    config.write_text(f"gallery: {tmp_path / 'gallery'}\ncamera:\n  kind: opencv\n")
    assert enroll_main(["--config", str(config), "--from-folder", str(people)]) == 0
    out = capsys.readouterr().out
    assert "carol: kept 8 chip(s) from 4 photo(s) (4 face(s) and their mirror images)" in out
    assert (
        "dave: kept 4 chip(s) from 3 photo(s) (2 face(s) and their mirror images), no face in 1"
        in out
    )
    assert f"WARNING: dave has only 2 new face(s); enroll at least {MIN_CHIPS}" in out
    assert "WARNING: carol" not in out
    assert Gallery(tmp_path / "gallery").persons() == ["carol", "dave"]

    assert enroll_main(["--config", str(config), "--remove", "dave"]) == 0
    assert "removed dave (4 image(s))" in capsys.readouterr().out
    assert Gallery(tmp_path / "gallery").persons() == ["carol"]


def test_enroll_cli_leaves_features_from_the_doorbells_stored_backbone(
    tmp_path: Path, backbone_models: BackboneModels
) -> None:
    state = tmp_path / "state"
    NodeState(state).save_artifact(
        StoredArtifact(0, 0, "int8", backbone_models.int8_model, "lineage", "0" * 64)
    )
    photos(tmp_path / "photos", 3)
    config = tmp_path / "node.yaml"
    config.write_text(f"gallery: {tmp_path / 'gallery'}\nstate_dir: {state}\n")
    argv = ["--config", str(config), "--person", "fay", "--from-folder", str(tmp_path / "photos")]
    assert enroll_main(argv) == 0
    (left,) = (state / INCOMING).glob("*.npz")
    with np.load(left, allow_pickle=False) as data:
        assert data["features"].shape == (6, 256)  # 3 photos and their mirror images
        assert str(data["backbone"]) == hashlib.sha256(backbone_models.int8_model).hexdigest()


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--person", "../evil"], "person name '../evil' must be"),
        (["--person", "unknown"], "person name 'unknown' must be"),
        (["--remove", "nobody"], "'nobody' is not enrolled"),
        (["--remove", "a/b"], "person name 'a/b' must be"),
        ([], "give --person NAME"),
    ],
)
def test_enroll_cli_clear_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], error: str
) -> None:
    photos(tmp_path / "photos", 1)
    config = tmp_path / "node.yaml"
    config.write_text(f"gallery: {tmp_path / 'gallery'}\n")
    source = ["--from-folder", str(tmp_path / "photos")] if "--person" in args else []
    with pytest.raises(SystemExit) as exit_info:
        enroll_main(["--config", str(config), *source, *args])
    assert exit_info.value.code == 2
    assert error in capsys.readouterr().err
    assert not (tmp_path / "gallery").exists() or not any((tmp_path / "gallery").iterdir())


def test_a_folder_with_no_face_at_all_is_a_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "walls").mkdir()
    cv2.imwrite(str(tmp_path / "walls" / "wall.png"), np.full((240, 320, 3), 90, np.uint8))
    config = tmp_path / "node.yaml"
    config.write_text(f"gallery: {tmp_path / 'gallery'}\n")
    code = enroll_main(
        ["--config", str(config), "--person", "erin", "--from-folder", str(tmp_path / "walls")]
    )
    assert code == 1
    assert (
        "erin: kept 0 chip(s) from 1 photo(s), no face in 1 (wall.png)" in capsys.readouterr().out
    )
    assert Gallery(tmp_path / "gallery").persons() == []


def test_label_feedback_adds_the_visit_chip_to_the_gallery(tmp_path: Path) -> None:
    now = [0.0]
    store = RecentCrops(max_count=2, max_age_s=3600, clock=lambda: now[0])
    gallery = Gallery(tmp_path)
    chip = chips_of(0, 1, 3)[0]
    store.add("e1", chip, "unknown")
    named: list[str] = []
    label = json.dumps({"event_id": "e1", "person": "carol"}).encode()
    path = apply_label(store, gallery, label, named.append)
    assert path is not None
    assert named == ["e1"]  # the stranger store is told
    assert path.parent.name == "carol"
    stored = gallery.read_chip(path)
    assert stored is not None
    assert np.array_equal(stored, chip)
    with pytest.raises(FeedbackError, match="unknown or older"):  # used once
        apply_label(store, gallery, b'{"event_id": "e1", "person": "carol"}')

    store.add("e2", chip, "unknown")
    assert apply_label(store, gallery, b'{"event_id": "e2", "person": "ignore"}') is None
    store.add("old", chip, "x")
    now[0] = 3601.0
    with pytest.raises(FeedbackError, match="older than 3600s"):
        apply_label(store, gallery, b'{"event_id": "old", "person": "carol"}')
    for i in range(3):
        store.add(f"n{i}", chip, "x")
    assert len(store) == 2  # bounded count: n0 evicted
    with pytest.raises(FeedbackError):
        apply_label(store, gallery, b'{"event_id": "n0", "person": "carol"}')
    for bad in (b"nope", b"[1]", b'{"event_id": 1}', b'{"event_id": "n1", "person": "../x"}'):
        with pytest.raises(FeedbackError):
            apply_label(store, gallery, bad)
    store.add("grey", np.zeros((80, 80), np.uint8), "x")  # not a chip: refused, not stored
    with pytest.raises(FeedbackError, match="aligned 150x150"):
        apply_label(store, gallery, b'{"event_id": "grey", "person": "carol"}')
    assert gallery.count() == 1
    with pytest.raises(GalleryError):
        gallery.add("carol", [np.zeros((80, 80), np.uint8)])


def test_event_chips_are_held_losslessly_in_less_memory() -> None:
    """Up to 200 event chips are held for an hour: as PNG, exact and smaller."""
    store = RecentCrops()
    chip = chips_of(0, 1, 3)[0]
    store.add("e", chip, "unknown")
    stored = store.take("e")
    assert stored.crop.dtype == np.uint8
    assert np.array_equal(stored.crop, chip)
    assert len(stored.png) < chip.nbytes / 1.5
