"""bench.scale end to end, small: real Mosquitto (loopback and the TLS production
configuration on a provisioned site), the real aggregator verifying signed updates."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import scale
from broker.local import find_mosquitto


@pytest.mark.parametrize("broker_kind", ["loopback", "tls"])
def test_a_signed_round_is_collected_and_its_memory_measured(
    broker_kind: str, tmp_path: Path
) -> None:
    find_mosquitto()
    row = scale.run_one(4, "topk", tmp_path, broker_kind=broker_kind, timeout=300)
    assert row["broker"] == broker_kind
    assert row["signed"] is True
    # All four updates verified and accepted (run_one raises on a refusal or a shortfall).
    assert row["nodes"] == 4
    assert 0 < row["bytes_per_update"] < 20_000  # a top-k head update, not a CNN's
    # Memory while collecting, beside what the process held before the round.
    assert row["rss_before_mb"] > 0
    assert row["collect_rss_mb"] >= row["rss_before_mb"] - 1
    assert row["collect_growth_mb"] == pytest.approx(
        row["collect_rss_mb"] - row["rss_before_mb"], abs=0.11
    )
    assert row["lifetime_peak_mb"] >= row["collect_rss_mb"]
    log = (tmp_path / "aggregator.log").read_text()
    assert "rejected" not in log
