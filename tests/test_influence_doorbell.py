"""Issue 13 item 1, the doorbell's half: a global model far worse on its own gallery is refused.

A real node on a real broker with a gallery of 3 people: the aggregator's signed
v2 that names them far worse (leave-one-out) than the installed v1 is refused and
counted (`worse_on_gallery`), v1 keeps serving, and the next good version is taken.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from aggregator.backbone import BackboneModels
from broker.local import LocalBroker
from edge.node import EdgeNode
from tests.mqtt_helpers import Probe, wait_until
from tests.test_edge_node import (
    TOPICS,
    Base,
    aggregator_at,
    base,
    gallery,
    global_payload,
    make_config,
    running,
    serve_backbone_and_head,
)

__all__ = ["base", "gallery"]  # the module-scoped fixtures, shared


Serving = tuple[Probe, EdgeNode]


@pytest.fixture
def serving_v1(
    tmp_path: Path, broker: LocalBroker, gallery: Path, base: Base, backbone_models: BackboneModels
) -> Iterator[Serving]:
    """The aggregator, and a doorbell it served v1, which names everybody in its gallery."""
    config = make_config(tmp_path, broker.port, gallery)
    with aggregator_at(broker) as aggregator:
        serve_backbone_and_head(aggregator, backbone_models, base, 1)
        with running(config) as node:
            wait_until(lambda: node.artifacts.gallery_accuracy == 1.0)
            yield aggregator, node


def test_a_model_far_worse_on_the_gallery_is_not_installed(
    serving_v1: Serving,
    base: Base,
    backbone_models: BackboneModels,
    caplog: pytest.LogCaptureFixture,
) -> None:
    aggregator, node = serving_v1
    sha = backbone_models.sha256
    names, weights = base
    rng = np.random.default_rng(0)
    # Every face onto one line: everybody looks like everybody.
    ruined = [np.outer(rng.normal(size=w.shape[0]), rng.normal(size=w.shape[1])) for w in weights]

    def version() -> int | None:
        head = node.recognizer.model.head
        return None if head is None else head.version

    assert version() == 1
    bad = global_payload((names, [r.astype(np.float32) for r in ruined]), 2, backbone=sha)
    aggregator.publish(TOPICS.global_model, bad, retain=True)

    def refusals() -> list[str]:
        return [r.getMessage() for r in caplog.records if "worse_on_gallery" in r.getMessage()]

    # the session counts a refusal, then logs it: wait for both
    wait_until(lambda: node.counters["worse_on_gallery"] == 1 and len(refusals()) == 1)
    assert version() == 1  # v1 keeps serving
    assert node.artifacts.gallery_accuracy == 1.0
    assert "keeping v1" in refusals()[0]

    good = global_payload(base, 3, backbone=sha)
    aggregator.publish(TOPICS.global_model, good, retain=True)
    wait_until(lambda: version() == 3)
    assert node.counters["worse_on_gallery"] == 1


def test_a_head_that_ranks_as_well_but_names_nobody_at_its_threshold_is_refused(
    serving_v1: Serving, base: Base, backbone_models: BackboneModels
) -> None:
    """Issue 18 item 2: the doorbell's gate scores open-set at the threshold it receives.

    Ranking alone (the gate before) sees no difference between v1 and a v2 with the
    same weights and a threshold no face reaches: every resident would be "unknown"."""
    aggregator, node = serving_v1
    sha = backbone_models.sha256
    locked_out = global_payload(base, 2, backbone=sha, threshold=0.9999)
    aggregator.publish(TOPICS.global_model, locked_out, retain=True)
    wait_until(lambda: node.counters["worse_on_gallery"] == 1)
    assert node.models.version == 1
    assert node.recognizer.model.head is not None
    assert node.recognizer.model.head.threshold == 0.0  # v1's, still serving
