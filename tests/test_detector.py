"""Haar detection on downscaled frames, boxes in full-frame pixels."""

from __future__ import annotations

import numpy as np
import pytest

from edge.detector import DetectorError, FaceDetector
from edge.recognition_config import DetectionConfig
from fedbell.synthetic import make_identities, make_scene, render_face


def overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0, min(ay + ah, by + bh) - max(ay, by))
    return w * h / float(aw * ah + bw * bh - w * h)


@pytest.mark.parametrize("downscale", [0.5, 1.0])
def test_finds_synthetic_faces_in_full_frame_coordinates(downscale: float) -> None:
    detector = FaceDetector(DetectionConfig(downscale=downscale))
    rng = np.random.default_rng(1)
    found = 0
    for identity in make_identities(10, 4):
        scene = make_scene([render_face(identity, rng)], rng)
        boxes = detector.detect(scene.frame)
        if boxes and overlap(boxes[0], scene.boxes[0]) > 0.4:
            found += 1
    assert found >= 9


def test_two_faces_largest_first_and_max_faces() -> None:
    rng = np.random.default_rng(2)
    a, b = make_identities(2, 8)
    scene = make_scene([render_face(a, rng), render_face(b, rng)], rng, face_side=(150, 200))
    boxes = FaceDetector().detect(scene.frame)
    assert len(boxes) == 2
    assert boxes[0][2] >= boxes[1][2]
    assert len(FaceDetector(DetectionConfig(max_faces=1)).detect(scene.frame)) == 1


def test_min_face_size_and_empty_frames() -> None:
    rng = np.random.default_rng(3)
    scene = make_scene([render_face(make_identities(1, 1)[0], rng)], rng, face_side=(100, 110))
    assert FaceDetector(DetectionConfig(min_face_px=200)).detect(scene.frame) == []
    assert FaceDetector().detect(np.zeros((480, 640), np.uint8)) == []
    assert FaceDetector().detect(np.zeros((10, 10, 3), np.uint8)) == []
    with pytest.raises(ValueError, match="expected a grey or colour image"):
        FaceDetector().detect(np.zeros((2, 2, 2, 2), np.uint8))


def test_missing_cascade_is_a_clear_error() -> None:
    with pytest.raises(DetectorError, match="not found"):
        FaceDetector(DetectionConfig(cascade="no_such_cascade.xml"))
