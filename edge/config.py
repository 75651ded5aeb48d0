"""A doorbell node's YAML configuration (see config/edge.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from edge.plan import PlanLimits
from edge.recognition_config import (
    CameraConfig,
    DetectionConfig,
    HomeAssistantConfig,
    RecognitionConfig,
)
from fedbell.config import MqttSettings, SigningSettings, StrictModel, site_id
from fedbell.wire.topics import check_segment


class TrainingSettings(StrictModel):
    threads: int = Field(
        default=1,
        ge=1,
        le=64,
        title="Training threads",
        description="Kept for existing configs: a round trains the head with a few "
        "milliseconds of numpy on one core.",
    )
    max_images_per_person: int = Field(
        default=200,
        ge=1,
        title="Images per person",
        description="Newest images per person used for training and prototypes; bounds "
        "time and memory.",
    )
    base_model_wait_s: float = Field(
        default=120.0,
        gt=0,
        title="Wait for the base model (s)",
        description="How long a selected node waits for the round's base model to arrive "
        "(it may come just after the round message) before it skips the round.",
    )
    max_strangers: int = Field(
        default=200,
        ge=0,
        le=10_000,
        title="Stranger store",
        description="Backbone features of this many recent 'unknown' visitors are kept in the "
        "state folder as training negatives (the oldest go first); they never leave the "
        "doorbell. 0 keeps none.",
    )


class InferenceSettings(StrictModel):
    flavour: Literal["int8", "float"] = Field(
        default="int8",
        title="Backbone flavour",
        description="Which of the aggregator's two backbone flatbuffers to run: int8 is "
        "faster on a Pi, float a little more accurate.",
    )
    threads: int = Field(
        default=1,
        ge=1,
        le=16,
        title="Inference threads",
        description="Interpreter threads for recognition.",
    )


class EdgeConfig(StrictModel):
    device_id: str = Field(
        title="Device id", description="This doorbell's name; also its broker user name."
    )
    site: str = Field(title="Site id", description="The federation (house) it belongs to.")
    mqtt: MqttSettings = Field(
        default_factory=MqttSettings, title="MQTT", description="Broker connection."
    )
    signing: SigningSettings = Field(
        default_factory=SigningSettings,
        title="Signing",
        description="Device key and the aggregator's public key.",
    )
    state_dir: Path = Field(
        title="State folder",
        description="Current head, backbone, round bookkeeping, cached gallery features and "
        "the stranger store.",
    )
    gallery_dir: Path = Field(
        title="Gallery",
        description="Aligned face chips: `<gallery>/<person>/<image>` (any other photo is "
        "detected and aligned when read). Never leaves the house.",
    )
    gallery_rescan_s: float = Field(
        default=30.0,
        gt=0,
        title="Gallery rescan (s)",
        description="How often the status is re-published if enrollment or labelling changed "
        "the gallery (recognition itself notices a change within a second).",
    )
    training: TrainingSettings = Field(
        default_factory=TrainingSettings, title="Training", description="Local training limits."
    )
    accept: PlanLimits = Field(
        default_factory=PlanLimits,
        title="Accepted training plans",
        description="Bounds on the epochs, batch size and learning rate a round may ask for; "
        "a round outside them is refused and counted (plan_out_of_bounds).",
    )
    inference: InferenceSettings = Field(
        default_factory=InferenceSettings,
        title="Inference",
        description="Which TFLite model recognises faces.",
    )
    camera: CameraConfig = Field(
        default_factory=CameraConfig,
        title="Camera",
        description="Frame source for recognition and enrollment.",
    )
    detection: DetectionConfig = Field(
        default_factory=DetectionConfig,
        title="Face detection",
        description="BlazeFace (default) or Haar, and the Haar fallback's settings.",
    )
    recognition: RecognitionConfig = Field(
        default_factory=RecognitionConfig,
        title="Recognition",
        description="Unknown-visitor threshold, debouncing, ring triggers, snapshots.",
    )
    home_assistant: HomeAssistantConfig = Field(
        default_factory=HomeAssistantConfig,
        title="Home Assistant",
        description="MQTT discovery and doorbell event topics.",
    )

    _site = field_validator("site")(site_id)

    @field_validator("device_id")
    @classmethod
    def _device(cls, value: str) -> str:
        return check_segment(value, "device id")
