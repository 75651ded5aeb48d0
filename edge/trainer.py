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

from fedbell.faces.embedding import (
    AdamMoments,
    Features,
    LabelIds,
    TrainParams,
    model_names,
    train_head,
)
from fedbell.wire.codecs import Weights


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
    moments: AdamMoments | None = None
    """The local Adam's state at the end, for a doorbell that keeps it (`adam_moments`)."""


def train_delta(
    base: Sequence[npt.NDArray[np.float32]],
    features: Features,
    labels: LabelIds,
    strangers: Features,
    params: TrainParams,
    *,
    residual: Sequence[npt.NDArray[np.float32]] | None = None,
    moments: AdamMoments | None = None,
) -> TrainedDelta:
    """Train a copy of the base head on the gallery (and strangers seen at the door).

    `labels` number the house's own people 0..P-1 in any order: they never
    leave the doorbell, and nothing in the delta depends on their names.

    `residual`: with the topk codec, what this doorbell's earlier updates left
    unsent (`fedbell.wire.sparsify.with_error_feedback`). Training starts from
    base + residual, the head this doorbell would hold had all of it been sent,
    and the delta is still measured from `base`, so it carries the residual
    once. Adding the residual to a delta trained from `base` instead counts it
    twice: a few local epochs of Adam re-learn most of what was not sent (the
    gradient at `base` still points there), and the residual grows every round
    until it swamps the update (measured on generated faces: top-k 5 % then
    drifts down for 40 rounds where float32 learns in 2).

    `moments`: the Adam this doorbell kept from its last round, to continue.
    """
    started = time.monotonic()
    start = list(base)
    if residual is not None and [r.shape for r in residual] == [b.shape for b in start]:
        start = [
            np.asarray(b, np.float32) + np.asarray(r, np.float32)
            for b, r in zip(start, residual, strict=True)
        ]
    # (a residual of other shapes is from an older model and means nothing here)
    result = train_head(start, features, labels, strangers, params, moments=moments)
    delta = [
        np.asarray(t - np.asarray(b, np.float32), dtype=np.float32)
        for t, b in zip(result.head, base, strict=True)
    ]
    return TrainedDelta(
        names=model_names(base),
        delta=delta,
        num_examples=len(features),
        loss=result.loss,
        seconds=time.monotonic() - started,
        moments=result.moments,
    )
