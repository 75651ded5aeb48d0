"""A doorbell node's YAML configuration (see config/edge.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from edge.plan import PlanLimits
from edge.recognition_config import (
    CameraConfig,
    DetectionConfig,
    HomeAssistantConfig,
    RecognitionConfig,
)
from fedbell.config import (
    DeviceId,
    MqttSettings,
    PositiveCount,
    Seconds,
    SigningSettings,
    SiteId,
    StrictModel,
    Threads,
)


class TrainingSettings(StrictModel):
    threads: Threads = 1
    """Kept for existing configs: a round trains the head with a few milliseconds of numpy on one
    core."""
    max_images_per_person: PositiveCount = 200
    """Newest images per person used for training and prototypes; bounds time and memory."""
    base_model_wait_s: Seconds = 120.0
    """How long a selected node waits for the round's base model to arrive (it may come just after
    the round message) before it skips the round."""
    max_strangers: int = Field(default=200, ge=0, le=10_000)
    """Backbone features of this many recent 'unknown' visitors are kept in the state folder as
    training negatives (the oldest go first); they never leave the doorbell. 0 keeps none."""


class InferenceSettings(StrictModel):
    flavour: Literal["int8", "float"] = "int8"
    """Which of the aggregator's two backbone flatbuffers to run: int8 is faster on a Pi, float a
    little more accurate."""
    threads: int = Field(default=1, ge=1, le=16)
    """Interpreter threads for recognition."""


class EdgeConfig(StrictModel):
    device_id: DeviceId
    """This doorbell's name; also its broker user name."""
    site: SiteId
    """The federation (house) it belongs to."""
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    """Broker connection."""
    signing: SigningSettings = Field(default_factory=SigningSettings)
    """Device key and the aggregator's public key."""
    state_dir: Path
    """Current head, backbone, round bookkeeping, cached gallery features and the stranger store."""
    gallery_dir: Path
    """Aligned face chips: `<gallery>/<person>/<image>` (any other photo is detected and aligned
    when read). Never leaves the house."""
    gallery_rescan_s: Seconds = 30.0
    """How often the status is re-published if enrollment or labelling changed the gallery
    (recognition itself notices a change within a second)."""
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    """Local training limits."""
    accept: PlanLimits = Field(default_factory=PlanLimits)
    """Bounds on the epochs, batch size and learning rate a round may ask for; a round outside them
    is refused and counted (plan_out_of_bounds)."""
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    """Which TFLite model recognises faces."""
    camera: CameraConfig = Field(default_factory=CameraConfig)
    """Frame source for recognition and enrollment."""
    detection: DetectionConfig = Field(default_factory=DetectionConfig)
    """BlazeFace (default) or Haar, and the Haar fallback's settings."""
    recognition: RecognitionConfig = Field(default_factory=RecognitionConfig)
    """Unknown-visitor threshold, debouncing, ring triggers, snapshots."""
    home_assistant: HomeAssistantConfig = Field(default_factory=HomeAssistantConfig)
    """MQTT discovery and doorbell event topics."""
