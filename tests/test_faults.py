"""Crash and fault tolerance with real processes, real SIGKILLs and a real Mosquitto.

- the broker dies mid-round: real nodes and the real aggregator reconnect on
  their own, no update is lost, the round completes;
- the aggregator dies mid-round: it resumes from disk and counts no update
  twice; killed again and again during rounds, its state always loads and
  the published version never goes back;
- 30 % of the selected devices vanish: the round closes at its deadline
  with the quorum or is abandoned (and announced) below it; a late update
  changes nothing;
- a node killed mid-training takes part in the round after its restart.

The aggregator and the doorbells run as `python -m aggregator`,
`python -m edge` and `python -m bench.devices` (simulated doorbells, no
TensorFlow) subprocesses wherever a test kills them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.state import ModelRecord, StateRecord, StateStore
from broker.local import LocalBroker
from fedbell.wire.messages import parse_global
from fedbell.wire.protocol import DeviceStatus, RoundAnnouncement, RoundMetrics
from simulation.data import write_synthetic
from tests.test_aggregator import (
    MAX_BYTES,
    SITE,
    TOPICS,
    FakeDevice,
    make_config,
    random_delta,
    running,
    wait_until,
    weighted,
)

pytestmark = pytest.mark.timeout(900)  # real processes on a loaded 2-core machine

REPO = Path(__file__).resolve().parents[1]
STARTUP = 300.0
"""Seconds a process start may take (TensorFlow, the backbone, the gallery's features)."""
ROUND = 240.0
"""Seconds a round with real doorbells may take; rounds close as soon as all answered."""
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


def aggregator_process(tmp_path: Path, port: int, cache_dir: Path, **rounds: Any) -> Process:
    """`python -m aggregator` on the test broker; `cache_dir`: the session's `aggregator_cache`.

    `evaluation` and `strangers` (folders) go to its evaluation settings, `auto_rounds`
    to the top level, the rest to its round settings.
    """
    auto = rounds.pop("auto_rounds", 0)
    evaluation, strangers = rounds.pop("evaluation", None), rounds.pop("strangers", None)
    config = make_config(
        tmp_path, port, cache_dir, evaluation=evaluation, strangers=strangers, **rounds
    ).model_dump(mode="json")
    config["auto_rounds"] = auto
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


@pytest.fixture
def recorder(broker: LocalBroker) -> Iterator[Recorder]:
    recording = Recorder(broker.port)
    yield recording
    recording.close()


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """Every process a test starts is stopped at the end, whatever happened."""
    started: list[Process] = []
    yield started
    for process in started:
        process.stop()


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three generated people at a generated front door, four photos each."""
    root = tmp_path_factory.mktemp("gallery")
    write_synthetic(root, persons=3, photos=4, seed=5)
    return root


def read_round(state_dir: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((state_dir / "state.json").read_text())
    except (OSError, ValueError):
        return None
    round_record: dict[str, Any] | None = state.get("round")
    return round_record


def test_broker_crash_mid_round_everyone_reconnects_and_the_round_completes(
    tmp_path: Path,
    broker: LocalBroker,
    recorder: Recorder,
    *,
    gallery: Path,
    processes: list[Process],
    aggregator_cache: Path,
) -> None:
    aggregator = aggregator_process(
        tmp_path,
        broker.port,
        aggregator_cache,
        codec="float16",
        timeout_s=ROUND,
        min_updates=2,
        train={"epochs": 1, "batch_size": 8},
    )
    nodes = [node_process(tmp_path, broker.port, name, gallery) for name in ("d1", "d2")]
    processes.extend([aggregator, *nodes])
    aggregator.start().wait_log("ready: site", timeout=STARTUP)
    for node in nodes:
        node.start()
    for name in ("d1", "d2"):
        recorder.status(
            name, lambda s: s.state == "online" and s.model_version == 0, timeout=STARTUP
        )
    recorder.command(cmd="start_round", devices=["d1", "d2"])
    recorder.round(1, "train")

    broker.kill()  # mid-round: the nodes are training, nothing has been aggregated
    assert recorder.versions()[-1] == 0
    time.sleep(1.0)
    broker.start()
    fresh = Recorder(broker.port)  # the retained model survived the crash
    try:
        assert fresh.wait_for(TOPICS.global_model, lambda _p: True, timeout=10)
    finally:
        fresh.close()

    metrics = recorder.metrics(1, timeout=ROUND)
    assert metrics.outcome == "published"
    assert metrics.participants == 2  # no update lost
    for name in ("d1", "d2"):  # reconnected on their own and took the new model
        assert recorder.status(name, lambda s: s.model_version == 1).state == "online"
    recorder.wait_for(TOPICS.aggregator_status, lambda p: b'"online"' in p)
    assert "disconnected from the broker" in aggregator.log()
    for node in nodes:
        assert "disconnected from the broker" in node.log()
    late = Recorder(broker.port)
    try:
        assert late.wait_for(
            TOPICS.global_model,
            lambda p: parse_global(p, site=SITE, max_bytes=MAX_BYTES, keys=None).version == 1,
            timeout=10,
        )
    finally:
        late.close()


def test_aggregator_crash_mid_round_resumes_from_disk_and_counts_nothing_twice(
    tmp_path: Path,
    broker: LocalBroker,
    recorder: Recorder,
    processes: list[Process],
    aggregator_cache: Path,
) -> None:
    aggregator = aggregator_process(
        tmp_path, broker.port, aggregator_cache, min_updates=3, auto_rounds=1, timeout_s=ROUND
    )
    processes.append(aggregator)
    aggregator.start().wait_log("ready: site", timeout=STARTUP)
    devices = [FakeDevice(broker.port, name) for name in ("a", "b", "c")]
    try:
        announcement = recorder.round(1, "train")
        base = parse_global(
            recorder.payloads(TOPICS.global_model)[-1], site=SITE, max_bytes=MAX_BYTES, keys=None
        )
        assert base.version == announcement.base_version == 0
        parts = [
            (random_delta(base, seed), examples) for seed, examples in ((1, 3), (2, 5), (3, 7))
        ]
        updates = [
            device.update(base, delta, examples=n, round_id=1)
            for device, (delta, n) in zip(devices, parts, strict=True)
        ]
        devices[0].send(updates[0])
        devices[1].send(updates[1])
        wait_until(lambda: len((read_round(tmp_path / "state") or {}).get("received", ())) == 2)

        aggregator.kill()
        devices[0].send(updates[0])  # a redelivery of an update already counted
        devices[2].send(updates[2])  # queued by the broker for the aggregator's session
        aggregator.start()

        metrics = recorder.metrics(1, timeout=STARTUP)  # a restart loads TensorFlow, the backbone
        assert metrics.outcome == "published"
        assert metrics.participants == 3
        assert metrics.examples == 15
        # Our replay of a's update is refused; a's and b's own messages come back too
        # when the kill fell between their commit and their PUBACK (the broker then
        # redelivers them): refused the same way, never counted (3 updates, 15 examples).
        assert set(metrics.rejected) == {"duplicate"}
        assert 1 <= metrics.rejected["duplicate"] <= 3
        assert "round 1 collecting with 2/3 updates" in aggregator.log()
        new = parse_global(
            recorder.wait_for(
                TOPICS.global_model,
                lambda p: parse_global(p, site=SITE, max_bytes=MAX_BYTES, keys=None).version == 1,
            ),
            site=SITE,
            max_bytes=MAX_BYTES,
            keys=None,
        )
        for got, expected in zip(new.weights, weighted(base, parts), strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        versions = recorder.versions()
        assert versions == sorted(versions)
        assert versions[-1] == 1
    finally:
        for device in devices:
            device.close()


def test_repeated_aggregator_crashes_during_rounds_never_leave_a_half_written_model(
    tmp_path: Path,
    broker: LocalBroker,
    recorder: Recorder,
    processes: list[Process],
    aggregator_cache: Path,
) -> None:
    aggregator = aggregator_process(
        tmp_path,
        broker.port,
        aggregator_cache,
        min_updates=1,
        timeout_s=5,
        auto_rounds=1000,
        codec="int8",
    )
    fleet = fleet_process(tmp_path, broker.port, ["s1", "s2", "s3"])
    processes.extend([aggregator, fleet])
    fleet.start()
    store = StateStore(tmp_path / "state")
    rng = random.Random(3)
    committed = 0
    for cycle in range(3):
        aggregator.start().wait_log("ready: site", timeout=STARTUP)
        if cycle == 0:
            recorder.metrics(1, timeout=ROUND)  # a version on disk before the kills begin
        aggregator.wait_log("started: base version", timeout=ROUND)  # a round of this start
        # Rounds take ~1 s here (longer on a loaded machine): kills land anywhere in them.
        time.sleep(rng.uniform(0.0, 2.0))
        aggregator.kill()
        record = store.load()  # what the next start will read: complete and loadable
        assert record is not None
        assert record.model.version >= committed
        committed = record.model.version
        weights = store.read_arrays(record.model.file)
        assert len(weights) == len(record.model.names)
        for name in record.retained.values():
            assert (store.folder / name).stat().st_size > 0
    aggregator.start().wait_log("ready: site", timeout=STARTUP)
    recorder.metrics(committed + 1, timeout=ROUND)  # and rounds go on
    assert committed >= 1
    versions = recorder.versions()
    assert versions == sorted(versions), versions  # never went back


def test_an_interrupted_write_leaves_the_last_complete_state(tmp_path: Path) -> None:
    """The files a crash mid-write leaves behind are never taken for the model."""
    store = StateStore(tmp_path)
    first = store.write_arrays("model", [np.arange(4, dtype=np.float32)])
    store.commit(StateRecord(model=ModelRecord(version=3, round=3, names=("w",), file=first)))
    complete = (tmp_path / first).read_bytes()
    (tmp_path / "model-0123456789ab.npz.tmp").write_bytes(complete[: len(complete) // 2])
    (tmp_path / "model-ba9876543210.npz").write_bytes(complete[:10])  # renamed, never named
    (tmp_path / "state.json.tmp").write_bytes(b'{"model": {"version": 4, "rou')

    loaded = store.load()
    assert loaded is not None
    assert loaded.model.version == 3
    np.testing.assert_array_equal(store.read_arrays(loaded.model.file)[0], [0, 1, 2, 3])
    second = store.write_arrays("model", [np.ones(4, dtype=np.float32)])
    store.commit(StateRecord(model=ModelRecord(version=4, round=4, names=("w",), file=second)))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["state.json", second])


@pytest.mark.parametrize("case", [(7, "published"), (8, "abandoned")], ids=["quorum", "below"])
def test_thirty_percent_of_the_devices_vanish_mid_round(
    tmp_path: Path,
    broker: LocalBroker,
    recorder: Recorder,
    *,
    processes: list[Process],
    case: tuple[int, str],
    aggregator_cache: Path,
) -> None:
    quorum, outcome = case
    stayers = [f"s{i}" for i in range(7)]
    leavers = [f"v{i}" for i in range(3)]
    staying = fleet_process(tmp_path, broker.port, stayers, label="stayers")
    leaving = fleet_process(tmp_path, broker.port, leavers, delay=30, label="leavers")
    processes.extend([staying, leaving])
    config = make_config(
        tmp_path, broker.port, aggregator_cache, timeout_s=4, min_updates=quorum, codec="int8"
    )
    with running(config) as service:
        coordinator = service.coordinator
        for fleet in (staying, leaving):  # ready once they hold the retained model
            fleet.start().wait_log("ready", timeout=30)
        wait_until(lambda: len(coordinator.online) == 10)
        recorder.command(cmd="start_round")
        announcement = recorder.round(1, "train")
        assert len(announcement.selected) == 10
        leaving.kill()  # 30 % vanish before answering

        closed = recorder.metrics(1, timeout=15)  # at the deadline, nothing hangs
        assert closed.outcome == outcome
        assert closed.participants == 7
        phase = "closed" if outcome == "published" else "abandoned"
        recorder.round(1, phase)  # announced either way
        version = coordinator.model.version
        assert version == (1 if outcome == "published" else 0)

        late = FakeDevice(broker.port, "v0")  # back, with its update for round 1
        try:
            wait_until(lambda: "v0" in coordinator.online)
            base = parse_global(
                recorder.payloads(TOPICS.global_model)[-1],
                site=SITE,
                max_bytes=MAX_BYTES,
                keys=None,
            )
            stale = late.update(
                base, random_delta(base, 9), examples=4, round_id=1, codec="int8", base_version=0
            )
            late.send(stale)  # no round open
            wait_until(lambda: coordinator.rejected["no_round"] == 1, timeout=10)

            recorder.command(cmd="start_round")  # nothing hangs: the next round starts
            assert "v0" in recorder.round(2, "train").selected
            late.send(stale)  # and it sends round 1's update again, not round 2's
            wait_until(lambda: coordinator.rejected["wrong_round"] == 1, timeout=10)
            current = coordinator.round
            assert current is not None
            assert "v0" not in current.received
            assert coordinator.model.version == version  # changed nothing
            again = recorder.metrics(2, timeout=15)  # closes at its deadline like round 1
            assert (again.outcome, again.participants) == (outcome, 7)
            assert again.rejected == {"wrong_round": 1}
        finally:
            late.close()


def test_a_node_killed_mid_round_takes_part_after_its_restart(
    tmp_path: Path,
    broker: LocalBroker,
    recorder: Recorder,
    *,
    gallery: Path,
    processes: list[Process],
    aggregator_cache: Path,
) -> None:
    """Killed with its update trained but not sent, a node trains again after its restart.

    Training the head takes milliseconds of numpy, so a kill cannot be aimed at it;
    a step-by-step round holds the trained update until the operator's `send`,
    which makes "trained, not sent" a state the kill is certain to hit.
    """
    aggregator = aggregator_process(
        tmp_path,
        broker.port,
        aggregator_cache,
        codec="float16",
        timeout_s=ROUND,
        train={"epochs": 3, "batch_size": 4},
    )
    node = node_process(tmp_path, broker.port, "d1", gallery)
    processes.extend([aggregator, node])
    aggregator.start().wait_log("ready: site", timeout=STARTUP)
    node.start()
    recorder.status("d1", lambda s: s.state == "online" and s.model_version == 0, STARTUP)
    recorder.command(cmd="train", devices=["d1"])
    node.wait_log("holding for the send phase", timeout=ROUND)
    node.kill()
    assert "update sent" not in node.log()  # its round-1 work died with it

    node.start()
    recorder.command(cmd="send")  # the retained round now says "send": it trains again
    aggregator.wait_log("accepted update from d1", timeout=STARTUP)
    assert "round 1: update sent" in node.log()
    recorder.command(cmd="aggregate")
    recorder.command(cmd="publish")
    metrics = recorder.metrics(1, timeout=ROUND)
    assert metrics.outcome == "published"
    assert metrics.participants == 1
    recorder.status("d1", lambda s: s.model_version == 1 and s.last_round == 1)
