"""The centralised baseline: the same model trained on the union of the nodes' data.

Same initial weights (the aggregator's model seed), same hyper-parameters and
as many passes over the data as the federation made (rounds × local epochs),
so the gap between the two numbers is what federating cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedbell.dataset import Sample, load_samples
from fedbell.model import TrainParams, accuracy, build_model, limit_threads, train

BASELINE_THREADS = 1
"""The demo machine's two cores are shared; the baseline is small enough for one."""


@dataclass(frozen=True)
class Baseline:
    accuracy: float
    model_params: int


def centralized(
    train_samples: Sequence[Sample],
    held_out: Sequence[Sample],
    labels: Sequence[str],
    params: TrainParams,
    model_seed: int,
) -> Baseline:
    limit_threads(BASELINE_THREADS)
    images, ids = load_samples(train_samples, labels)
    test_images, test_ids = load_samples(held_out, labels)
    model = build_model(len(labels), seed=model_seed)
    train(model, images, ids, params)
    return Baseline(accuracy(model, test_images, test_ids), int(model.count_params()))
