"""Aggregation at scale: N simulated doorbells, one real Mosquitto, the real aggregator.

    python -m bench.scale [--nodes 10 100 1000] [--codec int8] [--workers K]

For each N: a fresh `LocalBroker` on loopback, the aggregator CLI as a
subprocess (`python -m aggregator`, quorum N, one automatic round, a long
deadline), and N doorbells spread over a few `bench.swarm` processes, each a
real MQTT connection with its own client id that publishes its update (built
before the round) as soon as the round message arrives.

What the figures mean:

- updates_per_s: (accepted − 1) / (last accepted − first accepted), read from
  the aggregator's own "accepted update" log lines (millisecond timestamps):
  the rate at which it validates, decodes, folds in and acknowledges updates
  while the rest wait at the broker.
- round_seconds: the retained round message (phase train) to the retained
  global model version 1, both as a watcher client receives them: the
  doorbells' reaction, the aggregation and the new model's TFLite export.
- peak_rss_mb: the aggregator's VmHWM at the end of the round (TensorFlow and
  the TFLite conversion included, as the operator's machine sees it);
  collect_rss_mb: its highest VmRSS sampled every 50 ms while updates came in;
  rss_before_mb: its VmRSS when the round was announced.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.table import Table

from broker.local import LocalBroker
from fedbell.envelope import Codec
from fedbell.messages import parse_global
from fedbell.protocol import RoundAnnouncement, RoundMetrics
from fedbell.topics import Topics

SITE = "scale"
LABELS = ("alice", "bob", "carol")
"""The example site's labels (config/aggregator.yaml): the default ~197k-parameter model."""
REPO = Path(__file__).resolve().parents[1]
CLIENTS_PER_WORKER = 250
MAX_WORKERS = 4
ACCEPTED = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO aggregator: "
    r"round \d+: accepted update from "
)


@dataclass
class Watcher:
    """Receive times of the round messages, global models and metrics."""

    port: int
    topics: Topics = field(default_factory=lambda: Topics(SITE))
    announced: float | None = None
    published: float | None = None
    metrics: RoundMetrics | None = None

    def __post_init__(self) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", self.port, keepalive=60)
        self.client.subscribe(
            [(self.topics.round, 1), (self.topics.global_model, 1), (self.topics.metrics, 1)]
        )
        self.client.loop_start()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        now = time.time()
        payload = bytes(message.payload)
        if message.topic == self.topics.round:
            announcement = RoundAnnouncement.model_validate_json(payload)
            if announcement.round == 1 and announcement.phase == "train":
                self.announced = self.announced or now
        elif message.topic == self.topics.global_model:
            model = parse_global(payload, site=SITE, max_bytes=len(payload), keys=None)
            if model.version == 1:
                self.published = self.published or now
        elif message.topic == self.topics.metrics:
            self.metrics = RoundMetrics.model_validate_json(payload)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class RssSampler(threading.Thread):
    """Samples a process's VmRSS every 50 ms (kB, with the time), and the CPU
    seconds of the processes in `cpu_pids` (to see who is busy while updates flow)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pid = pid
        self.cpu_pids: dict[str, list[int]] = {}
        self.samples: list[tuple[float, int]] = []
        self.cpu: list[tuple[float, dict[str, float]]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            try:
                self.samples.append((time.time(), proc_status_kb(self.pid, "VmRSS")))
                self.cpu.append(
                    (
                        time.time(),
                        {name: sum(map(cpu_seconds, pids)) for name, pids in self.cpu_pids.items()},
                    )
                )
            except (OSError, KeyError):
                return

    def cpu_share(self, start: float, end: float) -> dict[str, float]:
        """Cores each process group used on average between two moments."""
        inside = [(t, c) for t, c in self.cpu if start <= t <= end]
        if len(inside) < 2:
            return {}
        (t0, c0), (t1, c1) = inside[0], inside[-1]
        return {name: round((c1[name] - c0.get(name, 0.0)) / (t1 - t0), 2) for name in c1}

    def peak_between(self, start: float, end: float) -> int:
        return max((kb for t, kb in self.samples if start <= t <= end), default=0)

    def at(self, moment: float) -> int:
        before = [kb for t, kb in self.samples if t <= moment]
        return before[-1] if before else 0


def proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (and its reaped children) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def raise_fd_limit(needed: int) -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; the broker and workers inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    limit = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if limit < needed:
        raise RuntimeError(f"{needed} file descriptors needed, the hard limit is {limit}")
    return limit


def aggregator_config(folder: Path, port: int, nodes: int, codec: Codec) -> Path:
    """A config like the example's, with quorum N, one automatic round, a long deadline."""
    path = folder / "aggregator.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "site": SITE,
                "labels": list(LABELS),
                "state_dir": str(folder / "state"),
                "mqtt": {"port": port, "keepalive": 60},
                "rounds": {
                    "codec": codec,
                    "timeout_s": 3600,
                    "min_updates": nodes,
                    "auto_pause_s": 0,
                },
                "auto_rounds": 1,
            }
        )
    )
    return path


def _lines(stream: IO[str], into: queue.Queue[str]) -> None:
    for line in stream:
        into.put(line)


class Worker:
    """One `bench.swarm` process, talked to in JSON lines over stdin/stdout."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.swarm", json.dumps(spec)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_lines, args=(self.process.stdout, self.lines), daemon=True).start()

    def read(self, timeout: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"swarm worker said nothing in {timeout}s") from None
        message: dict[str, Any] = json.loads(line)
        return message

    def stop(self) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write("stop\n")
        self.process.stdin.flush()
        report = self.read(timeout=60)
        self.process.wait(timeout=60)
        return report

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def accepted_times(log: str) -> list[float]:
    return [
        datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        for m in map(ACCEPTED.match, log.splitlines())
        if m
    ]


def wait_for(condition: Any, timeout: float, what: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise RuntimeError(f"the aggregator exited ({process.returncode}) waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout}s")
        time.sleep(0.02)


def run_one(
    nodes: int, codec: Codec, folder: Path, workers: int | None = None, timeout: float = 900.0
) -> dict[str, Any]:
    """One aggregation round with `nodes` doorbells; the figures as a dict."""
    count = workers or max(1, min(MAX_WORKERS, math.ceil(nodes / CLIENTS_PER_WORKER)))
    names = [f"bell{i:04d}" for i in range(nodes)]
    with LocalBroker(folder / "broker") as broker:
        config = aggregator_config(folder, broker.port, nodes, codec)
        log_path = folder / "aggregator.log"
        with log_path.open("wb") as log_file:
            aggregator = subprocess.Popen(
                [sys.executable, "-m", "aggregator", "--config", str(config)],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
            )
        sampler = RssSampler(aggregator.pid)
        sampler.start()
        watcher = Watcher(broker.port)
        swarm: list[Worker] = []
        try:
            swarm = [
                Worker(
                    {
                        "port": broker.port,
                        "site": SITE,
                        "codec": codec,
                        "density": 0.05,
                        "devices": names[i::count],
                        "seed": i,
                    }
                )
                for i in range(count)
            ]
            sampler.cpu_pids = {
                "aggregator": [aggregator.pid],
                "broker": [broker.pid or 0],
                "doorbells": [w.process.pid for w in swarm],
            }
            for worker in swarm:
                ready = worker.read(timeout=300)
                if "ready" not in ready:
                    raise RuntimeError(f"swarm worker failed: {ready}")
            wait_for(lambda: watcher.announced is not None, 120, "round announcement", aggregator)
            wait_for(lambda: watcher.published is not None, timeout, "global model v1", aggregator)
            wait_for(
                lambda: watcher.metrics is not None and watcher.metrics.round == 1,
                30,
                "round metrics",
                aggregator,
            )
            peak_kb = proc_status_kb(aggregator.pid, "VmHWM")
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
    times = accepted_times(log_path.read_text())
    assert watcher.announced is not None
    assert watcher.published is not None
    assert watcher.metrics is not None
    if len(times) != nodes or watcher.metrics.participants != nodes:
        raise RuntimeError(
            f"{len(times)} updates accepted, {nodes} expected "
            f"(rejected: {watcher.metrics.rejected}); see {log_path}"
        )
    span = times[-1] - times[0]
    return {
        "nodes": nodes,
        "codec": codec,
        "updates_per_s": round((nodes - 1) / span, 1) if span > 0 else None,
        "round_seconds": round(watcher.published - watcher.announced, 2),
        "collect_seconds": round(times[-1] - watcher.announced, 2),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "collect_rss_mb": round(
            max(sampler.peak_between(watcher.announced, times[-1]), sampler.at(times[-1])) / 1024, 1
        ),
        "rss_before_mb": round(sampler.at(watcher.announced) / 1024, 1),
        "bytes_up": watcher.metrics.bytes_up,
        "cores_while_collecting": sampler.cpu_share(watcher.announced, times[-1]),
        "workers": count,
    }


def run_scale(
    nodes_list: Sequence[int] = (10, 100, 1000),
    codec: Codec = "topk",
    *,
    workers: int | None = None,
    workdir: Path | None = None,
    timeout: float = 900.0,
    show: bool = True,
) -> list[dict[str, Any]]:
    """The scale benchmark for each N in `nodes_list`; for `make bench` (`scale`)."""
    raise_fd_limit(max(nodes_list) + 256)
    results = []
    with tempfile.TemporaryDirectory(prefix="fedbell-scale-") as scratch:
        base = workdir or Path(scratch)
        for nodes in nodes_list:
            folder = base / f"{codec}-{nodes}"
            folder.mkdir(parents=True, exist_ok=True)
            results.append(run_one(nodes, codec, folder, workers=workers, timeout=timeout))
            if show:
                print(json.dumps(results[-1]), flush=True)
    if show:
        print_table(results)
    return results


def print_table(results: Sequence[dict[str, Any]]) -> None:
    table = Table(title="aggregation at scale (one Mosquitto, loopback)")
    columns = (
        "nodes",
        "codec",
        "updates_per_s",
        "round_seconds",
        "collect_seconds",
        "peak_rss_mb",
        "collect_rss_mb",
        "rss_before_mb",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "codec" else "right")
    for row in results:
        table.add_row(*(str(row[c]) for c in columns))
    Console(width=120).print(table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 100, 1000])
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
    results = run_scale(args.nodes, args.codec, workers=args.workers, workdir=args.workdir)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
