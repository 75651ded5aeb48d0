"""Secure aggregation's cost: the aggregator's unmasking time, upload bytes, the doorbell's time.

    python -m bench.secagg [--doorbells 1000] [--dropout 0.3] [--upload-doorbells 100]
                           [--coordinates 32768] [--density 0.10] [--json PATH]

Drives fedbell.wire.secagg's two state machines in one process, every message
through bytes, with signed adverts (each doorbell its own Ed25519 identity)
and the parameters the aggregator would choose (SecAggParams.for_cohort), over
the round's shared subset of the head (coordinates x density values each).

- unmask: a round of --doorbells with --dropout of them silent after dealing
  their shares (their masked input never arrives, so their pairwise masks must
  be rebuilt), planned for that dropout (max_dropout = --dropout). The
  aggregator's unmasking time is unmask_request + every survivor's reply +
  result (reconstructing every secret from the shares, removing every mask);
  its time for the whole round (adverts, roster, shares, inboxes, masked
  inputs) is printed beside it. CPU time is printed too: on a machine shared
  with other work the wall time is the CPU time plus waiting for a core.
- upload: a round of --upload-doorbells with the default parameters (planned
  for 10 % dropout): what one doorbell publishes (advert + shares + masked
  input + unmask reply), mean and largest.
- client: one doorbell's own time for a round (all five steps), mean over the
  doorbells of each round, and its CPU in each step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from aggregator.config import RoundSettings
from fedbell.wire import masking
from fedbell.wire.masking import encode
from fedbell.wire.secagg import SecAggClient, SecAggParams, SecAggServer

T = TypeVar("T")


@dataclass(frozen=True)
class RoundCost:
    doorbells: int
    dropped: int
    neighbours: int
    threshold: int
    coordinates: int
    unmask_seconds: float
    unmask_cpu_seconds: float
    server_seconds: float
    client_seconds_mean: float
    client_cpu_ms_by_step: dict[str, float]
    """A doorbell's CPU in each step (advertise, share, receive, masked_input, unmask), mean."""
    upload_bytes_mean: float
    upload_bytes_max: int
    upload_bytes_by_step: dict[str, float]
    """Mean bytes per doorbell of each message it publishes."""
    exact: bool


def measure(doorbells: int, dropout: float, plan_dropout: float, size: int, seed: int) -> RoundCost:
    """One whole round, timed per party; `exact` checks the sum against the plain one."""
    names = [f"bell-{i:04d}" for i in range(doorbells)]
    rng = np.random.default_rng(seed)
    dropped = set(rng.choice(names, size=round(doorbells * dropout), replace=False).tolist())
    params = SecAggParams.for_cohort(
        round_id=1,
        lineage="bench",
        cohort=doorbells,
        size=size,
        clip_norm=1.0,
        max_dropout=plan_dropout,
    )
    identities = {name: Ed25519PrivateKey.generate() for name in names}
    keys = {name: key.public_key() for name, key in identities.items()}
    inputs = {
        name: encode(rng.normal(0, 0.01, size).astype(np.float32), params.scale, rng)
        for name in names
    }
    server = SecAggServer(params, keys, names)
    clients = {name: SecAggClient(name, params, identities[name], keys) for name in names}
    client_time = dict.fromkeys(names, 0.0)
    client_cpu: dict[str, float] = {}  # step -> CPU seconds, all doorbells
    uploaded = dict.fromkeys(names, 0)
    by_step: dict[str, list[int]] = {}
    server_time = [0.0, 0.0]  # wall, CPU

    def on_client(name: str, step: Callable[..., T], *args: object) -> T:
        start, start_cpu = time.perf_counter(), time.process_time()
        out = step(*args)
        client_time[name] += time.perf_counter() - start
        step_name = getattr(step, "__name__", "step")
        client_cpu[step_name] = client_cpu.get(step_name, 0.0) + time.process_time() - start_cpu
        if isinstance(out, bytes) and name not in dropped:
            uploaded[name] += len(out)
            by_step.setdefault(step_name, []).append(len(out))
        return out

    def on_server(step: Callable[..., T], *args: object) -> T:
        start, start_cpu = time.perf_counter(), time.process_time()
        out = step(*args)
        server_time[0] += time.perf_counter() - start
        server_time[1] += time.process_time() - start_cpu
        return out

    for name, client in clients.items():
        on_server(server.add_advert, name, on_client(name, client.advertise))
    roster = on_server(server.roster)
    for name, client in clients.items():
        on_server(server.add_shares, name, on_client(name, client.share, roster))
    for name, client in clients.items():
        on_client(name, client.receive, on_server(server.inbox, name), server.holders)
    for name, client in clients.items():
        masked = on_client(name, client.masked_input, inputs[name])
        if name not in dropped:
            on_server(server.add_masked, name, masked)
    before_unmask = list(server_time)
    request = on_server(server.unmask_request)
    for name, client in clients.items():
        if name not in dropped:
            on_server(server.add_unmask, name, on_client(name, client.unmask, request))
    total, survivors = on_server(server.result)
    expected = np.zeros(size, dtype=np.uint32)
    for name in survivors:
        expected += inputs[name]
    senders = [name for name in names if name not in dropped]
    k, t = params.degree(doorbells)
    return RoundCost(
        doorbells=doorbells,
        dropped=len(dropped),
        neighbours=k,
        threshold=t,
        coordinates=size,
        unmask_seconds=server_time[0] - before_unmask[0],
        unmask_cpu_seconds=server_time[1] - before_unmask[1],
        server_seconds=server_time[0],
        client_seconds_mean=statistics.fmean(client_time.values()),
        client_cpu_ms_by_step={step: 1000 * cpu / doorbells for step, cpu in client_cpu.items()},
        upload_bytes_mean=statistics.fmean(uploaded[name] for name in senders),
        upload_bytes_max=max(uploaded[name] for name in senders),
        upload_bytes_by_step={step: statistics.fmean(sizes) for step, sizes in by_step.items()},
        exact=bool(np.array_equal(total, masking.reduce(expected)))
        and len(survivors) == len(senders),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--doorbells", type=int, default=1000)
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--upload-doorbells", type=int, default=100)
    parser.add_argument("--coordinates", type=int, default=32_768)
    # the round's shared subset: by default the aggregator's rounds.secure_density
    parser.add_argument("--density", type=float, default=RoundSettings().secure_density)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    size = max(1, round(args.coordinates * args.density))
    upload = measure(args.upload_doorbells, 0.0, 0.1, size, args.seed)
    stress = measure(args.doorbells, args.dropout, args.dropout, size, args.seed)
    print(f"masked coordinates per doorbell: {size} ({args.coordinates} x {args.density})")
    for label, cost in (("upload round", upload), ("unmask round", stress)):
        print(
            f"{label}: {cost.doorbells} doorbells, {cost.dropped} dropped after sharing, "
            f"k={cost.neighbours} t={cost.threshold}; sum exact: {cost.exact}\n"
            f"  aggregator: unmask {cost.unmask_seconds:.2f} s "
            f"({cost.unmask_cpu_seconds:.2f} s CPU), whole round "
            f"{cost.server_seconds:.2f} s\n"
            f"  doorbell: {cost.client_seconds_mean * 1000:.1f} ms per round ("
            + ", ".join(f"{step} {ms:.2f}" for step, ms in cost.client_cpu_ms_by_step.items())
            + " ms CPU), upload "
            f"{cost.upload_bytes_mean / 1000:.1f} kB mean, "
            f"{cost.upload_bytes_max / 1000:.1f} kB max ("
            + ", ".join(
                f"{step} {size / 1000:.2f} kB" for step, size in cost.upload_bytes_by_step.items()
            )
            + ")"
        )
    print(
        f"targets: unmask {args.doorbells} doorbells ({args.dropout:.0%} dropped) <= 5 s: "
        f"{stress.unmask_seconds:.2f} s; upload at {args.upload_doorbells} doorbells <= 20 kB: "
        f"{upload.upload_bytes_max / 1000:.1f} kB"
    )
    if args.json is not None:
        args.json.write_text(
            json.dumps({"upload": asdict(upload), "unmask": asdict(stress)}, indent=2) + "\n"
        )
    return 0 if upload.exact and stress.exact else 1


if __name__ == "__main__":
    sys.exit(main())
