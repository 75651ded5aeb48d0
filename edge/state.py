"""What a doorbell keeps across restarts: global model (head), backbone, last round, residual,
and its local Adam's moments.

Each item is a data file plus a JSON sidecar that records the data file's
sha256. The data file is written first and the sidecar last, each through a
temporary file and `os.replace`, so a crash in between leaves a sidecar that
does not match: the item then reads as absent and the node waits for the
broker's retained copy instead of starting from a half-written model.

Weights are stored as `.npz` and read with `allow_pickle=False`; nothing
here can execute code from disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from fedbell.faces.embedding import AdamMoments
from fedbell.wire.codecs import Weights
from fedbell.wire.messages import GlobalModel

log = logging.getLogger(__name__)

GLOBAL_WEIGHTS = "global.npz"
GLOBAL_SIDECAR = "global.json"
TFLITE_MODEL = "model.tflite"
TFLITE_SIDECAR = "model.json"
ROUND_FILE = "round.json"
RESIDUAL_WEIGHTS = "residual.npz"
RESIDUAL_SIDECAR = "residual.json"
MOMENTS_WEIGHTS = "adam.npz"
MOMENTS_SIDECAR = "adam.json"
_UNREADABLE = (KeyError, TypeError, ValueError, OSError, zipfile.BadZipFile)
Stored = TypeVar("Stored")


@dataclass(frozen=True)
class KeptAdam:
    """The local Adam's state after a round's training (`adam_moments: kept`), and the
    lineage whose head it trained: a later lineage's rounds never continue it, even when a
    training of the old one finishes after the new head is installed."""

    lineage: str
    moments: AdamMoments


@dataclass(frozen=True)
class StoredArtifact:
    """The backbone TFLite model the node runs, as stored on disk (one flavour)."""

    version: int
    round: int
    flavour: str
    model: bytes
    lineage: str
    backbone_id: str
    """sha256 of the float flavour: the id global models name, whichever flavour runs."""


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data`; readers see the old or the new file, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        Path(temporary).replace(path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pack(weights: Weights) -> bytes:
    buffer = io.BytesIO()
    # Keyed by position (arr_0, ...): tensor names contain '/', which zip members
    # would turn into folders. The names live in the sidecar.
    np.savez(buffer, *weights, allow_pickle=False)
    return buffer.getvalue()


def _unpack(data: bytes, count: int) -> Weights:
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        return [np.asarray(arrays[f"arr_{i}"], dtype=np.float32) for i in range(count)]


def _kept_adam(data: bytes, sidecar: dict[str, Any]) -> KeptAdam:
    count, steps = int(sidecar["tensors"]), int(sidecar["steps"])
    arrays = _unpack(data, 2 * count)
    return KeptAdam(str(sidecar["lineage"]), AdamMoments(arrays[:count], arrays[count:], steps))


def _global_model(data: bytes, sidecar: dict[str, Any]) -> GlobalModel:
    names = tuple(str(n) for n in sidecar["names"])
    return GlobalModel(
        version=int(sidecar["version"]),
        round=int(sidecar["round"]),
        names=names,
        weights=_unpack(data, len(names)),
        lineage=str(sidecar["lineage"]),
        threshold=float(sidecar["threshold"]),
        backbone=str(sidecar["backbone"]),
        meta=dict(sidecar["meta"]),
    )


def _artifact(data: bytes, sidecar: dict[str, Any]) -> StoredArtifact:
    return StoredArtifact(
        version=int(sidecar["version"]),
        round=int(sidecar["round"]),
        flavour=str(sidecar["flavour"]),
        model=data,
        lineage=str(sidecar["lineage"]),
        backbone_id=str(sidecar["backbone_id"]),
    )


class NodeState:
    """The node's state folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _read_pair(self, data_name: str, sidecar_name: str) -> tuple[bytes, dict[str, Any]] | None:
        """(data, sidecar) if both exist and agree, else None (with a log line why)."""
        sidecar_path = self.folder / sidecar_name
        if not sidecar_path.exists():
            return None
        try:
            sidecar = json.loads(sidecar_path.read_text())
            data = (self.folder / data_name).read_bytes()
        except (OSError, ValueError) as err:
            log.warning("state: ignoring %s: %s", sidecar_path, err)
            return None
        if not isinstance(sidecar, dict) or sidecar.get("sha256") != _digest(data):
            log.warning(
                "state: %s does not match %s (interrupted write?); ignoring both",
                data_name,
                sidecar_name,
            )
            return None
        return data, sidecar

    def _load_pair(
        self,
        data_name: str,
        sidecar_name: str,
        what: str,
        parse: Callable[[bytes, dict[str, Any]], Stored],
    ) -> Stored | None:
        """`parse(data, sidecar)` of a pair that reads (`_read_pair`), else None; a pair whose
        content `parse` cannot use is logged and reads as absent too."""
        pair = self._read_pair(data_name, sidecar_name)
        if pair is None:
            return None
        try:
            return parse(*pair)
        except _UNREADABLE as err:
            log.warning("state: stored %s unusable: %s", what, err)
            return None

    def _write_pair(
        self, data_name: str, sidecar_name: str, data: bytes, sidecar: dict[str, Any]
    ) -> None:
        write_atomically(self.folder / data_name, data)
        record = {**sidecar, "sha256": _digest(data)}
        write_atomically(self.folder / sidecar_name, json.dumps(record, indent=1).encode())

    def save_global(self, model: GlobalModel) -> None:
        self._write_pair(
            GLOBAL_WEIGHTS,
            GLOBAL_SIDECAR,
            _pack(model.weights),
            {
                "version": model.version,
                "round": model.round,
                "names": list(model.names),
                "meta": dict(model.meta),
                "lineage": model.lineage,
                "threshold": model.threshold,
                "backbone": model.backbone,
            },
        )

    def load_global(self) -> GlobalModel | None:
        return self._load_pair(GLOBAL_WEIGHTS, GLOBAL_SIDECAR, "global model", _global_model)

    def save_residual(self, residual: Weights) -> None:
        """What top-k left out of the last update (error feedback); never sent as such."""
        self._write_pair(
            RESIDUAL_WEIGHTS, RESIDUAL_SIDECAR, _pack(residual), {"tensors": len(residual)}
        )

    def clear_residual(self) -> None:
        """Forget the residual (a new lineage: its head has other tensors)."""
        (self.folder / RESIDUAL_SIDECAR).unlink(missing_ok=True)
        (self.folder / RESIDUAL_WEIGHTS).unlink(missing_ok=True)

    def load_residual(self) -> Weights | None:
        return self._load_pair(
            RESIDUAL_WEIGHTS,
            RESIDUAL_SIDECAR,
            "top-k residual",
            lambda data, sidecar: _unpack(data, int(sidecar["tensors"])),
        )

    def save_moments(self, kept: KeptAdam) -> None:
        """The local Adam's state after a round's training (`adam_moments: kept`)."""
        moments = kept.moments
        self._write_pair(
            MOMENTS_WEIGHTS,
            MOMENTS_SIDECAR,
            _pack([*moments.m, *moments.v]),
            {"tensors": len(moments.m), "steps": moments.steps, "lineage": kept.lineage},
        )

    def clear_moments(self) -> None:
        """Forget the local Adam's state (a new lineage, or a plan that starts it fresh)."""
        (self.folder / MOMENTS_SIDECAR).unlink(missing_ok=True)
        (self.folder / MOMENTS_WEIGHTS).unlink(missing_ok=True)

    def load_moments(self) -> KeptAdam | None:
        return self._load_pair(MOMENTS_WEIGHTS, MOMENTS_SIDECAR, "Adam moments", _kept_adam)

    def save_artifact(self, artifact: StoredArtifact) -> None:
        self._write_pair(
            TFLITE_MODEL,
            TFLITE_SIDECAR,
            artifact.model,
            {
                "version": artifact.version,
                "round": artifact.round,
                "flavour": artifact.flavour,
                "lineage": artifact.lineage,
                "backbone_id": artifact.backbone_id,
            },
        )

    def load_artifact(self) -> StoredArtifact | None:
        # Unusable: e.g. a closed-set model's sidecar from before open-world recognition.
        return self._load_pair(TFLITE_MODEL, TFLITE_SIDECAR, "TFLite sidecar", _artifact)

    def save_last_round(self, round_id: int) -> None:
        write_atomically(self.folder / ROUND_FILE, json.dumps({"last_round": round_id}).encode())

    def load_last_round(self) -> int:
        path = self.folder / ROUND_FILE
        if not path.exists():
            return 0
        try:
            value = json.loads(path.read_text())["last_round"]
            return int(value) if isinstance(value, int) and value >= 0 else 0
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("state: %s unreadable (%s); treating as no round done", path, err)
            return 0
