"""The aggregator's state on disk, written so a crash never leaves half of it.

One small JSON file, `state.json`, is the commit point: it holds the model
version, the round (announcement, received devices, counters) and names the
current model's arrays (`model-*.npz`), the open round's accumulator
(`sum-*.npz`: running sum or buffered deltas), the server optimiser's moments
(`optimizer-*.npz`) and the last retained payloads (`global-*.bin`,
`tflite-*.bin`, `metrics-*.bin`, republished on every start). Big files are written
first under fresh names; then `state.json` is replaced atomically (temporary
file in the same folder, fsync, os.replace, fsync of the folder); files it no
longer names are deleted afterwards. So after a crash at any point, the state
is either the old one or the new one, never a model of one version with the
counters of another.

Arrays are saved with `np.savez` and read with `allow_pickle=False`: nothing
in the folder can execute code when loaded.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from fedbell.errors import FedbellError
from fedbell.wire.protocol import RoundAnnouncement

STATE_FILE = "state.json"
PREFIXES = ("model", "sum", "optimizer", "global", "tflite", "metrics")
"""Prefixes of the files this module writes; only those are ever deleted."""

RoundStatus = Literal["collecting", "aggregated", "closed", "abandoned"]


class StateError(FedbellError):
    """The state folder is unreadable or inconsistent."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelRecord(_Record):
    lineage: str = Field(
        default="", description="The model's history id; empty in states older than lineages."
    )
    version: int = Field(ge=0)
    epoch: int = Field(
        default=0,
        ge=0,
        description="The lineage's epoch (ms since 1970 when it started): doorbells refuse a "
        "head of a lineage whose epoch is not above the one they run (a replayed old lineage).",
    )
    round: int = Field(ge=0, description="Round that produced it (0: the initial model).")
    names: tuple[str, ...]
    file: str
    optimizer: str | None = Field(
        default=None, description="Server optimiser whose moments `optimizer_file` holds."
    )
    optimizer_file: str | None = None
    optimizer_steps: int = Field(default=0, ge=0)


class RoundRecord(_Record):
    announcement: RoundAnnouncement
    status: RoundStatus
    manual: bool
    started_at: float
    received: tuple[str, ...] = ()
    examples: int = 0
    bytes_up: int = 0
    announce_bytes: int = 0
    rejected: dict[str, int] = Field(default_factory=dict)
    total_weight: int = 0
    strategy: str = Field(default="fedavg", description="rounds.strategy when it started.")
    weighting: Literal["houses", "examples"] = Field(
        default="examples",
        description="rounds.weighting when it started (rounds saved before the setting existed "
        "weighed by examples).",
    )
    sum_file: str | None = Field(
        default=None,
        description="The accumulator's arrays: the running sum (fedavg, "
        "clipped) or the buffered deltas (median, trimmed_mean).",
    )


class StateRecord(_Record):
    model: ModelRecord
    round: RoundRecord | None = None
    last_round: int = Field(default=0, ge=0)
    noised_rounds: int = Field(
        default=0,
        ge=0,
        description="Secure rounds whose noised sum was unmasked, every lineage: what the "
        "privacy accountant counts (a new lineage does not give the houses' privacy back).",
    )
    retained: dict[str, str] = Field(
        default_factory=dict, description="Retained topic name -> payload file to republish."
    )


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StateStore:
    """Reads and atomically writes the state folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @property
    def path(self) -> Path:
        return self.folder / STATE_FILE

    def _write_new(self, prefix: str, suffix: str, data: bytes) -> str:
        """Write `data` under a fresh name, durably; return the name."""
        if prefix not in PREFIXES:
            raise ValueError(f"unknown state file prefix {prefix!r}")
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{prefix}-{uuid.uuid4().hex[:12]}{suffix}"
        temporary = self.folder / f"{name}.tmp"
        with temporary.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(self.folder / name)
        return name

    def write_arrays(self, prefix: str, arrays: Sequence[npt.NDArray[np.floating]]) -> str:
        buffer = io.BytesIO()
        np.savez(buffer, *arrays)  # stored as arr_0, arr_1, ... in order
        return self._write_new(prefix, ".npz", buffer.getvalue())

    def read_arrays(self, name: str) -> list[npt.NDArray[np.floating]]:
        try:
            with np.load(self.folder / name, allow_pickle=False) as data:
                return [np.array(data[f"arr_{i}"]) for i in range(len(data.files))]
        except (OSError, ValueError, KeyError) as err:
            raise StateError(f"{self.folder / name}: cannot read arrays: {err}") from None

    def write_blob(self, prefix: str, data: bytes) -> str:
        return self._write_new(prefix, ".bin", data)

    def read_blob(self, name: str) -> bytes:
        try:
            return (self.folder / name).read_bytes()
        except OSError as err:
            raise StateError(f"{self.folder / name}: {err.strerror}") from None

    def load(self) -> StateRecord | None:
        """The committed state, or None on first start."""
        if not self.path.exists():
            return None
        try:
            return StateRecord.model_validate_json(self.path.read_bytes())
        except (OSError, ValueError) as err:
            raise StateError(f"{self.path}: unreadable state: {err}") from None

    def commit(self, record: StateRecord) -> None:
        """Make `record` the state, then delete files it no longer names."""
        self.folder.mkdir(parents=True, exist_ok=True)
        temporary = self.folder / f"{STATE_FILE}.tmp"
        with temporary.open("wb") as handle:
            handle.write(record.model_dump_json(indent=1).encode())
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(self.path)
        _fsync_dir(self.folder)
        self._collect_garbage(record)

    def _collect_garbage(self, record: StateRecord) -> None:
        keep = {record.model.file, *record.retained.values()}
        if record.model.optimizer_file is not None:
            keep.add(record.model.optimizer_file)
        if record.round is not None and record.round.sum_file is not None:
            keep.add(record.round.sum_file)
        for path in self.folder.iterdir():
            owned = path.name.split("-", 1)[0] in PREFIXES and path.suffix in (
                ".npz",
                ".bin",
                ".tmp",
            )
            if owned and path.name not in keep:
                path.unlink(missing_ok=True)
