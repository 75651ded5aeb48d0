"""The local step's optimiser (`TrainParams.optimizer`, issue 20): sgd is plain gradient
descent, so a round's delta is the house's gradient times the learning rate, which a
server optimiser (FedAdam) can then keep moments of; adam normalises every coordinate."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedbell.faces import embedding
from fedbell.faces.embedding import TrainParams, normalize, train_head
from fedbell.wire.protocol import TrainingPlan
from tests.recognition_helpers import clustered_house


def whole_batch_gradient(x: Any, y: Any, z: Any, head: Any, params: TrainParams) -> Any:
    current = embedding._forward(x, [head])[0]
    sums = np.zeros((int(y.max()) + 1, current.shape[1]), np.float32)
    np.add.at(sums, y, current)
    epoch = embedding._Epoch(current, sums, normalize(sums))
    batch = np.arange(len(x))
    args = {"x": x, "z": z, "targets": y, "batch": batch, "epoch": epoch}
    return embedding._batch_gradient([head], params=params, **args)[1][0]


def test_one_sgd_step_moves_the_head_against_the_gradient() -> None:
    x, y, z, head = clustered_house(3)
    params = TrainParams(optimizer="sgd", epochs=1, batch_size=len(x), learning_rate=1e-2)
    grad = whole_batch_gradient(x, y, z, head, params)
    assert np.linalg.norm(grad) > 0.01  # a gradient that says something
    moved = train_head([head], x, y, z, params).head[0] - head
    np.testing.assert_allclose(moved, -1e-2 * grad, rtol=1e-4, atol=1e-6)


def test_adam_moves_every_coordinate_by_about_the_learning_rate_at_first() -> None:
    """Why sgd exists: Adam's first step is lr * sign(gradient), small gradients included."""
    x, y, z, head = clustered_house(4)
    params = TrainParams(optimizer="adam", epochs=1, batch_size=len(x), learning_rate=1e-3)
    moved = train_head([head], x, y, z, params).head[0] - head
    assert np.abs(moved) == pytest.approx(np.full(moved.shape, 1e-3), rel=1e-3)


def test_the_round_plan_names_the_optimiser_and_refuses_others() -> None:
    assert TrainingPlan(optimizer="sgd").optimizer == "sgd"
    with pytest.raises(ValueError, match="optimi"):
        TrainingPlan(optimizer="lion")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="optimizer"):
        TrainParams(optimizer="lion")  # type: ignore[arg-type]
