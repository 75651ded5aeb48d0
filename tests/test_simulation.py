"""The simulation: its data split (pure functions) and one whole small run, for real."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from fedbell.dataset import Sample
from simulation.config import SimulationConfig, load
from simulation.data import split_dataset, write_folder
from simulation.processes import Fleet, ProcessDied

ROOT = Path(__file__).resolve().parents[1]


def fake_samples(persons: int, images: int) -> list[Sample]:
    return [
        Sample(f"p{p}", Path(f"/data/p{p}/{i}.png")) for p in range(persons) for i in range(images)
    ]


@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
@pytest.mark.parametrize("nodes", [1, 3, 8])
def test_split_holds_out_every_person_and_covers_the_rest_once(alpha: float, nodes: int) -> None:
    samples = fake_samples(persons=6, images=10)
    split = split_dataset(samples, nodes=nodes, alpha=alpha, holdout_fraction=0.3, seed=1)

    assert split.labels == tuple(sorted({s.person for s in samples}))
    assert Counter(s.person for s in split.held_out) == {f"p{p}": 3 for p in range(6)}
    assert not set(split.held_out) & set(split.train)
    assert set(split.held_out) | set(split.train) == set(samples)
    spread = [s for node in split.per_node for s in node]
    assert sorted(spread, key=str) == sorted(split.train, key=str)  # each exactly once
    assert len(split.per_node) == nodes
    assert all(split.per_node)


def test_split_is_deterministic_for_a_seed() -> None:
    samples = fake_samples(persons=5, images=8)
    first = split_dataset(samples, nodes=3, alpha=0.5, holdout_fraction=0.3, seed=7)
    assert first == split_dataset(samples, nodes=3, alpha=0.5, holdout_fraction=0.3, seed=7)
    assert first != split_dataset(samples, nodes=3, alpha=0.5, holdout_fraction=0.3, seed=8)


def test_split_refuses_labels_that_are_not_topic_safe() -> None:
    samples = [*fake_samples(2, 4), Sample("bad name", Path("/data/bad name/0.png"))]
    with pytest.raises(ValueError, match="bad name"):
        split_dataset(samples, nodes=2, alpha=1.0, holdout_fraction=0.3, seed=0)


def test_split_refuses_more_nodes_than_training_images() -> None:
    with pytest.raises(ValueError, match="cannot give 20 nodes"):
        split_dataset(fake_samples(2, 5), nodes=20, alpha=1.0, holdout_fraction=0.3, seed=0)


def test_write_folder_links_without_touching_the_source(tmp_path: Path) -> None:
    source = tmp_path / "source" / "alice" / "0.png"
    source.parent.mkdir(parents=True)
    source.write_bytes(b"png")
    write_folder([Sample("alice", source)], tmp_path / "gallery")
    written = tmp_path / "gallery" / "alice" / "0.png"
    assert written.read_bytes() == b"png"
    assert sorted(p.name for p in source.parent.iterdir()) == ["0.png"]


def test_flags_override_yaml_and_typos_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text("nodes: 3\nrounds: 5\n")
    config = load(path, {"rounds": 2, "alpha": None})
    assert (config.nodes, config.rounds, config.alpha) == (3, 2, 1.0)
    path.write_text("nodez: 3\n")
    with pytest.raises(Exception, match="nodez: unknown key"):
        load(path, {})


def test_shipped_config_is_valid() -> None:
    config = load(ROOT / "config" / "simulation.yaml", {})
    assert config == SimulationConfig()


def test_fleet_reports_a_dead_child_with_its_log_and_stops_the_rest(tmp_path: Path) -> None:
    with Fleet() as fleet:
        sleeper = fleet.start(
            "sleeper",
            "timeit",
            ["-n", "1", "import time; time.sleep(60)"],
            tmp_path / "sleeper.log",
        )
        crasher = fleet.start("crasher", "no_such_module_here", [], tmp_path / "crasher.log")
        crasher.process.wait(timeout=30)
        with pytest.raises(ProcessDied, match="No module named") as raised:
            fleet.check()
        assert raised.value.name == "crasher"
    assert sleeper.process.poll() is not None  # stopped on exit


def test_a_small_simulation_runs_end_to_end(tmp_path: Path) -> None:
    """Mosquitto, the aggregator and two doorbells as real processes, two rounds."""
    config = tmp_path / "sim.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "synthetic": {"persons": 4, "images_per_person": 8},
                "round_timeout_s": 120,
                "startup_timeout_s": 120,
                "live": {"visitors": 2, "strangers": 1},
            }
        )
    )
    report = tmp_path / "out" / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulation",
            "--config",
            str(config),
            "--nodes",
            "2",
            "--rounds",
            "2",
            "--epochs",
            "1",
            "--report",
            str(report),
            "--workdir",
            str(tmp_path / "work"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    data = json.loads(report.read_text())
    for key in (
        "dataset",
        "nodes",
        "alpha",
        "rounds",
        "centralized_accuracy",
        "codec",
        "model_params",
    ):
        assert key in data
    assert data["nodes"] == 2
    assert data["codec"] == "topk"
    assert [r["round"] for r in data["rounds"]] == [1, 2]
    for row in data["rounds"]:
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["bytes_up"] > 0
        assert row["bytes_down"] > 0
        assert row["participants"] >= 1
    assert 0.0 <= data["centralized_accuracy"] <= 1.0
    assert data["model_params"] > 0
    assert report.with_suffix(".png").stat().st_size > 0
    assert "error" not in data["live"], data["live"]
    assert data["live"]["frames"] > 0
    assert len(data["live"]["visits"]) == 3
