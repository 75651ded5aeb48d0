"""Frame sources: folder replay, OpenCV video file, reconnection with back-off, picamera2 help."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edge.camera import (
    CameraError,
    FolderSource,
    Frame,
    OpenCVSource,
    Picamera2Source,
    ReconnectingSource,
    open_source,
)
from edge.recognition_config import CameraConfig
from fedbell.faces.synthetic import make_identities, write_visitor_video


def write_frames(folder: Path, count: int) -> None:
    folder.mkdir()
    for i in range(count):
        cv2.imwrite(str(folder / f"{i:03d}.png"), np.full((48, 64, 3), i * 10, np.uint8))
    (folder / "notes.txt").write_text("not an image")


def test_folder_replays_in_order_at_frame_rate(tmp_path: Path) -> None:
    write_frames(tmp_path / "f", 3)
    sleeps: list[float] = []
    source = FolderSource(tmp_path / "f", fps=10, sleep=sleeps.append)
    values = []
    while (frame := source.read()) is not None:
        values.append(int(frame[0, 0, 0]))
    assert values == [0, 10, 20]
    assert len(sleeps) == 2  # the first frame is due at once, then one per 0.1 s
    assert 0 < sleeps[0] <= 0.1


def test_folder_loop_and_errors(tmp_path: Path) -> None:
    write_frames(tmp_path / "f", 2)
    source = FolderSource(tmp_path / "f", loop=True)
    assert [int(source.read()[0, 0, 0]) for _ in range(5)] == [0, 10, 0, 10, 0]  # type: ignore[index]
    with pytest.raises(CameraError, match="not a folder"):
        FolderSource(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CameraError, match="holds no images"):
        FolderSource(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"camera\.folder is not set"):
        CameraConfig(kind="folder")
    with pytest.raises(ValueError, match="Extra inputs"):
        CameraConfig(kind="opencv", devise=0)  # type: ignore[call-arg]


def test_opencv_video_file(tmp_path: Path) -> None:
    video = tmp_path / "v.avi"
    write_visitor_video(
        video, make_identities(1, 0), np.random.default_rng(0), frames_per_visitor=3, gap_frames=1
    )
    source = open_source(CameraConfig(kind="opencv", device=str(video)))
    frames = []
    while (frame := source.read()) is not None:
        frames.append(frame)
    assert len(frames) == 4
    assert frames[0].shape == (480, 640, 3)
    assert source.status.state == "ended"
    with pytest.raises(CameraError, match="no such video file"):
        OpenCVSource(str(tmp_path / "nope.avi"))


def state(source: ReconnectingSource) -> str:
    return source.status.state


class FlakyCamera:
    """Fails on the given read numbers, like an unplugged USB camera."""

    def __init__(self, fail_on: set[int]) -> None:
        self.reads = 0
        self.fail_on = fail_on

    def read(self) -> Frame | None:
        self.reads += 1
        if self.reads in self.fail_on:
            raise CameraError("device vanished")
        return np.zeros((4, 4, 3), np.uint8)

    def close(self) -> None:
        pass


def test_reconnecting_source_backs_off_and_recovers() -> None:
    now = [0.0]
    opens = []
    camera = FlakyCamera({2})

    def opener() -> FlakyCamera:
        opens.append(now[0])
        if len(opens) in (2, 3):  # still unplugged for two attempts
            raise CameraError("no device")
        return camera

    source = ReconnectingSource(
        opener, initial_delay=1.0, max_delay=3.0, clock=lambda: now[0], sleep=lambda s: None
    )
    assert source.read() is not None
    assert state(source) == "connected"
    assert source.read() is None  # read fails
    assert state(source) == "reconnecting"
    assert "device vanished" in (source.status.last_error or "")
    assert source.read() is None  # too early to retry
    now[0] = 1.0
    assert source.read() is None  # attempt 2 fails, next in 2 s
    now[0] = 2.5
    assert source.read() is None  # not yet
    now[0] = 3.0
    assert source.read() is None  # attempt 3 fails, next in 3 s (capped)
    now[0] = 6.0
    assert source.read() is not None
    assert state(source) == "connected"
    assert source.status.reconnects == 3
    assert opens == [0.0, 1.0, 3.0, 6.0]


def test_picamera2_elsewhere_is_a_clear_error() -> None:
    with pytest.raises(CameraError, match="python3-picamera2"):
        open_source(CameraConfig(kind="picamera2"))


def test_picamera2_source_with_a_fake_camera() -> None:
    class FakePicamera2:
        def create_video_configuration(self, **kwargs: Any) -> dict[str, Any]:
            return kwargs

        def configure(self, config: dict[str, Any]) -> None:
            self.config = config

        def start(self) -> None:
            pass

        def capture_array(self, stream: str) -> np.ndarray:
            return np.zeros((480, 640, 4), np.uint8)

        def stop(self) -> None:
            pass

        def close(self) -> None:
            pass

    source = Picamera2Source(640, 480, 15, camera_factory=FakePicamera2)
    frame = source.read()
    assert frame is not None
    assert frame.shape == (480, 640, 3)
    source.close()
