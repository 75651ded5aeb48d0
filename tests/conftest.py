"""Shared fixtures: a real Mosquitto per test, started from the project's config."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.local import LocalBroker

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A private broker on a free loopback port, stopped after the test."""
    with LocalBroker(tmp_path / "broker") as running:
        yield running


def shared_dataset(name: str) -> Path:
    """A real-photograph dataset beside the checkout, or skip saying why."""
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(f"needs real photographs in {path} (absent in a fresh clone)")
    return path
