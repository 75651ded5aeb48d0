"""Issue 13 item 17: the aggregator's log is one line per event, with the right numbers.

A real `python -m aggregator` process (its own environment: no TF_CPP_MIN_LOG_LEVEL
inherited from the test session) on a real broker runs one round; its whole output,
stdout and stderr piped to a file, is then read as an operator reads the journal.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from aggregator.quiet import native_noise_dropped
from broker.local import LocalBroker
from fedbell.wire.messages import Signer, build_update, parse_global
from fedbell.wire.protocol import DeviceStatus, RoundAnnouncement, to_json
from fedbell.wire.topics import Topics
from tests.mqtt_helpers import Probe

ROOT = Path(__file__).resolve().parents[1]
SITE = "logs"
TOPICS = Topics(SITE)
LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) [\w.]+: \S.*")
"""Every line of the log is one record in the configured format: nothing else, no wrapping."""
NOISE = ("TensorSpec", "absl", "cpu_feature_guard", "oneDNN", "I0000", "W0000", "tensorflow")


@pytest.fixture
def aggregator_log(
    tmp_path: Path, broker: LocalBroker, aggregator_cache: Path
) -> Iterator[tuple[Path, Probe]]:
    config = tmp_path / "aggregator.yaml"
    config.write_text(
        f"site: {SITE}\n"
        f"state_dir: {tmp_path / 'state'}\n"
        f"cache_dir: {aggregator_cache}\n"
        f"mqtt:\n  host: 127.0.0.1\n  port: {broker.port}\n"
        "rounds:\n  codec: float32\n  timeout_s: 60\n  auto_pause_s: 0\n"
        "threads: 1\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    log = tmp_path / "aggregator.log"
    probe = Probe(broker.port, f"{TOPICS.base}/#")
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "aggregator", "--config", str(config)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            yield log, probe
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
            probe.close()


def test_one_round_logs_one_line_per_event_with_the_updates_own_count(
    aggregator_log: tuple[Path, Probe],
) -> None:
    log, probe = aggregator_log
    base = parse_global(
        bytes(probe.wait_for(TOPICS.global_model, timeout=180).payload),
        site=SITE,
        max_bytes=1 << 24,
        keys=None,
    )
    for door in ("door1", "door2"):  # both handled before the command that follows
        probe.publish(TOPICS.status(door), to_json(DeviceStatus(state="online")), retain=True)
    probe.publish(TOPICS.control, json.dumps({"cmd": "start_round"}))
    announcement = RoundAnnouncement.model_validate_json(probe.wait_for(TOPICS.round).payload)
    assert announcement.selected == ("door1", "door2")
    rng = np.random.default_rng(0)
    for door, examples in (("door1", 42), ("door2", 7)):
        delta = [(0.001 * rng.normal(size=w.shape)).astype(np.float32) for w in base.weights]
        probe.publish(
            TOPICS.update(door),
            build_update(
                site=SITE,
                signer=Signer(door),
                round_id=announcement.round,
                base_version=base.version,
                num_examples=examples,
                names=base.names,
                delta=delta,
                codec="float32",
            ),
        )
    deadline = time.monotonic() + 60
    while True:
        model = parse_global(
            bytes(probe.wait_for(TOPICS.global_model, timeout=deadline - time.monotonic()).payload),
            site=SITE,
            max_bytes=1 << 24,
            keys=None,
        )
        if model.version == 1:
            break
    text = log.read_text()
    deadline = time.monotonic() + 30
    while "round 1 closed: published version 1" not in text and time.monotonic() < deadline:
        time.sleep(0.1)  # the log line follows the publish
        text = log.read_text()

    lines = text.splitlines()
    assert "round 1: accepted update from door1 (42 examples), 1/2 updates" in text, text
    assert "round 1: accepted update from door2 (7 examples), 2/2 updates" in text, text
    assert "round 1: aggregated 2 updates (49 examples) into version 1" in text, text
    assert "round 1 closed: published version 1" in text
    strays = [line for line in lines if not LINE.fullmatch(line)]
    assert not strays, "lines that are not one log record each:\n" + "\n".join(strays)
    noisy = [line for line in lines if any(word in line for word in NOISE)]
    assert not noisy, "TensorFlow's noise in the log:\n" + "\n".join(noisy)


def test_native_noise_is_dropped_and_everything_else_kept(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """What LiteRT, absl and the converter write to fd 2 themselves, around a real line."""
    with native_noise_dropped():
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(2, b"I0000 00:00:1796160422.442895   24601 cpu_feature_guard.cc:227] banner\n")
        os.write(
            2,
            b"fully_quantize: 0, inference_type: 6, input_inference_type: FLOAT32, "
            b"output_inference_type: FLOAT32\n",
        )
        os.write(2, b"E0000 00:00:1796160422.442895   24601 op.cc:1] a real error\n")
        sys.stderr.write("2026-12-01 21:00:00,000 INFO aggregator: kept\n")
    err = capfd.readouterr().err
    assert sorted(err.splitlines()) == [  # (pytest's sys.stderr is not fd 2: order differs)
        "2026-12-01 21:00:00,000 INFO aggregator: kept",
        "E0000 00:00:1796160422.442895   24601 op.cc:1] a real error",
    ]
