"""Recognition with real TFLite models (LiteRT): float, int8, int8 input, hot swap."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

from edge.recognizer import UNKNOWN, ModelArtifact, Recognizer, RecognizerError
from tests.recognition_helpers import KNOWN, faces_of, trained_model


@pytest.mark.parametrize("variant", ["float_tflite", "int8_tflite", "int8_io_tflite"])
def test_recognises_held_out_faces(variant: str) -> None:
    model = trained_model()
    recognizer = Recognizer(threshold_override=0.0)
    recognizer.swap(ModelArtifact(getattr(model, variant), model.labels))
    assert recognizer.input_size == 64
    faces = [faces_of(model.identities[i], 5, 900 + i) for i in range(KNOWN)]
    results = [recognizer.recognize_batch(list(f)) for f in faces]
    correct = sum(name == model.labels[i] for i, rs in enumerate(results) for name, _ in rs)
    assert correct / (5 * KNOWN) >= 0.8
    probabilities = recognizer.probabilities_batch(list(faces[0]))
    assert probabilities.shape == (5, KNOWN)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=0.05)


def test_threshold_priority_and_unknown() -> None:
    model = trained_model()
    face = faces_of(model.identities[0], 1, 5)[0]
    recognizer = Recognizer(default_threshold=0.5)
    recognizer.swap(ModelArtifact(model.float_tflite, model.labels, threshold=None))
    assert recognizer.threshold == 0.5
    recognizer.swap(ModelArtifact(model.float_tflite, model.labels, threshold=1.0))
    assert recognizer.threshold == 1.0
    assert recognizer.recognize(face)[0] == UNKNOWN
    strict = Recognizer(threshold_override=0.0)
    strict.swap(ModelArtifact(model.float_tflite, model.labels, threshold=1.0))
    assert strict.recognize(face)[0] == model.labels[0]


def test_hot_swap_keeps_recognising_and_rejects_bad_models() -> None:
    model = trained_model()
    face = faces_of(model.identities[1], 1, 6)[0]
    recognizer = Recognizer(threshold_override=0.0)
    with pytest.raises(RecognizerError, match="no recognition model"):
        recognizer.recognize(face)
    recognizer.swap(ModelArtifact(model.float_tflite, model.labels, version=1))
    stop = threading.Event()
    failures: list[BaseException] = []
    count = 0

    def recognise_forever() -> None:
        nonlocal count
        while not stop.is_set():
            try:
                recognizer.recognize(face)
                count += 1
            except BaseException as err:  # any failure is the finding
                failures.append(err)
                return

    worker = threading.Thread(target=recognise_forever)
    worker.start()
    for version in range(2, 6):
        data = model.int8_tflite if version % 2 else model.float_tflite
        recognizer.swap(ModelArtifact(data, model.labels, version=version))
    stop.set()
    worker.join()
    assert not failures
    assert count > 0
    assert recognizer.version == 5

    with pytest.raises(RecognizerError, match="not a usable TFLite model"):
        recognizer.swap(ModelArtifact(b"not a flatbuffer", model.labels, version=6))
    with pytest.raises(RecognizerError, match="outputs but"):
        recognizer.swap(ModelArtifact(model.float_tflite, ("a", "b"), version=7))
    assert recognizer.version == 5  # the old model stays in use
    with pytest.raises(RecognizerError, match="model takes 64x64"):
        recognizer.recognize(np.zeros((32, 32), np.float32))


@pytest.mark.parametrize(
    ("labels", "threshold", "match"),
    [
        ((), None, "labels"),
        (("a", "a"), None, "distinct"),
        (("unknown",), None, "cannot"),
        (("a",), 1.5, "threshold"),
    ],
)
def test_artifact_validation(labels: tuple[str, ...], threshold: float | None, match: str) -> None:
    with pytest.raises(RecognizerError, match=match):
        ModelArtifact(b"x", labels, threshold)


def test_inference_path_does_not_import_tensorflow() -> None:
    code = (
        "import sys\n"
        "import edge.pipeline, edge.events, edge.camera, edge.recognizer\n"
        "edge.recognizer.interpreter_factory()\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
