"""A doorbell node's YAML configuration (see config/edge.yaml)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from fedbell.config import MqttSettings, SigningSettings, StrictModel, site_id
from fedbell.topics import check_segment


class TrainingSettings(StrictModel):
    threads: int = Field(default=1, ge=1, le=64, title="Training threads",
                         description="Cores TensorFlow may use while training.")
    max_images_per_person: int = Field(
        default=200, ge=1, title="Images per person",
        description="Newest images per person used for training; bounds time and memory.")


class EdgeConfig(StrictModel):
    device_id: str = Field(title="Device id",
                           description="This doorbell's name; also its broker user name.")
    site: str = Field(title="Site id", description="The federation (house) it belongs to.")
    mqtt: MqttSettings = Field(default_factory=MqttSettings, title="MQTT",
                               description="Broker connection.")
    signing: SigningSettings = Field(default_factory=SigningSettings, title="Signing",
                                     description="Device key and the aggregator's public key.")
    state_dir: Path = Field(title="State folder",
                            description="Current model, TFLite artifact, round bookkeeping.")
    gallery_dir: Path = Field(title="Gallery", description="Labelled face crops: "
                              "`<gallery>/<person>/<image>`. Never leaves the house.")
    training: TrainingSettings = Field(default_factory=TrainingSettings, title="Training",
                                       description="Local training limits.")

    _site = field_validator("site")(site_id)

    @field_validator("device_id")
    @classmethod
    def _device(cls, value: str) -> str:
        return check_segment(value, "device id")
