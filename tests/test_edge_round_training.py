"""A round's local training (`edge.round_training.RoundTraining`): when a doorbell sits
a round out. Without a broker: the installer and its state folder are real.

Training itself runs in `tests/test_edge_node.py` (real backbone and gallery);
here, each reason to skip answers None without training, and a skip that the
operator must act on (no backbone for the model) is counted.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from edge.round_training import RoundTraining
from fedbell.wire.protocol import RoundAnnouncement, parse_json
from tests.test_edge_installer import BASE, Installs
from tests.test_edge_node import global_payload, round_payload


def training(installs: Installs, stopping: threading.Event | None = None) -> RoundTraining:
    return RoundTraining(
        installs.parts, models=installs.installer, stopping=stopping or threading.Event()
    )


def announced(number: int, **fields: object) -> RoundAnnouncement:
    announcement = parse_json(round_payload(number), RoundAnnouncement)
    return announcement.model_copy(update=fields)


def test_a_round_past_its_deadline_is_skipped(tmp_path: Path) -> None:
    installs = Installs(tmp_path)
    installs.installer.on_global(global_payload(BASE, 1))
    trainer = training(installs)
    assert trainer.train(announced(1, deadline=time.time() - 1), None) is None
    assert trainer.trainings == 0


def test_a_base_model_that_never_comes_or_is_already_passed_is_skipped(tmp_path: Path) -> None:
    installs = Installs(tmp_path)
    stopping = threading.Event()
    trainer = training(installs, stopping)
    stopping.set()  # the node is closing: no waiting for the base model
    started = time.monotonic()
    assert trainer.train(announced(1), None) is None
    assert time.monotonic() - started < 5
    installs.installer.on_global(global_payload(BASE, 2))
    assert trainer.train(announced(1, base_version=1), None) is None  # already at v2
    assert trainer.trainings == 0


def test_a_model_without_its_backbone_is_skipped_and_counted(tmp_path: Path) -> None:
    installs = Installs(tmp_path)
    installs.installer.on_global(global_payload(BASE, 1))
    ready = threading.Event()
    trainer = training(installs)
    assert trainer.train(announced(1), None, ready=ready.set) is None
    assert installs.counters == {"no_backbone": 1}
    assert not ready.is_set()  # a secure round would not advertise its keys
    assert trainer.trainings == 0
