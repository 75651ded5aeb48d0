"""Issue 13 item 5: a camera password stays out of the YAML, the journal and the broker.

An RTSP URL with credentials used to live in the world-readable YAML and to
appear in the retained status and the log when the camera could not be
opened. It now comes from a credential file (`camera.device_file`), and URLs
are redacted wherever they are logged or published.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
import yaml

from broker.local import LocalBroker
from edge.config import EdgeConfig
from edge.recognition_config import CameraConfig
from fedbell.config import load_config
from fedbell.errors import ConfigError
from fedbell.redact import RedactingFormatter, redact
from fedbell.wire.protocol import DeviceStatus
from fedbell.wire.topics import Topics
from tests.mqtt_helpers import Probe, doorbell_config

SECRET = "hunter2"
# Port 9 (discard) on loopback: nothing listens, the camera cannot be opened.
URL = f"rtsp://admin:{SECRET}@127.0.0.1:9/stream1"


@pytest.mark.parametrize(
    "text",
    [
        f"opencv: cannot open '{URL}'",
        f"http://cam.lan/snap.jpg?user=admin&password={SECRET}",
        f"rtsp://{SECRET}@cam.lan/live",
    ],
)
def test_urls_are_redacted(text: str) -> None:
    assert SECRET not in redact(text)
    assert "cam.lan" in redact(text) or "127.0.0.1" in redact(text)  # the host stays


def test_a_password_in_the_yaml_is_refused_without_printing_it(tmp_path: Path) -> None:
    path = tmp_path / "edge.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "device_id": "door1",
                "site": "home",
                "state_dir": str(tmp_path / "state"),
                "gallery_dir": str(tmp_path / "gallery"),
                "camera": {"kind": "opencv", "device": URL},
            }
        )
    )
    with pytest.raises(ConfigError, match=r"camera\.device_file") as caught:
        load_config(path, EdgeConfig)
    assert SECRET not in str(caught.value)


def test_the_url_comes_from_a_credential_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "camera-url"
    secret_file.write_text(URL + "\n")
    camera = CameraConfig(kind="opencv", device_file=secret_file)
    assert camera.opencv_device() == URL
    assert SECRET not in camera.model_dump_json()
    with pytest.raises(ConfigError, match="cannot read"):
        CameraConfig(kind="opencv", device_file=tmp_path / "missing").opencv_device()


def test_an_unreachable_camera_leaks_its_password_nowhere(
    broker: LocalBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from edge.node import EdgeNode

    secret_file = tmp_path / "camera-url"
    secret_file.write_text(URL)
    camera = CameraConfig(kind="opencv", device_file=secret_file, reconnect_initial_s=0.2)
    config = doorbell_config(broker.port, tmp_path, camera)
    status_topic = Topics("home").status("door1")
    probe = Probe(broker.port, status_topic)
    caplog.set_level(logging.INFO)
    node = EdgeNode(config)
    stop = threading.Event()
    thread = threading.Thread(target=node.run, args=(stop,), daemon=True)
    thread.start()
    try:
        # Wait for a retained status that reports the camera failure.
        deadline = time.monotonic() + 30
        detail = ""
        while "open failed" not in detail:
            assert time.monotonic() < deadline, f"no camera failure in the status: {detail!r}"
            message = probe.wait_for(status_topic, timeout=max(0.1, deadline - time.monotonic()))
            detail = DeviceStatus.model_validate_json(message.payload).detail
            if "open failed" not in detail:
                node.session.publish_status_if_connected()  # the status follows the camera state
        assert SECRET not in detail
        assert "127.0.0.1:9" in detail  # still says which camera
    finally:
        stop.set()
        thread.join(30)
        probe.close()
    # What the journal would get: every record through the service's formatter.
    formatter = RedactingFormatter()
    journal = "\n".join(formatter.format(record) for record in caplog.records)
    assert "open failed" in journal
    assert SECRET not in journal
