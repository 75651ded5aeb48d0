"""Recognition benchmark, pinned to one core as on a busy Pi.

    python -m bench.recognition [--dataset ../shared/datasets/faces94_female]

Prints: whole-pipeline frames per second on 640×480 frames (goal ≥ 30),
milliseconds per face for the float and int8 TFLite models, and, when the
real-photo dataset is present, the Haar detection rate and the recognition
accuracy after training on a split of it. Training uses Keras here (a bench,
not the inference path).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import numpy.typing as npt

from edge.detector import FaceDetector
from edge.pipeline import Pipeline
from edge.recognition_config import DetectionConfig
from edge.recognizer import ModelArtifact, Recognizer
from fedbell.faces import FACE_SIZE, crop_face, normalize_face, read_image
from fedbell.synthetic import make_identities, make_scene, render_face

DEFAULT_DATASET = Path(__file__).resolve().parents[1].parent / "shared/datasets/faces94_female"
Faces = npt.NDArray[np.float32]


class NullSink:
    """Events go nowhere: the bench measures vision, not the broker."""

    def visitor(self, *args: object, **kwargs: object) -> str:
        return ""

    def ring(self, *args: object, **kwargs: object) -> str:
        return ""

    def present(self, present: bool) -> None:
        pass


def train_tflite(
    faces: Faces, labels: npt.NDArray[np.int64], classes: int, epochs: int
) -> tuple[bytes, bytes]:
    """A small stride-2 CNN (the shape of fedbell's model) → float and int8 TFLite."""
    import keras
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(0)
    layers = keras.layers
    inputs = keras.Input((FACE_SIZE, FACE_SIZE, 1))
    x = inputs
    for filters in (16, 32, 64, 64):
        x = layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.Flatten()(layers.Dropout(0.0)(x))
    x = layers.Dense(128, activation="relu")(x)
    model = keras.Model(inputs, layers.Dense(classes, activation="softmax")(x))
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit(faces[..., None], labels, epochs=epochs, batch_size=16, verbose=0)

    def representative() -> Any:
        for face in faces[:100]:
            yield [face[None, :, :, None]]

    float_model = bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return float_model, bytes(converter.convert())


def synthetic_faces(persons: int, per_person: int) -> tuple[Faces, npt.NDArray[np.int64]]:
    rng = np.random.default_rng(0)
    faces, labels = [], []
    for index, identity in enumerate(make_identities(persons, 0)):
        for _ in range(per_person):
            faces.append(normalize_face(render_face(identity, rng)))
            labels.append(index)
    return np.stack(faces), np.array(labels, dtype=np.int64)


def ms_per_face(recognizer: Recognizer, faces: Faces, repeats: int = 300) -> float:
    for face in faces[:10]:
        recognizer.recognize(face)
    start = time.perf_counter()
    for i in range(repeats):
        recognizer.recognize(faces[i % len(faces)])
    return (time.perf_counter() - start) * 1000.0 / repeats


def pipeline_fps(recognizer: Recognizer, frames: int = 150) -> tuple[float, float]:
    """(fps, faces per frame) of detect → crop → normalise → recognise on 640×480 frames."""
    rng = np.random.default_rng(1)
    people = make_identities(5, 3)
    scenes = [make_scene([render_face(people[i % 5], rng)], rng).frame for i in range(30)]
    pipeline = Pipeline(FaceDetector(), recognizer, NullSink())
    for scene in scenes[:5]:
        pipeline.process(scene)
    start = time.perf_counter()
    faces = 0
    for i in range(frames):
        faces += len(pipeline.process(scenes[i % len(scenes)]))
    return frames / (time.perf_counter() - start), faces / frames


def real_dataset(root: Path, train_per_person: int, epochs: int) -> None:
    """Detection rate and accuracy on real photographs (first images train, rest test)."""
    # 180x200 photos: small already, so detect at full size.
    detector = FaceDetector(DetectionConfig(downscale=1.0, min_face_px=40))
    persons = sorted(p for p in root.iterdir() if p.is_dir())
    crops: dict[int, list[Faces]] = {}
    images = detected = 0
    for index, person in enumerate(persons):
        for path in sorted(person.iterdir()):
            try:
                frame = read_image(path)
            except ValueError:
                continue
            images += 1
            boxes = detector.detect(frame)
            if boxes:
                detected += 1
                crop = crop_face(frame, boxes[0])
                crops.setdefault(index, []).append(normalize_face(crop))
    print(
        f"real photos ({root.name}): {len(persons)} persons, {images} images, "
        f"Haar detection rate {detected / max(1, images):.1%}"
    )
    train_x: list[Faces] = []
    test_x: list[Faces] = []
    train_y: list[int] = []
    test_y: list[int] = []
    for index, faces in crops.items():
        for i, face in enumerate(faces):
            (train_x if i < train_per_person else test_x).append(face)
            (train_y if i < train_per_person else test_y).append(index)
    if not test_x:
        print("real photos: too few detected faces to evaluate")
        return
    float_model, int8_model = train_tflite(
        np.stack(train_x), np.array(train_y, np.int64), len(persons), epochs
    )
    labels = tuple(p.name for p in persons)
    for name, data in (("float", float_model), ("int8", int8_model)):
        recognizer = Recognizer(threshold_override=0.0)
        recognizer.swap(ModelArtifact(data, labels))
        names = [n for n, _ in recognizer.recognize_batch(test_x)]
        accuracy = np.mean([n == labels[y] for n, y in zip(names, test_y, strict=True)])
        print(
            f"real photos: {name} accuracy {accuracy:.1%} on {len(test_x)} held-out faces "
            f"({len(train_x)} training crops, {train_per_person}/person)"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--train-per-person", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {0})  # one core, as a Pi shares its cores with training
    faces, labels = synthetic_faces(10, 12)
    float_model, int8_model = train_tflite(faces, labels, 10, epochs=5)
    artifact_labels = tuple(f"person{i:02d}" for i in range(10))
    for name, data in (("float", float_model), ("int8", int8_model)):
        recognizer = Recognizer(threshold_override=0.0, num_threads=1)
        recognizer.swap(ModelArtifact(data, artifact_labels))
        print(f"{name} TFLite: {ms_per_face(recognizer, faces):.2f} ms per face")
        fps, per_frame = pipeline_fps(recognizer)
        print(
            f"{name} pipeline on 640x480: {fps:.1f} frames/s ({per_frame:.2f} faces/frame), "
            f"goal >= 30"
        )
    if args.dataset.is_dir():
        real_dataset(args.dataset, args.train_per_person, args.epochs)
    else:
        print(f"real photos: {args.dataset} absent, skipped")


if __name__ == "__main__":
    main()
