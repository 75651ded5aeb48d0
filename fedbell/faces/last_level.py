"""dlib's last residual level as a trainable part, in numpy (issue 20, item 3).

The backbone's last level is one downsampling residual block at 256 channels.
On a 150×150 chip its input is 4×4×256, and dlib's own arithmetic makes most
of the block inert:

* the first convolution (3×3, stride 2, no padding) sees one window, the
  top-left 3×3 of the input, and gives a 1×1 output;
* the second (3×3, stride 1, "same") on that 1×1 sees zeros around it, so only
  its centre tap counts: a 256×256 matrix;
* the shortcut is the input 2×2 average-pooled (2×2 outputs), and dlib's
  add_prev pads the 1×1 branch with zeros at the bottom and right, so the
  branch lands on output (0, 0) only.

So the pooled features the head reads are

    pooled = rest + relu(s00 + W2·relu(W1·patch + b1) + b2) / 4

with `patch` the top-left 3×3×256 window (2,304 values), `s00` the first
pooled shortcut and `rest` the other three outputs' share, neither trainable.
A doorbell caches those three per chip (`LEVEL_INPUTS` = 2,816 values) and
trains W1, b1, W2, b2 (the affine layers folded in, as `build_backbone` folds
them) together with the head: 655,872 + 32,768 values, where the full block
holds 1.18 M (the rest never reaches the output).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedbell.faces.dlib_resnet import FEATURES, DlibWeights, Op, dlib_projection

Array = npt.NDArray[np.float32]

PATCH = 3 * 3 * FEATURES
"""The first convolution's one window: the top-left 3×3 of the level's input."""
LEVEL_INPUTS = PATCH + 2 * FEATURES
"""Values cached per chip: the window, the first pooled shortcut, the rest's share."""
INPUT_SHAPE = (4, 4, FEATURES)
"""The level's input on a 150×150 chip."""
NAMES: tuple[str, ...] = ("level/conv1", "level/bias1", "level/conv2", "level/bias2")
"""The level's tensors, in the order a model lists them (before the head)."""
SHAPES: tuple[tuple[int, ...], ...] = (
    (PATCH, FEATURES),
    (FEATURES,),
    (FEATURES, FEATURES),
    (FEATURES,),
)
VALUES = sum(int(np.prod(shape)) for shape in SHAPES)
"""The level's trainable values (655,872)."""


def compact(level_input: npt.NDArray[np.floating]) -> Array:
    """(N, 4, 4, 256) level inputs → (N, LEVEL_INPUTS): what a doorbell caches per chip."""
    x = np.asarray(level_input, dtype=np.float32)
    if x.ndim != 4 or x.shape[1:] != INPUT_SHAPE:
        raise ValueError(f"level inputs must be (n, 4, 4, {FEATURES}), got {x.shape}")
    patch = x[:, :3, :3, :].reshape(len(x), PATCH)
    shortcut = x.reshape(len(x), 2, 2, 2, 2, FEATURES).mean(axis=(2, 4))  # 2×2 average pool
    relu = np.maximum(shortcut, 0.0)
    rest = (relu[:, 0, 1] + relu[:, 1, 0] + relu[:, 1, 1]) / 4.0
    return np.ascontiguousarray(np.concatenate([patch, shortcut[:, 0, 0], rest], axis=1))


def initial(weights: DlibWeights) -> list[Array]:
    """dlib's own last level as [W1, b1, W2, b2], its affine layers folded in."""
    start = max(i for i, layer in enumerate(weights.layers) if layer.op == Op("tag", ident=1))
    con1, affine1, _, con2, affine2 = weights.layers[start + 1 : start + 6]
    if [con1.op.kind, affine1.op.kind, con2.op.kind, affine2.op.kind] != [
        "con",
        "affine",
        "con",
        "affine",
    ] or (con1.op.stride, con2.op.stride) != (2, 1):
        raise ValueError("dlib's network does not end in the expected downsampling block")
    # dlib kernels are (out, in, rows, cols); the patch is flattened (rows, cols, in).
    kernel1 = con1.tensors["kernel"].transpose(2, 3, 1, 0) * affine1.tensors["gamma"]
    bias1 = con1.tensors["bias"] * affine1.tensors["gamma"] + affine1.tensors["beta"]
    kernel2 = con2.tensors["kernel"][:, :, 1, 1].T * affine2.tensors["gamma"]
    bias2 = con2.tensors["bias"] * affine2.tensors["gamma"] + affine2.tensors["beta"]
    return [
        np.ascontiguousarray(kernel1.reshape(PATCH, FEATURES), dtype=np.float32),
        np.asarray(bias1, np.float32),
        np.ascontiguousarray(kernel2, dtype=np.float32),
        np.asarray(bias2, np.float32),
    ]


def start_model(weights: DlibWeights, *, with_level: bool = False) -> list[Array]:
    """Version 0 of every lineage: dlib's own final projection (the head), after dlib's
    own last level when the doorbells train that level too (`[W1, b1, W2, b2, P]`)."""
    head = [dlib_projection(weights)]
    return [*initial(weights), *head] if with_level else head


def check(level: Sequence[npt.NDArray[np.float32]]) -> list[Array]:
    """The level's four tensors, or ValueError saying which is wrong."""
    if len(level) != len(NAMES):
        raise ValueError(f"the last level has {len(NAMES)} tensors, got {len(level)}")
    out = []
    for name, shape, tensor in zip(NAMES, SHAPES, level, strict=True):
        array = np.asarray(tensor, dtype=np.float32)
        if array.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {array.shape}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} has NaN or infinite values")
        out.append(array)
    return out


@dataclass(frozen=True)
class Activations:
    """What the backward pass needs from a forward pass."""

    patch: Array
    hidden: Array  # relu(W1·patch + b1)
    active: npt.NDArray[np.bool_]  # where the output relu passes


def forward(inputs: Array, level: Sequence[Array]) -> tuple[Array, Activations]:
    """Pooled features (N, 256) of cached level inputs (N, LEVEL_INPUTS)."""
    w1, b1, w2, b2 = level
    x = np.asarray(inputs, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != LEVEL_INPUTS:
        raise ValueError(f"level inputs must be (n, {LEVEL_INPUTS}), got {x.shape}")
    patch, s00, rest = x[:, :PATCH], x[:, PATCH : PATCH + FEATURES], x[:, PATCH + FEATURES :]
    hidden = np.maximum(patch @ w1 + b1, 0.0)
    out = s00 + hidden @ w2 + b2
    active = out > 0
    pooled = rest + np.where(active, out, 0.0) / 4.0
    return np.asarray(pooled, np.float32), Activations(patch, hidden, active)


def backward(level: Sequence[Array], acts: Activations, grad_pooled: Array) -> list[Array]:
    """Gradients of [W1, b1, W2, b2] given the gradient of the pooled features."""
    w2 = level[2]
    grad_out = np.where(acts.active, grad_pooled / 4.0, 0.0).astype(np.float32)
    grad_hidden = (grad_out @ w2.T) * (acts.hidden > 0)
    return [
        np.asarray(acts.patch.T @ grad_hidden, np.float32),
        np.asarray(grad_hidden.sum(axis=0), np.float32),
        np.asarray(acts.hidden.T @ grad_out, np.float32),
        np.asarray(grad_out.sum(axis=0), np.float32),
    ]
