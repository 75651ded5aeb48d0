"""Soak: N rounds × M simulated doorbells against the real aggregator and broker.

    python -m bench.soak --rounds 200 --nodes 10 [--every 20]   (make soak ARGS=...)

Starts a private Mosquitto, the real aggregator (`python -m aggregator`, its
own process, its own state folder, signing on: updates are verified against
each doorbell's Ed25519 key) and M simulated doorbells in this process
(bench/devices.py: each its own MQTT client, answering every round with a
real signed update envelope of the federated head in the default codec, no
TensorFlow). It asks for N automatic rounds and, every K rounds, prints
resident memory (VmRSS after the round, and the highest VmRSS sampled every
50 ms since the last line, i.e. while updates were collected) and open file
descriptors of the aggregator, the broker and the simulated devices. At the
end it prints the aggregator's RSS growth between round 20 (after warm-up)
and round N; the bar is < 10 %.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.devices import Fleet
from bench.scale_site import seed_backbone_cache, signing_keys
from bench.scale_watch import RssSampler
from broker.local import LocalBroker
from fedbell.wire.protocol import RoundMetrics
from fedbell.wire.topics import Topics

SITE = "soak"
WARM_UP_ROUND = 20
GROWTH_BAR = 0.10
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Usage:
    rss_kib: int
    fds: int

    def __str__(self) -> str:
        return f"{self.rss_kib / 1024:7.1f} MiB {self.fds:4d} fds"


def usage(pid: int) -> Usage:
    """Resident memory (VmRSS) and open file descriptors of a process, from /proc."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return Usage(rss, sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir()))


def aggregator_config(
    folder: Path, port: int, nodes: int, timeout_s: float, keys: tuple[Path, Path]
) -> Path:
    """Defaults (the product's codec and strategy), quorum M, signing on."""
    state_dir = folder / "state"
    seed_backbone_cache(state_dir)
    path = folder / "aggregator.yaml"
    path.write_text(
        json.dumps(
            {  # JSON is YAML
                "site": SITE,
                "state_dir": str(state_dir),
                "mqtt": {"port": port},
                "signing": {"private_key_file": str(keys[0]), "trusted_keys_dir": str(keys[1])},
                "rounds": {
                    "timeout_s": timeout_s,
                    "min_updates": nodes,
                    "auto_pause_s": 0.1,
                },
                "threads": 1,
            }
        )
    )
    return path


class MetricsWatch:
    """Collects the aggregator's per-round metrics as they are published."""

    def __init__(self, port: int) -> None:
        self.metrics: queue.Queue[RoundMetrics] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(Topics(SITE).metrics, qos=1)

    def _on_message(self, _client: Any, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.payload:
            self.metrics.put(RoundMetrics.model_validate_json(message.payload))

    def command(self, payload: dict[str, Any]) -> None:
        self.client.publish(Topics(SITE).control, json.dumps(payload), qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def soak(rounds: int, nodes: int, every: int, folder: Path, round_timeout_s: float) -> bool:
    names = [f"door{i:02d}" for i in range(nodes)]
    keys_dir, trusted, aggregator_key, aggregator_pub = signing_keys(folder, names)
    broker = LocalBroker(folder / "broker").start()
    log_file = (folder / "aggregator.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aggregator",
            "--config",
            str(
                aggregator_config(
                    folder, broker.port, nodes, round_timeout_s, (aggregator_key, trusted)
                )
            ),
            "--log-level",
            "WARNING",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=log_file,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    fleet = Fleet(names, broker.port, SITE, keys_dir=keys_dir, aggregator_key=aggregator_pub)
    watch = MetricsWatch(broker.port)
    sampler = RssSampler(process.pid)
    sampler.start()
    rss: dict[int, int] = {}
    peaks: dict[int, int] = {}
    try:
        fleet.wait_ready(timeout=600)  # the aggregator imports TensorFlow and loads dlib first
        since = time.time()
        watch.command({"cmd": "auto", "rounds": rounds})
        started = time.monotonic()
        print(
            f"{'round':>5} {'outcome':>9} {'aggregator':>20} {'peak collecting':>16} "
            f"{'broker':>20} {'devices':>20} {'s/round':>7}"
        )
        done = 0
        while done < rounds:
            try:
                metrics = watch.metrics.get(timeout=round_timeout_s + 120)
            except queue.Empty:
                print(
                    f"no round finished within {round_timeout_s + 120:.0f}s; see "
                    f"{folder / 'aggregator.log'}"
                )
                return False
            if metrics.round <= done:
                continue  # the retained copy of an older round
            done = metrics.round
            aggregator = usage(process.pid)
            rss[done] = aggregator.rss_kib
            now = time.time()
            peaks[done] = sampler.peak_between(since, now)
            if metrics.outcome != "published" or done % every == 0 or done in (1, rounds):
                assert broker.pid is not None
                peak = max(v for r, v in peaks.items() if r > done - every)
                print(
                    f"{done:5d} {metrics.outcome:>9} {aggregator!s:>20} "
                    f"{peak / 1024:12.1f} MiB {usage(broker.pid)!s:>20} "
                    f"{usage(os.getpid())!s:>20} {(time.monotonic() - started) / done:7.2f}",
                    flush=True,
                )
            since = now
        return report(rss, rounds)
    finally:
        sampler.done.set()
        watch.close()
        fleet.close()
        process.terminate()
        process.wait(30)
        log_file.close()
        broker.stop()


def report(rss: dict[int, int], rounds: int) -> bool:
    first = WARM_UP_ROUND if WARM_UP_ROUND in rss else min(rss)
    start, end = rss[first], rss[rounds]
    growth = (end - start) / start
    ok = growth < GROWTH_BAR
    peak = max(value for round_id, value in rss.items() if round_id >= first)
    print(
        f"aggregator RSS round {first}: {start / 1024:.1f} MiB, "
        f"round {rounds}: {end / 1024:.1f} MiB, growth {100 * growth:+.1f} % "
        f"({'<' if ok else '>='} {100 * GROWTH_BAR:.0f} %: {'PASS' if ok else 'FAIL'}); "
        f"peak from round {first} on: {peak / 1024:.1f} MiB "
        f"({100 * (peak - start) / start:+.1f} %)"
    )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--every", type=int, default=20, help="print every K rounds")
    parser.add_argument(
        "--round-timeout",
        type=float,
        default=60.0,
        help="round deadline (s); every device answers at once, so rounds "
        "normally close long before it",
    )
    parser.add_argument(
        "--keep", type=Path, default=None, help="keep the broker, state and logs in this folder"
    )
    args = parser.parse_args(argv)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        return 0 if soak(args.rounds, args.nodes, args.every, args.keep, args.round_timeout) else 1
    with tempfile.TemporaryDirectory(prefix="fedbell-soak-") as folder:
        return (
            0 if soak(args.rounds, args.nodes, args.every, Path(folder), args.round_timeout) else 1
        )


if __name__ == "__main__":
    sys.exit(main())
