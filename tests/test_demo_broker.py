"""Issue 13 item 14: the demo's broker keeps its retained models across a restart.

`make demo` runs in a fresh `tempfile.mkdtemp` folder (0700, owned by whoever
runs it) with the broker in `<work>/broker`. Run as root, Mosquitto used to
drop to the `mosquitto` user, which cannot enter that folder: no log, no
persistence file, and a restarted broker had forgotten every retained model.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.local import LocalBroker
from simulation.stack import Layout, topics
from tests.mqtt_helpers import Probe


@pytest.fixture
def demo_layout() -> Iterator[Layout]:
    """The work folder exactly as the demo makes it (simulation.runner.make_workdir)."""
    root = Path(tempfile.mkdtemp(prefix="fedbell-sim-"))
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    yield Layout(root)
    shutil.rmtree(root, ignore_errors=True)


def test_a_restarted_demo_broker_still_has_the_retained_model(demo_layout: Layout) -> None:
    model_topic = topics().global_model
    broker = LocalBroker(demo_layout.broker)
    broker.start()
    try:
        aggregator = Probe(broker.port)
        aggregator.publish(model_topic, b"model v7", retain=True)
        aggregator.close()
    finally:
        broker.stop()  # SIGTERM: Mosquitto writes its persistence file
    assert (demo_layout.broker / "mosquitto.db").is_file(), (
        f"no persistence file (running as uid {os.geteuid()})"
    )
    assert "New connection" in broker.log_path.read_text()  # the log is written too

    broker.start()  # same port and folder
    try:
        doorbell = Probe(broker.port, model_topic)
        message = doorbell.wait_for(model_topic, timeout=10)
        assert message.retain
        assert message.payload == b"model v7"
        doorbell.close()
    finally:
        broker.stop()
