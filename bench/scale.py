"""Aggregation at scale: N signed doorbells, one real Mosquitto, the real aggregator.

    python -m bench.scale [--nodes 10 100 1000] [--brokers loopback tls] [--codec topk]

For each broker set-up and each N: a fresh Mosquitto, the aggregator CLI as a
subprocess (`python -m aggregator`, quorum N, one automatic round, a long
deadline, signing on: its own Ed25519 key and a trusted key per doorbell), and
N doorbells spread over a few `bench.swarm` processes, each a real MQTT
connection with its own client id that publishes its signed update of the
federated head (built before the round) as soon as the round message arrives.

Broker set-ups:

- `loopback`: `broker/local.conf` on 127.0.0.1, no TLS, no logins;
- `tls`: the production configuration (`broker/production.conf` through
  `broker.secure.SecureBroker`) on a site made by the real provisioner
  (`deploy.provision init`, `add-aggregator`, `add-operator`, `add-device`):
  TLS 1.2 with client certificates, a password per login, the generated ACL,
  client ids bound to user names. The first doorbell is provisioned in full;
  the others are added to the same registry (so the provisioner renders their
  ACL blocks) with passwords hashed in one `mosquitto_passwd -U` pass, and
  present the first doorbell's client certificate (the broker checks the
  certificate against the CA and the CRL; the login is the password): a full
  `add-device` costs ~0.3 s each on this machine, 5 minutes for 1000.

What the figures mean (times from the aggregator's own replies on
`aggregator/reply`, one per update it accepted, stamped with its clock):

- updates_per_s: (accepted − 1) / (last accepted − first accepted): the rate
  at which it verifies, validates, decodes, folds in and acknowledges updates
  while the rest wait at the broker;
- collect_seconds: round announced → last update accepted; round_seconds:
  round announced → the round's metrics (after the release);
- rss_before_mb: the aggregator's VmRSS when the round is announced (after
  imports, dlib's weights and the backbone: what it holds idle);
  collect_rss_mb: its highest VmRSS sampled every 50 ms while the updates
  come in; collect_growth_mb: the difference, i.e. what collecting N updates
  costs. lifetime_peak_mb (VmHWM) is printed for contrast: it is the
  TensorFlow import and model loading, not aggregation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.scale_site import REPO, aggregator_config, make_broker
from bench.scale_watch import (
    RssSampler,
    Watcher,
    Worker,
    proc_status_kb,
    raise_fd_limit,
    swarm_spec,
    wait_for,
)
from fedbell.wire.envelope import Codec

CLIENTS_PER_WORKER = 250
MAX_WORKERS = 4
BROKERS = ("loopback", "tls")
GROWTH_BAR_MB = 64.0
"""Collecting 1000 updates may cost at most this much more memory than collecting 10:
a streaming aggregator holds one running sum and a bounded inbox, whatever N."""


def run_one(
    nodes: int,
    codec: Codec,
    folder: Path,
    *,
    broker_kind: str = "loopback",
    workers: int | None = None,
    timeout: float = 900.0,
) -> dict[str, Any]:
    """One aggregation round with `nodes` signed doorbells; the figures as a dict."""
    count = workers or max(1, min(MAX_WORKERS, math.ceil(nodes / CLIENTS_PER_WORKER)))
    names = [f"bell{i:04d}" for i in range(nodes)]
    broker, site = make_broker(broker_kind, folder, names)
    with broker:
        config = aggregator_config(site, broker.port, nodes, codec)
        log_path = folder / "aggregator.log"
        with log_path.open("wb") as log_file:
            aggregator = subprocess.Popen(
                [sys.executable, "-m", "aggregator", "--config", str(config)],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                env={**os.environ, **site.env, "TF_CPP_MIN_LOG_LEVEL": "3"},
            )
        sampler = RssSampler(aggregator.pid)
        sampler.start()
        watcher = Watcher(site, broker.port)
        swarm: list[Worker] = []
        try:
            swarm = [
                Worker(swarm_spec(site, broker.port, codec, names[i::count], i))
                for i in range(count)
            ]
            sampler.cpu_pids = {
                "aggregator": [aggregator.pid],
                "broker": [broker.pid or 0],
                "doorbells": [w.process.pid for w in swarm],
            }
            for worker in swarm:
                ready = worker.read(timeout=600)
                if "ready" not in ready:
                    raise RuntimeError(f"swarm worker failed: {ready}")
            wait_for(lambda: watcher.announced is not None, 300, "round announcement", aggregator)
            wait_for(
                lambda: len(watcher.accepted) + len(watcher.refused) >= nodes,
                timeout,
                f"{nodes} update replies",
                aggregator,
            )
            wait_for(lambda: watcher.metrics is not None, 120, "round metrics", aggregator)
            lifetime_kb = proc_status_kb(aggregator.pid, "VmHWM")
            reports = [worker.stop() for worker in swarm]
        finally:
            for worker in swarm:
                worker.kill()
            watcher.close()
            sampler.done.set()
            aggregator.send_signal(signal.SIGTERM)
            try:
                aggregator.wait(timeout=60)
            except subprocess.TimeoutExpired:
                aggregator.kill()
                aggregator.wait()
    errors = [e for r in reports for e in r["errors"]]
    if errors:
        raise RuntimeError(f"swarm errors: {errors[:5]}")
    assert watcher.announced is not None
    assert watcher.metrics is not None
    assert watcher.finished is not None
    if watcher.refused or watcher.metrics.participants != nodes:
        raise RuntimeError(
            f"{len(watcher.accepted)} updates accepted, {nodes} expected; refused: "
            f"{watcher.refused[:5]}; see {log_path}"
        )
    times = sorted(watcher.accepted)
    span = times[-1] - times[0]
    before_kb = sampler.at(watcher.announced)
    collect_kb = max(sampler.peak_between(watcher.announced, times[-1]), sampler.at(times[-1]))
    return {
        "broker": broker_kind,
        "nodes": nodes,
        "codec": codec,
        "signed": True,
        "updates_per_s": round((nodes - 1) / span, 1) if span > 0 else None,
        "collect_seconds": round(times[-1] - watcher.announced, 2),
        "round_seconds": round(watcher.finished - watcher.announced, 2),
        "rss_before_mb": round(before_kb / 1024, 1),
        "collect_rss_mb": round(collect_kb / 1024, 1),
        "collect_growth_mb": round((collect_kb - before_kb) / 1024, 1),
        "lifetime_peak_mb": round(lifetime_kb / 1024, 1),
        "bytes_per_update": round(watcher.metrics.bytes_up / nodes),
        "cores_while_collecting": sampler.cpu_share(watcher.announced, times[-1]),
        "workers": count,
    }


def run_scale(
    nodes_list: Sequence[int] = (10, 100, 1000),
    codec: Codec = "topk",
    *,
    brokers: Sequence[str] = BROKERS,
    workers: int | None = None,
    workdir: Path | None = None,
    timeout: float = 900.0,
    show: bool = True,
) -> list[dict[str, Any]]:
    """The scale benchmark for each broker set-up and N; for `make bench` (`scale`)."""
    raise_fd_limit(max(nodes_list) + 256)
    results = []
    with tempfile.TemporaryDirectory(prefix="fedbell-scale-") as scratch:
        base = workdir or Path(scratch)
        for kind in brokers:
            for nodes in nodes_list:
                folder = base / f"{kind}-{codec}-{nodes}"
                folder.mkdir(parents=True, exist_ok=True)
                results.append(
                    run_one(
                        nodes, codec, folder, broker_kind=kind, workers=workers, timeout=timeout
                    )
                )
                if show:
                    print(json.dumps(results[-1]), flush=True)
    if show:
        print_table(results)
    return results


def growth_verdict(results: Sequence[dict[str, Any]]) -> list[str]:
    """Per broker: does collecting the most updates cost more than GROWTH_BAR_MB over the
    fewest? A streaming aggregator's collection memory must not grow with N."""
    lines = []
    for kind in dict.fromkeys(r["broker"] for r in results):
        rows = sorted((r for r in results if r["broker"] == kind), key=lambda r: r["nodes"])
        if len(rows) < 2:
            continue
        extra = rows[-1]["collect_growth_mb"] - rows[0]["collect_growth_mb"]
        ok = extra <= GROWTH_BAR_MB
        lines.append(
            f"{'PASS' if ok else 'FAIL'}  {kind}: collecting {rows[-1]['nodes']} updates costs "
            f"{extra:+.1f} MiB over {rows[0]['nodes']} (bar {GROWTH_BAR_MB:g} MiB)"
        )
    return lines


def print_table(results: Sequence[dict[str, Any]]) -> None:
    table = Table(
        title="aggregation at scale: signed updates, the aggregator's memory while collecting"
    )
    columns = (
        "broker",
        "nodes",
        "codec",
        "bytes_per_update",
        "updates_per_s",
        "collect_seconds",
        "round_seconds",
        "rss_before_mb",
        "collect_rss_mb",
        "collect_growth_mb",
        "lifetime_peak_mb",
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("broker", "codec") else "right")
    for row in results:
        table.add_row(*(str(row[c]) for c in columns))
    console = Console(width=160)
    console.print(table)
    for line in growth_verdict(results):
        console.print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--brokers", nargs="+", choices=BROKERS, default=list(BROKERS))
    parser.add_argument("--codec", default="topk", choices=["float32", "float16", "int8", "topk"])
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"doorbell processes (default: one per {CLIENTS_PER_WORKER}, at most {MAX_WORKERS})",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep broker and aggregator folders and logs here",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    results = run_scale(
        args.nodes, args.codec, brokers=args.brokers, workers=args.workers, workdir=args.workdir
    )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if all(line.startswith("PASS") for line in growth_verdict(results)) else 1


if __name__ == "__main__":
    sys.exit(main())
