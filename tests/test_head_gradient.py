"""The doorbell's hand-written training step against TensorFlow's autodiff.

A doorbell trains the head in numpy (`fedbell.faces.embedding`), without
TensorFlow. These tests write the same prototype-CosFace loss in TensorFlow
and check that the numpy gradient of a batch is TensorFlow's, and that a
whole local round trained with TensorFlow's gradients ends where the
doorbell's does: the delta a doorbell sends is the one TensorFlow would have
computed from the same data, seed and plan.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedbell.faces import embedding, last_level
from fedbell.faces.embedding import TrainParams, normalize, train_head
from tests.recognition_helpers import clustered_house

tf = pytest.importorskip("tensorflow")


def tf_embed(model: list[Any], x: np.ndarray) -> Any:
    """The model's raw embeddings in TensorFlow: the head, or dlib's last level and the head."""
    features = tf.constant(x, tf.float64)
    if len(model) > 1:
        w1, b1, w2, b2 = model[:-1]
        patch, s00, rest = (
            features[:, : last_level.PATCH],
            features[:, last_level.PATCH : last_level.PATCH + 256],
            features[:, last_level.PATCH + 256 :],
        )
        out = s00 + tf.nn.relu(patch @ w1 + b1) @ w2 + b2
        features = rest + tf.nn.relu(out) / 4.0
    return features @ model[-1]


def tf_batch_gradient(
    model: list[np.ndarray],
    *,
    x: np.ndarray,
    z: np.ndarray,
    targets: np.ndarray,
    batch: np.ndarray,
    epoch: Any,
    params: TrainParams,
) -> tuple[float, list[np.ndarray]]:
    """The loss of `embedding._batch_gradient`, differentiated by TensorFlow.

    Prototypes are constants within an epoch (the doorbell recomputes them
    each epoch and does not train through them).
    """
    own = (
        normalize(epoch.sums[targets] - epoch.current[batch])
        if params.leave_one_out
        else epoch.centres[targets]
    )
    variables = [tf.Variable(np.asarray(t, np.float64)) for t in model]
    with tf.GradientTape() as tape:
        e = tf.math.l2_normalize(tf_embed(variables, x[batch]), axis=1)
        n = tf.math.l2_normalize(tf_embed(variables, z), axis=1)
        centres = tf.constant(epoch.centres, tf.float64)
        cos = tf.concat([e @ tf.transpose(centres), e @ tf.transpose(n)], axis=1)
        own_cos = tf.reduce_sum(e * tf.constant(own, tf.float64), axis=1) - params.margin
        cos = tf.tensor_scatter_nd_update(
            cos, tf.stack([tf.range(len(batch)), tf.constant(targets, tf.int32)], axis=1), own_cos
        )
        loss = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=tf.constant(targets), logits=params.scale * cos
            )
        )
    grads = tape.gradient(loss, variables)
    return float(loss.numpy()), [np.asarray(g.numpy(), np.float32) for g in grads]


def last_level_house(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """A house's cached level inputs, its strangers and a small random model of the real
    shapes (the level's 2,816 inputs, 256 features): for the level's training step."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, last_level.LEVEL_INPUTS))
    x = np.concatenate([c + 0.7 * rng.normal(size=(5, last_level.LEVEL_INPUTS)) for c in centres])
    y = np.repeat(np.arange(4), 5)
    z = rng.normal(size=(7, last_level.LEVEL_INPUTS))
    model = [
        rng.normal(size=shape) / np.sqrt(shape[0]) / (4 if len(shape) == 1 else 1)
        for shape in (*last_level.SHAPES, (256, 8))
    ]
    return (
        np.abs(x).astype(np.float32),  # the level's inputs are relu outputs
        y.astype(np.int64),
        np.abs(z).astype(np.float32),
        [np.asarray(t, np.float32) for t in model],
    )


def a_house(kind: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    if kind == "head":
        x, y, z, head = clustered_house(seed)
        return x, y, z, [head]
    return last_level_house(seed)


@pytest.mark.parametrize("kind", ["head", "last_level"])
@pytest.mark.parametrize("leave_one_out", [True, False])
def test_batch_gradient_is_tensorflows(leave_one_out: bool, kind: str) -> None:
    x, y, z, model = a_house(kind, 1)
    params = TrainParams(leave_one_out=leave_one_out)
    current = embedding._forward(x, model)[0]
    sums = np.zeros((int(y.max()) + 1, current.shape[1]), np.float32)
    np.add.at(sums, y, current)
    epoch = embedding._Epoch(current, sums, normalize(sums))
    batch = np.array([0, 3, 6, 11, 15, 19])
    args = {"x": x, "z": z, "targets": y[batch], "batch": batch, "epoch": epoch}
    loss, grads = embedding._batch_gradient(model, params=params, **args)
    want_loss, wants = tf_batch_gradient(model, params=params, **args)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert len(grads) == len(wants) == len(model)
    for grad, want in zip(grads, wants, strict=True):
        assert np.linalg.norm(want) > 1e-4  # a gradient that says something
        np.testing.assert_allclose(grad, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("kind", ["head", "last_level"])
def test_a_local_round_ends_where_tensorflows_gradients_take_it(
    monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Same data, seed and plan (3 epochs of Adam, FedProx on): the deltas agree to 1e-3
    of their size, while the round moves the model by far more than that."""
    x, y, z, model = a_house(kind, 2)
    params = TrainParams(epochs=3, batch_size=8, learning_rate=1e-2, prox_mu=0.1, seed=5)
    ours = [t - m for t, m in zip(train_head(model, x, y, z, params).head, model, strict=True)]
    monkeypatch.setattr(embedding, "_batch_gradient", tf_batch_gradient)
    theirs = [t - m for t, m in zip(train_head(model, x, y, z, params).head, model, strict=True)]
    for mine, want in zip(ours, theirs, strict=True):
        size = np.linalg.norm(want)
        assert size > 0.05
        assert np.linalg.norm(mine - want) < 1e-3 * size
