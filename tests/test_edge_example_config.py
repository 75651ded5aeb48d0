"""Issue 13 item 15: a doorbell started by hand from config/edge.yaml.

`python -m edge --config` runs the example configuration as shipped, changed only
where a test must: the broker's port (a private Mosquitto), the state and gallery
folders, and for the replay the camera folder. It must connect to the broker it
names, not crash off a Pi, log the end of a folder replay, and leave
`doorbell/<dev>/present` OFF whenever live recognition stops.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml

from broker.local import LocalBroker
from fedbell.wire.protocol import DeviceStatus
from fedbell.wire.topics import Topics
from tests.mqtt_helpers import Probe, wait_until

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "edge.yaml"
EXAMPLE_CONFIG: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
DEVICE = EXAMPLE_CONFIG["device_id"]
TOPICS = Topics(EXAMPLE_CONFIG["site"])
PRESENT = f"doorbell/{DEVICE}/present"


def adapted(tmp_path: Path, port: int, **camera: Any) -> Path:
    """The example config with only the broker port, the folders (and `camera`) changed."""
    config = yaml.safe_load(EXAMPLE.read_text())
    assert config["mqtt"]["host"] == "127.0.0.1"  # the example names its broker
    config["mqtt"]["port"] = port
    config["state_dir"] = str(tmp_path / "state")
    config["gallery_dir"] = str(tmp_path / "gallery")
    config["camera"].update(camera)
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Doorbell:
    """`python -m edge --config PATH` with its output (stdout and stderr) in a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "edge", "--config", str(config)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout: float = 60.0) -> None:
        wait_until(lambda: needle in self.text(), timeout, f"{needle!r} in the log")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError("the doorbell did not stop on SIGTERM") from None


class Retained:
    """The last payload seen on each topic (retained state as Home Assistant reads it)."""

    def __init__(self, port: int) -> None:
        self.probe = Probe(port, PRESENT, TOPICS.status(DEVICE))
        self.last: dict[str, bytes] = {}

    def pump(self) -> None:
        while not self.probe.messages.empty():
            message = self.probe.messages.get()
            self.last[message.topic] = bytes(message.payload)

    def wait(self, topic: str, check: Callable[[bytes], bool], timeout: float = 60.0) -> None:
        def seen() -> bool:
            self.pump()
            return topic in self.last and check(self.last[topic])

        wait_until(seen, timeout, f"the expected payload on {topic}")

    def close(self) -> None:
        self.probe.close()


@pytest.fixture
def retained(broker: LocalBroker) -> Iterator[Retained]:
    # A run before this one (crashed, or the old code) left presence ON, retained.
    seed = Probe(broker.port)
    seed.publish(PRESENT, "ON", retain=True)
    seed.close()
    watching = Retained(broker.port)
    watching.wait(PRESENT, lambda p: p == b"ON")
    yield watching
    watching.close()


def online(payload: bytes) -> bool:
    return bool(payload) and DeviceStatus.model_validate_json(payload).state == "online"


def offline(payload: bytes) -> bool:
    return bool(payload) and DeviceStatus.model_validate_json(payload).state == "offline"


def test_the_example_config_runs_as_is_against_the_broker_it_names(
    tmp_path: Path, broker: LocalBroker, retained: Retained
) -> None:
    doorbell = Doorbell(adapted(tmp_path, broker.port), tmp_path / "edge.log")
    try:
        retained.wait(TOPICS.status(DEVICE), online)
        doorbell.wait_for_log(f"connected to 127.0.0.1:{broker.port} as {DEVICE}")
        retained.wait(PRESENT, lambda p: p == b"OFF")  # nobody at the door: not ON any more
        assert doorbell.process.poll() is None  # no camera here: it retries, it runs on
    finally:
        code = doorbell.stop()
    assert code == 0, doorbell.text()
    retained.wait(TOPICS.status(DEVICE), offline)
    retained.pump()
    assert retained.last[PRESENT] == b"OFF"
    assert "Traceback" not in doorbell.text()


def test_picamera2_off_a_pi_is_one_clear_line(tmp_path: Path, broker: LocalBroker) -> None:
    if importlib.util.find_spec("picamera2") is not None:
        pytest.skip("picamera2 is installed here")
    doorbell = Doorbell(adapted(tmp_path, broker.port, kind="picamera2"), tmp_path / "edge.log")
    assert doorbell.process.wait(60) == 2
    lines = doorbell.text().strip().splitlines()
    assert lines[-1].startswith("fedbell-edge: camera.kind picamera2: "), lines
    assert "python3-picamera2" in lines[-1]
    assert "Traceback" not in doorbell.text()


def test_the_end_of_a_folder_replay_is_logged_and_clears_presence(
    tmp_path: Path, broker: LocalBroker, retained: Retained
) -> None:
    folder = tmp_path / "replay"
    folder.mkdir()
    for index in range(5):
        cv2.imwrite(str(folder / f"frame{index}.png"), np.full((120, 160, 3), 40 * index, np.uint8))
    config = adapted(tmp_path, broker.port, kind="folder", folder=str(folder))
    doorbell = Doorbell(config, tmp_path / "edge.log")
    try:
        doorbell.wait_for_log(f"camera: the replay of {folder} ended after 5 frames")
        retained.wait(PRESENT, lambda p: p == b"OFF")
        retained.wait(TOPICS.status(DEVICE), online)  # the node itself runs on (training)
        assert doorbell.process.poll() is None
    finally:
        assert doorbell.stop() == 0, doorbell.text()
    assert "Traceback" not in doorbell.text()


def test_a_config_that_names_no_broker_says_so(tmp_path: Path, broker: LocalBroker) -> None:
    config = yaml.safe_load(adapted(tmp_path, broker.port).read_text())
    del config["mqtt"]["host"]
    config["camera"]["enabled"] = False
    path = tmp_path / "no-host.yaml"
    path.write_text(yaml.safe_dump(config))
    doorbell = Doorbell(path, tmp_path / "edge.log")
    try:
        doorbell.wait_for_log(f"{path} names no broker (mqtt.host): trying ")
    finally:
        assert doorbell.stop() == 0, doorbell.text()


def test_no_broker_at_the_address_is_said_at_once_and_once(tmp_path: Path) -> None:
    """Not 10 s of "queued while disconnected (rc=4)", one per event, before a word."""
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    folder = tmp_path / "replay"  # a porch replayed in a loop: events while offline
    folder.mkdir()
    for index in range(5):
        cv2.imwrite(str(folder / f"{index}.png"), np.full((120, 160, 3), 40 * index, np.uint8))
    config = adapted(tmp_path, port, kind="folder", folder=str(folder), loop=True)
    doorbell = Doorbell(config, tmp_path / "edge.log")
    try:
        started = time.monotonic()
        doorbell.wait_for_log(f"no broker at 127.0.0.1:{port} (is it running, on this port?)")
        print(f"said after {time.monotonic() - started:.1f} s")  # the process's start included
        time.sleep(3.0)  # paho retries meanwhile: the message is not repeated
        assert doorbell.text().count("no broker at") == 1
        assert "queued while disconnected" not in doorbell.text()
    finally:
        assert doorbell.stop() == 0, doorbell.text()
    assert doorbell.text().count("events are queued until it is back") <= 1


def test_a_replay_of_six_visitors_gives_six_events(tmp_path: Path, broker: LocalBroker) -> None:
    """Issue 19 item 4: with the example's defaults (debounce 30 s, a visit ends after 5 s)
    six visitors replayed a few frames apart were one event. A replay runs on its own
    time with the replay settings: one event each (no model yet: each is "unknown")."""
    from tests.recognition_helpers import frames_of, write_frames

    empty = [np.full((480, 640, 3), 120, np.uint8)] * 10  # 0.67 s of empty porch at 15 fps
    frames = [f for person in range(6) for f in frames_of(person, 8, 300 + person) + empty]
    write_frames(tmp_path / "replay", frames)
    config = adapted(tmp_path, broker.port, kind="folder", folder=str(tmp_path / "replay"))
    visits = Probe(broker.port, f"doorbell/{DEVICE}/visitor")
    doorbell = Doorbell(config, tmp_path / "edge.log")
    try:
        doorbell.wait_for_log("the replay of", timeout=120)  # every frame was judged
        time.sleep(1.0)  # the last QoS 1 events are on their way
        events = []
        while not visits.messages.empty():
            events.append(json.loads(visits.messages.get().payload))
        assert [e["person"] for e in events] == ["unknown"] * 6, doorbell.text()[-3000:]
    finally:
        visits.close()
        assert doorbell.stop() == 0, doorbell.text()


def example_keys() -> dict[str, set[str]]:
    """Top-level key -> the keys under it, set or commented out (`# key:`)."""
    sections: dict[str, set[str]] = {}
    current: set[str] = set()
    for line in EXAMPLE.read_text().splitlines():
        top = re.match(r"^(# )?([a-z_]+):", line)
        nested = re.match(r"^\s*#?\s*([a-z_]+):", line)
        if top:
            current = sections.setdefault(top.group(2), set())
        elif nested:
            current.add(nested.group(1))
    return sections


def test_every_key_is_in_the_example_config_commented_or_set() -> None:
    """Each section's every setting is in config/edge.yaml, set or as a `# key:` line."""
    from pydantic import BaseModel

    from edge.config import EdgeConfig

    example = example_keys()
    missing = []
    for name, field in EdgeConfig.model_fields.items():
        section = field.annotation
        if name not in example:
            missing.append(name)
        elif isinstance(section, type) and issubclass(section, BaseModel):
            missing += [f"{name}.{key}" for key in section.model_fields if key not in example[name]]
    assert missing == []
