"""The doorbell's gallery: names, chips in and out, cached features, change checks, strangers."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from aggregator.backbone import BackboneModels
from edge.gallery import (
    FEATURE_CACHE,
    INCOMING,
    Gallery,
    GalleryError,
    StrangerStore,
    check_person_name,
)
from fedbell.faces.detection import HaarDetector
from fedbell.faces.embedding import embed
from fedbell.faces.features import Backbone
from fedbell.faces.images import crop_face
from fedbell.faces.openset import best_match, prototype
from tests.recognition_helpers import chips_of, detector, frames_of, projection


@pytest.fixture(scope="module")
def backbone(backbone_models: BackboneModels) -> Backbone:
    return Backbone(backbone_models.float_model)


def write_image(path: Path, value: int, mtime: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((40, 40, 3), value, dtype=np.uint8))
    os.utime(path, (mtime, mtime))


def test_missing_gallery_is_empty(tmp_path: Path, backbone: Backbone) -> None:
    gallery = Gallery(tmp_path / "absent")
    assert gallery.persons() == []
    assert gallery.count() == 0
    assert gallery.signature() == ()
    data = gallery.features(backbone)
    assert len(data) == 0
    assert data.features.shape == (0, backbone.size)


def test_lists_persons_and_images_skipping_hidden_and_other_files(tmp_path: Path) -> None:
    write_image(tmp_path / "bob" / "a.png", 10, 1000)
    write_image(tmp_path / "ann" / "old.png", 20, 1000)
    write_image(tmp_path / "ann" / "new.jpg", 30, 2000)
    write_image(tmp_path / "ann" / ".hidden.png", 40, 3000)
    (tmp_path / "ann" / "notes.txt").write_text("not a face")
    (tmp_path / ".trash").mkdir()
    gallery = Gallery(tmp_path)
    assert gallery.persons() == ["ann", "bob"]
    assert [p.name for p in gallery.images("ann")] == ["new.jpg", "old.png"]
    assert gallery.count() == 3


@pytest.mark.parametrize(
    "name", ["", "../evil", "a/b", "alice\n", "-lead", "unknown", "Ignore", "x" * 65, 3]
)
def test_unsafe_person_names_are_refused(tmp_path: Path, name: object) -> None:
    with pytest.raises(GalleryError, match="person name"):
        check_person_name(name)
    gallery = Gallery(tmp_path)
    with pytest.raises(GalleryError, match="person name"):
        gallery.add(name, [np.zeros((150, 150, 3), np.uint8)])  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())  # nothing written anywhere


def test_add_stores_chips_and_remove_deletes_the_person(tmp_path: Path) -> None:
    gallery = Gallery(tmp_path / "gallery")
    chips = chips_of(0, 2, 1)
    saved = gallery.add("ann", chips)
    assert [p.parent.name for p in saved] == ["ann", "ann"]
    stored = gallery.read_chip(saved[0])
    assert stored is not None
    assert np.array_equal(stored, chips[0])  # RGB in, RGB out
    with pytest.raises(GalleryError, match="expected an aligned 150x150 RGB uint8 chip"):
        gallery.add("ann", [np.zeros((64, 64), np.uint8)])
    assert gallery.count() == 2
    assert gallery.remove("ann") == 2
    assert gallery.persons() == []
    with pytest.raises(GalleryError, match="not enrolled"):
        gallery.remove("ann")


def test_signature_changes_with_every_enrollment_and_removal(tmp_path: Path) -> None:
    gallery = Gallery(tmp_path / "gallery")
    chip = chips_of(0, 1, 1)
    seen = {gallery.signature()}
    gallery.add("ann", chip)
    seen.add(gallery.signature())
    gallery.add("ann", chip)  # a second chip of the same person
    seen.add(gallery.signature())
    gallery.add("bob", chip)
    seen.add(gallery.signature())
    gallery.remove("ann")
    seen.add(gallery.signature())
    assert len(seen) == 5
    assert gallery.signature() == gallery.signature()  # and stable when nothing changed


def test_features_are_cached_per_file_and_backbone(
    tmp_path: Path, backbone: Backbone, backbone_models: BackboneModels
) -> None:
    state = tmp_path / "state"
    gallery = Gallery(tmp_path / "gallery", state)
    gallery.add("ann", chips_of(0, 2, 1))
    gallery.add("bob", chips_of(1, 1, 2))
    first = gallery.features(backbone)
    assert first.persons == ("ann", "bob")
    assert sorted(first.labels.tolist()) == [0, 0, 1]
    assert first.features.shape == (3, backbone.size)
    assert (state / FEATURE_CACHE).is_file()

    class Counting(Backbone):
        chips = 0

        def features(self, chips):  # type: ignore[no-untyped-def]
            Counting.chips += len(chips)
            return super().features(chips)

    counting = Counting(backbone_models.float_model)
    again = Gallery(tmp_path / "gallery", state).features(counting)  # a restart: from the cache
    assert Counting.chips == 0
    assert np.array_equal(again.features, first.features)
    gallery.add("bob", chips_of(1, 1, 3))
    Gallery(tmp_path / "gallery", state).features(counting)
    assert Counting.chips == 1  # only the new chip ran
    int8 = Gallery(tmp_path / "gallery", state).features(Backbone(backbone_models.int8_model))
    assert int8.backbone != first.backbone  # another backbone: all computed again
    assert len(int8) == 4


def test_features_left_by_the_enroll_cli_are_taken_not_computed(
    tmp_path: Path, backbone: Backbone, backbone_models: BackboneModels
) -> None:
    """The CLI (another process) runs the chips through the doorbell's stored backbone
    before they appear; the doorbell only picks the features up."""
    state, root = tmp_path / "state", tmp_path / "gallery"
    chips = chips_of(0, 3, 1)
    saved = Gallery(root, state).add("ann", chips, backbone=backbone)
    assert [p.name.startswith(".") for p in (root / "ann").iterdir()] == [False] * 3
    assert len(list((state / INCOMING).glob("*.npz"))) == 1

    class Counting(Backbone):
        chips = 0

        def features(self, chips):  # type: ignore[no-untyped-def]
            Counting.chips += len(chips)
            return super().features(chips)

    doorbell = Gallery(root, state)
    data = doorbell.features(Counting(backbone_models.float_model))
    assert Counting.chips == 0  # nothing computed: the features were waiting
    assert sorted(data.files) == sorted(f"ann/{p.name}" for p in saved)
    assert np.allclose(np.sort(data.features, axis=0), np.sort(backbone.features(chips), axis=0))
    assert not list((state / INCOMING).glob("*.npz"))  # taken
    Gallery(root, state).features(Counting(backbone_models.float_model))
    assert Counting.chips == 0  # and kept in the cache

    Gallery(root, state).add(
        "bob", chips_of(1, 1, 2), backbone=Backbone(backbone_models.int8_model)
    )
    Gallery(root, state).features(Counting(backbone_models.float_model))
    assert Counting.chips == 1  # features of another backbone: dropped, computed here
    assert not list((state / INCOMING).glob("*.npz"))


def test_photos_are_detected_and_aligned_and_faceless_ones_left_out(
    tmp_path: Path, backbone: Backbone
) -> None:
    root = tmp_path / "gallery"
    (root / "ann").mkdir(parents=True)
    cv2.imwrite(str(root / "ann" / "photo.png"), frames_of(0, 1, 7)[0])  # a whole porch frame
    cv2.imwrite(str(root / "ann" / "wall.png"), np.full((200, 300, 3), 128, np.uint8))
    (root / "ann" / "broken.png").write_bytes(b"not an image")
    gallery = Gallery(root, detector=detector)
    data = gallery.features(backbone)
    assert data.files == ("ann/photo.png",)
    assert sorted(data.skipped) == ["ann/broken.png", "ann/wall.png"]
    assert sorted(p.name for p in gallery.images("ann")) == ["broken.png", "photo.png", "wall.png"]


def test_stranger_store_is_bounded_persistent_and_tied_to_a_backbone(tmp_path: Path) -> None:
    path = tmp_path / "strangers.npz"
    store = StrangerStore(path, capacity=3)
    for i in range(5):
        store.add("a" * 64, np.full((1, 4), i, np.float32), f"event{i}")
    assert len(store) == 3
    kept = StrangerStore(path, capacity=3).features("a" * 64, 4)
    assert kept[:, 0].tolist() == [2.0, 3.0, 4.0]  # the oldest went first
    assert StrangerStore(path, 3).features("b" * 64, 4).shape == (0, 4)

    assert store.forget("event3") == 1  # a label named that visitor
    assert store.forget("event0") == 0  # long gone
    assert store.forget("") == 0  # debounced visits have no event to name
    reloaded = StrangerStore(path, capacity=3)
    assert reloaded.features("a" * 64, 4)[:, 0].tolist() == [2.0, 4.0]

    store.add("b" * 64, np.ones((1, 4), np.float32))  # a new backbone starts it again
    assert len(store) == 1
    assert len(StrangerStore(path, capacity=0)) == 0
    StrangerStore(None, capacity=0).add("a" * 64, np.ones((1, 4), np.float32))
    path.write_bytes(b"junk")
    assert len(StrangerStore(path, capacity=3)) == 0  # unreadable: starts empty, says so


def test_a_closed_set_gallery_of_grey_haar_crops_still_works(
    tmp_path: Path, backbone: Backbone
) -> None:
    """The upgrade keeps the old gallery: its grey crops (Haar box + 10 % per side) are read
    as chips even where BlazeFace finds no face in them, and name their people."""
    haar = HaarDetector()
    root = tmp_path / "gallery"
    for person in range(3):
        (root / f"person{person}").mkdir(parents=True)
        for i, frame in enumerate(frames_of(person, 3, 60 + person)):
            face = haar.detect(frame)[0]
            crop = crop_face(frame, face.box)  # what the closed-set enrollment stored
            assert cv2.imwrite(str(root / f"person{person}" / f"{i}.png"), crop)
    gallery = Gallery(root, detector=detector)
    data = gallery.features(backbone)
    assert len(data) == 9
    assert data.skipped == ()
    embeddings = embed(data.features, [projection()])
    prototypes = np.stack([prototype(embeddings[data.labels == p]) for p in range(3)])
    for person in range(3):
        visitor = embed(backbone.features(chips_of(person, 2, 90 + person)), [projection()])
        assert best_match(visitor, prototypes)[0].tolist() == [person, person]
