"""Throw hostile update messages at the aggregator's validation path, every codec.

    python -m bench.fuzz --count 100000 [--codecs float32 float16 int8 topk]

For each update codec (top-k, the product's default, included) the fuzzer
builds valid updates of the federated head (`fedbell.faces.embedding.HEAD_NAMES`,
dlib's 256 → 128 projection) and mutates each one way: raw byte damage, a
header that lies (re-serialised with a correct sha256 so the lie reaches the
deeper checks), a poisoned body written in that codec's own layout (NaN/Inf
values or scales, absurd norms, top-k indices that repeat or run past the
end, decompression bombs, short bodies, trailing bytes), a wrong topic.
Half of the messages go to an unsigned site, half to a signed one (Ed25519
verification in the path).

Every message goes through exactly what the aggregator does with an update
(`aggregator/coordinator.py`): `parse_update`, then the round's `check`, then
`accept`, which folds it into a REAL accumulator made by `make_accumulator`
from the product's round settings. A crash is any exception other than
RejectedMessage. A *model change* is a model the aggregator would publish
(`next_step` over that accumulator, computed after every accepted message)
that differs from an independent expectation: FedAvg (for top-k, the
coverage-corrected sparse FedAvg) computed here in plain numpy over the
pristine deltas the accepted messages were made from. So an accepted message
whose content differs from what its doorbell built (a poisoned body, a lying
example count on a signed site) fails the run, and so does a rejected message
that touched the accumulator, or the base weights changing.

By default (`rounds.weighting` houses) every accepted message weighs the
same, whatever it claims. With weighting by examples: on an unsigned site a
header is not authenticated, so the example count a message claims is the
weight the expectation uses (read from the raw JSON here, independently of
the envelope code); on a signed site it must be the count the doorbell
signed; either way capped at the round's `max_examples`. Every delta is
clipped to its `clip_norm` (the aggregator's default since issue 13 item 1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import struct
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from aggregator.accumulator import Accumulator, make_accumulator, next_step
from aggregator.config import RoundSettings, Weighting
from aggregator.strategy import InconsistentUpdate
from bench.steps import Intake, open_round
from fedbell.errors import RejectedMessage
from fedbell.faces.dlib_resnet import DESCRIPTOR, FEATURES
from fedbell.faces.embedding import HEAD_NAMES
from fedbell.wire import envelope, messages
from fedbell.wire.codecs import TENSOR_CODECS, Weights
from fedbell.wire.envelope import Codec, TensorSpec

SITE = "home"
DEVICES = ("door", "garage")
EXAMPLES = {"door": 5, "garage": 9}
LIMIT = 4 << 20
PRODUCT = RoundSettings()
"""The aggregator's round defaults, what the fuzzer throws messages at."""
SHAPES: dict[str, tuple[int, ...]] = {HEAD_NAMES[0]: (FEATURES, DESCRIPTOR)}
"""The head's tensors, as the aggregator expects them (see `Exporter.specs`)."""
DELTA_SCALE = 0.01
"""About what a round of local training moves a head weight."""
Mutator = Callable[[np.random.Generator, bytes, Codec], bytes]
BOMB = zstandard.ZstdCompressor(level=19).compress(b"\0" * (256 << 20))
"""256 MiB of zeros in about 8 KiB: made once, thrown many times."""
RTOL, ATOL = 1e-5, 1e-7


def _split(payload: bytes) -> tuple[dict[str, Any], bytes]:
    length = struct.unpack_from(">I", payload, 5)[0]
    return json.loads(payload[9 : 9 + length]), payload[9 + length :]


def _join(header: dict[str, Any], body: bytes, fix_digest: bool = True) -> bytes:
    if fix_digest:
        header = {**header, "body_size": len(body), "body_sha256": hashlib.sha256(body).hexdigest()}
    raw = json.dumps(header).encode()
    return envelope.MAGIC + bytes([envelope.VERSION]) + struct.pack(">I", len(raw)) + raw + body


def _hostile_value(rng: np.random.Generator) -> Any:
    choices: list[Any] = [
        None,
        -1,
        0,
        2**63,
        -(2**63),
        1e308,
        float("nan"),
        "",
        "x" * 5000,
        [],
        {},
        [1, 2],
        {"a": {"b": {"c": []}}},
        True,
        "float64",
        "../../etc",
    ]
    return choices[int(rng.integers(len(choices)))]


def flip_bits(rng: np.random.Generator, payload: bytes, _codec: Codec) -> bytes:
    data = bytearray(payload)
    for _ in range(int(rng.integers(1, 8))):
        data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
    return bytes(data)


def truncate(rng: np.random.Generator, payload: bytes, _codec: Codec) -> bytes:
    return payload[: int(rng.integers(len(payload)))]


def splice_junk(rng: np.random.Generator, payload: bytes, _codec: Codec) -> bytes:
    at = int(rng.integers(len(payload)))
    return payload[:at] + rng.bytes(int(rng.integers(1, 64))) + payload[at:]


_LIES: dict[str, Any] = {
    "kind": "global",
    "site": "cottage",
    "round": 2,
    "model_version": 1,
    "sender": "garage",
    "num_examples": 10**9,
    "codec": "topk",
    "compression": "none",
    "meta": {"x": 1},
    "signature": "AAAA",
    "body_size": 1,
    "unknown_field": 1,
}


def lie_in_header(rng: np.random.Generator, payload: bytes, codec: Codec) -> bytes:
    header, body = _split(payload)
    field_name = str(rng.choice(list(_LIES)))
    if field_name == "codec":
        lie: Any = str(rng.choice([c for c in TENSOR_CODECS if c != codec]))
    elif field_name == "num_examples" and rng.random() < 0.5:
        lie = int(rng.integers(1, 10_000_000))  # plausible, but not what was signed
    else:
        lie = _LIES[field_name]
    header[field_name] = _hostile_value(rng) if rng.random() < 0.6 else lie
    return _join(header, body, fix_digest=field_name != "body_size")


def lie_about_tensors(rng: np.random.Generator, payload: bytes, _codec: Codec) -> bytes:
    header, body = _split(payload)
    tensors = header["tensors"]
    index = int(rng.integers(len(tensors)))
    how = int(rng.integers(7))
    if how == 0:
        tensors[index]["shape"] = [*reversed(tensors[index]["shape"]), 1]
    elif how == 1:
        tensors[index]["shape"] = [2**31, 2**31]
    elif how == 2:
        tensors[index]["shape"][0] = int(rng.choice([0, -1, 7]))
    elif how == 3:
        tensors[index]["dtype"] = "float64"
    elif how == 4:
        tensors.append({"name": "extra", "shape": [1]})
    elif how == 5:
        tensors[index]["name"] = "head/other"
    else:
        tensors.pop(index)
    return _join(header, body)


_NON_FINITE = (np.nan, np.inf, -np.inf)


def _poison_values(rng: np.random.Generator, raw: bytearray, codec: Codec) -> bytearray:
    """NaN or Inf where this codec keeps floats: a value, a per-channel or a top-k scale."""
    bad = float(rng.choice(_NON_FINITE))
    if codec == "float32":
        at = 4 * int(rng.integers(len(raw) // 4))
        raw[at : at + 4] = struct.pack("<f", bad)
    elif codec == "float16":
        at = 2 * int(rng.integers(len(raw) // 2))
        raw[at : at + 2] = np.asarray([bad], dtype="<f2").tobytes()
    elif codec == "int8":
        at = 4 * int(rng.integers(DESCRIPTOR))  # the scales come first, one per channel
        raw[at : at + 4] = struct.pack("<f", bad)
    else:
        (k,) = struct.unpack_from("<I", raw)
        at = 4 + 4 * k  # after the count and the gaps: the tensor's one scale
        raw[at : at + 4] = struct.pack("<f", bad)
    return raw


def _blow_up(raw: bytearray, codec: Codec) -> bytearray:
    """Finite values with an absurd norm, in this codec's layout."""
    if codec == "float32":
        values = np.frombuffer(bytes(raw), dtype="<f4") * np.float32(1e30)
        return bytearray(values.astype("<f4").tobytes())
    if codec == "float16":
        return bytearray(np.full(len(raw) // 2, 60000.0, dtype="<f2").tobytes())
    if codec == "int8":
        scales = np.frombuffer(bytes(raw[: 4 * DESCRIPTOR]), dtype="<f4") * np.float32(1e30)
        raw[: 4 * DESCRIPTOR] = scales.astype("<f4").tobytes()
        return raw
    (k,) = struct.unpack_from("<I", raw)
    at = 4 + 4 * k
    (scale,) = struct.unpack_from("<f", raw, at)
    raw[at : at + 4] = struct.pack("<f", scale * 1e30)
    return raw


def _bad_indices(rng: np.random.Generator, raw: bytearray) -> bytearray:
    """Top-k: a repeated index, an index past the end, or a count past the tensor."""
    (k,) = struct.unpack_from("<I", raw)
    how = int(rng.integers(3))
    if how == 0 and k > 1:
        at = 4 + 4 * int(rng.integers(1, k))
        raw[at : at + 4] = struct.pack("<I", 0)
    elif how == 1:
        raw[4:8] = struct.pack("<I", FEATURES * DESCRIPTOR + int(rng.integers(0, 1000)))
    else:
        raw[0:4] = struct.pack("<I", FEATURES * DESCRIPTOR + 1)
    return raw


def poison_body(rng: np.random.Generator, payload: bytes, codec: Codec) -> bytes:
    header, body = _split(payload)
    raw = bytearray(zstandard.ZstdDecompressor().decompress(body))
    how = int(rng.integers(6 if codec == "topk" else 5))
    if how == 0:
        raw = _poison_values(rng, raw, codec)
    elif how == 1:
        raw = _blow_up(raw, codec)
    elif how == 2:  # decompression bomb
        return _join(header, BOMB)
    elif how == 3:  # short body
        raw = raw[: int(rng.integers(len(raw)))]
    elif how == 4:  # trailing garbage after the last tensor
        raw += rng.bytes(16)
    else:
        raw = _bad_indices(rng, raw)
    return _join(header, zstandard.ZstdCompressor().compress(bytes(raw)))


def not_zstd(rng: np.random.Generator, payload: bytes, _codec: Codec) -> bytes:
    header, _ = _split(payload)
    return _join(header, rng.bytes(int(rng.integers(0, 4096))))


MUTATORS: tuple[Mutator, ...] = (
    flip_bits,
    truncate,
    splice_junk,
    lie_in_header,
    lie_about_tensors,
    poison_body,
    not_zstd,
)


def _digest(arrays: Sequence[np.ndarray]) -> str:
    return hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest()


# --- the independent expectation -------------------------------------------------------


def claimed_examples(payload: bytes) -> int:
    """The example count a message's header claims, read from its raw JSON."""
    header, _ = _split(payload)
    return int(header["num_examples"])


class Expectation:
    """What FedAvg over the accepted messages must give, computed here in plain numpy.

    Each accepted message contributes the pristine delta its doorbell built
    (as the codec delivers it, see `pristine`) with its weight; top-k rounds
    divide each coordinate by sqrt(weight covering it x the total weight)
    (`aggregator.strategy.SparseFedAvg`'s documented rule). Kept as running
    float64 sums, so checking after every accepted message stays cheap.
    """

    def __init__(self, base: Weights, sparse: bool, clip_norm: float | None) -> None:
        self.base = [b.astype(np.float64) for b in base]
        self.sparse = sparse
        self.clip_norm = clip_norm
        self.sums = [np.zeros_like(b) for b in self.base]
        self.covered = [np.zeros_like(b) for b in self.base]
        self.total = 0

    def add(self, delta: Weights, weight: int) -> None:
        arrays = [d.astype(np.float64) for d in delta]
        if self.clip_norm is not None:
            norm = math.sqrt(sum(float(np.sum(a * a)) for a in arrays))
            if norm > self.clip_norm:
                arrays = [a * (self.clip_norm / norm) for a in arrays]
        for index, array in enumerate(arrays):
            self.sums[index] += weight * array
            self.covered[index] += weight * (array != 0)
        self.total += weight

    def weights(self) -> list[npt.NDArray[np.float64]]:
        if self.sparse:
            return [
                b + s / np.sqrt(np.maximum(c, 1.0) * self.total)
                for b, s, c in zip(self.base, self.sums, self.covered, strict=True)
            ]
        return [b + s / self.total for b, s in zip(self.base, self.sums, strict=True)]


def pristine(
    codec: Codec, delta: Weights, specs: Sequence[TensorSpec], payload: bytes, density: float
) -> Weights:
    """What a doorbell's delta must arrive as through `codec`, computed without the
    decoder: float32 exact, float16 rounded, int8 with one scale per output channel,
    top-k the densest share with int8 values. Checked against the real decoder once
    (a mismatch means the expectation or the codec is wrong)."""
    out: Weights = []
    for array in delta:
        if codec == "float32":
            out.append(array.copy())
        elif codec == "float16":
            out.append(array.astype(np.float16).astype(np.float32))
        elif codec == "int8":
            peak = np.max(np.abs(array), axis=0)
            scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
            out.append((np.clip(np.rint(array / scales), -127, 127) * scales).astype(np.float32))
        else:
            flat = array.reshape(-1)
            k = max(1, math.ceil(density * flat.size))
            keep = np.argsort(-np.abs(flat), kind="stable")[:k]
            values = flat[keep]
            scale = np.float32(np.max(np.abs(values)) / 127.0) or np.float32(1.0)
            dense = np.zeros_like(flat)
            dense[keep] = np.clip(np.rint(values / scale), -127, 127) * scale
            out.append(dense.reshape(array.shape))
    decoded = messages.parse_update(
        payload,
        site=SITE,
        device=_split(payload)[0]["sender"],
        expected=specs,
        max_bytes=LIMIT,
        keys=None,
    ).delta
    for mine, theirs in zip(out, decoded, strict=True):
        if not np.allclose(mine, theirs, rtol=1e-6, atol=1e-9):
            raise AssertionError(f"{codec}: the fuzzer's expectation disagrees with the codec")
    return out


# --- the run ---------------------------------------------------------------------------


def _off_expectation(
    published: Sequence[np.ndarray], expected: Sequence[npt.NDArray[np.float64]]
) -> float | None:
    """None if the published weights are the expected ones, else the largest difference."""
    for got, want in zip(published, expected, strict=True):
        if got.shape != want.shape:
            return float("inf")
        if not np.allclose(got, want, rtol=RTOL, atol=ATOL):
            return float(np.max(np.abs(got.astype(np.float64) - want)))
    return None


@dataclass
class CodecReport:
    codec: Codec
    signed: bool
    messages: int
    outcomes: Counter[str]
    crashes: list[str]
    model_changes: list[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.crashes and not self.model_changes


def _seed_messages(
    rng: np.random.Generator,
    *,
    codec: Codec,
    base: Weights,
    specs: Sequence[TensorSpec],
    keys: dict[str, Ed25519PrivateKey] | None,
    settings: RoundSettings,
) -> tuple[dict[str, bytes], dict[str, Weights]]:
    """One valid update per doorbell, and the delta each must arrive as."""
    seeds: dict[str, bytes] = {}
    clean: dict[str, Weights] = {}
    for device in DEVICES:
        delta = [rng.normal(scale=DELTA_SCALE, size=a.shape).astype(np.float32) for a in base]
        seeds[device] = messages.build_update(
            site=SITE,
            signer=messages.Signer(device, None if keys is None else keys[device]),
            round_id=1,
            base_version=0,
            num_examples=EXAMPLES[device],
            names=[s.name for s in specs],
            codec=codec,
            delta=delta,
            density=settings.density,
        )
        clean[device] = pristine(codec, delta, specs, seeds[device], settings.density)
    return seeds, clean


def _check_release(
    base: Weights, accumulator: Accumulator, devices: Sequence[str], expected: Expectation
) -> str | None:
    """What is wrong with the model the aggregator would publish now, if anything."""
    try:
        published = next_step(base, accumulator, devices, None).weights
    except Exception:  # reported as a model change, with its traceback
        return f"next_step failed: {traceback.format_exc()}"
    worst = _off_expectation(published, expected.weights())
    if worst is None:
        return None
    return f"moved the model off the expectation (max difference {worst:.3g})"


def run_codec(
    codec: Codec, count: int, seed: int, signed: bool, weighting: Weighting = PRODUCT.weighting
) -> CodecReport:
    """`count` hostile messages of one codec against one round's validation and accumulator."""
    rng = np.random.default_rng(seed)
    base = [rng.normal(scale=0.05, size=s).astype(np.float32) for s in SHAPES.values()]
    specs = tuple(TensorSpec(name=n, shape=s) for n, s in SHAPES.items())
    keys = {d: Ed25519PrivateKey.generate() for d in DEVICES}
    trusted = {d: k.public_key() for d, k in keys.items()} if signed else None
    settings = RoundSettings(codec=codec, timeout_s=1e9, weighting=weighting)
    if settings.strategy not in ("fedavg", "clipped"):
        raise SystemExit(f"fuzz expects a streaming default strategy, not {settings.strategy}")
    accumulator = make_accumulator(settings, [a.shape for a in base], sparse=codec == "topk")
    # The round's documented rules, applied here by hand: every update clipped to
    # clip_norm (on by default), and weighing the same as every other (rounds.weighting
    # houses) or its claimed examples up to max_examples, whatever it claims.
    expected = Expectation(base, codec == "topk", settings.clip_norm)
    round_ = open_round(settings, 1, DEVICES, accumulator, lineage="fuzz")
    intake = Intake(SITE, LIMIT, specs, trusted, settings.max_update_norm)
    seeds, clean = _seed_messages(
        rng, codec=codec, base=base, specs=specs, keys=keys if signed else None, settings=settings
    )
    before = _digest(base)
    report = CodecReport(codec, signed, count, Counter(), [], [], 0.0)
    outcomes, crashes, changes = report.outcomes, report.crashes, report.model_changes
    accepted: list[str] = []
    started = time.perf_counter()
    for i in range(count):
        device = DEVICES[i % len(DEVICES)]
        mutator = MUTATORS[int(rng.integers(len(MUTATORS)))]
        payload = mutator(rng, seeds[device], codec)
        topic_device = device if rng.random() < 0.9 else "intruder"
        count_before = accumulator.count
        try:
            update = intake.take(round_, payload, topic_device)
        except (RejectedMessage, InconsistentUpdate) as err:
            # As the coordinator does: an update the accumulator refuses is a rejection.
            reason = err.reason if isinstance(err, RejectedMessage) else "inconsistent"
            outcomes[reason] += 1
            if accumulator.count != count_before:
                changes.append(f"{mutator.__name__}: a rejected message changed the sum: {err}")
            continue
        except Exception:  # any other exception is exactly what we hunt
            crashes.append(f"{mutator.__name__}: {traceback.format_exc()}")
            continue
        outcomes["accepted"] += 1
        round_.received.remove(update.device)  # let the next valid one in as well
        accepted.append(update.device)
        examples = EXAMPLES[update.device] if signed else claimed_examples(payload)
        weight = 1 if settings.weighting == "houses" else min(examples, settings.max_examples)
        expected.add(clean[update.device], weight)
        problem = _check_release(base, accumulator, accepted, expected)
        if problem is not None:
            changes.append(f"{mutator.__name__}: message {i} from {update.device}: {problem}")
            # Count each bad message once: from now on expect what it did.
            expected.add(clean[update.device], -weight)  # exactly undone
            expected.add(update.delta, weight)
    if _digest(base) != before:
        changes.append("the base weights changed")
    report.seconds = time.perf_counter() - started
    return report


def run(count: int, seed: int, signed: bool, codecs: Sequence[Codec] = TENSOR_CODECS) -> int:
    """`count` messages spread over `codecs`; prints one block per codec; 1 on any failure."""
    failed = 0
    for index, codec in enumerate(codecs):
        share = count // len(codecs) + (1 if index < count % len(codecs) else 0)
        report = run_codec(codec, share, seed + 1000 * index, signed)
        print_report(report)
        failed |= 0 if report.ok else 1
    return failed


def print_report(report: CodecReport) -> None:
    site = "signed" if report.signed else "unsigned"
    rate = report.messages / report.seconds if report.seconds > 0 else float("inf")
    print(
        f"fuzz {report.codec:<7} {site:<8} site: {report.messages} hostile messages, "
        f"{report.seconds:.1f} s, {rate:.0f} msg/s"
    )
    reasons = ", ".join(f"{reason} {n}" for reason, n in report.outcomes.most_common())
    print(f"  {reasons}")
    print(f"  crashes: {len(report.crashes)}   model changes: {len(report.model_changes)}")
    for line in [*report.crashes, *report.model_changes][:3]:
        print(f"  {line}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--codecs", nargs="+", choices=TENSOR_CODECS, default=list(TENSOR_CODECS))
    args = parser.parse_args(argv)
    half = args.count // 2
    failed = run(half, args.seed, False, args.codecs)
    failed |= run(args.count - half, args.seed + 1, True, args.codecs)
    print("fuzz:", "PASS (0 crashes, 0 model changes)" if not failed else "FAIL")
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
