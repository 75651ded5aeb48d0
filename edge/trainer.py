"""The client step: train the round's head on this house's faces, return trained − base.

The doorbell, the simulation and the benchmarks all call `train_delta`, so
what a benchmark measures is what a doorbell sends. It works on backbone
features (computed once per gallery image, see `edge/gallery.py`), so a round
costs milliseconds of numpy and never imports TensorFlow.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedbell.codecs import Weights
from fedbell.embedding import HEAD_NAMES, Features, LabelIds, TrainParams, train_head


def round_seed(device: str, round_id: int) -> int:
    """A seed that differs per device and round but is reproducible for both."""
    return zlib.crc32(f"{device}:{round_id}".encode()) & 0x7FFFFFFF


@dataclass(frozen=True)
class TrainedDelta:
    names: tuple[str, ...]
    delta: Weights
    num_examples: int
    loss: float
    seconds: float


def train_delta(
    base: Sequence[npt.NDArray[np.float32]],
    features: Features,
    labels: LabelIds,
    strangers: Features,
    params: TrainParams,
) -> TrainedDelta:
    """Train a copy of the base head on the gallery (and strangers seen at the door).

    `labels` number the house's own people 0..P-1 in any order: they never
    leave the doorbell, and nothing in the delta depends on their names.
    """
    started = time.monotonic()
    result = train_head(base, features, labels, strangers, params)
    delta = [
        np.asarray(t - np.asarray(b, np.float32), dtype=np.float32)
        for t, b in zip(result.head, base, strict=True)
    ]
    return TrainedDelta(
        names=HEAD_NAMES,
        delta=delta,
        num_examples=len(features),
        loss=result.loss,
        seconds=time.monotonic() - started,
    )
