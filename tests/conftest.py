"""Shared fixtures: a real Mosquitto per test, started from the project's config, and
a running federation on it (tests/federation.py: the aggregator and doorbells as
processes)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from broker.local import LocalBroker

if TYPE_CHECKING:
    from aggregator.backbone import BackboneModels
    from tests.federation import Federation, Process, Recorder

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def backbone_models(request: pytest.FixtureRequest) -> BackboneModels:
    """dlib's face network as float and int8 TFLite, converted once and cached.

    The conversion (TensorFlow, a minute or two) is the aggregator's own
    (`aggregator.backbone.backbone_models`), cached under pytest's cache folder,
    so later sessions only read two files.
    """
    from aggregator.backbone import backbone_models as convert

    return convert(request.config.cache.mkdir("fedbell-backbone"))


@pytest.fixture(scope="session")
def aggregator_cache(request: pytest.FixtureRequest, backbone_models: BackboneModels) -> Path:
    """The one cache folder every test's aggregator (in process or CLI) is pointed at.

    It is the `backbone_models` fixture's folder, and that fixture has run: an
    aggregator without stranger photos finds the backbone converted already, so
    the conversion happens once per session (and once ever, while pytest's cache
    lasts). Stranger photos would make the converter's representative set (a
    second conversion), so tests give their aggregators no stranger folder.
    """
    del backbone_models  # only its side effect: the converted backbone in this folder
    return Path(request.config.cache.mkdir("fedbell-backbone"))


@pytest.fixture(scope="session")
def last_level_cache(aggregator_cache: Path) -> Path:
    """`aggregator_cache` with the backbone cut before dlib's last level converted too
    (`rounds.trainable: last_level`; a dozen seconds once, then two files read)."""
    from aggregator.backbone import backbone_models as convert

    convert(aggregator_cache, until_last_level=True)
    return aggregator_cache


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A private broker on a free loopback port, stopped after the test."""
    with LocalBroker(tmp_path / "broker") as running:
        yield running


@pytest.fixture
def recorder(broker: LocalBroker) -> Iterator[Recorder]:
    """Every message under the test site on `broker`, from before anything starts."""
    from tests.federation import Recorder

    with Recorder(broker.port) as recording:
        yield recording


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """Every process a test starts is stopped at the end, whatever happened."""
    started: list[Process] = []
    yield started
    for process in started:
        process.stop()


@pytest.fixture
def federation(
    tmp_path: Path,
    broker: LocalBroker,
    recorder: Recorder,
    processes: list[Process],
    aggregator_cache: Path,
) -> Federation:
    """A federation to start on the test's broker (imported here, not at the top, so that
    tests without one never import the learning core)."""
    from tests.federation import Federation

    return Federation(tmp_path, broker, recorder, processes, aggregator_cache)


def shared_dataset(name: str) -> Path:
    """A real-photograph dataset beside the checkout, or skip saying why."""
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(f"needs real photographs in {path} (absent in a fresh clone)")
    return path
