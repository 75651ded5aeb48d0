"""Frame sources behind one small interface: Pi camera, OpenCV, image folder.

`ReconnectingSource` wraps any of them so a camera that disconnects is
reopened with exponential back-off while the node keeps running and reports
`reconnecting` in its status.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import cv2
import numpy as np
import numpy.typing as npt

from edge.recognition_config import CameraConfig
from fedbell.redact import redact

log = logging.getLogger(__name__)

Frame = npt.NDArray[np.uint8]
"""A BGR (or grey) image, height × width × 3."""

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".tif", ".tiff"})


class CameraError(RuntimeError):
    """A frame source cannot be opened or has failed."""


class FrameSource(Protocol):
    def read(self) -> Frame | None:
        """The next frame; None when there is no frame (end of replay or a failure)."""

    def close(self) -> None:
        """Release the device."""


PICAMERA2_HELP = (
    "the picamera2 frame source is only available on a Raspberry Pi with libcamera: "
    "install it with `sudo apt install python3-picamera2` and create the virtualenv with "
    "`python3 -m venv --system-site-packages .venv`, or use camera.kind: opencv"
)


class Picamera2Source:
    """The Pi camera through libcamera, as BGR frames."""

    def __init__(
        self, width: int, height: int, fps: float, camera_factory: Callable[[], Any] | None = None
    ) -> None:
        if camera_factory is None:
            try:
                from picamera2 import Picamera2
            except ImportError as err:
                raise CameraError(PICAMERA2_HELP) from err
            camera_factory = Picamera2
        try:
            self._camera = camera_factory()
            config = self._camera.create_video_configuration(
                main={"size": (width, height), "format": "RGB888"}, controls={"FrameRate": fps}
            )
            self._camera.configure(config)
            self._camera.start()
        except Exception as err:  # libcamera raises many kinds; all mean "no camera"
            raise CameraError(f"picamera2: cannot start the camera: {err}") from err

    def read(self) -> Frame | None:
        try:
            frame = self._camera.capture_array("main")
        except Exception as err:  # the driver's failure modes are not typed
            raise CameraError(f"picamera2: capture failed: {err}") from err
        # libcamera's "RGB888" is B, G, R in memory: what OpenCV calls BGR.
        return np.ascontiguousarray(frame[:, :, :3], dtype=np.uint8)

    def close(self) -> None:
        try:
            self._camera.stop()
            self._camera.close()
        except Exception as err:  # closing a dead camera must not stop the node
            log.debug("picamera2: close failed: %s", err)


class OpenCVSource:
    """A USB camera index, an RTSP/HTTP URL, or a video file through VideoCapture."""

    def __init__(
        self,
        device: int | str,
        width: int = 640,
        height: int = 480,
        fps: float = 15.0,
        loop: bool = False,
    ) -> None:
        self._device = _as_device(device)
        self._loop = loop
        self._is_file = isinstance(self._device, str) and Path(self._device).is_file()
        if isinstance(self._device, str) and "://" not in self._device and not self._is_file:
            raise CameraError(f"opencv: {self._device}: no such video file")
        self._capture = cv2.VideoCapture(self._device)
        if not self._capture.isOpened():
            raise CameraError(f"opencv: cannot open {redact(str(self._device))!r}")
        if isinstance(self._device, int):
            self._capture.set(cv2.CAP_PROP_FRAME_WIDTH, width)
            self._capture.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
            self._capture.set(cv2.CAP_PROP_FPS, fps)

    def read(self) -> Frame | None:
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


class FolderSource:
    """Images of a folder replayed in name order at a set frame rate."""

    def __init__(
        self,
        folder: Path,
        fps: float = 0.0,
        loop: bool = False,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not folder.is_dir():
            raise CameraError(f"folder: {folder} is not a folder")
        self._paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self._paths:
            raise CameraError(f"folder: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self._period = 1.0 / fps if fps > 0 else 0.0
        self._loop = loop
        self._index = 0
        self._next_time = time.monotonic()
        self._sleep = sleep

    def read(self) -> Frame | None:
        while True:
            if self._index >= len(self._paths):
                if not self._loop:
                    return None
                self._index = 0
            path = self._paths[self._index]
            self._index += 1
            frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if frame is not None:
                break
            log.warning("folder: skipping %s: not an image OpenCV can read", path)
        if self._period:
            delay = self._next_time - time.monotonic()
            if delay > 0:
                self._sleep(delay)
            self._next_time = max(self._next_time + self._period, time.monotonic())
        return np.asarray(frame, dtype=np.uint8)

    def close(self) -> None:
        self._paths = []


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
        self._last_read = time.monotonic()
        try:
            return self._read()
        finally:
            self._last_read = time.monotonic()

    def _read(self) -> Frame | None:
        with self._lock:
            if self._ended:
                return None
            if self._source is None and not self._try_open():
                return None
            assert self._source is not None
            try:
                frame = self._source.read()
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
    if config.kind == "picamera2":
        return Picamera2Source(config.width, config.height, config.fps)
    if config.kind == "folder":
        assert config.folder is not None  # checked by CameraConfig
        return FolderSource(config.folder, config.fps, config.loop)
    return OpenCVSource(
        config.opencv_device(), config.width, config.height, config.fps, config.loop
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
