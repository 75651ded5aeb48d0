"""The doorbell's gallery: listing, counting, and the training arrays it yields."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from edge.gallery import Gallery
from fedbell.faces import FACE_SIZE


def write_face(path: Path, value: int, mtime: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((40, 40), value, dtype=np.uint8)
    image[10:30, 10:30] = 255 - value  # not flat, so equalisation has something to do
    assert cv2.imwrite(str(path), image)
    os.utime(path, (mtime, mtime))


def test_missing_gallery_is_empty(tmp_path: Path) -> None:
    gallery = Gallery(tmp_path / "absent")
    assert gallery.persons() == []
    assert gallery.count() == 0
    assert len(gallery.training_set(["ann"], 10)) == 0


def test_lists_persons_and_images_skipping_hidden_and_other_files(tmp_path: Path) -> None:
    write_face(tmp_path / "bob" / "a.png", 10, 1000)
    write_face(tmp_path / "ann" / "old.png", 20, 1000)
    write_face(tmp_path / "ann" / "new.jpg", 30, 2000)
    write_face(tmp_path / "ann" / ".hidden.png", 40, 3000)
    (tmp_path / "ann" / "notes.txt").write_text("not a face")
    (tmp_path / ".trash").mkdir()
    gallery = Gallery(tmp_path)
    assert gallery.persons() == ["ann", "bob"]
    assert [p.name for p in gallery.images("ann")] == ["new.jpg", "old.png"]
    assert gallery.count() == 3


def test_training_set_keeps_newest_of_labelled_persons_in_label_order(tmp_path: Path) -> None:
    for i in range(4):
        write_face(tmp_path / "ann" / f"{i}.png", 10 * i, 1000 + i)
    write_face(tmp_path / "bob" / "0.png", 50, 1000)
    (tmp_path / "bob" / "broken.png").write_bytes(b"not an image")
    write_face(tmp_path / "stranger" / "0.png", 60, 1000)
    data = Gallery(tmp_path).training_set(["bob", "ann"], max_per_person=2)
    assert data.skipped_persons == ("stranger",)
    assert data.images.shape == (3, FACE_SIZE, FACE_SIZE)
    assert data.images.dtype == np.float32
    assert sorted(data.labels.tolist()) == [0, 1, 1]  # bob is 0, ann 1; broken file skipped
    assert float(data.images.max()) <= 1.0
