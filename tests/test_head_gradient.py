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

from fedbell.faces import embedding
from fedbell.faces.embedding import TrainParams, normalize, train_head
from tests.recognition_helpers import clustered_house

tf = pytest.importorskip("tensorflow")


def tf_batch_gradient(
    projection: np.ndarray,
    *,
    x: np.ndarray,
    z: np.ndarray,
    targets: np.ndarray,
    batch: np.ndarray,
    epoch: Any,
    params: TrainParams,
) -> tuple[float, np.ndarray]:
    """The loss of `embedding._batch_gradient`, differentiated by TensorFlow.

    Prototypes are constants within an epoch (the doorbell recomputes them
    each epoch and does not train through them).
    """
    own = (
        normalize(epoch.sums[targets] - epoch.current[batch])
        if params.leave_one_out
        else epoch.centres[targets]
    )
    variable = tf.Variable(projection.astype(np.float64))
    with tf.GradientTape() as tape:
        e = tf.math.l2_normalize(tf.constant(x[batch], tf.float64) @ variable, axis=1)
        n = tf.math.l2_normalize(tf.constant(z, tf.float64) @ variable, axis=1)
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
    grad = tape.gradient(loss, variable)
    return float(loss.numpy()), np.asarray(grad.numpy(), np.float32)


@pytest.mark.parametrize("leave_one_out", [True, False])
def test_batch_gradient_is_tensorflows(leave_one_out: bool) -> None:
    x, y, z, head = clustered_house(1)
    params = TrainParams(leave_one_out=leave_one_out)
    current = embedding._forward(x, head)[0]
    sums = np.zeros((int(y.max()) + 1, current.shape[1]), np.float32)
    np.add.at(sums, y, current)
    epoch = embedding._Epoch(current, sums, normalize(sums))
    batch = np.array([0, 3, 6, 11, 15, 19])
    args = {"x": x, "z": z, "targets": y[batch], "batch": batch, "epoch": epoch}
    loss, grad = embedding._batch_gradient(head, params=params, **args)
    want_loss, want = tf_batch_gradient(head, params=params, **args)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert np.linalg.norm(want) > 0.01  # a gradient that says something
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_a_local_round_ends_where_tensorflows_gradients_take_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Same data, seed and plan (3 epochs of Adam, FedProx on): the deltas agree to 1e-3
    of their size, while the round moves the head by far more than that."""
    x, y, z, head = clustered_house(2)
    params = TrainParams(epochs=3, batch_size=8, learning_rate=1e-2, prox_mu=0.1, seed=5)
    ours = train_head([head], x, y, z, params).head[0] - head
    monkeypatch.setattr(embedding, "_batch_gradient", tf_batch_gradient)
    theirs = train_head([head], x, y, z, params).head[0] - head
    size = np.linalg.norm(theirs)
    assert size > 0.05
    assert np.linalg.norm(ours - theirs) < 1e-3 * size
