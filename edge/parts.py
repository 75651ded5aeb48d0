"""What the doorbell node's parts share, built once by `EdgeNode` and handed to each."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge.artifacts import Artifacts
from edge.config import EdgeConfig
from edge.gallery import Gallery, StrangerStore
from edge.recognizer import Recognizer
from edge.state import NodeState


@dataclass(frozen=True)
class DoorbellParts:
    """One doorbell's configuration, stores, recognizer and counters."""

    config: EdgeConfig
    state: NodeState
    """The state folder: the global model, the last round, the top-k residual."""
    gallery: Gallery
    strangers: StrangerStore
    recognizer: Recognizer
    artifacts: Artifacts
    """The installed backbone and the gallery's score under it."""
    counters: Counter[str]
    """Dropped messages and failed jobs, by reason."""
    keys: dict[str, Ed25519PublicKey] | None
    """The aggregator's public key, if models and rounds must be signed (None: unsigned)."""

    @property
    def device(self) -> str:
        return self.config.device_id
