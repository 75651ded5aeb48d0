"""A running federation for tests: real Mosquitto, `python -m aggregator`, `python -m edge`.

The `federation` fixture (tests/conftest.py) gives a test a `Federation` on its own
broker: it starts the aggregator and the doorbells (each with a gallery of generated
people) as processes, a `Recorder` keeps every message under the site, and every
process is stopped after the test, whatever happened. `python -m bench.devices`
fleets (simulated doorbells, no TensorFlow) stand in where a test needs many.
Each test gets a federation of its own: rounds, lineages and state folders never
carry over from one test to the next.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from broker.local import LocalBroker
from fedbell.wire.messages import parse_global
from fedbell.wire.protocol import DeviceStatus, RoundAnnouncement, RoundMetrics
from simulation.data import write_synthetic
from tests.test_aggregator import MAX_BYTES, SITE, TOPICS, make_config

REPO = Path(__file__).resolve().parents[1]
STARTUP = 300.0
"""Seconds a process start may take on a loaded 2-core machine (TensorFlow, the backbone,
the gallery's features)."""
READY = "ready: site"
"""What the aggregator logs once it serves the site."""
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "NOTIFY_SOCKET": ""}


class Recorder:
    """Every message under the site; resubscribes after a broker restart (unlike a Probe)."""

    def __init__(self, port: int) -> None:
        self._lock = threading.Lock()
        self._seen: list[tuple[str, bytes]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *_: c.subscribe(f"{TOPICS.base}/#", qos=1)
        self.client.on_message = self._record
        self.client.reconnect_delay_set(1, 2)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _record(self, _client: Any, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self._seen.append((message.topic, bytes(message.payload)))

    def payloads(self, topic: str, since: int = 0) -> list[bytes]:
        """Non-empty payloads on `topic`, oldest first, from the `since`-th message seen."""
        with self._lock:
            return [p for t, p in self._seen[since:] if t == topic and p]

    def everything(self) -> list[tuple[str, bytes]]:
        """(topic, payload) of every message seen so far, oldest first."""
        with self._lock:
            return list(self._seen)

    def mark(self) -> int:
        """A point in what was seen: `since=` it, only later messages count."""
        with self._lock:
            return len(self._seen)

    def wait_for(
        self, topic: str, accept: Callable[[bytes], bool], timeout: float = 30.0, since: int = 0
    ) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for payload in self.payloads(topic, since):
                if accept(payload):
                    return payload
            time.sleep(0.05)
        raise AssertionError(
            f"nothing acceptable on {topic} within {timeout}s; "
            f"saw {[p[:160] for p in self.payloads(topic)]}"
        )

    def metrics(self, round_id: int, timeout: float = 30.0, since: int = 0) -> RoundMetrics:
        payload = self.wait_for(
            TOPICS.metrics,
            lambda p: (
                json.loads(p)["round"] == round_id and json.loads(p)["outcome"] != "aggregated"
            ),
            timeout,
            since,
        )
        return RoundMetrics.model_validate_json(payload)

    def round(self, round_id: int, phase: str, timeout: float = 30.0) -> RoundAnnouncement:
        payload = self.wait_for(
            TOPICS.round,
            lambda p: json.loads(p)["round"] == round_id and json.loads(p)["phase"] == phase,
            timeout,
        )
        return RoundAnnouncement.model_validate_json(payload)

    def status(
        self,
        device: str,
        accept: Callable[[DeviceStatus], bool],
        timeout: float = 30.0,
        since: int = 0,
    ) -> DeviceStatus:
        payload = self.wait_for(
            TOPICS.status(device),
            lambda p: accept(DeviceStatus.model_validate_json(p)),
            timeout,
            since,
        )
        return DeviceStatus.model_validate_json(payload)

    def statuses(
        self,
        devices: Iterable[str],
        accept: Callable[[DeviceStatus], bool],
        timeout: float = 30.0,
        since: int = 0,
    ) -> None:
        """Each device's status, one after the other: `accept`ed within `timeout`."""
        for device in devices:
            self.status(device, accept, timeout, since)

    def versions(self) -> list[int]:
        """Versions of every global model seen, in order (republications included)."""
        return [
            parse_global(p, site=SITE, max_bytes=MAX_BYTES, keys=None).version
            for p in self.payloads(TOPICS.global_model)
        ]

    def command(self, **command: Any) -> None:
        self.client.publish(TOPICS.control, json.dumps(command), qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *_exception: object) -> None:
        self.close()


def start_aggregator(
    config: Path, stderr: IO[bytes] | int, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`python -m aggregator --config config` from the repository, stdout discarded;
    `env` is added to this process's environment, TensorFlow's log kept quiet."""
    return subprocess.Popen(
        [sys.executable, "-m", "aggregator", "--config", str(config)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        env={**os.environ, **(env or {}), "TF_CPP_MIN_LOG_LEVEL": "3"},
    )


class Process:
    """A fedbell process whose stderr goes to a log file; SIGKILL and restart keep the log."""

    def __init__(self, log_path: Path, *args: str) -> None:
        self.args = [sys.executable, "-m", *args]
        self.log_path = log_path
        self._log: IO[bytes] | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Process:
        self._log = self.log_path.open("ab")
        self._log.write(f"\n=== start {self.starts}\n".encode())
        self._log.flush()
        self.process = subprocess.Popen(
            self.args, cwd=REPO, env=ENV, stdout=self._log, stderr=self._log
        )
        self.starts += 1
        return self

    def log(self) -> str:
        """The log of the current (last) start."""
        return self.log_path.read_text().rsplit("=== start", 1)[-1]

    def wait_log(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"{self.args} exited:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {text!r} in the log within {timeout}s:\n{self.log()[-3000:]}"
                )
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: a crash, no clean-up of any kind."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            assert self.process.wait(10) == -signal.SIGKILL
            self.process = None
        if self._log is not None:
            self._log.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._log is not None:
            self._log.close()


def aggregator_process(
    tmp_path: Path,
    port: int,
    cache_dir: Path,
    *,
    sections: dict[str, dict[str, Any]] | None = None,
    **rounds: Any,
) -> Process:
    """`python -m aggregator` on the test broker; `cache_dir`: the session's `aggregator_cache`.

    `evaluation` and `strangers` (folders) go to its evaluation settings, `auto_rounds`
    to the top level, `sections` into the config's sections of those names (e.g.
    `{"signing": {...}}`), the rest to its round settings.
    """
    auto = rounds.pop("auto_rounds", 0)
    evaluation, strangers = rounds.pop("evaluation", None), rounds.pop("strangers", None)
    config = make_config(
        tmp_path, port, cache_dir, evaluation=evaluation, strangers=strangers, **rounds
    ).model_dump(mode="json")
    config["auto_rounds"] = auto
    for name, settings in (sections or {}).items():
        config[name] = {**(config.get(name) or {}), **settings}
    path = tmp_path / "aggregator.yaml"
    path.write_text(yaml.safe_dump(config))
    return Process(tmp_path / "aggregator.log", "aggregator", "--config", str(path))


def node_process(tmp_path: Path, port: int, device: str, gallery: Path, **settings: Any) -> Process:
    """`python -m edge` on the test broker, training on `gallery` (generated faces: Haar)."""
    config = {
        "device_id": device,
        "site": SITE,
        "mqtt": {"port": port, "keepalive": 5},
        "state_dir": str(tmp_path / device),
        "gallery_dir": str(gallery),
        "training": {"base_model_wait_s": 60, "threads": 1},
        "camera": {"enabled": False},  # these doorbells only train
        "detection": {"kind": "haar"},  # BlazeFace does not see the generated cartoons
        **settings,
    }
    path = tmp_path / f"{device}.yaml"
    path.write_text(yaml.safe_dump(config))
    return Process(tmp_path / f"{device}.log", "edge", "--config", str(path))


def fleet_process(
    tmp_path: Path, port: int, names: list[str], delay: float = 0.0, label: str = "fleet"
) -> Process:
    return Process(
        tmp_path / f"{label}.log",
        "bench.devices",
        "--port",
        str(port),
        "--site",
        SITE,
        "--names",
        ",".join(names),
        "--delay",
        str(delay),
    )


class Federation:
    """A test's federation on its own broker: the processes it starts are stopped after
    the test (the `processes` fixture's list), and `recorder` heard everything."""

    def __init__(
        self,
        root: Path,
        broker: LocalBroker,
        recorder: Recorder,
        processes: list[Process],
        cache: Path,
    ) -> None:
        self.root, self.broker, self.recorder = root, broker, recorder
        self.processes, self.cache = processes, cache

    @property
    def port(self) -> int:
        return self.broker.port

    def aggregator(self, **rounds: Any) -> Process:
        """`python -m aggregator` (not started yet); settings as `aggregator_process`'s."""
        return self.add(aggregator_process(self.root, self.port, self.cache, **rounds))

    def start_aggregator(self, **rounds: Any) -> Process:
        """The aggregator, started and serving the site."""
        aggregator = self.aggregator(**rounds)
        aggregator.start().wait_log(READY, timeout=STARTUP)
        return aggregator

    def start_doorbell(self, device: str, gallery: Path, **settings: Any) -> Process:
        """`python -m edge` training on `gallery`, started; settings as `node_process`'s."""
        return self.add(node_process(self.root, self.port, device, gallery, **settings)).start()

    def fleet(self, names: list[str], delay: float = 0.0, label: str = "fleet") -> Process:
        """Simulated doorbells in one process (not started yet)."""
        return self.add(fleet_process(self.root, self.port, names, delay, label))

    def house(self, device: str, seed: int, persons: int, photos: int) -> Path:
        """A gallery of generated people at `device`'s door."""
        gallery = self.root / f"house-{device}"
        write_synthetic(gallery, persons=persons, photos=photos, seed=seed)
        return gallery

    def add(self, process: Process) -> Process:
        self.processes.append(process)
        return process
