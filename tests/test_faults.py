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
TensorFlow) subprocesses wherever a test kills them: the `federation` fixture
(tests/federation.py) starts them.
"""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.state import ModelRecord, StateRecord, StateStore
from broker.local import LocalBroker
from fedbell.wire.messages import parse_global
from simulation.data import write_synthetic
from tests.federation import STARTUP, Federation, Recorder
from tests.mqtt_helpers import wait_until
from tests.test_aggregator import (
    MAX_BYTES,
    SITE,
    TOPICS,
    FakeDevice,
    make_config,
    random_delta,
    running,
    weighted,
)

pytestmark = pytest.mark.timeout(900)  # real processes on a loaded 2-core machine

ROUND = 240.0
"""Seconds a round with real doorbells may take; rounds close as soon as all answered."""


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
    broker: LocalBroker, recorder: Recorder, federation: Federation, gallery: Path
) -> None:
    aggregator = federation.start_aggregator(
        codec="float16", timeout_s=ROUND, min_updates=2, train={"epochs": 1, "batch_size": 8}
    )
    nodes = [federation.start_doorbell(name, gallery) for name in ("d1", "d2")]
    # Serving ("model v0: ..."), the backbone installed too: a doorbell still downloading it
    # when the broker dies may get the round before the retained chunks and sit it out.
    recorder.statuses(
        ("d1", "d2"),
        lambda s: s.state == "online" and s.detail.startswith("model v0:"),
        timeout=STARTUP,
    )
    # Paused, the doorbells cannot answer (in milliseconds) before the crash, so the round is
    # announced and open, with nothing sent or aggregated, whatever the machine's load.
    paused = [node.process for node in nodes if node.process is not None]
    for process in paused:
        process.send_signal(signal.SIGSTOP)
    try:
        recorder.command(cmd="start_round", devices=["d1", "d2"])
        recorder.round(1, "train")
        broker.kill()  # mid-round
        assert recorder.versions()[-1] == 0
        time.sleep(1.0)
        broker.start()
        fresh = Recorder(broker.port)  # the retained model survived the crash
        try:
            assert fresh.wait_for(TOPICS.global_model, lambda _p: True, timeout=10)
        finally:
            fresh.close()
    finally:
        for process in paused:
            process.send_signal(signal.SIGCONT)

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
    tmp_path: Path, broker: LocalBroker, recorder: Recorder, federation: Federation
) -> None:
    aggregator = federation.start_aggregator(min_updates=3, auto_rounds=1, timeout_s=ROUND)
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
        houses = [(delta, 1) for delta, _ in parts]  # every house weighs the same
        for got, expected in zip(new.weights, weighted(base, houses), strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        versions = recorder.versions()
        assert versions == sorted(versions)
        assert versions[-1] == 1
    finally:
        for device in devices:
            device.close()


def test_repeated_aggregator_crashes_during_rounds_never_leave_a_half_written_model(
    tmp_path: Path, recorder: Recorder, federation: Federation
) -> None:
    aggregator = federation.aggregator(min_updates=1, timeout_s=5, auto_rounds=1000, codec="int8")
    federation.fleet(["s1", "s2", "s3"]).start()
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
    federation: Federation,
    case: tuple[int, str],
) -> None:
    quorum, outcome = case
    staying = federation.fleet([f"s{i}" for i in range(7)], label="stayers")
    leaving = federation.fleet([f"v{i}" for i in range(3)], delay=30, label="leavers")
    config = make_config(
        tmp_path, broker.port, federation.cache, timeout_s=4, min_updates=quorum, codec="int8"
    )
    with running(config) as service:
        coordinator = service.coordinator
        for fleet in (staying, leaving):  # ready once they hold the retained model
            fleet.start().wait_log("ready", timeout=30)
        wait_until(lambda: len(coordinator.federation.online) == 10)
        recorder.command(cmd="start_round")
        announcement = recorder.round(1, "train")
        assert len(announcement.selected) == 10
        leaving.kill()  # 30 % vanish before answering

        closed = recorder.metrics(1, timeout=15)  # at the deadline, nothing hangs
        assert closed.outcome == outcome
        assert closed.participants == 7
        phase = "closed" if outcome == "published" else "abandoned"
        recorder.round(1, phase)  # announced either way
        version = coordinator.federation.model.version
        assert version == (1 if outcome == "published" else 0)

        late = FakeDevice(broker.port, "v0")  # back, with its update for round 1
        try:
            wait_until(lambda: "v0" in coordinator.federation.online)
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
            wait_until(lambda: coordinator.federation.rejected["no_round"] == 1, timeout=10)

            recorder.command(cmd="start_round")  # nothing hangs: the next round starts
            assert "v0" in recorder.round(2, "train").selected
            late.send(stale)  # and it sends round 1's update again, not round 2's
            wait_until(lambda: coordinator.federation.rejected["wrong_round"] == 1, timeout=10)
            current = coordinator.federation.round
            assert current is not None
            assert "v0" not in current.received
            assert coordinator.federation.model.version == version  # changed nothing
            again = recorder.metrics(2, timeout=15)  # closes at its deadline like round 1
            assert (again.outcome, again.participants) == (outcome, 7)
            assert again.rejected == {"wrong_round": 1}
        finally:
            late.close()


def test_a_node_killed_mid_round_takes_part_after_its_restart(
    recorder: Recorder, federation: Federation, gallery: Path
) -> None:
    """Killed with its update trained but not sent, a node trains again after its restart.

    Training the head takes milliseconds of numpy, so a kill cannot be aimed at it;
    a step-by-step round holds the trained update until the operator's `send`,
    which makes "trained, not sent" a state the kill is certain to hit.
    """
    aggregator = federation.start_aggregator(
        codec="float16", timeout_s=ROUND, train={"epochs": 3, "batch_size": 4}
    )
    node = federation.start_doorbell("d1", gallery)
    recorder.status("d1", lambda s: s.state == "online" and s.model_version == 0, STARTUP)
    recorder.command(cmd="train", devices=["d1"])
    node.wait_log("holding for the send phase", timeout=ROUND)
    node.kill()
    assert "update sent" not in node.log()  # its round-1 work died with it

    node.start()
    recorder.command(cmd="send")  # the retained round now says "send": it trains again
    aggregator.wait_log("accepted update from d1", timeout=STARTUP)
    # The doorbell logs "sent" when its PUBACK arrives, which can be a few ms after the
    # aggregator has already accepted the update: wait for the line, do not race it.
    node.wait_log("round 1: update sent", timeout=ROUND)
    recorder.command(cmd="aggregate")
    recorder.command(cmd="publish")
    metrics = recorder.metrics(1, timeout=ROUND)
    assert metrics.outcome == "published"
    assert metrics.participants == 1
    recorder.status("d1", lambda s: s.model_version == 1 and s.last_round == 1)
