"""Error feedback for top-k updates: what a round leaves out, the next one sends.

Top-k alone throws most of each delta away and learning stalls; keeping the
remainder on the device and adding it to the next delta makes the sum of what
is sent track the sum of what was learnt (Stich et al., "Sparsified SGD with
memory", 2018). The residual never leaves the device.

The residual goes into the next round's training, not onto its delta:
`edge.trainer.train_delta(..., residual=r)` trains from base + r and returns
trained - base, which already carries r; then `with_error_feedback(names,
delta, None, density)` splits that into what is sent and the new residual.
Adding r to a delta trained from the bare base counts it twice, because local
epochs of Adam re-learn most of what was not sent; the residual then grows
every round (see `train_delta`). The `residual` argument below does that
addition and is kept only for callers that have not moved yet.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedbell.codecs import Weights, decode_tensors, encode_tensors


def with_error_feedback(
    names: Sequence[str],
    delta: Sequence[np.ndarray],
    residual: Sequence[np.ndarray] | None,
    density: float,
) -> tuple[Weights, Weights]:
    """(delta to send with the topk codec, residual to keep for the next round).

    `residual`: None when it went into `train_delta` (the right way, see above).
    """
    corrected: Weights = [np.asarray(d, dtype=np.float32) for d in delta]
    if residual is not None:
        if [r.shape for r in residual] != [c.shape for c in corrected]:
            residual = None  # the model changed shape: the old remainder means nothing
        else:
            corrected = [c + r.astype(np.float32) for c, r in zip(corrected, residual, strict=True)]
    specs, body = encode_tensors(names, corrected, "topk", density=density)
    sent = decode_tensors(specs, body, "topk", "zstd")
    return corrected, [c - s for c, s in zip(corrected, sent, strict=True)]
