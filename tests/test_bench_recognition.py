"""bench.recognition's frames and its doorbell set-up, on generated faces (no ../shared)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

from bench import recognition
from bench.openset_features import start_model
from fedbell.faces.detection import make_detector
from fedbell.faces.openset import UNKNOWN
from fedbell.faces.synthetic import make_identities, render_face

if TYPE_CHECKING:
    from aggregator.backbone import BackboneModels


def _faces(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [render_face(p, rng, 160) for p in make_identities(count, 0)]


def test_frames_are_textured_with_faces_of_several_sizes_and_some_without() -> None:
    frames, pasted = recognition.make_frames(_faces(4), 30)
    assert len(frames) == 30
    assert pasted == 20  # two frames of three
    for frame in frames:
        assert frame.shape == (480, 640, 3)
        assert frame.dtype == np.uint8
        # Not a flat porch: the background varies at every scale.
        assert float(cv2.Laplacian(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), cv2.CV_64F).std()) > 5
    again, _ = recognition.make_frames(_faces(4), 30)
    assert all(np.array_equal(a, b) for a, b in zip(frames, again, strict=True))


def test_a_house_is_enrolled_and_probed_at_a_threshold(backbone_models: BackboneModels) -> None:
    head = start_model()
    flavour = recognition.Flavour("float", backbone_models.float_model)
    recognizer = recognition.recognizer_for(flavour, backbone_models.sha256, head)
    rng = np.random.default_rng(1)
    people = {
        f"p{i}": [
            np.asarray(cv2.cvtColor(render_face(p, rng, 150), cv2.COLOR_GRAY2RGB), np.uint8)
            for _ in range(4)
        ]
        for i, p in enumerate(make_identities(3, 1))
    }
    gallery, probes, truth = recognition.gallery_of(recognizer, people)
    assert gallery.persons == ("p0", "p1", "p2")
    assert len(gallery) == 9  # three photos each enrolled, one each left to probe
    assert len(probes) == len(truth) == 3
    recognizer.set_gallery(gallery)
    # At threshold 1.0 (nothing calibrated) nobody is named; at -1 everyone is.
    assert {n for n, _ in recognizer.recognize_batch(probes)} == {UNKNOWN}
    recognition.with_threshold(recognizer, -1.0)
    assert all(n != UNKNOWN for n, _ in recognizer.recognize_batch(probes))
    assert recognition.ms_per_face(recognizer, probes, repeats=3) > 0
    frames, _ = recognition.make_frames(_faces(2), 6)
    fps, found = recognition.pipeline_fps(recognizer, make_detector("haar"), frames)
    assert fps > 0
    assert len(found) == 6
