"""The simulation: its data split (pure functions) and one whole small run, for real."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from fedbell.faces.dataset import Sample
from fedbell.faces.openset import UNKNOWN
from simulation.config import SimulationConfig, load
from simulation.data import MAX_PER_HOUSE, one_photo_each, split_households, write_folder
from simulation.processes import Fleet, ProcessDied
from simulation.replay import plan_visits
from simulation.stack import accuracy_loss_bar

ROOT = Path(__file__).resolve().parents[1]


def fake_samples(persons: int, images: int) -> list[Sample]:
    return [
        Sample(f"p{p}", Path(f"/data/p{p}/{i}.png")) for p in range(persons) for i in range(images)
    ]


@pytest.mark.parametrize("houses", [1, 2, 4])
def test_households_share_no_person_with_the_held_out_people_or_the_newcomer(
    houses: int,
) -> None:
    samples = fake_samples(persons=12, images=4)
    homes = split_households(samples, houses=houses, seed=1)

    assert len(homes.houses) == len(homes.galleries) == houses
    assert all(homes.houses)
    residents = [p for house in homes.houses for p in house]
    assert len(residents) == len(set(residents))  # each person lives in one house at most
    held = {s.person for s in homes.held_out}
    newcomer = {s.person for s in homes.newcomer}
    assert len(newcomer) == 1
    assert len(held) == round(0.3 * 12)
    assert not held & set(residents)
    assert not newcomer & (held | set(residents))
    everyone = {s.person for s in samples}
    assert held | newcomer | set(residents) <= everyone
    if held | newcomer | set(residents) != everyone:  # people left over: every house is full
        assert all(len(house) == MAX_PER_HOUSE for house in homes.houses)
    assert homes.newcomer == tuple(s for s in samples if s.person in newcomer)
    assert set(homes.held_out) == {s for s in samples if s.person in held}  # every photo


def test_a_gallery_holds_its_house_and_keeps_one_photo_each_for_a_visit() -> None:
    samples = fake_samples(persons=10, images=5)
    homes = split_households(samples, houses=3, seed=4)
    for house, gallery in zip(homes.houses, homes.galleries, strict=True):
        assert {s.person for s in gallery} == set(house)
        assert Counter(s.person for s in gallery) == dict.fromkeys(house, 4)
    visits = {s.person: s for s in homes.visits}
    assert set(visits) == {p for house in homes.houses for p in house}
    in_galleries = {s for gallery in homes.galleries for s in gallery}
    assert not in_galleries & set(homes.visits)  # a visit is a photo the doorbell never saw


def test_the_live_demo_films_as_many_strangers_as_configured_each_a_different_person() -> None:
    homes = split_households(fake_samples(persons=12, images=4), houses=2, seed=3)
    newcomer = homes.newcomer[0].person
    strangers = one_photo_each(homes.held_out)
    assert len(strangers) == len({s.person for s in homes.held_out}) == 4
    assert len({s.person for s in strangers}) == len(strangers)
    visits = plan_visits(newcomer, homes.newcomer[-1].path, homes.visits[:2], strangers[:3])
    assert [v.truth for v in visits[:3]] == [newcomer, *(s.person for s in homes.visits[:2])]
    assert [v.truth for v in visits[3:]] == [UNKNOWN] * 3
    assert {v.photo for v in visits[3:]} == {s.path for s in strangers[:3]}
    assert len(plan_visits(newcomer, homes.newcomer[-1].path, homes.visits[:2], [])) == 3


def test_households_are_deterministic_for_a_seed() -> None:
    samples = fake_samples(persons=9, images=3)
    first = split_households(samples, houses=2, seed=7)
    assert first == split_households(samples, houses=2, seed=7)
    assert first != split_households(samples, houses=2, seed=8)


def test_people_with_fewer_than_three_photos_are_left_out_and_too_few_is_an_error() -> None:
    samples = [
        *fake_samples(persons=6, images=3),
        *[Sample("two", Path(f"/t/{i}")) for i in (0, 1)],
    ]
    homes = split_households(samples, houses=2, seed=0)
    everyone = {s.person for gallery in homes.galleries for s in gallery}
    everyone |= {s.person for s in (*homes.held_out, *homes.newcomer)}
    assert "two" not in everyone
    with pytest.raises(ValueError, match="cannot fill 4 houses"):
        split_households(fake_samples(persons=6, images=3), houses=4, seed=0)


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
    config = load(path, {"rounds": 2, "codec": None})
    assert (config.nodes, config.rounds, config.codec) == (3, 2, "topk")
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


@pytest.mark.slow
@pytest.mark.timeout(900)  # a fresh machine converts dlib's network first (minutes)
def test_a_small_simulation_runs_end_to_end(tmp_path: Path) -> None:
    """Mosquitto, the aggregator and two doorbells as real processes, two rounds,
    the baselines, and the live replay before and after a newcomer is enrolled."""
    config = tmp_path / "sim.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                # 8 people: 2 held out, 1 newcomer, 5 residents in two houses
                "generated": True,  # even where real photos lie beside the checkout
                "synthetic": {"persons": 8, "images_per_person": 5},
                "round_timeout_s": 240,
                "startup_timeout_s": 600,
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
        timeout=840,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    data = json.loads(report.read_text())
    assert data["nodes"] == 2
    assert sorted(data["houses"]) == [2, 3]  # the 5 residents, dealt out
    assert data["held_out_persons"] == 2
    assert data["codec"] == "topk"
    assert data["head_params"] == 256 * 128  # the head is all that is federated
    assert [r["round"] for r in data["rounds"]] == [1, 2]
    for row in data["rounds"]:
        assert row["accuracy"] is not None
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["bytes_up"] > 0
        assert row["bytes_down"] > 0
        assert row["participants"] == 2  # both households answered every round
    assert data["final_accuracy"] == data["rounds"][-1]["accuracy"]
    for baseline in ("start_accuracy", "centralized_accuracy"):
        assert data[baseline] is not None
        assert 0.0 <= data[baseline] <= 1.0
    assert report.with_suffix(".png").stat().st_size > 0
    # The same learning over 3 deals of households: start, federated, central, the gain.
    assert [s["seed"] for s in data["seeds"]] == [0, 1, 2]
    for seed in data["seeds"]:
        assert all(0.0 <= seed[arm] <= 1.0 for arm in ("start", "federated", "central"))
    assert data["verdict"].startswith("over 3 seeds the federation's gain over its start is ")
    assert data["verdict"] in done.stdout
    assert done.stdout.count("round   2  accuracy") == 1  # the rounds are printed once

    live = data["live"]
    assert "error" not in live, live
    assert live["model_version"] == 2
    assert live["enroll_seconds"] > 0
    visits = live["visits"]
    visitors = [v["visitor"] for v in visits]
    assert len(visitors) == 4  # the newcomer, two residents, a stranger
    assert (visitors[0], visitors[-1]) == (live["newcomer"], "unknown")
    # Before enrolling, no doorbell can name the newcomer: the name is in no gallery.
    assert all(live["newcomer"] not in v["before"] for v in visits)
    # Filmed as the default camera records (two streams), every chip cut from the main one.
    assert live["camera"] == {"main": [1536, 864], "lores": [640, 360]}
    chips = [c for v in visits for d in v["decided_after"] for c in d["chips"]]
    assert chips
    assert all(chip["main_stream"] for chip in chips)


def test_stay_keeps_its_work_folder_unless_asked_to_clean_up() -> None:
    """`--stay` ends with Ctrl-C, with people perhaps enrolled by hand: keep their folder."""
    from simulation.__main__ import parse_args
    from simulation.runner import keeps

    def config(*argv: str) -> SimulationConfig:
        args = parse_args(list(argv))
        return SimulationConfig.model_validate(
            {key: getattr(args, key) for key in ("keep", "stay") if getattr(args, key) is not None}
        )

    assert not keeps(config())
    assert keeps(config("--keep"))
    assert keeps(config("--stay"))
    assert not keeps(config("--stay", "--no-keep"))


@pytest.mark.parametrize(("faces", "bar"), [(10, 0.2), (150, 2 / 150), (400, 0.01), (0, 1.0)])
def test_the_loss_bar_is_no_finer_than_the_evaluation_folder_measures(
    tmp_path: Path, faces: int, bar: float
) -> None:
    """Two faces' worth of the held-out folder, or the aggregator's default if finer."""
    for index in range(faces):
        photo = tmp_path / f"person{index % 5}" / f"{index}.jpg"
        photo.parent.mkdir(exist_ok=True)
        photo.write_bytes(b"")
    assert accuracy_loss_bar(tmp_path) == pytest.approx(bar)
