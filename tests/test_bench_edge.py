"""make bench-edge's set-up without running it: the unit's settings, the chroot, readiness,
and how a secure round's phases are timed."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from aggregator.config import RoundSettings
from bench.edge_probes import FrameCounter
from bench.edge_rounds import serving
from bench.edge_secure import PHASES, doorbell_phases, logged_times
from bench.edge_setup import DEVICE, UNIT, Layout, helper_names, show, unit_environment
from edge.camera import LORES_FOLDER, FolderSource
from fedbell.wire.protocol import DeviceStatus
from fedbell.wire.topics import SecAggLeaf
from simulation.replay import FRAMES_PER_VISIT, write_porch


def test_the_doorbell_runs_with_the_units_environment_but_not_its_specifiers() -> None:
    env = unit_environment(UNIT)
    assert env["MALLOC_ARENA_MAX"] == "2"
    assert env["OPENBLAS_NUM_THREADS"] == "1"
    assert "HOME" not in env  # %S/...: a systemd specifier, meaningless here


def test_in_a_chroot_paths_and_the_python_are_the_roots(tmp_path: Path) -> None:
    root = tmp_path / "root"
    work = root / "var" / "tmp" / "bench"
    layout = Layout(work, root, "/opt/fedbell/venv/bin/python", {"MALLOC_ARENA_MAX": "2"})
    assert layout.inside(work / "edge.yaml") == "/var/tmp/bench/edge.yaml"
    command = layout.command("-m", "edge")
    assert command[:4] == ["chroot", str(root), "/usr/bin/env", "-i"]
    assert "MALLOC_ARENA_MAX=2" in command
    assert command[-3:] == ["/opt/fedbell/venv/bin/python", "-m", "edge"]
    assert layout.cwd is None
    here = Layout(tmp_path, None, "python3")
    assert here.command("-m", "edge") == ["python3", "-m", "edge"]
    assert here.inside(tmp_path / "x") == str(tmp_path / "x")


def test_the_doorbell_is_ready_once_it_serves_a_model() -> None:
    def status(detail: str) -> DeviceStatus:
        return DeviceStatus(state="online", model_version=0, detail=detail)

    assert serving(status("model v0: 5 people, 40 photos; camera connected"))
    assert not serving(status("5 people, 40 photos; waiting for a model"))
    assert not serving(status(""))


LOG = """\
2026-12-06 11:38:54,600 INFO edge.secure: secure round: keys sent (274 bytes)
2026-12-06 11:38:54,700 INFO edge.rounds: round 2: trained in 0.1 s, loss 1.4; update ready to mask
2026-12-06 11:38:54,750 INFO edge.secure: secure round: shares sent (980 bytes)
2026-12-06 11:38:59,787 INFO edge.secure: secure round: keys sent (274 bytes)
2026-12-06 11:38:59,803 INFO edge.round_training: round 3: training on 15 gallery images
2026-12-06 11:39:00,045 INFO edge.rounds: round 3: trained in 0.2 s, loss 1.4; update ready to mask
2026-12-06 11:39:00,046 INFO edge.edge: a line of another part
2026-12-06 11:39:00,346 INFO edge.secure: secure round: shares sent (980 bytes)
2026-12-06 11:39:00,917 INFO edge.secure: secure round: masked sent (13176 bytes)
"""


def test_the_doorbells_log_gives_its_training_of_that_round_and_its_shares_after() -> None:
    times = logged_times(LOG, 3)
    assert times["ready"] - times["keys"] == pytest.approx(0.258)
    assert times["shares"] - times["ready"] == pytest.approx(0.301)
    with pytest.raises(ValueError, match="round 4: the doorbell's log lacks its ready, shares"):
        logged_times(LOG, 4)
    with pytest.raises(ValueError, match="lacks its shares"):
        logged_times(LOG.split("2026-12-06 11:39:00,346", maxsplit=1)[0], 3)


def test_a_phase_is_timed_from_when_the_doorbell_could_start_it() -> None:
    announced = {"keys": 10.0, "shares": 10.2, "send": 12.0, "unmask": 13.0}
    answered: dict[SecAggLeaf, float] = {
        "keys": 10.1,
        "shares": 11.6,
        "masked": 12.4,
        "unmask": 13.05,
    }
    # shares announced at 10.2 while it trained until 11.5 (its clock: 101.5): 0.1 s for them
    logged = {"keys": 100.1, "ready": 101.5, "shares": 101.6}
    parts = doorbell_phases(announced, answered, logged)
    assert parts == pytest.approx(
        {"advert": 0.1, "training": 1.4, "shares": 0.1, "masked": 0.4, "unmask": 0.05}
    )
    assert list(parts) == list(PHASES)
    # announced after its training ended: timed from the announcement
    later = doorbell_phases({**announced, "shares": 11.55}, answered, logged)
    assert later["shares"] == pytest.approx(0.05)


def test_the_helpers_and_the_measured_doorbell_make_up_a_secure_cohort() -> None:
    helpers = helper_names()
    assert len({DEVICE, *helpers}) == RoundSettings().min_cohort


@pytest.mark.parametrize("two_streams", [False, True])
def test_the_frame_counter_counts_each_frame_the_folder_camera_reads_once(
    tmp_path: Path, two_streams: bool
) -> None:
    """bench-edge's frames/s are opens in the camera folder (its lores/ copies with two
    streams): one per frame (cv2.imread opens a file twice, which counted every frame
    twice), and a full frame no chip is cut from is never opened."""
    video, camera = tmp_path / "video", tmp_path / "camera"
    write_porch(
        video,
        [np.full((120, 100), 90, np.uint8)],
        np.random.default_rng(0),
        full=(1536, 864) if two_streams else None,
    )
    camera.mkdir()
    show(video, camera)
    counters = [FrameCounter(camera), FrameCounter(camera / LORES_FOLDER)] if two_streams else []
    counters = counters or [FrameCounter(camera)]
    for counter in counters:
        counter.start()
    try:
        source = FolderSource(camera, split_width=640 if two_streams else None)
        pairs = [source.read_pair() for _ in range(FRAMES_PER_VISIT)]
        assert all(p is not None and p.two_streams == two_streams for p in pairs)
        time.sleep(0.5)  # inotify's events, a second open per frame's too, have arrived
        assert len(counters[-1].times) == FRAMES_PER_VISIT
        if two_streams:
            assert counters[0].times == []  # no chip cut: no full frame read
            first = pairs[0]
            assert first is not None
            assert first.full_frame is not None
            assert first.full_frame.shape == (864, 1536, 3)
            time.sleep(0.5)
            assert len(counters[0].times) == 1
    finally:
        for counter in counters:
            counter.close()
