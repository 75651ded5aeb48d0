"""Where `make bench-edge`'s doorbell runs, how it is configured, what it is shown.

The doorbell runs here or (`--chroot`, `make pi-check`) inside another root,
as the systemd unit runs it; the aggregator always runs here.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench.scale_site import seed_backbone_cache, signing_keys
from simulation import replay
from simulation.replay import People

SITE = "edgebench"
DEVICE = "door"
REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "fedbell-edge@.service"


def unit_environment(unit: Path) -> dict[str, str]:
    """The doorbell unit's Environment= settings (those without systemd specifiers):
    the benchmark runs the doorbell as the unit does."""
    found: dict[str, str] = {}
    for line in unit.read_text().splitlines():
        if line.startswith("Environment="):
            for item in line.removeprefix("Environment=").split():
                key, _, value = item.partition("=")
                if "%" not in value:
                    found[key] = value
    return found


@dataclass
class Layout:
    """Where things are, on this machine and as the doorbell sees them (in a chroot)."""

    work: Path
    chroot: Path | None
    python: str
    env: dict[str, str] = field(default_factory=dict)
    """Set for the doorbell's processes (the unit's Environment=)."""

    def inside(self, path: Path) -> str:
        if self.chroot is None:
            return str(path)
        return "/" + str(path.relative_to(self.chroot))

    @property
    def python_command(self) -> list[str]:
        """What starts the doorbell's Python (in the chroot, with only the unit's settings)."""
        if self.chroot is None:
            return [self.python]
        variables = {"PATH": "/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8", **self.env}
        return [
            "chroot",
            str(self.chroot),
            "/usr/bin/env",
            "-i",
            *(f"{key}={value}" for key, value in variables.items()),
            self.python,
        ]

    def command(self, *args: str) -> list[str]:
        return [*self.python_command, *args]

    @property
    def cwd(self) -> Path | None:
        return REPO if self.chroot is None else None


@dataclass(frozen=True)
class Settings:
    port: int
    frames: Path
    fps: float
    downlink: str
    codec: str
    full: tuple[int, int] | None = None
    """The camera's full-resolution stream (None: one stream, as before issue 20)."""


def write_configs(layout: Layout, settings: Settings) -> tuple[Path, Path]:
    work = layout.work
    keys_dir, trusted, aggregator_key, aggregator_pub = signing_keys(work / "keys", [DEVICE])
    doorbell_trusted = work / "doorbell-trusted"
    doorbell_trusted.mkdir()
    shutil.copyfile(aggregator_pub, doorbell_trusted / "aggregator.pub")
    state = work / "aggregator-state"
    seed_backbone_cache(state)
    aggregator = work / "aggregator.yaml"
    aggregator.write_text(
        yaml.safe_dump(
            {
                "site": SITE,
                "state_dir": str(state),
                "mqtt": {"port": settings.port, "keepalive": 60},
                "signing": {
                    "private_key_file": str(aggregator_key),
                    "trusted_keys_dir": str(trusted),
                },
                "rounds": {
                    "codec": settings.codec,
                    "downlink_codec": settings.downlink,
                    "timeout_s": 600,
                    "min_updates": 1,
                },
                "threads": 1,
            }
        )
    )
    doorbell = work / "edge.yaml"
    doorbell.write_text(
        yaml.safe_dump(
            {
                "device_id": DEVICE,
                "site": SITE,
                "mqtt": {"host": "127.0.0.1", "port": settings.port, "keepalive": 30},
                "signing": {
                    "private_key_file": layout.inside(keys_dir / f"{DEVICE}.key"),
                    "trusted_keys_dir": layout.inside(doorbell_trusted),
                },
                "state_dir": layout.inside(work / "doorbell-state"),
                "gallery_dir": layout.inside(work / "doorbell-state" / "gallery"),
                "training": {"base_model_wait_s": 600},
                "inference": {"flavour": "int8", "threads": 1},
                "camera": {
                    "kind": "folder",
                    "folder": layout.inside(settings.frames),
                    "fps": settings.fps,
                    "loop": True,
                    "full_width": None if settings.full is None else settings.full[0],
                    "full_height": None if settings.full is None else settings.full[1],
                },
                "home_assistant": {"enabled": False},
                # Emulated (pi-check), a face frame takes ~5 s (BlazeFace and the backbone
                # under qemu): a visit's frames are further apart than the 5 s after which
                # a visitor counts as gone, so each would start a new visit.
                **({"recognition": {"absent_after_s": 60}} if layout.chroot else {}),
            }
        )
    )
    return aggregator, doorbell


def enroll(layout: Layout, config: Path, people: People) -> tuple[float, str]:
    """The doorbell's own `edge enroll --from-folder` on a folder of <person>/<photo>."""
    photos = layout.work / "people"
    for person, paths in people.enroll.items():
        (photos / person).mkdir(parents=True)
        for path in paths:
            shutil.copyfile(path, photos / person / path.name)
    return replay.enroll(
        layout.inside(config),
        layout.inside(photos),
        python=layout.python_command,
        cwd=layout.cwd,
        env=layout.env,
        timeout=3600,
    )


def show(source: Path, camera: Path) -> None:
    """Put `source`'s frames behind the camera folder's names (atomic renames)."""
    for path in sorted(source.iterdir()):
        staged = camera.parent / f".{path.name}"
        shutil.copyfile(path, staged)
        staged.replace(camera / path.name)


def full_size(args: argparse.Namespace) -> tuple[int, int] | None:
    """The camera's full-resolution stream in this run (None: one stream)."""
    if args.one_stream:
        return None
    width, height = args.full_size
    return int(width), int(height)
