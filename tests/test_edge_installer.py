"""Which global model a doorbell installs (`edge.installer.ModelInstaller`), without a broker.

The messages are the aggregator's own (`build_global`); the gates they meet are
the node's: newer versions only, a new lineage only of a later epoch, a head the
recognizer can take. Refused models change nothing; a new lineage is announced
before it is installed; the installed model survives a restart.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest

from edge.artifacts import Artifacts
from edge.config import EdgeConfig
from edge.gallery import Gallery, StrangerStore
from edge.installer import ModelInstaller
from edge.parts import DoorbellParts
from edge.recognition_config import CameraConfig
from edge.recognizer import Recognizer
from edge.state import NodeState
from fedbell.errors import RejectedMessage
from fedbell.faces.embedding import HEAD_NAMES
from fedbell.wire.messages import GlobalModel
from tests.recognition_helpers import LINEAGE, projection
from tests.test_edge_node import SITE, global_payload

BASE = (list(HEAD_NAMES), [projection()])


class Installs:
    """An installer on a fresh state folder, and what it told the node."""

    def __init__(self, tmp_path: Path) -> None:
        config = EdgeConfig(
            device_id="door1",
            site=SITE,
            state_dir=tmp_path / "state",
            gallery_dir=tmp_path / "gallery",
            camera=CameraConfig(enabled=False),
        )
        state = NodeState(config.state_dir)
        recognizer = Recognizer()
        gallery = Gallery(config.gallery_dir, config.state_dir)
        self.counters: Counter[str] = Counter()
        self.lineages: list[tuple[str | None, str]] = []
        self.installed = 0
        self.parts = DoorbellParts(
            config,
            state=state,
            gallery=gallery,
            strangers=StrangerStore(None, 10),
            recognizer=recognizer,
            artifacts=Artifacts(
                config,
                recognizer,
                state=state,
                gallery=gallery,
                counters=self.counters,
                on_scored=lambda: None,
            ),
            counters=self.counters,
            keys=None,
        )
        self.installer = self.restarted()

    def restarted(self) -> ModelInstaller:
        """Another installer on the same state folder, as after a restart."""
        return ModelInstaller(
            self.parts,
            changed=threading.Condition(),
            on_new_lineage=self._new_lineage,
            on_installed=self._installed,
        )

    def _new_lineage(self, current: GlobalModel | None, model: GlobalModel) -> None:
        self.lineages.append((None if current is None else current.lineage, model.lineage))

    def _installed(self) -> None:
        self.installed += 1


def test_newer_versions_are_installed_and_survive_a_restart(tmp_path: Path) -> None:
    installs = Installs(tmp_path)
    installer = installs.installer
    assert installer.model is None
    installer.on_global(global_payload(BASE, 1, threshold=0.5))
    assert installs.lineages == [(None, LINEAGE)]  # the first model starts its lineage
    installer.on_global(global_payload(BASE, 3))
    installer.on_global(global_payload(BASE, 3))  # the same again: ignored
    installer.on_global(global_payload(BASE, 2))  # older: ignored
    assert installer.version == 3
    assert installs.installed == 2
    assert installs.lineages == [(None, LINEAGE)]
    assert installs.parts.recognizer.version == 3  # the head went to the recognizer
    assert not installs.counters
    restarted = installs.restarted()
    assert restarted.version == 3
    assert installs.parts.recognizer.version == 3


def test_a_new_lineage_must_be_of_a_later_epoch(tmp_path: Path) -> None:
    installs = Installs(tmp_path)
    installer = installs.installer
    installer.on_global(global_payload(BASE, 5, lineage="old", epoch=2))
    with pytest.raises(RejectedMessage) as refused:
        installer.on_global(global_payload(BASE, 9, lineage="replayed", epoch=1))
    assert refused.value.reason == "old_lineage"
    assert installer.version == 5
    installer.on_global(global_payload(BASE, 0, lineage="new", epoch=3))
    assert installer.model is not None
    assert (installer.model.lineage, installer.version) == ("new", 0)  # version 0 replaces 5
    assert installs.lineages == [(None, "old"), ("old", "new")]


def test_a_head_the_recognizer_cannot_take_changes_nothing(tmp_path: Path) -> None:
    installs = Installs(tmp_path)
    installer = installs.installer
    installer.on_global(global_payload(BASE, 1))
    broken = projection()[0]  # a vector, not a projection matrix
    with pytest.raises(RejectedMessage) as refused:
        installer.on_global(global_payload((BASE[0], [broken]), 2))
    assert refused.value.reason == "bad_shapes"
    assert installer.version == 1
    assert installs.installed == 1
    stored = installs.parts.state.load_global()
    assert stored is not None
    assert stored.version == 1
