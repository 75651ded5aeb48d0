"""The federated part of the face model: features → embedding, and its training.

A frozen backbone (dlib's face ResNet, see `fedbell/faces/dlib_resnet.py`) turns an
aligned face chip into features; the *head* projects them to an embedding that
is L2-normalised, so two faces compare by cosine similarity. Who is who is
decided at home, by the nearest enrolled prototype (`fedbell/gallery.py`). Only
the head is trained, on the doorbells, and only its tensors travel in rounds:
the federation learns how to compare faces, never whose faces they are.

The head starts as dlib's own final projection, so version 0 is exactly dlib's
descriptor (normalised) and the federation adapts it to doorbell conditions.

Pure numpy, so a doorbell trains without TensorFlow: the head is one matrix,
and its gradient is a few lines.

How the objective and its defaults were chosen (`make bench-openset`'s
households under doorbell conditions, dlib's 256-d features; tuned on a
validation split of the TRAINING people only — 30 % of the training houses
held out as test houses, 166 training / 69 validation houses, 921
calibration strangers — never on the test people). Figures are open-set
accuracy / TAR at 1 % FAR; the start head (dlib's projection) scores
0.847 / 0.584 there:

- the first defaults (Adam 1e-3, 5 epochs, batch 32, margin 0.2, scale 16)
  collapse the embedding cone: central 10 epochs 0.648 / 0.267, federated
  30 rounds × 20 houses 0.731 / 0.399;
- Adam 1e-4: central 3 / 10 / 20 epochs 0.808 / 0.640, 0.833 / 0.680,
  0.846 / 0.696; federated with 5 local epochs, 30 rounds 0.802 / 0.630;
  with 10 local epochs, 60 rounds 0.847 / 0.683 (chosen); Adam 3e-4, 5
  epochs, 60 rounds 0.763 / 0.554;
- margin 0.35 or scale 32 / margin 0.1 change nothing measurable (against a
  thousand prototypes and strangers the target's probability stays small, so
  the margin hardly moves the gradient); 128 strangers per doorbell instead of
  32 neither (federated, 20 rounds: 0.804 / 0.620 against 0.804 / 0.634);
- leave-one-out prototypes (`leave_one_out`) against prototypes that contain
  the face itself: central 10 epochs 0.833 / 0.680 against 0.844 / 0.700,
  within the noise of ~430 probes; kept because it trains what a doorbell
  does (a probe against the other photos' prototype);
- the aggregator's server momentum (`server_optimizer: fedavgm`, 0.9) makes
  it worse: 60 rounds 0.747 / 0.465 against 0.847 / 0.683 without (plain
  FedAvg of the sparse updates, the default, is kept);
- more head: a residual ReLU adapter (256→128→128, zero-initialised output)
  reaches 0.848 / 0.696 after 15 central epochs, a 256×256 head (dlib's
  columns plus 128 small random ones) 0.833 / 0.677 after 10: no better than
  the linear head, so the head stays one matrix. Under these conditions the
  frozen features, not the head's shape, bound what any head can reach.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from fedbell.faces import last_level
from fedbell.wire.codecs import Weights

Features = npt.NDArray[np.float32]
"""Backbone features, shape (N, FEATURES)."""
Embeddings = npt.NDArray[np.float32]
"""L2-normalised embeddings, shape (N, EMBEDDING)."""
LabelIds = npt.NDArray[np.int64]

HEAD_NAMES: tuple[str, ...] = ("head/projection",)
"""The tensors of the global model: what a round trains and averages."""
LAST_LEVEL_NAMES: tuple[str, ...] = (*last_level.NAMES, *HEAD_NAMES)
"""The global model when the aggregator trains dlib's last level too: its features
are then the level's cached inputs (`last_level.LEVEL_INPUTS` per face), not the
pooled features."""

_EPSILON = 1e-12


@dataclass(frozen=True)
class TrainParams:
    """Local training hyper-parameters; the round message carries them."""

    epochs: int = 10
    """Local epochs per round (measured: 10 beat 5 at Adam 1e-4, see above)."""
    batch_size: int = 32
    learning_rate: float = 1e-4
    """The local step. adam: 1e-3 collapses the embedding cone within a few hundred steps,
    1e-4 was the measured choice. sgd: 1e-4 too (measured against 2e-4 and 4e-4 with
    FedAdam on the server, issue 20: the gradient's norm is ~40, so a round moves a
    house's head about as far as Adam 1e-4 does)."""
    optimizer: Literal["adam", "sgd"] = "adam"
    """adam: Adam on every doorbell (the default; `adam_moments` says whether it runs on
    across rounds). A fresh Adam's first steps move every coordinate by about the learning
    rate whatever its gradient, and averaged over a round's houses that noise put
    visit-level TAR 5 points below the start head's after 20 rounds under `near`
    conditions (issue 20, docs/learning.md). sgd: plain gradient steps, so a round's
    delta is proportional to the house's gradient; with the aggregator's
    `server_optimizer: fedadam` keeping the moments across rounds (as central training
    keeps Adam's), 1.6 points above a fresh Adam per visit under `far` (five seeds), but
    not the default: a secure round's shared subset, rescaled, carries sampling noise
    that the server's momentum adds up (0.911 against 0.939), and on three houses' dense
    updates a round's head fell to chance with server momentum (FedAvgM) and was refused
    with FedAdam (docs/learning.md)."""
    adam_moments: Literal["fresh", "kept"] = "kept"
    """kept (the default): a training given an earlier one's `AdamMoments` continues that
    Adam, so a doorbell's Adam runs on across its rounds of a lineage, as central
    training's does: plain rounds +1.0 point of visit TAR under `far` over five seeds
    (within 1.5 of central), secure rounds unchanged. fresh: every training starts a new
    Adam (the rule before issue 20). docs/learning.md has both, and what kept costs the
    codecs of `make bench`."""
    prox_mu: float = 0.0
    """FedProx: weight of (mu/2)·||W - W_base||², which keeps a doorbell that
    knows only a few people from pulling the shared head towards them."""
    seed: int = 0
    margin: float = 0.2
    """CosFace margin: a face must be this much closer (in cosine) to its own
    person than to anyone else before it stops pulling."""
    scale: float = 16.0
    """Softmax temperature over cosines (CosFace's s)."""
    leave_one_out: bool = True
    """A face is compared with its own person's prototype made of their OTHER
    photos (as a probe is compared with an enrolment), not one that contains
    itself; a person with a single photo is then only a prototype for others."""

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError(f"epochs {self.epochs} / batch_size {self.batch_size} out of range")
        if self.optimizer not in {"adam", "sgd"}:
            raise ValueError(f"unknown local optimizer {self.optimizer!r}")
        if self.adam_moments not in {"fresh", "kept"}:
            raise ValueError(f"adam_moments must be fresh or kept, not {self.adam_moments!r}")
        if not self.learning_rate > 0 or self.prox_mu < 0 or self.scale <= 0:
            raise ValueError("learning_rate and scale must be positive, prox_mu not negative")


def model_names(model: Sequence[npt.NDArray[np.float32]]) -> tuple[str, ...]:
    """The names of a model's tensors: the head alone, or the last level and the head."""
    return LAST_LEVEL_NAMES if len(model) == len(LAST_LEVEL_NAMES) else HEAD_NAMES


def check_head(head: Sequence[npt.NDArray[np.float32]]) -> list[npt.NDArray[np.float32]]:
    """The tensors of a model (a head, or the last level and a head), or ValueError."""
    if len(head) not in (len(HEAD_NAMES), len(LAST_LEVEL_NAMES)):
        raise ValueError(
            f"a model has {len(HEAD_NAMES)} or {len(LAST_LEVEL_NAMES)} tensor(s), got {len(head)}"
        )
    projection = np.asarray(head[-1], dtype=np.float32)
    if projection.ndim != 2 or min(projection.shape) < 1:
        raise ValueError(f"head projection must be a matrix, got shape {projection.shape}")
    if not np.all(np.isfinite(projection)):
        raise ValueError("head projection has NaN or infinite values")
    return [*last_level.check(head[:-1]), projection] if len(head) > 1 else [projection]


def feature_width(model: Sequence[npt.NDArray[np.float32]]) -> int:
    """What one face's features hold for this model: pooled features or level inputs."""
    return last_level.LEVEL_INPUTS if len(model) > 1 else int(np.shape(model[-1])[0])


def normalize(vectors: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    """Rows scaled to unit length (a zero row stays zero)."""
    array = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(array, axis=-1, keepdims=True)
    return np.asarray(array / np.maximum(norms, _EPSILON), dtype=np.float32)


def embed(features: Features, head: Sequence[npt.NDArray[np.float32]]) -> Embeddings:
    """Unit-length embeddings of backbone features (level inputs for a last-level model)."""
    model = check_head(head)
    array = np.asarray(features, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] != feature_width(model):
        raise ValueError(
            f"features of shape {array.shape} do not fit a model taking {feature_width(model)}"
        )
    return _forward(array, model)[0]


def _normalize_backward(
    unit: npt.NDArray[np.float32], norms: npt.NDArray[np.float32], grad: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """Gradient through x = u/|u|: (dx - x·(x·dx)) / |u|."""
    along = np.sum(unit * grad, axis=1, keepdims=True)
    return np.asarray((grad - unit * along) / norms, dtype=np.float32)


@dataclass(frozen=True)
class _Pass:
    """A forward pass kept for its backward: what the head read, and the level's state."""

    pooled: npt.NDArray[np.float32]
    level: last_level.Activations | None


def _forward(
    features: npt.NDArray[np.float32], model: Sequence[npt.NDArray[np.float32]]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], _Pass]:
    """Unit embeddings, their norms before normalising, and what the backward needs."""
    acts = None
    pooled = features
    if len(model) > 1:
        pooled, acts = last_level.forward(features, model[:-1])
    raw = pooled @ model[-1]
    norms = np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), _EPSILON).astype(np.float32)
    return np.asarray(raw / norms, dtype=np.float32), norms, _Pass(pooled, acts)


def _backward(
    model: Sequence[npt.NDArray[np.float32]], forward: _Pass, grad_raw: npt.NDArray[np.float32]
) -> list[npt.NDArray[np.float32]]:
    """Gradients of the model's tensors given the gradient of the raw embeddings."""
    grad_head = np.asarray(forward.pooled.T @ grad_raw, np.float32)
    if forward.level is None:
        return [grad_head]
    grad_pooled = np.asarray(grad_raw @ model[-1].T, np.float32)
    return [*last_level.backward(model[:-1], forward.level, grad_pooled), grad_head]


@dataclass(frozen=True)
class TrainResult:
    head: Weights
    loss: float
    steps: int
    """Steps taken by this training (a kept Adam's earlier ones not counted)."""
    moments: AdamMoments | None = None
    """Adam's state at the end (None for sgd): what a doorbell keeps for its next round
    when the round plan says `adam_moments: kept`."""


@dataclass(frozen=True)
class AdamMoments:
    """A local Adam's moments and step count, one pair of arrays per tensor.

    A fresh Adam's first steps move every coordinate by about the learning rate whatever
    its gradient; a doorbell that keeps these across rounds starts its next round with
    steps scaled by the gradients it has seen (issue 20, docs/learning.md). They never
    leave the doorbell."""

    m: Weights
    v: Weights
    steps: int

    def fits(self, model: Sequence[npt.NDArray[np.float32]]) -> bool:
        """Whether these moments belong to a model of `model`'s shapes."""
        shapes = [np.shape(t) for t in model]
        return (
            self.steps > 0
            and [np.shape(a) for a in self.m] == shapes
            and [np.shape(a) for a in self.v] == shapes
        )


class _SGD:
    """Plain gradient descent on one matrix, in place (the local step's default)."""

    def __init__(self) -> None:
        self.steps = 0

    def step(
        self, param: npt.NDArray[np.float32], grad: npt.NDArray[np.float32], lr: float
    ) -> None:
        self.steps += 1
        param -= lr * grad


class _Adam:
    """Adam on one matrix, in place."""

    def __init__(
        self,
        shape: tuple[int, ...],
        kept: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], int] | None = None,
    ) -> None:
        """`kept`: (m, v, steps) of an earlier training to continue from."""
        if kept is None:
            self.m, self.v, self.steps = np.zeros(shape, np.float32), np.zeros(shape, np.float32), 0
        else:
            m, v, self.steps = kept
            self.m, self.v = np.array(m, np.float32), np.array(v, np.float32)

    def step(
        self, param: npt.NDArray[np.float32], grad: npt.NDArray[np.float32], lr: float
    ) -> None:
        beta1, beta2 = 0.9, 0.999
        self.steps += 1
        self.m = beta1 * self.m + (1 - beta1) * grad
        self.v = beta2 * self.v + (1 - beta2) * grad * grad
        m_hat = self.m / (1 - beta1**self.steps)
        v_hat = self.v / (1 - beta2**self.steps)
        param -= lr * m_hat / (np.sqrt(v_hat) + 1e-8)


@dataclass(frozen=True)
class _Epoch:
    """What stays fixed during one epoch: every face's embedding and the prototypes."""

    current: npt.NDArray[np.float32]
    sums: npt.NDArray[np.float32]
    centres: npt.NDArray[np.float32]


def _batch_gradient(
    model: Sequence[npt.NDArray[np.float32]],
    *,
    x: npt.NDArray[np.float32],
    z: npt.NDArray[np.float32],
    targets: LabelIds,
    batch: npt.NDArray[np.int64],
    epoch: _Epoch,
    params: TrainParams,
) -> tuple[float, list[npt.NDArray[np.float32]]]:
    """Loss and gradients of one batch: CosFace over the prototypes and the strangers."""
    classes = len(epoch.centres)
    e, e_norm, e_pass = _forward(x[batch], model)
    n, n_norm, n_pass = _forward(z, model)
    rows = np.arange(len(batch))
    own = (
        normalize(epoch.sums[targets] - epoch.current[batch])
        if params.leave_one_out
        else epoch.centres[targets]
    )
    cos = np.concatenate([e @ epoch.centres.T, e @ n.T], axis=1)
    cos[rows, targets] = np.sum(e * own, axis=1) - params.margin
    logits = params.scale * cos
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    loss = float(-np.mean(np.log(probs[rows, targets] + 1e-12)))
    probs[rows, targets] -= 1.0
    grad_cos = np.asarray((params.scale / len(batch)) * probs, np.float32)
    grad_e = np.asarray(
        grad_cos[:, :classes] @ epoch.centres
        + grad_cos[:, classes:] @ n
        + grad_cos[rows, targets][:, None] * (own - epoch.centres[targets]),
        np.float32,
    )
    grads = _backward(model, e_pass, _normalize_backward(e, e_norm, grad_e))
    if len(z):
        grad_n = np.asarray(grad_cos[:, classes:].T @ e, np.float32)
        from_strangers = _backward(model, n_pass, _normalize_backward(n, n_norm, grad_n))
        grads = [g + s for g, s in zip(grads, from_strangers, strict=True)]
    return loss, grads


def train_head(
    head: Sequence[npt.NDArray[np.float32]],
    features: Features,
    labels: LabelIds,
    negatives: Features,
    params: TrainParams,
    *,
    moments: AdamMoments | None = None,
) -> TrainResult:
    """Train a copy of `head` on one house's faces; returns the trained head.

    The objective is a prototype CosFace loss: each face must be nearer its own
    person's prototype (the normalised mean of that person's other photos'
    embeddings, recomputed every epoch and not trained) than every other
    person's by `margin`, and nearer than every stranger in `negatives` (faces
    of people nobody enrolled, seen at this door). The prototypes are the
    house's own, so no classifier weights tied to names exist anywhere.

    `head` is the round's model: the head alone, on pooled features, or dlib's
    last level and the head (`LAST_LEVEL_NAMES`), on the level's cached inputs.
    `moments`: an earlier training's Adam, continued if `params` says adam and
    `adam_moments: kept` and they belong to a model of these shapes.
    """
    start = check_head(head)
    width = feature_width(start)
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels, dtype=np.int64)
    z = np.asarray(negatives, dtype=np.float32).reshape(-1, width)
    if x.ndim != 2 or x.shape[1] != width or y.shape != (len(x),):
        raise ValueError(f"features {x.shape} / labels {y.shape} do not fit a model taking {width}")
    if len(x) and y.min() < 0:
        raise ValueError("label ids must be >= 0")
    classes = int(y.max()) + 1 if len(y) else 0
    counts = np.bincount(y, minlength=classes)
    anchors = np.flatnonzero(counts[y] > 1) if params.leave_one_out else np.arange(len(x))
    continues = params.optimizer == "adam" and params.adam_moments == "kept"
    kept = moments if continues and moments is not None and moments.fits(start) else None
    if classes + len(z) < 2 or len(anchors) == 0:  # nothing to tell apart: the head stays
        return TrainResult([t.copy() for t in start], float("nan"), 0, kept)

    model = [t.copy() for t in start]
    optimizers: list[_Adam] | list[_SGD]
    if params.optimizer == "adam":
        optimizers = [
            _Adam(t.shape, None if kept is None else (kept.m[i], kept.v[i], kept.steps))
            for i, t in enumerate(model)
        ]
    else:
        optimizers = [_SGD() for _ in model]
    steps_before = optimizers[0].steps
    rng = np.random.default_rng(params.seed)
    losses: list[float] = []
    for _ in range(params.epochs):
        current = _forward(x, model)[0]
        sums = np.zeros((classes, current.shape[1]), dtype=np.float32)
        np.add.at(sums, y, current)
        epoch = _Epoch(current, sums, normalize(sums))
        losses = []
        splits = max(1, -(-len(anchors) // params.batch_size))
        for batch in np.array_split(anchors[rng.permutation(len(anchors))], splits):
            loss, grads = _batch_gradient(
                model, x=x, z=z, targets=y[batch], batch=batch, epoch=epoch, params=params
            )
            losses.append(loss)
            for i, (tensor, origin) in enumerate(zip(model, start, strict=True)):
                pulled = grads[i] + params.prox_mu * (tensor - origin)
                optimizers[i].step(tensor, pulled, params.learning_rate)
    loss = float(np.mean(losses)) if losses else float("nan")
    trained = [t.astype(np.float32) for t in model]
    steps = optimizers[0].steps - steps_before
    if params.optimizer != "adam":
        return TrainResult(trained, loss, steps)
    adams = [o for o in optimizers if isinstance(o, _Adam)]
    state = AdamMoments([o.m for o in adams], [o.v for o in adams], optimizers[0].steps)
    return TrainResult(trained, loss, steps, state)
