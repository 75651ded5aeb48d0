"""The federation on one machine: generated configs and keys, then one process per role.

Each process gets the YAML a provisioned Pi or server would get, pointing at
the local broker; the only simulation-specific settings are the folders and
one TensorFlow thread per node (the demo machine has two cores).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from rich.console import Console

from aggregator.config import DEFAULT_MAX_ACCURACY_LOSS, DEFAULT_MIN_COHORT
from broker.local import read_listeners
from console import page_url, start_round_line
from fedbell.config import MqttSettings
from fedbell.wire.messages import AGGREGATOR
from fedbell.wire.signing import load_public_key, write_key_pair
from fedbell.wire.topics import Topics
from simulation.config import SimulationConfig
from simulation.processes import Fleet

SITE = "sim"
CACHE_DIR = Path(".cache/fedbell")
"""The converted backbone and photo features, kept between runs (git-ignored)."""
NODE_THREADS = 1
AGGREGATOR_DEADLINE_SHARE = 0.75
"""The aggregator's own round deadline, as a share of the driver's timeout: a
round with a missing update still closes and reports before the driver gives up."""

# TensorFlow reads these before it starts its thread pools; the edge config's
# `training.threads` says the same, this also covers imports that run first.
SINGLE_THREAD_ENV = {
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
    "OMP_NUM_THREADS": "1",
}
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class Layout:
    """Where everything of one run lives inside the work folder."""

    root: Path
    logs: Path = field(init=False)
    broker: Path = field(init=False)
    """The broker's config, persistence file and log."""
    held_out: Path = field(init=False)
    strangers: Path = field(init=False)
    """Generated strangers, when no folder of real ones is given."""

    def __post_init__(self) -> None:
        for folder in ("logs", "broker", "held_out", "strangers"):  # each named as it is
            object.__setattr__(self, folder, self.root / folder)

    def gallery(self, device: str) -> Path:
        return self.root / "nodes" / device / "gallery"

    def state(self, name: str) -> Path:
        return self.root / "state" / name

    def config(self, name: str) -> Path:
        return self.root / "configs" / f"{name}.yaml"

    def private_key(self, name: str) -> Path:
        return self.root / "keys" / f"{name}.key"

    def trusted_by(self, name: str) -> Path:
        return self.root / "keys" / f"trusted-by-{name}"


def device_ids(nodes: int) -> list[str]:
    return [f"door{i}" for i in range(1, nodes + 1)]


def write_keys(layout: Layout, devices: list[str]) -> None:
    """The aggregator trusts the doorbells' keys; each doorbell trusts the aggregator's."""
    public = layout.root / "keys" / f"{AGGREGATOR}.pub"
    write_key_pair(layout.private_key(AGGREGATOR), public)
    layout.trusted_by(AGGREGATOR).mkdir(parents=True, exist_ok=True)
    for device in devices:
        trusted = layout.trusted_by(device)
        trusted.mkdir(parents=True, exist_ok=True)
        (trusted / public.name).write_bytes(public.read_bytes())
        write_key_pair(layout.private_key(device), layout.trusted_by(AGGREGATOR) / f"{device}.pub")


def aggregator_keys(layout: Layout, config: SimulationConfig) -> dict[str, Ed25519PublicKey] | None:
    """The key a doorbell checks the aggregator's messages with (None when unsigned)."""
    if not config.signed:
        return None
    return {AGGREGATOR: load_public_key(layout.trusted_by("door1") / f"{AGGREGATOR}.pub")}


def _signing(layout: Layout, name: str, signed: bool) -> dict[str, str]:
    if not signed:
        return {}
    return {
        "private_key_file": str(layout.private_key(name)),
        "trusted_keys_dir": str(layout.trusted_by(name)),
    }


def accuracy_loss_bar(held_out: Path) -> float:
    """rounds.max_accuracy_loss for a run's evaluation folder: the default, or two of its
    faces' worth where that is coarser. Accuracy on N faces moves in steps of about 1/N,
    and a bar finer than that refuses a round for one face named differently (the
    generated demo holds 10 faces in no house, LFW's some 150)."""
    faces = sum(1 for photo in held_out.glob("*/*") if photo.is_file())
    return min(1.0, max(DEFAULT_MAX_ACCURACY_LOSS, 2 / max(faces, 1)))


def aggregator_config(
    config: SimulationConfig, layout: Layout, strangers: Path, mqtt: dict[str, Any]
) -> dict[str, Any]:
    return {
        "site": SITE,
        "mqtt": {**mqtt, "username": AGGREGATOR},
        "signing": _signing(layout, AGGREGATOR, config.signed),
        "state_dir": str(layout.state(AGGREGATOR)),
        # Outlives the run: the face network is converted once, not every demo.
        "cache_dir": str(CACHE_DIR.resolve()),
        "rounds": {
            "codec": config.codec,
            "timeout_s": round(config.round_timeout_s * AGGREGATOR_DEADLINE_SHARE, 1),
            "min_updates": 1,
            "train": {
                "epochs": config.epochs,
                "batch_size": config.batch_size,
                "learning_rate": config.learning_rate,
            },
            "seed": config.seed,
            "secure_aggregation": config.secure_aggregation,
            "min_cohort": min(max(2, config.nodes), DEFAULT_MIN_COHORT),
            # no DP: noise that protects a demo's few houses drowns their updates
            "privacy": {"epsilon_budget": None},
            "max_accuracy_loss": accuracy_loss_bar(layout.held_out),
        },
        "evaluation": {
            "dataset": str(layout.held_out),
            "strangers": str(strangers),
        },
    }


def edge_config(
    config: SimulationConfig, layout: Layout, device: str, mqtt: dict[str, Any]
) -> dict[str, Any]:
    return {
        "device_id": device,
        "site": SITE,
        "mqtt": {**mqtt, "username": device},
        "signing": _signing(layout, device, config.signed),
        "state_dir": str(layout.state(device)),
        "gallery_dir": str(layout.gallery(device)),
        "training": {"threads": NODE_THREADS},
        "camera": {"enabled": False},  # these nodes only train; live.py replays frames
    }


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def mqtt_settings(port: int) -> MqttSettings:
    return MqttSettings(host="127.0.0.1", port=port)


def topics() -> Topics:
    return Topics(SITE)


def console_banner(layout: Layout, port: int) -> str:
    """Where to watch and drive this run: the console, the broker and site, a round's command.

    The broker's websockets port (the console's) is only in its data folder,
    `layout.root / "broker"`, where the runner starts it.
    """
    ws_port = read_listeners(layout.root / "broker")["websockets"]
    return "\n".join(
        [
            f"console:  {page_url('127.0.0.1', ws_port, SITE, mqtt_port=port)}",
            f"broker:   127.0.0.1:{port} (MQTT), site {SITE}",
            f"a round:  {start_round_line('127.0.0.1', port, SITE)}",
        ]
    )


def start_federation(
    fleet: Fleet,
    config: SimulationConfig,
    layout: Layout,
    *,
    strangers: Path,
    port: int,
    devices: list[str],
) -> None:
    """Write configs (and keys), start the aggregator and every node, print the console."""
    if config.signed:
        write_keys(layout, devices)
    mqtt = {"host": "127.0.0.1", "port": port}
    env = QUIET_ENV
    path = write_yaml(layout.config(AGGREGATOR), aggregator_config(config, layout, strangers, mqtt))
    fleet.start(
        AGGREGATOR, "aggregator", ["--config", str(path)], layout.logs / f"{AGGREGATOR}.log", env
    )
    for device in devices:
        path = write_yaml(layout.config(device), edge_config(config, layout, device, mqtt))
        fleet.start(
            device,
            "edge",
            ["--config", str(path)],
            layout.logs / f"{device}.log",
            {**env, **SINGLE_THREAD_ENV},
        )
    banner = console_banner(layout, port)
    Console().print(banner, markup=False, highlight=False, soft_wrap=True)
    if config.stay:
        fleet.stay_message = (
            f"{banner}\nthe federation stays up: drive rounds from the console or with "
            "the line above; Ctrl-C stops everything"
        )
