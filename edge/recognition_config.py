"""Configuration of the doorbell's camera, face detection, recognition and Home Assistant.

The edge node's config includes these as its `camera:`, `detection:`,
`recognition:` and `home_assistant:` sections. Unknown keys are an error so a
typo in YAML is reported, not silently replaced by a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from fedbell.config import Cosine, Count, NonNegativeSeconds, PositiveCount, Seconds, StrictModel
from fedbell.errors import ConfigError
from fedbell.redact import redact


class CameraConfig(StrictModel):
    enabled: bool = True
    """Watch this camera and publish visitor events; off for a node that only trains (the
    simulation, a test bench)"""
    kind: Literal["picamera2", "opencv", "folder"] = "opencv"
    """picamera2 (Pi camera via libcamera), opencv (USB index, RTSP/HTTP URL or video file) or
    folder (replay images in name order)"""
    device: int | str = 0
    """For kind=opencv: a USB camera index, an rtsp:// or http:// URL, or a video file path"""
    device_file: Path | None = None
    """For kind=opencv: a file holding the camera URL, credentials included (e.g.
    ${CREDENTIALS_DIRECTORY}/camera-url from systemd's LoadCredential=), read at start; replaces
    `device`, so no password sits in the world-readable YAML"""
    folder: Path | None = None
    """For kind=folder: the folder of images to replay"""
    fps: float = Field(default=15.0, gt=0, le=120)
    """Frames per second requested from the camera (the replay rate for folders)"""
    width: int = Field(default=640, ge=16, le=4096)
    """Frame width in pixels"""
    height: int = Field(default=480, ge=16, le=4096)
    """Frame height in pixels; with two streams the small stream keeps the large one's aspect ratio,
    so its height follows `width` instead"""
    full_width: int | None = Field(default=1536, ge=16, le=8192)
    """Two streams: faces are detected and tracked on the small stream (`width`) and each aligned
    chip is cut from this full-resolution stream of the same instant (Picamera2's main stream beside
    its lores one; for OpenCV cameras the resolution requested, detection running on a scaled-down
    copy). 1536x864 suits a Pi 4 with a Camera Module 3; on a Pi Zero 2 W use 1280x720 (less memory
    per buffer); unset (null), or not wider than `width`, for one stream. A camera that cannot give
    it falls back to one stream with a warning"""
    full_height: int | None = Field(default=864, ge=16, le=8192)
    """Height of the full-resolution stream (set with `full_width`)"""
    loop: bool = False
    """Start a folder or video file again when it ends"""
    reconnect_initial_s: Seconds = 1.0
    """Seconds before the first attempt to reopen a lost camera"""
    reconnect_max_s: Seconds = 30.0
    """The reconnect delay doubles after each failure up to this many seconds"""

    @model_validator(mode="after")
    def _no_password_in_yaml(self) -> CameraConfig:
        if isinstance(self.device, str) and redact(self.device) != self.device:
            raise ValueError(
                "camera.device carries credentials: put the URL in a file readable by the "
                "service only and name it in camera.device_file"
            )
        return self

    def full_size(self) -> tuple[int, int] | None:
        """(width, height) of the full-resolution stream; None for one stream."""
        if self.full_width is None or self.full_height is None or self.full_width <= self.width:
            return None
        return self.full_width, self.full_height

    @property
    def replays(self) -> bool:
        """A recording (an image folder or a video file), not a live camera."""
        if self.kind == "folder":
            return True
        device = self.device
        return (
            self.kind == "opencv"
            and self.device_file is None
            and isinstance(device, str)
            and not device.isdigit()
            and "://" not in device
        )

    def opencv_device(self) -> int | str:
        """`device`, or the URL in `device_file` (read now; its text is never logged)."""
        if self.device_file is None:
            return self.device
        try:
            url = self.device_file.read_text().strip()
        except OSError as err:
            raise ConfigError(
                f"camera.device_file: cannot read {self.device_file}: {err.strerror}"
            ) from None
        if not url:
            raise ConfigError(f"camera.device_file: {self.device_file} is empty")
        return url

    @model_validator(mode="after")
    def _source_is_complete(self) -> CameraConfig:
        if self.kind == "folder" and self.folder is None:
            raise ValueError("camera.kind is 'folder' but camera.folder is not set")
        if (self.full_width is None) != (self.full_height is None):
            raise ValueError("camera.full_width and camera.full_height: set both or neither")
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("camera.reconnect_max_s must be >= camera.reconnect_initial_s")
        return self


class DetectionConfig(StrictModel):
    kind: Literal["blazeface", "haar"] = "blazeface"
    """blazeface (MediaPipe's model on LiteRT: boxes and eyes, so chips are aligned by the eyes) or
    haar (OpenCV's cascade: boxes only); BlazeFace falls back to Haar, with a warning, when its
    model files are missing"""
    model: Literal["full_range", "short_range"] = "full_range"
    """full_range finds faces ~25-40 px wide (a visitor a few metres away); short_range is faster
    but needs faces close to the camera"""
    min_score: float = Field(default=0.5, gt=0.0, lt=1.0)
    """BlazeFace: detections scoring below this are dropped"""
    downscale: float = Field(default=0.5, gt=0.05, le=1.0)
    """Haar: frames are resized by this factor before detection so the cascade keeps up with the
    camera; boxes are mapped back to full size"""
    min_face_px: int = Field(default=60, ge=8)
    """Haar: smallest face side, in full-frame pixels, worth recognising"""
    scale_factor: float = Field(default=1.1, gt=1.0, lt=2.0)
    """Haar: the cascade's scale step (detectMultiScale scaleFactor)"""
    min_neighbors: PositiveCount = 5
    """Haar: detectMultiScale minNeighbors; higher means fewer false detections"""
    max_faces: PositiveCount = 4
    """Only the largest faces of a frame are recognised"""
    cascade: str = "haarcascade_frontalface_default.xml"
    """Haar: a file name in cv2.data.haarcascades or a path"""


class RecognitionConfig(StrictModel):
    threshold: Cosine | None = None
    """Cosine similarity to the nearest enrolled person below which a face is 'unknown'; unset uses
    the threshold the aggregator calibrated on real strangers and ships with each global model"""
    default_threshold: Cosine = 0.5
    """Used only before any global model (and its threshold) arrived"""
    debounce_s: NonNegativeSeconds = 30.0
    """At most one visitor event per person in this many seconds"""
    confirm_frames: PositiveCount = 5
    """A visit (one face followed across frames) is named from the mean embedding of its best
    this many chips: one visitor event (5 frames is a third of a second at 15 fps; more frames,
    steadier names)"""
    visit_frames: PositiveCount | None = 8
    """A visit is decided once it has this many frames, from its best `confirm_frames` chips among
    them (largest, sharpest, most frontal): 8 at 15 fps picks the best 5 of half a second (visit
    TAR at 1 % FAR +2.1 points for faces from a 640x480 frame, +1.6 cut from the full stream,
    against deciding after 5: `bench.openset`, issue 20). A visit that ends sooner is decided
    when it ends, if it has `confirm_frames`. Null: `confirm_frames` (decided as soon as it can
    be; a ring later in the visit still takes its best chips so far)"""
    ring_on_face_frames: Count = 0
    """Ring when a face has been seen for this many consecutive frames; 0 turns the face trigger
    off"""
    ring_button_pin: int | None = Field(default=None, ge=0)
    """BCM pin of the push button (needs gpiozero); unset for no button"""
    absent_after_s: Seconds = 5.0
    """The person-present sensor turns off, and a visit ends, after this many seconds without a
    face"""
    replay_absent_after_frames: PositiveCount = 3
    """For a replay (camera.kind folder, or a video file), which runs on its own time (frames x
    1/camera.fps, whatever the machine's speed): a visit ends when its face is missing from this
    many frames in a row, instead of after absent_after_s (a replay's visitors are often only a few
    empty frames apart)"""
    replay_debounce_s: NonNegativeSeconds = 0.0
    """For a replay: replaces debounce_s (0: each visit of the replay is an event)"""
    snapshot: bool = False
    """Publish a JPEG of the frame with each visitor or ring event (off: no image leaves the
    device)"""
    snapshot_quality: int = Field(default=80, ge=10, le=100)
    """Quality of snapshot JPEGs"""
    event_crops_max: Count = 200
    """How many recent event face chips are kept (in memory) for labelling"""
    event_crops_max_age_s: Seconds = 3600.0
    """Event face chips older than this can no longer be labelled"""

    @model_validator(mode="after")
    def _visit_covers_its_chips(self) -> RecognitionConfig:
        # The default gives way to a larger confirm_frames; a value set must cover it.
        chosen = "visit_frames" in self.model_fields_set
        if chosen and self.visit_frames is not None and self.visit_frames < self.confirm_frames:
            raise ValueError(
                f"recognition.visit_frames ({self.visit_frames}) must be at least "
                f"recognition.confirm_frames ({self.confirm_frames})"
            )
        return self

    def decision_frames(self) -> int:
        """Frames after which a visit is decided: `visit_frames`, at least `confirm_frames`."""
        return max(self.visit_frames or self.confirm_frames, self.confirm_frames)

    def for_replay(self, fps: float) -> RecognitionConfig:
        """These settings with the replay's visit timeout and debounce, in replay seconds.

        Half a frame more than the frames: a track seen `frames` frames ago still
        continues, one more and it has ended (the tracker drops it at >= the timeout).
        """
        return self.model_copy(
            update={
                "absent_after_s": (self.replay_absent_after_frames + 0.5) / fps,
                "debounce_s": self.replay_debounce_s,
            }
        )


class HomeAssistantConfig(StrictModel):
    enabled: bool = True
    """Publish Home Assistant MQTT device discovery"""
    discovery_prefix: str = Field(default="homeassistant", min_length=1)
    """Home Assistant's discovery topic prefix"""
    topic_root: str = Field(default="doorbell", min_length=1)
    """Events go to <topic_root>/<device>/..."""
    device_name: str | None = None
    """Name shown in Home Assistant (default: the device id)"""
