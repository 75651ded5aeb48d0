"""A frame, and the two streams of one instant a doorbell detects on and cuts chips from.

`FramePair` is what every frame source gives (edge/camera.py): the small frame
detection and tracking run on and, with two streams, the full-resolution frame
of the same instant, given or read when a chip needs it. `StreamSplitter` makes
a pair from one large frame (OpenCV cameras, folders of large images).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import cv2
import numpy as np
import numpy.typing as npt

log = logging.getLogger("edge.camera")

Frame = npt.NDArray[np.uint8]
"""A BGR (or grey) image, height × width × 3."""


@dataclass(frozen=True)
class FramePair:
    """The frame detection runs on and, with two streams, the full-resolution frame
    of the same instant, each with its capture time (seconds; any clock, one per source).

    The full frame is either given (`full`) or read when a chip needs it
    (`fetch_full`): a replay holding both streams decodes the large one only for
    frames with a face, as the small one is all a frame without a face needs.
    """

    small: Frame
    small_time: float
    full: Frame | None = None
    full_time: float | None = None
    fetch_full: Callable[[], Frame | None] | None = field(default=None, compare=False)

    @property
    def matched(self) -> bool:
        """Both frames were captured at the same instant: chips may be cut from `full`."""
        return self.two_streams and self.full_time == self.small_time

    @property
    def two_streams(self) -> bool:
        """The source gave (or can give) a full-resolution frame beside the small one."""
        return self.full is not None or self.fetch_full is not None

    @cached_property
    def full_frame(self) -> Frame | None:
        """The full-resolution frame, read once on first use (None: one stream, or a
        replay's large frame that cannot be read)."""
        if self.full is not None or self.fetch_full is None:
            return self.full
        return self.fetch_full()

    def scale(self) -> tuple[float, float]:
        """(x, y) factors from small-frame pixels to full-frame pixels."""
        full = self.full_frame
        if full is None:
            return 1.0, 1.0
        return (
            full.shape[1] / self.small.shape[1],
            full.shape[0] / self.small.shape[0],
        )


def small_size(full_width: int, full_height: int, width: int) -> tuple[int, int]:
    """The small stream's size: `width` wide, the full stream's aspect ratio (even sizes,
    as libcamera's YUV420 wants)."""
    height = max(2, round(width * full_height / full_width / 2) * 2)
    return width - width % 2, height


class StreamSplitter:
    """Makes a pair from one full-resolution frame: the frame and a copy `width` wide.

    A frame not wider than `width` (a camera or replay that cannot give the large
    stream) makes a one-stream pair, with one warning per source.
    """

    def __init__(self, width: int, label: str) -> None:
        self.width = width
        self.label = label
        self._warned = False

    def pair(self, frame: Frame, timestamp: float) -> FramePair:
        height, width = frame.shape[:2]
        if width <= self.width:
            if not self._warned:
                self._warned = True
                log.warning(
                    "camera %s: frames are %dx%d, not wider than the small stream's %d px: "
                    "one stream (chips cut from the frame detection runs on)",
                    self.label,
                    width,
                    height,
                    self.width,
                )
            return FramePair(frame, timestamp)
        size = small_size(width, height, self.width)
        # Bilinear, not area averaging: 1.2 against 40 ms for 1536x864 -> 640x360 on this
        # machine, and the detector resizes to its own 128/192 px input anyway.
        small = cv2.resize(frame, size, interpolation=cv2.INTER_LINEAR)
        return FramePair(np.asarray(small, np.uint8), timestamp, frame, timestamp)
