"""The aggregator's command line: it serves, stops on SIGTERM, and names a bad key."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
from pathlib import Path

from broker.local import LocalBroker
from tests.federation import start_aggregator
from tests.test_aggregator import LINEAGE, REPO, SITE, TOPICS, Watcher, watcher

__all__ = ["watcher"]  # the fixture, shared with test_aggregator


def test_cli_serves_and_publishes_offline_on_sigterm(
    broker: LocalBroker, watcher: Watcher, tmp_path: Path, aggregator_cache: Path
) -> None:
    config = tmp_path / "aggregator.yaml"
    config.write_text(
        f"site: {SITE}\nstate_dir: {tmp_path / 'state'}\ncache_dir: {aggregator_cache}\n"
        f"mqtt:\n  port: {broker.port}\nthreads: 1\n"
    )
    process = start_aggregator(config, subprocess.PIPE)
    try:
        watcher.wait_for(TOPICS.aggregator_status, lambda p: b'"online"' in p, timeout=60)
        first = watcher.global_model(0)
        assert LINEAGE.fullmatch(first.lineage)
        backbone = watcher.backbone()
        assert backbone.lineage == first.lineage
        assert hashlib.sha256(backbone.float_model).hexdigest() == first.backbone
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr.decode()
    watcher.wait_for(TOPICS.aggregator_status, lambda p: b'"offline"' in p)
    log = stderr.decode()
    assert "ready: site test, model version 0" in log
    assert "SIGTERM: stopping" in log


def test_bad_config_names_the_file_and_the_key(tmp_path: Path) -> None:
    config = tmp_path / "aggregator.yaml"
    config.write_text("site: home\nstate_dir: /tmp/x\nrounds:\n  timout_s: 5\n")
    result = subprocess.run(
        [sys.executable, "-m", "aggregator", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert str(config) in result.stderr
    assert "rounds.timout_s" in result.stderr
    assert "unknown key" in result.stderr
