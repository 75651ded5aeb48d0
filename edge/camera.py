"""Frame sources behind one small interface: Pi camera, OpenCV, image folder.

`ReconnectingSource` wraps any of them so a camera that disconnects is
reopened with exponential back-off while the node keeps running and reports
`reconnecting` in its status.

Two streams (`camera.full_width`/`full_height`): `read_pair` gives a
`FramePair`, the small frame detection and tracking run on and the
full-resolution frame of the same instant the chips are cut from (Picamera2's
`lores` and `main` streams of one request; for OpenCV and folders the frame
as read and a scaled-down copy; a folder recorded with both streams, its
`lores/` copies and, only when a chip is cut, its images). A source that
cannot give the large stream falls back to one stream with one warning.
`read` still gives the small frame.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol, runtime_checkable

import cv2
import numpy as np
import numpy.typing as npt

from edge.frames import Frame, FramePair, StreamSplitter, small_size
from edge.recognition_config import CameraConfig
from fedbell.redact import redact

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".tif", ".tiff"})


class CameraError(RuntimeError):
    """A frame source cannot be opened or has failed."""


class FrameSource(Protocol):
    def read(self) -> Frame | None:
        """The next frame; None when there is no frame (end of replay or a failure)."""

    def close(self) -> None:
        """Release the device."""


@runtime_checkable
class PairSource(Protocol):
    """A frame source that can give both streams."""

    def read_pair(self) -> FramePair | None:
        """The next pair; None at the end of a replay."""

    def read(self) -> Frame | None: ...

    def close(self) -> None: ...


def read_pair(source: FrameSource) -> FramePair | None:
    """The next pair of any source (one-stream sources give one-stream pairs)."""
    if isinstance(source, PairSource):
        return source.read_pair()
    frame = source.read()
    return None if frame is None else FramePair(frame, time.monotonic())


PICAMERA2_HELP = (
    "the picamera2 frame source is only available on a Raspberry Pi with libcamera: "
    "install it with `sudo apt install python3-picamera2` and create the virtualenv with "
    "`python3 -m venv --system-site-packages .venv`, or use camera.kind: opencv"
)


class Picamera2Source:
    """The Pi camera through libcamera, as BGR frames.

    With `full` (width, height), two streams of each request: `main` at `full`
    (chips) and `lores` at `width` with main's aspect ratio (detection), which
    is YUV420 on a Pi 4's ISP. The request is held until the next frame is
    read, and `main` is copied out of it only when a chip is cut (a frame
    without a face costs no 4 MB copy). A camera that refuses the large
    configuration is opened again with one stream, with a warning.
    """

    def __init__(
        self,
        width: int,
        height: int,
        fps: float,
        camera_factory: Callable[[], Any] | None = None,
        *,
        full: tuple[int, int] | None = None,
    ) -> None:
        if camera_factory is None:
            try:
                from picamera2 import Picamera2
            except ImportError as err:
                raise CameraError(PICAMERA2_HELP) from err
            camera_factory = Picamera2
        self.two_streams = False
        self._held: Any = None
        """The request of the frame being processed: its main stream, until the next read."""
        try:
            self._camera = camera_factory()
            if full is not None:
                self.two_streams = self._configure_two(full, width, fps)
            if not self.two_streams:
                config = self._camera.create_video_configuration(
                    main={"size": (width, height), "format": "RGB888"},
                    controls={"FrameRate": fps},
                )
                self._camera.configure(config)
            self._camera.start()
        except Exception as err:  # libcamera raises many kinds; all mean "no camera"
            raise CameraError(f"picamera2: cannot start the camera: {err}") from err

    def _configure_two(self, full: tuple[int, int], width: int, fps: float) -> bool:
        lores = small_size(full[0], full[1], width)
        try:
            config = self._camera.create_video_configuration(
                main={"size": full, "format": "RGB888"},
                lores={"size": lores, "format": "YUV420"},
                controls={"FrameRate": fps},
            )
            self._camera.configure(config)
        except Exception as err:  # the sensor or the ISP cannot give it: one stream
            log.warning(
                "picamera2: cannot give a %dx%d main stream beside a %dx%d lores one (%s): "
                "one stream",
                *full,
                *lores,
                err,
            )
            return False
        return True

    def read(self) -> Frame | None:
        pair = self.read_pair()
        return None if pair is None else pair.small

    def read_pair(self) -> FramePair | None:
        self._release_held()
        try:
            if not self.two_streams:
                return FramePair(_bgr(self._camera.capture_array("main")), time.monotonic())
            # One request: both streams are the same exposure, stamped by the sensor.
            request = self._camera.capture_request()
            try:
                lores = request.make_array("lores")
                stamp = float(request.get_metadata().get("SensorTimestamp", time.monotonic_ns()))
            except Exception:
                request.release()
                raise
        except Exception as err:  # the driver's failure modes are not typed
            raise CameraError(f"picamera2: capture failed: {err}") from err
        self._held = request
        small = cv2.cvtColor(np.asarray(lores, np.uint8), cv2.COLOR_YUV2BGR_I420)
        return FramePair(
            np.asarray(small, np.uint8),
            stamp / 1e9,
            None,
            stamp / 1e9,
            fetch_full=lambda: self._main_of(request),
        )

    def _main_of(self, request: Any) -> Frame | None:
        """The main stream of `request` while it is held (None once released: the chips
        then come from the small frame)."""
        if request is not self._held:
            return None
        try:
            return _bgr(request.make_array("main"))
        except Exception as err:  # a failed copy loses this frame's full-resolution chips only
            log.warning("picamera2: cannot read the main stream: %s", err)
            return None

    def _release_held(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            try:
                held.release()
            except Exception as err:  # a dead camera: the next capture says so
                log.debug("picamera2: release failed: %s", err)

    def close(self) -> None:
        self._release_held()
        try:
            self._camera.stop()
            self._camera.close()
        except Exception as err:  # closing a dead camera must not stop the node
            log.debug("picamera2: close failed: %s", err)


def _bgr(frame: Any) -> Frame:
    # libcamera's "RGB888" is B, G, R in memory: what OpenCV calls BGR.
    return np.ascontiguousarray(np.asarray(frame)[:, :, :3], dtype=np.uint8)


class SplitFrameSource:
    """A source that reads whole frames and, given a splitter, makes both streams of each."""

    _splitter: StreamSplitter | None = None

    def _read_frame(self) -> Frame | None:
        """The next whole frame; None at the end of a replay."""
        raise NotImplementedError

    def read(self) -> Frame | None:
        pair = self.read_pair()
        return None if pair is None else pair.small

    def read_pair(self) -> FramePair | None:
        frame = self._read_frame()
        if frame is None:
            return None
        if self._splitter is None:
            return FramePair(frame, time.monotonic())
        return self._splitter.pair(frame, time.monotonic())


class OpenCVSource(SplitFrameSource):
    """A USB camera index, an RTSP/HTTP URL, or a video file through VideoCapture."""

    def __init__(
        self,
        device: int | str,
        width: int = 640,
        height: int = 480,
        fps: float = 15.0,
        loop: bool = False,
        *,
        full: tuple[int, int] | None = None,
    ) -> None:
        """With `full`, a camera index is asked for that size and detection runs on a copy
        `width` wide (a file or URL gives what it holds: it is split when wider)."""
        self._device = _as_device(device)
        self._loop = loop
        self._is_file = isinstance(self._device, str) and Path(self._device).is_file()
        if isinstance(self._device, str) and "://" not in self._device and not self._is_file:
            raise CameraError(f"opencv: {self._device}: no such video file")
        self._capture = cv2.VideoCapture(self._device)
        if not self._capture.isOpened():
            raise CameraError(f"opencv: cannot open {redact(str(self._device))!r}")
        self._splitter = None if full is None else StreamSplitter(width, "opencv")
        if isinstance(self._device, int):
            asked = full or (width, height)  # a camera gives the nearest size it has
            self._capture.set(cv2.CAP_PROP_FRAME_WIDTH, asked[0])
            self._capture.set(cv2.CAP_PROP_FRAME_HEIGHT, asked[1])
            self._capture.set(cv2.CAP_PROP_FPS, fps)

    def _read_frame(self) -> Frame | None:
        ok, frame = self._capture.read()
        if not ok and self._is_file and self._loop:
            self._capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, frame = self._capture.read()
        if not ok or frame is None:
            if self._is_file:
                return None  # end of the file, not a failure
            raise CameraError(f"opencv: {redact(str(self._device))!r} returned no frame")
        return np.asarray(frame, dtype=np.uint8)

    def close(self) -> None:
        self._capture.release()


def _as_device(device: int | str) -> int | str:
    """`"0"` from YAML or a CLI means camera index 0, not a file named 0."""
    if isinstance(device, str) and device.isdigit():
        return int(device)
    return device


LORES_FOLDER = "lores"
"""A folder replay's small stream: `<folder>/lores/<name>` beside each `<folder>/<name>`."""


class FolderSource(SplitFrameSource):
    """Images of a folder replayed in name order at a set frame rate.

    With two streams (`split_width`), an image that has a copy of the same stem in
    the folder's `lores/` subfolder is replayed as Picamera2 gives a frame: that
    copy is the small stream, and the image is read only when a chip is cut from
    it, and only if it is still the file it was when its copy was read (a replay
    folder rewritten meanwhile gives no chip from another frame). Without the
    copy, detection runs on a copy `split_width` wide made here.
    """

    def __init__(
        self,
        folder: Path,
        fps: float = 0.0,
        loop: bool = False,
        sleep: Callable[[float], None] = time.sleep,
        *,
        split_width: int | None = None,
    ) -> None:
        """With `split_width`, images wider than it are two streams: detection on a copy
        that wide, chips from the image."""
        self._splitter = None if split_width is None else StreamSplitter(split_width, "folder")
        if not folder.is_dir():
            raise CameraError(f"folder: {folder} is not a folder")
        self._paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self._paths:
            raise CameraError(f"folder: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        lores = folder / LORES_FOLDER
        self._lores = {}  # stem -> the image's small stream, as recorded
        if split_width is not None and lores.is_dir():
            self._lores = {p.stem: p for p in lores.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        self._period = 1.0 / fps if fps > 0 else 0.0
        self._loop = loop
        self._index = 0
        self._next_time = time.monotonic()
        self._sleep = sleep

    def read_pair(self) -> FramePair | None:
        while True:
            path = self._next_path()
            if path is None:
                return None
            pair = self._recorded_pair(path)
            # One open per frame, the bytes decoded here (cv2.imread opens a file twice:
            # make bench-edge counts the frames read by the opens in the folder).
            if pair is None and (frame := _decode(_file_bytes(path))) is not None:
                pair = self._pair(frame)
            if pair is not None:
                break
            log.warning("folder: skipping %s: not an image OpenCV can read", path)
        self._pace()
        return pair

    def _recorded_pair(self, path: Path) -> FramePair | None:
        """Both streams as recorded: the `lores/` copy now, the image when a chip is cut
        (None: no copy, or one that cannot be read)."""
        lores = self._lores.get(path.stem)
        if lores is None:
            return None
        try:
            recorded = _identity(path.stat())
        except OSError:
            return None
        small = _decode(_file_bytes(lores))
        if small is None:
            return None
        stamp = time.monotonic()

        def read_full() -> Frame | None:
            try:
                with path.open("rb") as file:
                    if _identity(os.fstat(file.fileno())) != recorded:
                        return None  # rewritten since its small stream was read
                    full = _camera_buffer(file)
                    if full is None:
                        full = _decode(np.frombuffer(file.read(), np.uint8))
            except OSError:
                return None
            if full is None:
                log.warning("folder: %s: not an image OpenCV can read (chips from lores)", path)
            return full

        return FramePair(small, stamp, None, stamp, fetch_full=read_full)

    def _pair(self, frame: Frame) -> FramePair:
        if self._splitter is None:
            return FramePair(frame, time.monotonic())
        return self._splitter.pair(frame, time.monotonic())

    def _next_path(self) -> Path | None:
        if self._index >= len(self._paths):
            if not self._loop:
                return None
            self._index = 0
        path = self._paths[self._index]
        self._index += 1
        return path

    def _pace(self) -> None:
        if self._period:
            delay = self._next_time - time.monotonic()
            if delay > 0:
                self._sleep(delay)
            self._next_time = max(self._next_time + self._period, time.monotonic())

    def close(self) -> None:
        self._paths = []


def _identity(stat: os.stat_result) -> tuple[int, int, int]:
    """Which file a path names: a file replaced by a rename has another inode."""
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


BMP_HEADER = struct.Struct("<2sI4xIIiiHHI")
"""A BMP's file and info headers up to the compression: magic, size, pixel offset, info
size, width, height, planes, bits per pixel, compression."""


def _camera_buffer(file: BinaryIO) -> Frame | None:
    """An uncompressed 24-bit BMP's pixels as a camera hands a buffer over: one copy of
    them, bottom-up rows seen top-down without another (the chip cut from it copies its
    own few rows). None for any other file (the caller decodes it; `file` is rewound)."""
    head = file.read(BMP_HEADER.size)
    file.seek(0)
    if len(head) < BMP_HEADER.size:
        return None
    magic, _, offset, _, width, height, _, bits, compression = BMP_HEADER.unpack(head)
    if magic != b"BM" or bits != 24 or compression != 0 or width <= 0 or height <= 0:
        return None
    if (width * 3) % 4:  # rows padded to 4 bytes: leave it to the decoder
        return None
    file.seek(offset)
    pixels = np.fromfile(file, np.uint8, count=width * height * 3)
    file.seek(0)
    if pixels.size != width * height * 3:
        return None
    return pixels.reshape(height, width, 3)[::-1]


def _file_bytes(path: Path) -> npt.NDArray[np.uint8] | None:
    """A file's bytes (None when it is gone: a replay folder being rewritten)."""
    try:
        return np.fromfile(path, np.uint8)
    except OSError:
        return None


def _decode(data: npt.NDArray[np.uint8] | None) -> Frame | None:
    """An image file's bytes as a BGR frame (None: not an image OpenCV can read)."""
    if data is None or data.size == 0:
        return None
    frame = cv2.imdecode(data, cv2.IMREAD_COLOR)
    return None if frame is None else np.asarray(frame, dtype=np.uint8)


@dataclass(frozen=True)
class SourceStatus:
    """What the node reports about its camera."""

    state: Literal["connected", "reconnecting", "ended"]
    last_error: str | None
    reconnects: int


class ReconnectingSource:
    """Reopens a failed source with exponential back-off; never raises from read().

    `read()` returns None while the camera is down (the caller just skips that
    turn), and `status` says `reconnecting` with the last error.
    """

    def __init__(
        self,
        opener: Callable[[], FrameSource],
        initial_delay: float = 1.0,
        max_delay: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._opener = opener
        self._initial = initial_delay
        self._max = max_delay
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._source: FrameSource | None = None
        self._delay = initial_delay
        self._retry_at = 0.0
        self._ended = False
        self._status = SourceStatus("reconnecting", None, 0)
        self._last_read: float | None = None

    @property
    def status(self) -> SourceStatus:
        return self._status

    @property
    def last_read(self) -> float | None:
        """time.monotonic() when `read` was last entered or left (None: never called).

        The node's watchdog check: a camera loop that stops calling `read`, or a
        `read` that never returns (a hung driver), leaves it behind.
        """
        return self._last_read

    def read(self) -> Frame | None:
        pair = self.read_pair()
        return None if pair is None else pair.small

    def read_pair(self) -> FramePair | None:
        self._last_read = time.monotonic()
        try:
            return self._read()
        finally:
            self._last_read = time.monotonic()

    def _read(self) -> FramePair | None:
        with self._lock:
            if self._ended:
                return None
            if self._source is None and not self._try_open():
                return None
            assert self._source is not None
            try:
                frame = read_pair(self._source)
            except Exception as err:  # any driver failure means: reopen later
                self._fail(f"read failed: {err}")
                return None
            if frame is None:
                self._ended = True
                self._status = SourceStatus(
                    "ended", self._status.last_error, self._status.reconnects
                )
            return frame

    def wait_for_retry(self) -> None:
        """Sleep until the next reopen attempt is due (for a loop with nothing to do)."""
        delay = self._retry_at - self._clock()
        if delay > 0:
            self._sleep(min(delay, 0.5))

    def _try_open(self) -> bool:
        if self._clock() < self._retry_at:
            return False
        try:
            self._source = self._opener()
        except Exception as err:  # a missing device is expected while it is unplugged
            self._fail(f"open failed: {err}")
            return False
        if self._status.state == "reconnecting" and self._status.reconnects:
            log.info("camera reconnected after %d attempts", self._status.reconnects)
        self._delay = self._initial
        self._status = SourceStatus("connected", self._status.last_error, self._status.reconnects)
        return True

    def _fail(self, reason: str) -> None:
        reason = redact(reason)  # an RTSP URL's password goes to the log and the status
        if self._source is not None:
            self._source.close()
            self._source = None
        log.warning("camera %s; retrying in %.1fs", reason, self._delay)
        self._retry_at = self._clock() + self._delay
        self._delay = min(self._delay * 2.0, self._max)
        self._status = SourceStatus("reconnecting", reason, self._status.reconnects + 1)

    def close(self) -> None:
        with self._lock:
            if self._source is not None:
                self._source.close()
                self._source = None
            self._ended = True


def open_raw_source(config: CameraConfig) -> FrameSource:
    """The source the config names, opened now (raises CameraError if it cannot be)."""
    full = config.full_size()
    if config.kind == "picamera2":
        return Picamera2Source(config.width, config.height, config.fps, full=full)
    if config.kind == "folder":
        assert config.folder is not None  # checked by CameraConfig
        return FolderSource(
            config.folder,
            config.fps,
            config.loop,
            split_width=None if full is None else config.width,
        )
    return OpenCVSource(
        config.opencv_device(), config.width, config.height, config.fps, config.loop, full=full
    )


def check_available(config: CameraConfig) -> None:
    """CameraError (one line: what to do) if the configured kind cannot work on this
    machine at all; a camera that is merely unplugged is retried instead."""
    if config.kind == "picamera2":
        try:
            import picamera2  # noqa: F401
        except ImportError as err:
            raise CameraError(f"camera.kind picamera2: {PICAMERA2_HELP}") from err


def open_source(config: CameraConfig) -> ReconnectingSource:
    """The configured source wrapped so failures become status, not crashes.

    Picamera2 on a machine without it is a configuration error, reported now
    rather than retried forever.
    """
    check_available(config)
    return ReconnectingSource(
        lambda: open_raw_source(config), config.reconnect_initial_s, config.reconnect_max_s
    )
