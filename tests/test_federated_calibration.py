"""Federated calibration with real processes (issue 18 item 1): Mosquitto, `python -m
aggregator` set up as a bare install (`evaluation.require_calibration`, no stranger photos,
no evaluation set, secure rounds) and `python -m edge` doorbells with houses of generated
people.

Each secure training round's result waits for a calibration round, in which the doorbells
score it on their stranger stores and galleries and mask the histograms. What each doorbell
masked is recomputed here from its state folder (its gallery's cached features, its stranger
store) and the round's signed heads, by the same function (`histograms.house_vector`): the
published threshold must be exactly `histograms.calibrate` of their sum. With empty stranger
stores the candidate is refused, saying what is missing; an oversized histogram vector from
a compromised login is refused and counted while the round goes on.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import paho.mqtt.client as mqtt
import pytest

from aggregator.backbone import BackboneModels
from broker.local import LocalBroker
from edge.config import EdgeConfig
from edge.gallery import STRANGER_STORE, Gallery, StrangerStore
from fedbell.config import load_config
from fedbell.faces import histograms
from fedbell.faces.detection import make_detector
from fedbell.faces.features import Backbone
from fedbell.wire.envelope import TensorSpec
from fedbell.wire.messages import GlobalModel
from fedbell.wire.protocol import RoundAnnouncement, RoundMetrics
from simulation.data import write_synthetic
from tests.federation import STARTUP, Process, Recorder, aggregator_process
from tests.test_aggregator import TOPICS
from tests.test_secure_rounds import (
    PHASE,
    ROUND,
    Doorbell,
    Injector,
    doorbell_inputs,
    global_model,
    start_federation,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

NAMES = ["d0", "d1", "d2"]
STRANGERS = {"persons": 20, "photos": 2}
"""Visitors nobody labelled at each door: generated people of no house (40 photos, one
visitor event each; about half of them calibrate, the rest train)."""


def bare_aggregator(tmp_path: Path, port: int, cache: Path) -> Process:
    """What install-server.sh configures, as far as calibration goes: require_calibration,
    no stranger folder, no evaluation set; secure rounds of the three doorbells."""
    return aggregator_process(
        tmp_path,
        port,
        cache,
        secure_aggregation=True,
        min_cohort=len(NAMES),
        timeout_s=PHASE,
        downlink_codec="int8",
        train={"epochs": 2, "batch_size": 8},
        sections={"evaluation": {"require_calibration": True}},
    )


def fill_stranger_stores(tmp_path: Path, backbone_models: BackboneModels) -> None:
    """Each doorbell's stranger store, as its camera would fill it: the int8 backbone's
    features (the doorbells' default flavour) of generated visitors of no house."""
    backbone = Backbone(backbone_models.int8_model)
    for seed, name in enumerate(NAMES):
        folder = tmp_path / f"visitors-{name}"
        write_synthetic(folder, seed=100 + seed, **STRANGERS)
        state = tmp_path / f"visitors-state-{name}"
        seen = Gallery(folder, state, detector=lambda: make_detector("haar"))
        features = seen.features(backbone).features
        assert len(features) >= 30, f"Haar found {len(features)} visitors at {name}'s door"
        config = load_config(tmp_path / f"{name}.yaml", EdgeConfig)
        store = StrangerStore(config.state_dir / STRANGER_STORE, config.training.max_strangers)
        for visit, row in enumerate(features):
            store.add(backbone.sha256, row[None, :], event_id=f"{name}-visit-{visit}")


def house_vector(
    tmp_path: Path, doorbell: Doorbell, base: GlobalModel, announcement: RoundAnnouncement
) -> npt.NDArray[np.float64]:
    """What this doorbell masked in a calibration round, before noise and fixed point: the
    heads scored on its gallery and the calibrating half of its stranger store."""
    data, strangers = doorbell_inputs(tmp_path, doorbell, base, "calibrate")
    assert announcement.calibrate is not None
    specs = [
        TensorSpec(name=n, shape=w.shape) for n, w in zip(base.names, base.weights, strict=True)
    ]
    candidate, start = announcement.calibrate.heads(specs)
    return histograms.house_vector(candidate, start, data.features, data.labels, strangers)


class CalibrationInjector(Injector):
    """A compromised doorbell's login that strikes in calibration rounds only."""

    def _on_round(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if json.loads(message.payload).get("calibrate") is not None:
            super()._on_round(client, userdata, message)


def training_then_calibration(
    recorder: Recorder, training: int
) -> tuple[RoundMetrics, RoundMetrics, RoundAnnouncement]:
    """A started round, its calibration round: (training metrics, calibration metrics,
    the calibration round's announcement)."""
    mark = recorder.mark()
    recorder.command(cmd="start_round")
    trained = RoundMetrics.model_validate_json(
        recorder.wait_for(
            TOPICS.metrics, lambda p: json.loads(p)["round"] == training, ROUND, since=mark
        )
    )
    calibration = recorder.metrics(training + 1, timeout=ROUND, since=mark)
    return trained, calibration, recorder.round(training + 1, "keys")


def test_a_bare_install_calibrates_on_the_doorbells_strangers(
    tmp_path: Path,
    broker: LocalBroker,
    recorder: Recorder,
    *,
    processes: list[Process],
    aggregator_cache: Path,
    backbone_models: BackboneModels,
) -> None:
    """Empty stranger stores: the candidate is refused, saying what is missing, and only
    version 0 is out. Filled stores: the next candidate is published with the threshold
    `histograms.calibrate` gives for the sum of the doorbells' own histograms, while an
    oversized histogram vector sent from a doorbell's login is refused and counted."""
    aggregator = bare_aggregator(tmp_path, broker.port, aggregator_cache)
    doorbells = start_federation(
        tmp_path, broker, recorder=recorder, processes=processes, aggregator=aggregator, names=NAMES
    )

    trained, calibration, _ = training_then_calibration(recorder, 1)
    assert (trained.outcome, trained.version, trained.secure) == ("aggregated", 1, True), trained
    assert recorder.round(1, "keys").train.hold_out_strangers  # the calibrating half stays out
    assert "federated calibration" in trained.detail
    assert calibration.outcome == "abandoned", calibration
    assert calibration.rejected.get("calibration_too_few_strangers") == 1, calibration
    assert "stranger stores hold 0 strangers" in calibration.detail
    assert set(recorder.versions()) == {0}

    # the doorbells' cameras saw visitors nobody labelled: their stores fill (on restart)
    for doorbell in doorbells.values():
        doorbell.process.stop()
    fill_stranger_stores(tmp_path, backbone_models)
    mark = recorder.mark()
    for doorbell in doorbells.values():
        doorbell.process.start()
    recorder.statuses(
        NAMES, lambda s: (s.state, s.model_version) == ("online", 0), timeout=STARTUP, since=mark
    )

    injector = CalibrationInjector(broker.port, recorder)
    oversized = np.zeros(histograms.VECTOR_SIZE + 1000, "<u4").tobytes()
    injector.on(
        "send",
        TOPICS.secagg("masked", "d0"),
        lambda a: json.dumps(
            {
                "round": a.round,
                "lineage": a.lineage,
                "device": "d0",
                "values": base64.b64encode(oversized).decode(),
            }
        ).encode(),
    )
    try:
        trained, calibration, announcement = training_then_calibration(recorder, 3)
    finally:
        injector.close()
    assert injector.sent == ["send"]
    assert calibration.outcome == "published", calibration.detail
    assert calibration.rejected.get("secagg_wrong_size") == 1, calibration
    assert calibration.version == 1
    assert announcement.calibrate is not None
    assert announcement.secagg is not None
    assert announcement.secagg.dimension == histograms.VECTOR_SIZE

    base, published = global_model(recorder, 0), global_model(recorder, 1)
    survivors = RoundAnnouncement.model_validate_json(
        recorder.wait_for(
            TOPICS.round,
            lambda p: json.loads(p)["round"] == 4 and json.loads(p)["phase"] == "unmask",
        )
    ).secagg
    assert survivors is not None
    assert sorted(survivors.survivors) == NAMES
    summed = sum(house_vector(tmp_path, doorbells[n], base, announcement) for n in NAMES)
    expected = histograms.calibrate(summed, 0.01)
    print(json.dumps({"published": published.threshold, "expected": expected.__dict__}))
    assert published.threshold == pytest.approx(expected.threshold, abs=1e-9)
    assert expected.strangers >= histograms.MIN_STRANGERS
    assert f"threshold {expected.threshold:.3f}" in calibration.detail
    # the gate's inputs are the sum's too
    assert f"names {100 * expected.true_accept:.1f} % of residents" in calibration.detail
    assert f"{100 * expected.start_true_accept:.1f} % at" in calibration.detail
    assert published.threshold != pytest.approx(base.threshold, abs=1e-3)
