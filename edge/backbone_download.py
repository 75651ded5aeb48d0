"""The backbone arriving in chunks: a signed manifest, then its chunks, on paho's thread.

A doorbell installs a backbone only whole and verified (`fedbell.wire.backbone`):
the manifest's signature against the aggregator's key from provisioning, every
chunk against its line of the manifest, the assembled bytes against the
manifest's sha256. A chunk that does not match is refused and counted
(`bad_chunk`) and nothing is installed; a later good copy of it still
completes the set. A manifest that replaces one whose chunks never all came
counts `incomplete_backbone`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge.artifacts import Artifacts
from fedbell.errors import RejectedMessage
from fedbell.wire.backbone import BackboneAssembly, parse_manifest
from fedbell.wire.messages import GlobalModel, TfliteArtifact
from fedbell.wire.topics import Topics

log = logging.getLogger(__name__)


def refuse_older_lineage(current: GlobalModel, lineage: str, epoch: int) -> None:
    """RejectedMessage for another lineage whose epoch is not above the running one's.

    Epochs only grow (the aggregator's clock at lineage start, signed in every model
    message), so this is a replay of an older lineage's signed head or backbone by
    someone who can publish on the model topics: a new lineage would skip the
    version and gallery gates.
    """
    if lineage != current.lineage and epoch <= current.epoch:
        raise RejectedMessage(
            "old_lineage",
            f"lineage {lineage} (epoch {epoch}) is not newer than lineage "
            f"{current.lineage} (epoch {current.epoch}) that this doorbell runs",
        )


@dataclass
class BackboneDownload:
    """Feeds manifests and chunks into one assembly; hands a complete backbone to `install`."""

    topics: Topics
    artifacts: Artifacts
    counters: Counter[str]
    _: KW_ONLY
    keys: Mapping[str, Ed25519PublicKey] | None
    max_bytes: int
    install: Callable[[TfliteArtifact], None]
    """Called (on paho's thread) with a verified backbone: it queues the install."""
    current: Callable[[], GlobalModel | None]
    """The installed global model, whose lineage an older one's manifest may not replace."""
    assembly: BackboneAssembly = field(default_factory=BackboneAssembly)

    def on_manifest(self, payload: bytes) -> None:
        manifest = parse_manifest(
            payload, site=self.topics.site, max_bytes=self.max_bytes, keys=self.keys
        )
        if (model := self.current()) is not None:
            refuse_older_lineage(model, manifest.lineage, manifest.epoch)
        if not self.artifacts.wants(manifest.lineage, manifest.version):
            log.info(
                "backbone v%d of lineage %s: already installed", manifest.version, manifest.lineage
            )
            self.assembly.expect_nothing()
            return
        lacked = self.assembly.expect(manifest)
        if lacked:
            self.counters["incomplete_backbone"] += 1
            log.warning("the previous backbone lacked %d chunks when a new manifest came", lacked)
        log.info(
            "backbone v%d of lineage %s announced: %d chunks, %d bytes",
            manifest.version,
            manifest.lineage,
            len(manifest.chunks),
            manifest.float_size + manifest.int8_size,
        )

    def on_chunk(self, topic: str, payload: bytes) -> None:
        try:
            index = self.topics.chunk_index(topic)
        except ValueError as err:
            raise RejectedMessage("bad_topic", str(err)) from None
        artifact = self.assembly.add(index, payload)
        if artifact is not None and self.artifacts.accept(artifact):
            log.info("backbone of lineage %s complete and verified", artifact.lineage)
            self.install(artifact)

    @property
    def progress(self) -> str:
        manifest = self.assembly.manifest
        if manifest is None:
            return ""
        return f"backbone {self.assembly.received}/{len(manifest.chunks)} chunks"
