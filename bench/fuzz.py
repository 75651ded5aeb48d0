"""Throw hostile update messages at the aggregator's validation path.

    python -m bench.fuzz --count 100000

Each message is a valid update mutated one way: raw byte damage, a header
that lies (re-serialised with a correct sha256 so the lie reaches the deeper
checks), a poisoned body (NaN, Inf, absurd norms, decompression bombs), a
replay, a wrong topic. Every message goes through exactly what the aggregator
does with an update: `parse_update`, then the round's checks, then `accept`.
A crash is any exception other than RejectedMessage. The model must not
change: the base weights are hashed before and after, and the running sum may
only grow by updates that passed every check.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import time
import traceback
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from aggregator.accumulator import Streaming
from aggregator.config import RoundSettings
from aggregator.rounds import Round, announce
from aggregator.strategy import RunningFedAvg
from fedbell import envelope, messages
from fedbell.envelope import TensorSpec
from fedbell.errors import RejectedMessage

SITE = "home"
DEVICES = ("door", "garage")
LIMIT = 4 << 20
SHAPES = {
    "conv/kernel": (3, 3, 1, 8),
    "conv/bias": (8,),
    "dense/kernel": (32, 6),
    "dense/bias": (6,),
}
Mutator = Callable[[np.random.Generator, bytes], bytes]
BOMB = zstandard.ZstdCompressor(level=19).compress(b"\0" * (256 << 20))
"""256 MiB of zeros in about 8 KiB: made once, thrown many times."""


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


def flip_bits(rng: np.random.Generator, payload: bytes) -> bytes:
    data = bytearray(payload)
    for _ in range(int(rng.integers(1, 8))):
        data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
    return bytes(data)


def truncate(rng: np.random.Generator, payload: bytes) -> bytes:
    return payload[: int(rng.integers(len(payload)))]


def splice_junk(rng: np.random.Generator, payload: bytes) -> bytes:
    at = int(rng.integers(len(payload)))
    return payload[:at] + rng.bytes(int(rng.integers(1, 64))) + payload[at:]


def lie_in_header(rng: np.random.Generator, payload: bytes) -> bytes:
    header, body = _split(payload)
    field = str(
        rng.choice(
            [
                "kind",
                "site",
                "round",
                "model_version",
                "sender",
                "num_examples",
                "codec",
                "compression",
                "meta",
                "signature",
                "body_size",
                "unknown_field",
            ]
        )
    )
    header[field] = (
        _hostile_value(rng)
        if rng.random() < 0.6
        else {
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
        }[field]
    )
    return _join(header, body, fix_digest=field != "body_size")


def lie_about_tensors(rng: np.random.Generator, payload: bytes) -> bytes:
    header, body = _split(payload)
    tensors = header["tensors"]
    index = int(rng.integers(len(tensors)))
    how = int(rng.integers(6))
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
    else:
        tensors.pop(index)
    return _join(header, body)


def poison_body(rng: np.random.Generator, payload: bytes) -> bytes:
    header, body = _split(payload)
    raw = bytearray(zstandard.ZstdDecompressor().decompress(body))
    how = int(rng.integers(5))
    if how == 0:  # NaN or Inf somewhere in a float32 body
        at = 4 * int(rng.integers(len(raw) // 4))
        raw[at : at + 4] = struct.pack("<f", float(rng.choice([np.nan, np.inf, -np.inf])))
    elif how == 1:  # absurd norm: every value huge
        values = np.frombuffer(bytes(raw), dtype="<f4") * np.float32(1e30)
        raw = bytearray(values.astype("<f4").tobytes())
    elif how == 2:  # decompression bomb
        return _join(header, BOMB)
    elif how == 3:  # short body
        raw = raw[: int(rng.integers(len(raw)))]
    else:  # trailing garbage after the last tensor
        raw += rng.bytes(16)
    return _join(header, zstandard.ZstdCompressor().compress(bytes(raw)))


def not_zstd(rng: np.random.Generator, payload: bytes) -> bytes:
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


def _digest(arrays: list[np.ndarray]) -> str:
    return hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest()


def run(count: int, seed: int, signed: bool) -> int:
    rng = np.random.default_rng(seed)
    names = list(SHAPES)
    base = [rng.normal(size=s).astype(np.float32) for s in SHAPES.values()]
    specs = tuple(TensorSpec(name=n, shape=s) for n, s in SHAPES.items())
    keys = {d: Ed25519PrivateKey.generate() for d in DEVICES}
    trusted = {d: k.public_key() for d, k in keys.items()} if signed else None
    settings = RoundSettings(codec="float32", timeout_s=1e9, max_update_norm=100.0)
    round_ = Round(
        announcement=announce(
            round_id=1,
            base_version=0,
            selected=DEVICES,
            now=time.time(),
            settings=settings,
            manual=False,
        ),
        manual=False,
        started_at=time.time(),
        accumulator=Streaming(RunningFedAvg([a.shape for a in base])),
    )
    seeds = [
        messages.build_update(
            site=SITE,
            signer=messages.Signer(d, keys[d] if signed else None),
            round_id=1,
            base_version=0,
            num_examples=5,
            names=names,
            codec="float32",
            delta=[rng.normal(scale=0.01, size=a.shape).astype(np.float32) for a in base],
        )
        for d in DEVICES
    ]
    before = _digest(base)
    outcomes: Counter[str] = Counter()
    crashes: list[str] = []
    started = time.perf_counter()
    for i in range(count):
        device = DEVICES[i % len(DEVICES)]
        mutator = MUTATORS[int(rng.integers(len(MUTATORS)))]
        payload = mutator(rng, seeds[i % len(DEVICES)])
        topic_device = device if rng.random() < 0.9 else "intruder"
        accepted_before = round_.accumulator.count
        try:
            update = messages.parse_update(
                payload,
                site=SITE,
                device=topic_device,
                expected=specs,
                max_bytes=LIMIT,
                keys=trusted,
            )
            round_.check(update, now=time.time(), max_norm=settings.max_update_norm)
            round_.accept(update, len(payload))
            outcomes["accepted"] += 1
            round_.received.remove(update.device)  # let the next valid one in as well
        except RejectedMessage as err:
            outcomes[err.reason] += 1
            if round_.accumulator.count != accepted_before:
                crashes.append(f"rejected message changed the running sum: {err}")
        except Exception:  # any other exception is exactly what we hunt
            crashes.append(f"{mutator.__name__}: {traceback.format_exc()}")
    seconds = time.perf_counter() - started
    changed = _digest(base) != before
    print(
        f"fuzz: {count} hostile messages ({'signed' if signed else 'unsigned'} site), "
        f"{seconds:.1f} s, {count / seconds:.0f} msg/s"
    )
    for reason, n in outcomes.most_common():
        print(f"  {reason:<18} {n}")
    print(f"crashes: {len(crashes)}   model changes: {int(changed)}")
    for crash in crashes[:3]:
        print(crash)
    return 1 if crashes or changed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    half = args.count // 2
    return run(half, args.seed, signed=False) | run(args.count - half, args.seed + 1, signed=True)


if __name__ == "__main__":
    raise SystemExit(main())
