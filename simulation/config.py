"""The simulation's settings: a strict YAML model that command-line flags override."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from fedbell.config import Epochs, LearningRate, Seconds, StrictModel, UpdateCodec, load_config
from fedbell.errors import ConfigError
from fedbell.faces.embedding import TrainParams


class SyntheticSettings(StrictModel):
    persons: int = Field(default=20, ge=2, le=99)
    """Generated identities when no dataset folder is given."""
    images_per_person: int = Field(default=10, ge=3, le=1000)
    """Generated photos of each identity."""
    image_size: int = Field(default=96, ge=32, le=512)
    """Side of each generated grey photo, in pixels."""


class LiveSettings(StrictModel):
    enabled: bool = True
    """After the rounds, replay a generated doorbell video through one node's recognition pipeline
    and print its events."""
    visitors: int = Field(default=4, ge=1, le=50)
    """Residents of the doorbell's house who walk up to the door in the video (besides the newcomer
    it enrols after the rounds)."""
    strangers: int = Field(default=1, ge=0, le=50)
    """People nobody enrolled who walk up to the door."""


class SimulationConfig(StrictModel):
    dataset: Path | None = None
    """A `<person>/<image>` folder of faces; unset: LFW from ../shared/datasets when it lies beside
    the checkout, else generated identities."""
    generated: bool = False
    """Generate the faces even when real photos lie beside the checkout."""
    synthetic: SyntheticSettings = Field(default_factory=SyntheticSettings)
    """Used when `dataset` is unset."""
    nodes: int = Field(default=4, ge=1, le=32)
    """Separate edge processes, one per household, each with its gallery."""
    rounds: int = Field(default=15, ge=1, le=1000)
    """Federated rounds to run."""
    strangers: Path | None = None
    """A `<person>/<image>` folder of real strangers (one photo each is enough) the aggregator
    calibrates the unknown-visitor threshold on; unset: ../shared/datasets/lfw_strangers beside the
    checkout, else generated strangers."""
    codec: UpdateCodec = "topk"
    """float32, float16, int8 or topk (sparse) updates."""
    epochs: Epochs = TrainParams.epochs
    """Epochs each doorbell trains the head per round (on cached features: milliseconds)."""
    batch_size: int = Field(default=TrainParams.batch_size, ge=1, le=1024)
    """Local training batch size."""
    learning_rate: LearningRate = TrainParams.learning_rate
    """Adam learning rate, nodes and baseline alike."""
    seed: int = 0
    """Seeds data generation, the split, the model and training."""
    secure_aggregation: bool = True
    """Doorbells mask their updates so the aggregator sees only each round's sum; every doorbell is
    the cohort's floor (min_cohort = nodes, at most 5), so a round that loses one below it is
    abandoned rather than unmasked."""
    seeds: int = Field(default=3, ge=0, le=20)
    """After the MQTT run, the same learning in one process on households dealt with this many seeds
    (from `seed`): start, federated and central per seed, and the federation's gain with its spread
    (0: skip)."""
    signed: bool = True
    """Give every process an Ed25519 key, as in production."""
    # the first start converts dlib's network to TFLite (1-2 min)
    startup_timeout_s: Seconds = 600.0
    """How long to wait for every node to be online."""
    round_timeout_s: Seconds = 300.0
    """How long to wait for one round's metrics."""
    report: Path = Path("reports/demo.json")
    """JSON report path; the plot goes beside it (.png)."""
    workdir: Path | None = None
    """Where configs, galleries and logs go; unset: a fresh temporary folder."""
    keep: bool | None = None
    """Keep the temporary work folder at the end (true) or delete it (false); unset: kept after
    --stay (its doorbells may hold people enrolled by hand), else deleted."""
    stay: bool = False
    """After the scripted rounds, keep the broker, the aggregator, the doorbells and the console
    running until Ctrl-C, to drive more rounds from the console or with mosquitto_pub."""
    live: LiveSettings = Field(default_factory=LiveSettings)
    """The replayed-video demo after the rounds."""

    @model_validator(mode="after")
    def _cohort(self) -> SimulationConfig:
        if self.secure_aggregation and self.nodes < 2:
            raise ValueError(
                "secure_aggregation needs at least 2 nodes (a sum of one is no secret)"
            )
        return self


def load(path: Path | None, overrides: dict[str, Any]) -> SimulationConfig:
    """The YAML file (or defaults) with every non-None override applied and re-validated."""
    base = load_config(path, SimulationConfig) if path is not None else SimulationConfig()
    merged = base.model_dump()
    merged.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return SimulationConfig.model_validate(merged)
    except ValidationError as err:  # only a command-line value can be wrong here
        raise ConfigError(
            "; ".join(
                f"--{'.'.join(str(p) for p in problem['loc'])}: {problem['msg']}"
                for problem in err.errors()
            )
        ) from None
