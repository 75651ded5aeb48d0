"""Tiny real TFLite face models trained on synthetic identities, shared by the recognition tests.

Training happens once per test session (cached): a few seconds on one core.
TensorFlow is fine here; the inference path under test never imports it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edge.detector import FaceDetector
from fedbell.faces import crop_face, normalize_face
from fedbell.synthetic import (
    IdentityParams,
    make_identities,
    make_scene,
    person_name,
    render_face,
)

KNOWN = 8
"""Synthetic persons the test model is trained on; person KNOWN.. are strangers."""
OUTLIERS = 16
"""Other synthetic people shown in training with a uniform target ("none of these")."""
SEED = 11


@dataclass(frozen=True)
class TrainedModel:
    float_tflite: bytes
    int8_tflite: bytes
    int8_io_tflite: bytes
    labels: tuple[str, ...]
    identities: tuple[IdentityParams, ...]
    """All identities of the seed: the first KNOWN are enrolled, the rest are strangers."""


def faces_of(identity: IdentityParams, count: int, seed: int) -> npt.NDArray[np.float32]:
    """Normalised crops made as enrollment makes them: scene → Haar → crop_face.

    The detector's box varies in size and position around a face; training on
    its crops rather than on the raw renders teaches the model that variation.
    """
    rng = np.random.default_rng(seed)
    faces: list[npt.NDArray[np.float32]] = []
    while len(faces) < count:
        scene = make_scene([render_face(identity, rng, 96)], rng)
        boxes = _detector().detect(scene.frame)
        if boxes:
            faces.append(normalize_face(crop_face(scene.frame, boxes[0])))
    return np.stack(faces)


@functools.cache
def _detector() -> FaceDetector:
    return FaceDetector()


def _keras_model(classes: int) -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(SEED)
    layers = keras.layers
    inputs = keras.Input((64, 64, 1))
    x = inputs
    for filters in (8, 16, 32):
        x = layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(64, activation="relu")(x)
    outputs = layers.Dense(classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="categorical_crossentropy")
    return model


@functools.cache
def trained_model(per_person: int = 24, epochs: int = 25) -> TrainedModel:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    identities = tuple(make_identities(KNOWN + 3, SEED))
    images = np.concatenate([faces_of(identities[i], per_person, 100 + i) for i in range(KNOWN)])
    targets = np.repeat(np.eye(KNOWN, dtype=np.float32), per_person, axis=0)
    # Outlier exposure: strangers in training with a uniform target teach the
    # softmax to be unsure about faces it was not trained on, so a threshold
    # can separate them (a plain softmax is confidently wrong on strangers).
    outliers = make_identities(OUTLIERS, SEED + 1000)
    stranger_images = np.concatenate(
        [faces_of(o, per_person // 4, 300 + i) for i, o in enumerate(outliers)]
    )
    images = np.concatenate([images, stranger_images])
    targets = np.concatenate(
        [targets, np.full((len(stranger_images), KNOWN), 1.0 / KNOWN, np.float32)]
    )
    model = _keras_model(KNOWN)
    model.fit(images[..., None], targets, epochs=epochs, batch_size=32, verbose=0, shuffle=True)

    def representative() -> Any:
        for image in images[::4]:
            yield [image[None, :, :, None]]

    float_bytes = bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    int8_bytes = bytes(converter.convert())
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    int8_io_bytes = bytes(converter.convert())
    names = tuple(person_name(i) for i in range(KNOWN))
    return TrainedModel(float_bytes, int8_bytes, int8_io_bytes, names, identities)
