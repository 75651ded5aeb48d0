"""Enrollment into the gallery, and label feedback from recent events."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.camera import FolderSource
from edge.detector import FaceDetector
from edge.enroll import enroll, enroll_main
from edge.feedback import FeedbackError, RecentCrops, apply_label
from fedbell.faces import read_image
from fedbell.synthetic import make_identities, make_scene, render_face


def photos(folder: Path, count: int, with_face: bool = True) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    identity = make_identities(1, 3)[0]
    for i in range(count):
        scene = make_scene([render_face(identity, rng)], rng)
        frame = scene.frame if with_face or i % 2 else np.full_like(scene.frame, 128)
        cv2.imwrite(str(folder / f"{i:02d}.jpg"), frame)


def test_enroll_from_folder_stores_grey_crops(tmp_path: Path) -> None:
    photos(tmp_path / "photos", 6)
    result = enroll(
        FolderSource(tmp_path / "photos"), FaceDetector(), tmp_path / "gallery", "alice", count=4
    )
    assert len(result.saved) == 4
    for path in result.saved:
        assert path.parent == tmp_path / "gallery" / "alice"
        crop = read_image(path)
        assert crop.dtype == np.uint8
        assert crop.shape[0] == crop.shape[1] > 64  # the crop, not the normalised 64x64


def test_enroll_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photos(tmp_path / "photos", 4)
    config = tmp_path / "node.yaml"
    config.write_text(f"gallery: {tmp_path / 'gallery'}\ncamera:\n  kind: opencv\n")
    code = enroll_main(
        [
            "--config",
            str(config),
            "--person",
            "bob",
            "--from-folder",
            str(tmp_path / "photos"),
            "--count",
            "3",
        ]
    )
    assert code == 0
    assert len(list((tmp_path / "gallery" / "bob").glob("*.png"))) == 3
    assert "saved 3 crops of bob" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        enroll_main(
            [
                "--config",
                str(config),
                "--person",
                "../evil",
                "--from-folder",
                str(tmp_path / "photos"),
            ]
        )


def test_label_feedback_stores_recent_crop(tmp_path: Path) -> None:
    now = [0.0]
    store = RecentCrops(max_count=2, max_age_s=3600, clock=lambda: now[0])
    crop = np.full((80, 80), 90, np.uint8)
    store.add("e1", crop, "unknown")
    path = apply_label(store, tmp_path, json.dumps({"event_id": "e1", "person": "carol"}).encode())
    assert path is not None
    assert np.array_equal(read_image(path), crop)
    with pytest.raises(FeedbackError, match="unknown or older"):  # used once
        apply_label(store, tmp_path, b'{"event_id": "e1", "person": "carol"}')

    store.add("e2", crop, "unknown")
    assert apply_label(store, tmp_path, b'{"event_id": "e2", "person": "ignore"}') is None
    store.add("old", crop, "x")
    now[0] = 3601.0
    with pytest.raises(FeedbackError, match="older than 3600s"):
        apply_label(store, tmp_path, b'{"event_id": "old", "person": "carol"}')
    for i in range(3):
        store.add(f"n{i}", crop, "x")
    assert len(store) == 2  # bounded count: n0 evicted
    with pytest.raises(FeedbackError):
        apply_label(store, tmp_path, b'{"event_id": "n0", "person": "carol"}')
    for bad in (b"nope", b"[1]", b'{"event_id": 1}', b'{"event_id": "n1", "person": "../x"}'):
        with pytest.raises(FeedbackError):
            apply_label(store, tmp_path, bad)
