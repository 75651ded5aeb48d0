"""Do the messages of a round fit the broker's limit? Checked once, at start.

With `rounds.trainable: last_level` the model is 21 times the head (688,640 values
against 32,768), so a setting that worked for the head may make a message larger
than `mqtt.max_message_bytes`: the broker would drop it mid-round, and a doorbell
would refuse it. Each message a round of this configuration sends is built here
with the real builders, at its largest (a dense random delta, the longest device
id, a signature), and the aggregator refuses to start if one does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from aggregator.config import AggregatorConfig
from aggregator.export import Exporter
from fedbell.errors import FedbellError
from fedbell.wire import masking
from fedbell.wire.messages import Signer, build_global, build_update
from fedbell.wire.protocol import CalibrationPlan
from fedbell.wire.secagg_messages import Masked, b64, dump

LONGEST_NAME = "d" * 64
"""The longest device id and lineage the wire allows."""


class MessageTooLarge(FedbellError):
    """A message this configuration's rounds would send exceeds the broker's limit."""


@dataclass(frozen=True)
class Sizes:
    """Bytes of each message a round sends, at its largest; None where it sends none."""

    global_model: int
    update: int | None
    """A plain round's update (rounds.codec at rounds.density)."""
    masked: int | None
    """A secure round's masked subset (rounds.secure_density of the model)."""

    def describe(self) -> str:
        parts = [f"global model {self.global_model:,} B"]
        if self.update is not None:
            parts.append(f"update {self.update:,} B")
        if self.masked is not None:
            parts.append(f"masked update {self.masked:,} B")
        return ", ".join(parts)


def measure(config: AggregatorConfig, exporter: Exporter) -> Sizes:
    """Build each message of a round of this configuration; MessageTooLarge if one cannot
    be sent (its size, the limit, and what to change)."""
    rounds, limit = config.rounds, config.mqtt.max_message_bytes
    key = Ed25519PrivateKey.generate()  # signed: the largest a message gets
    start = exporter.initial_weights()
    values = sum(int(w.size) for w in start)
    what = f"rounds.trainable {rounds.trainable} ({values:,} values)"
    global_model = len(
        build_global(
            site=config.site,
            signer=Signer("aggregator", key),
            version=0,
            round_id=0,
            names=exporter.names,
            weights=start,
            lineage=LONGEST_NAME,
            epoch=2**62,
            threshold=1.0,
            backbone="0" * 64,
            codec=rounds.downlink_codec,
        )
    )
    _fits(
        global_model,
        limit,
        f"{what}: the global model as {rounds.downlink_codec}",
        "set rounds.downlink_codec to int8",
    )
    update = masked = None
    if rounds.secure_aggregation:
        size = len(masking.shared_subset(values, rounds.secure_density, 1, LONGEST_NAME))
        raw = masking.pack(np.full(size, (1 << 24) - 1, np.uint32))
        masked = len(
            dump(Masked(round=1, lineage=LONGEST_NAME, device=LONGEST_NAME, values=b64(raw)))
        )
        _fits(
            masked,
            limit,
            f"{what}: a masked update of {size:,} values",
            "lower rounds.secure_density",
        )
        if exporter.uncalibrated:
            _calibration_fits(exporter, what)
    else:
        delta = np.random.default_rng(0).normal(size=values).astype(np.float32)
        shaped, offset = [], 0
        for tensor in start:
            shaped.append(delta[offset : offset + tensor.size].reshape(tensor.shape))
            offset += tensor.size
        update = len(
            build_update(
                site=config.site,
                signer=Signer(LONGEST_NAME, key),
                round_id=1,
                base_version=0,
                num_examples=1,
                names=exporter.names,
                delta=shaped,
                codec=rounds.codec,
                density=rounds.density,
            )
        )
        _fits(
            update,
            limit,
            f"{what}: an update as {rounds.codec}",
            "set rounds.codec to topk or int8",
        )
    return Sizes(global_model, update, masked)


def _calibration_fits(exporter: Exporter, what: str) -> None:
    """A bare site's calibration round carries two heads in its announcement."""
    start = exporter.initial_weights()
    try:
        CalibrationPlan.of(exporter.names, start, start, exporter.config.rounds.downlink_codec)
    except ValidationError:
        raise MessageTooLarge(
            f"{what}: the doorbells calibrate each release here (evaluation.require_calibration "
            "without strangers or dataset) and a calibration round's announcement carries two "
            "models, too large for it; give evaluation.strangers and evaluation.dataset, or "
            "set rounds.trainable to head"
        ) from None


def _fits(size: int, limit: int, what: str, change: str) -> None:
    if size > limit:
        raise MessageTooLarge(
            f"{what} is {size:,} bytes, over mqtt.max_message_bytes {limit:,}: the broker would "
            f"drop it mid-round; {change}, or set rounds.trainable to head"
        )
