"""The face-identity CNN, its training step and its TFLite export.

Small on purpose: a Pi 4 trains it on a few hundred crops in seconds, its
updates fit comfortably in MQTT messages, and it has no layer that would stop
a built-in-ops-only TFLite training model later: stride-2 convolutions instead
of MaxPool, no BatchNorm (their gradients need Flex ops; BatchNorm statistics
also do not average well across non-IID clients).

TensorFlow is imported inside the functions: the inference path (LiteRT)
never pays for it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedbell.codecs import Weights
from fedbell.envelope import TensorSpec
from fedbell.faces import FACE_SIZE

Images = npt.NDArray[np.float32]
"""A batch of normalised grey crops, shape (N, FACE_SIZE, FACE_SIZE)."""
LabelIds = npt.NDArray[np.int64]
STRANGER = -1
"""Label id of a face that belongs to nobody in the label set (outlier exposure)."""


@dataclass(frozen=True)
class TrainParams:
    """Local training hyper-parameters; the round message carries them."""

    epochs: int = 5
    batch_size: int = 8
    learning_rate: float = 1e-3
    prox_mu: float = 0.0
    """FedProx: weight of (mu/2)·||w - w_base||², which keeps a node with a few
    people in its gallery from drifting far from the global model."""
    seed: int = 0


def _keras() -> Any:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    return keras


def limit_threads(threads: int) -> None:
    """Keep TensorFlow to `threads` cores: several processes share a Pi or a CI box."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        pass  # TensorFlow already started; it keeps its first setting


def build_model(num_classes: int, size: int = FACE_SIZE, seed: int = 0) -> Any:
    """A fresh model with deterministic initial weights for `seed`."""
    keras = _keras()
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input((size, size, 1), name="face")
    x = inputs
    for index, filters in enumerate((16, 32, 64, 64), start=1):
        x = layers.Conv2D(
            filters, 3, strides=2, padding="same", activation="relu", name=f"conv{index}"
        )(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dropout(0.3, name="dropout")(x)
    x = layers.Dense(128, activation="relu", name="embed")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="identity")(x)
    return keras.Model(inputs, outputs, name="fedbell_face")


def weight_names(model: Any) -> list[str]:
    return [str(w.path) for w in model.weights]


def get_weights(model: Any) -> Weights:
    return [np.asarray(w, dtype=np.float32) for w in model.get_weights()]


def set_weights(model: Any, weights: Sequence[npt.NDArray[np.float32]]) -> None:
    model.set_weights(list(weights))


def tensor_specs(
    names: Sequence[str], weights: Sequence[npt.NDArray[np.float32]]
) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(name=n, shape=tuple(int(d) for d in w.shape))
        for n, w in zip(names, weights, strict=True)
    )


def augment(images: Images, rng: np.random.Generator) -> Images:
    """Random shifts of up to 4 pixels and horizontal flips: a doorbell never
    sees a face twice in exactly the same place."""
    out = np.empty_like(images)
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4)), mode="edge")
    size = images.shape[1]
    for i in range(len(images)):
        dy, dx = rng.integers(0, 9, size=2)
        crop = padded[i, dy : dy + size, dx : dx + size]
        out[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return out


def _batches(
    images: Images, labels: LabelIds, params: TrainParams, epoch: int
) -> Iterator[tuple[Images, LabelIds]]:
    rng = np.random.default_rng((params.seed, epoch))
    order = rng.permutation(len(images))
    augmented = augment(images[order], rng)
    for start in range(0, len(order), params.batch_size):
        yield (
            augmented[start : start + params.batch_size, :, :, None],
            labels[order][start : start + params.batch_size],
        )


class _Step:
    """One model's compiled training step, built once and reused every round.

    Rebuilding a tf.function per round would retrace the graph each time,
    which costs more than a round of training on a doorbell's gallery.
    """

    def __init__(self, model: Any) -> None:
        import tensorflow as tf

        keras = _keras()
        self.optimizer = keras.optimizers.Adam(1e-3)
        self.optimizer.build(model.trainable_weights)
        self.anchors = [tf.Variable(w, trainable=False) for w in model.trainable_weights]
        self.mu = tf.Variable(0.0, trainable=False)

        def step(x: Any, y: Any) -> Any:
            with tf.GradientTape() as tape:
                log_p = tf.math.log(tf.clip_by_value(model(x, training=True), 1e-7, 1.0))
                known = y >= 0
                # Residents: cross-entropy with their label. Strangers (STRANGER):
                # cross-entropy with the uniform distribution, which teaches the
                # model to be unsure on faces it was never meant to know
                # (Hendrycks et al., "Deep anomaly detection with outlier exposure").
                resident = -tf.gather(log_p, tf.maximum(y, 0), axis=1, batch_dims=1)
                stranger = -tf.reduce_mean(log_p, axis=1)
                loss = tf.reduce_mean(tf.where(known, resident, stranger))
                drift = tf.add_n(
                    [
                        tf.reduce_sum(tf.square(w - a))
                        for w, a in zip(model.trainable_weights, self.anchors, strict=True)
                    ]
                )
                loss += self.mu / 2.0 * drift
            grads = tape.gradient(loss, model.trainable_weights)
            self.optimizer.apply_gradients(zip(grads, model.trainable_weights, strict=True))
            return loss

        self.step = tf.function(step, reduce_retracing=True)

    def reset(self, model: Any, params: TrainParams) -> None:
        """Fresh optimizer moments and the proximal anchor at the current weights."""
        for variable in self.optimizer.variables:
            variable.assign(np.zeros(variable.shape, variable.dtype))
        self.optimizer.learning_rate.assign(params.learning_rate)
        for anchor, weight in zip(self.anchors, model.trainable_weights, strict=True):
            anchor.assign(weight)
        self.mu.assign(params.prox_mu)


_STEPS: weakref.WeakKeyDictionary[Any, _Step] = weakref.WeakKeyDictionary()


def train(model: Any, images: Images, labels: LabelIds, params: TrainParams) -> float:
    """Train in place from the model's current weights; returns the last epoch's mean loss."""
    import tensorflow as tf

    _keras().utils.set_random_seed(params.seed)
    step = _STEPS.get(model)
    if step is None:
        step = _STEPS[model] = _Step(model)
    step.reset(model, params)
    loss = float("nan")
    for epoch in range(params.epochs):
        losses = [
            float(step.step(tf.constant(x), tf.constant(y)))
            for x, y in _batches(images, labels, params, epoch)
        ]
        loss = float(np.mean(losses)) if losses else loss
    return loss


def predict(model: Any, images: Images) -> npt.NDArray[np.float32]:
    """Class probabilities, shape (N, classes)."""
    return np.asarray(
        model.predict(images[:, :, :, None], verbose=0, batch_size=256), dtype=np.float32
    )


def accuracy(model: Any, images: Images, labels: LabelIds) -> float:
    if len(images) == 0:
        return float("nan")
    return float(np.mean(np.argmax(predict(model, images), axis=1) == labels))


def to_tflite(model: Any, representative: Images) -> tuple[bytes, bytes]:
    """Float and int8 (weights and activations, float in/out) flatbuffers."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    float_model = bytes(converter.convert())

    samples = representative[:200]

    def dataset() -> Iterator[list[npt.NDArray[np.float32]]]:
        for image in samples:
            yield [image[None, :, :, None].astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = dataset
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return float_model, bytes(converter.convert())
