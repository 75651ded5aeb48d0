"""Frame sources: folder replay, OpenCV video file, reconnection with back-off, picamera2 help."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edge.camera import (
    LORES_FOLDER,
    CameraError,
    FolderSource,
    OpenCVSource,
    Picamera2Source,
    ReconnectingSource,
    open_source,
)
from edge.chips import cut_chips, scale_face
from edge.frames import Frame, FramePair, small_size
from edge.recognition_config import CameraConfig
from fedbell.faces.detection import Face
from fedbell.faces.features import face_chip
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


# --- two streams (issue 20) -------------------------------------------------------------------


def test_a_pair_is_matched_only_when_both_streams_are_one_instant() -> None:
    small, full = np.zeros((360, 640, 3), np.uint8), np.zeros((864, 1536, 3), np.uint8)
    assert FramePair(small, 1.0, full, 1.0).matched
    assert FramePair(small, 1.0, full, 1.0).scale() == (2.4, 2.4)
    assert not FramePair(small, 1.0, full, 1.04).matched
    assert not FramePair(small, 1.0).matched  # one stream: nothing to cut from
    assert small_size(1536, 864, 640) == (640, 360)
    assert small_size(2304, 1296, 640) == (640, 360)


def test_folder_of_large_images_gives_two_streams(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    cv2.imwrite(str(folder / "0.png"), np.full((720, 1280, 3), 90, np.uint8))
    config = CameraConfig(kind="folder", folder=folder, full_width=1280, full_height=720)
    source = open_source(config)
    pair = source.read_pair()
    assert pair is not None
    assert pair.full is not None
    assert pair.small.shape == (360, 640, 3)  # detection on a copy 640 wide
    assert pair.full.shape == (720, 1280, 3)  # chips from the image itself
    assert pair.matched
    source.close()


def recorded_pair(folder: Path, name: str, full: Frame, lores: Frame) -> None:
    """One frame of a folder recorded with both streams: the image and its `lores/` copy."""
    (folder / LORES_FOLDER).mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / name), full)
    cv2.imwrite(str(folder / LORES_FOLDER / name), lores)


def test_a_folder_recorded_with_both_streams_decodes_the_large_one_only_for_a_chip(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "f"
    lores = np.zeros((360, 640, 3), np.uint8)
    recorded_pair(folder, "0.png", np.full((720, 1280, 3), 90, np.uint8), lores)
    recorded_pair(folder, "1.png", np.zeros((720, 1280, 3), np.uint8), lores)
    (folder / "1.png").write_bytes(b"not a png any more")  # its lores copy still reads
    source = open_source(CameraConfig(kind="folder", folder=folder, full_width=1280))
    pair = source.read_pair()
    assert pair is not None
    assert pair.full is None  # not decoded yet: the lores copy is all detection needs
    assert pair.small.shape == (360, 640, 3)
    assert pair.matched
    assert pair.two_streams
    assert pair.full_frame is not None
    assert pair.full_frame.shape == (720, 1280, 3)
    assert int(pair.full_frame[0, 0, 0]) == 90
    assert pair.scale() == (2.0, 2.0)
    broken = source.read_pair()
    assert broken is not None
    assert broken.full_frame is None  # chips then come from the small frame
    assert broken.scale() == (1.0, 1.0)
    source.close()


def test_an_uncompressed_main_stream_is_read_as_a_camera_buffer(tmp_path: Path) -> None:
    """A BMP main stream is one copy of its pixels (rows seen top-down): the same frame
    and the same chip as OpenCV's decoding of it, and a rewritten file gives none."""
    folder = tmp_path / "f"
    full = np.random.default_rng(0).integers(0, 256, (864, 1536, 3), dtype=np.uint8)
    recorded_pair(folder, "0.bmp", full, np.zeros((360, 640, 3), np.uint8))
    (folder / LORES_FOLDER / "0.bmp").rename(folder / LORES_FOLDER / "0.png")  # any format
    source = FolderSource(folder, split_width=640)
    pair = source.read_pair()
    assert pair is not None
    assert pair.full_frame is not None
    assert np.array_equal(pair.full_frame, full)
    face = Face((300, 200, 60, 60), 0.9, (310.0, 220.0), (340.0, 221.0))
    chips = cut_chips(pair, [face]).chips
    decoded = cv2.imread(str(folder / "0.bmp"))
    assert decoded is not None
    assert np.array_equal(chips[0], face_chip(decoded, scale_face(face, 2.4, 2.4)))
    assert source.read_pair() is None  # one frame, no loop
    again = FolderSource(folder, split_width=640).read_pair()
    assert again is not None
    cv2.imwrite(str(tmp_path / "new.bmp"), full[::-1])
    (tmp_path / "new.bmp").replace(folder / "0.bmp")  # a replay folder rewritten meanwhile
    assert again.full_frame is None


def test_a_frame_without_a_face_or_of_another_instant_never_reads_its_full_frame() -> None:
    reads: list[int] = []

    def fetch() -> Frame:
        reads.append(1)
        return np.full((864, 1536, 3), 200, np.uint8)

    small = np.zeros((360, 640, 3), np.uint8)
    face = Face((100, 100, 50, 50), 0.9)
    assert cut_chips(FramePair(small, 1.0, None, 1.0, fetch_full=fetch), []).chips == []
    cut = cut_chips(FramePair(small, 1.0, None, 1.5, fetch_full=fetch), [face])
    assert cut.mismatched
    assert not cut.full_resolution
    assert cut.face_px == [50]
    assert float(cut.chips[0].mean()) == pytest.approx(0, abs=1)  # from the small frame
    assert reads == []
    cut = cut_chips(FramePair(small, 1.0, None, 1.0, fetch_full=fetch), [face])
    assert not cut.mismatched
    assert cut.full_resolution
    assert cut.face_px == [120]  # 50 px on the small frame, 2.4 times as wide on the full
    assert float(cut.chips[0].mean()) == pytest.approx(200, abs=1)  # from the full frame
    assert reads == [1]


def test_a_camera_without_the_large_stream_falls_back_to_one_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_frames(tmp_path / "f", 3)  # 64x48 images: smaller than the small stream
    video = tmp_path / "v.avi"
    write_visitor_video(  # 640x480 frames: the video holds no larger stream
        video, make_identities(1, 0), np.random.default_rng(0), frames_per_visitor=3, gap_frames=1
    )
    for config in (
        CameraConfig(kind="folder", folder=tmp_path / "f"),
        CameraConfig(kind="opencv", device=str(video)),
    ):
        caplog.clear()
        source = open_source(config)
        pairs = [source.read_pair() for _ in range(3)]
        assert all(p is not None and p.full is None for p in pairs)
        warnings = [r for r in caplog.records if "one stream" in r.getMessage()]
        assert len(warnings) == 1
        source.close()


class FakePicamera2:
    """Picamera2's interface as the source uses it; refuses a main stream wider than
    `max_width` as libcamera refuses a size the sensor mode cannot give."""

    max_width = 4096

    def __init__(self) -> None:
        self.config: dict[str, Any] = {}
        self.stamp = 10**9
        self.requests: list[FakeRequest] = []

    def create_video_configuration(self, **kwargs: Any) -> dict[str, Any]:
        return kwargs

    def configure(self, config: dict[str, Any]) -> None:
        if config["main"]["size"][0] > self.max_width:
            raise RuntimeError("invalid configuration: main stream too large")
        self.config = config

    def start(self) -> None:
        pass

    def capture_array(self, stream: str) -> np.ndarray:
        width, height = self.config[stream]["size"]
        return np.zeros((height, width, 4), np.uint8)

    def capture_request(self) -> FakeRequest:
        self.stamp += 66_000_000
        self.requests.append(FakeRequest(self.config, self.stamp))
        return self.requests[-1]

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass


class FakeRequest:
    def __init__(self, config: dict[str, Any], stamp: int) -> None:
        self.config, self.stamp, self.released = config, stamp, False
        self.made: list[str] = []

    def make_array(self, stream: str) -> np.ndarray:
        assert not self.released, "a released request's buffers belong to the camera again"
        self.made.append(stream)
        width, height = self.config[stream]["size"]
        if stream == "lores":  # YUV420: a full-size Y plane, then quarter-size U and V
            return np.full((height * 3 // 2, width), 128, np.uint8)
        return np.full((height, width, 4), 200, np.uint8)

    def get_metadata(self) -> dict[str, Any]:
        return {"SensorTimestamp": self.stamp}

    def release(self) -> None:
        self.released = True


def test_picamera2_two_streams_come_from_one_request() -> None:
    camera = FakePicamera2()
    source = Picamera2Source(640, 480, 15, camera_factory=lambda: camera, full=(1536, 864))
    assert source.two_streams
    pair = source.read_pair()
    assert pair is not None
    assert pair.small.shape == (360, 640, 3)  # the lores stream, YUV420 made BGR
    assert pair.matched
    assert pair.small_time == pytest.approx(1.066)
    (request,) = camera.requests
    assert request.made == ["lores"]  # main is copied only when a chip is cut
    assert not request.released  # held while the frame is processed
    assert pair.full_frame is not None
    assert pair.full_frame.shape == (864, 1536, 3)
    assert request.made == ["lores", "main"]
    skipped = source.read_pair()  # a frame whose full frame nobody asked for
    assert request.released
    frame = source.read()  # the one-frame interface gives the small stream
    assert frame is not None
    assert frame.shape == (360, 640, 3)
    assert skipped is not None
    assert skipped.full_frame is None  # released with the next read: chips from lores
    assert camera.requests[1].made == ["lores"]
    source.close()
    assert all(r.released for r in camera.requests)


def test_picamera2_refusing_the_large_stream_falls_back_to_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class SmallSensor(FakePicamera2):
        max_width = 1000

    source = Picamera2Source(640, 480, 15, camera_factory=SmallSensor, full=(1536, 864))
    assert not source.two_streams
    pair = source.read_pair()
    assert pair is not None
    assert not pair.two_streams
    assert pair.small.shape == (480, 640, 3)
    warnings = [r for r in caplog.records if "one stream" in r.getMessage()]
    assert len(warnings) == 1
    source.close()


def test_two_stream_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="set both or neither"):
        CameraConfig(full_width=1536, full_height=None)
    assert CameraConfig().full_size() == (1536, 864)
    assert CameraConfig(full_width=None, full_height=None).full_size() is None
    assert CameraConfig(width=1920, height=1080).full_size() is None  # not larger: one stream
