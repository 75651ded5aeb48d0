"""The local step's optimiser (`TrainParams.optimizer`, issue 20): sgd is plain gradient
descent, so a round's delta is the house's gradient times the learning rate, which a
server optimiser (FedAdam) can then keep moments of; adam normalises every coordinate."""

from __future__ import annotations

from dataclasses import replace
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


def test_a_kept_adam_runs_on_as_if_the_training_had_never_stopped() -> None:
    """`adam_moments: kept`: two trainings of 3 epochs, the second given the first's
    moments, end where one of 6 epochs does (one whole batch an epoch, so the order of
    the faces does not matter); a fresh second training does not."""
    x, y, z, head = clustered_house(5)
    kept = TrainParams(epochs=3, batch_size=len(x), learning_rate=1e-3, adam_moments="kept")
    once = train_head([head], x, y, z, replace(kept, epochs=6))
    first = train_head([head], x, y, z, kept)
    assert first.moments is not None
    assert first.moments.steps == first.steps == 3
    second = train_head(first.head, x, y, z, kept, moments=first.moments)
    assert second.steps == 3
    assert second.moments is not None
    assert second.moments.steps == 6
    np.testing.assert_allclose(second.head[0], once.head[0], rtol=1e-5, atol=1e-7)
    fresh = train_head(
        first.head, x, y, z, replace(kept, adam_moments="fresh"), moments=first.moments
    )
    assert float(np.abs(fresh.head[0] - once.head[0]).max()) > 1e-4


def test_moments_are_ignored_unless_kept_and_of_the_model_s_shapes() -> None:
    x, y, z, head = clustered_house(6)
    params = TrainParams(epochs=2, batch_size=len(x), learning_rate=1e-3, adam_moments="fresh")
    plain = train_head([head], x, y, z, params)
    assert plain.moments is not None  # the doorbell decides whether to keep them
    other = embedding.AdamMoments([np.ones((3, 3), np.float32)], [np.ones((3, 3), np.float32)], 9)
    for given, plan in (
        (plain.moments, params),  # fresh: a new Adam whatever it is given
        (other, replace(params, adam_moments="kept")),  # another model's: a new Adam
    ):
        again = train_head([head], x, y, z, plan, moments=given)
        np.testing.assert_array_equal(again.head[0], plain.head[0])
    sgd = train_head([head], x, y, z, replace(params, optimizer="sgd", adam_moments="kept"))
    assert sgd.moments is None
    with pytest.raises(ValueError, match="adam_moments"):
        TrainParams(adam_moments="always")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="adam_moments"):
        TrainingPlan(adam_moments="always")  # type: ignore[arg-type]
