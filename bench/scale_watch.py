"""Watching a `bench.scale` run: the aggregator's memory and CPU, the round as an
observer receives it, and the `bench.swarm` worker processes that play the doorbells.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.scale_site import REPO, SITE, Site
from fedbell.wire.envelope import Codec
from fedbell.wire.protocol import Reply, RoundAnnouncement, RoundMetrics
from fedbell.wire.topics import Topics

# --- memory ----------------------------------------------------------------------------


def proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (and its reaped children) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


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


def raise_fd_limit(needed: int) -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; the broker and workers inherit it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    limit = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if limit < needed:
        raise RuntimeError(f"{needed} file descriptors needed, the hard limit is {limit}")
    return limit


# --- watching the round -------------------------------------------------------------------


@dataclass
class Watcher:
    """The round's announcement, the aggregator's update replies and the metrics, as
    an observer receives them (the operator's login on the production broker)."""

    site: Site
    port: int
    topics: Topics = field(default_factory=lambda: Topics(SITE))
    announced: float | None = None
    accepted: list[float] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    finished: float | None = None
    metrics: RoundMetrics | None = None

    def __post_init__(self) -> None:
        self.started = time.time()
        login = self.site.watcher_login
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=login[0] if login else "", protocol=mqtt.MQTTv5
        )
        if login is not None:
            self.client.username_pw_set(*login)
        if self.site.watcher_bundle is not None:
            bundle = self.site.watcher_bundle
            self.client.tls_set(
                ca_certs=str(bundle / "ca.crt"),
                certfile=str(bundle / "client.crt"),
                keyfile=str(bundle / "client.key"),
            )
        self.client.on_message = self._on_message
        self.client.connect(self.site.host, self.port, keepalive=60)
        self.client.subscribe(
            [(self.topics.round, 1), (self.topics.metrics, 1), (self.topics.reply, 1)]
        )
        self.client.loop_start()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        now = time.time()
        payload = bytes(message.payload)
        if not payload:
            return
        if message.topic == self.topics.round:
            announcement = RoundAnnouncement.model_validate_json(payload)
            if announcement.round == 1 and announcement.phase == "train":
                self.announced = self.announced or now
        elif message.topic == self.topics.reply:
            reply = Reply.model_validate_json(payload)
            if reply.about == "update" and reply.round in (1, None) and reply.time >= self.started:
                if reply.ok:
                    self.accepted.append(reply.time)
                else:
                    self.refused.append(f"{reply.device}: {reply.reason} {reply.detail}")
        elif message.topic == self.topics.metrics:
            metrics = RoundMetrics.model_validate_json(payload)
            if metrics.round == 1:
                self.metrics, self.finished = metrics, self.finished or now

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- the swarm ------------------------------------------------------------------------------


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


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, process: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise RuntimeError(f"the aggregator exited ({process.returncode}) waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout}s")
        time.sleep(0.02)


def swarm_spec(
    site: Site, port: int, codec: Codec, devices: list[str], seed: int
) -> dict[str, Any]:
    return {
        "port": port,
        "host": site.host,
        "site": SITE,
        "codec": codec,
        "density": 0.05,
        "devices": devices,
        "seed": seed,
        "keys_dir": str(site.keys_dir),
        "aggregator_key": str(site.aggregator_pub),
        "tls": site.tls,
        "passwords": None if site.passwords is None else str(site.passwords),
    }
