"""The coordinator's state folder: loading or creating it at start, writing and committing it.

The coordinator decides when to commit (always before it publishes, so a
restart republishes exactly what was committed); this module decides what a
commit holds: the model and its optimiser moments, the round with its
accumulator, and the retained payloads. The folder outlives the config, so
loading checks that the saved model still fits the head this aggregator
trains; one that does not (a state from before lineages, another model
architecture) is left behind and a new lineage starts, which doorbells accept.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Container
from dataclasses import dataclass

import numpy as np

from aggregator.accumulator import make_optimizer, restore
from aggregator.config import AggregatorConfig
from aggregator.export import Exporter, Release
from aggregator.robust import ServerOptimizer
from aggregator.rounds import Round
from aggregator.state import ModelRecord, RoundStatus, StateError, StateRecord, StateStore
from aggregator.strategy import InconsistentUpdate
from fedbell.faces.embedding import HEAD_NAMES, LAST_LEVEL_NAMES
from fedbell.wire.codecs import Weights

log = logging.getLogger("aggregator")

OPEN: tuple[RoundStatus, ...] = ("collecting", "aggregated")
"""Statuses of a round that has not ended: only such a round needs its accumulator."""


@dataclass
class SavedModel:
    """The current model version and the files that hold it."""

    lineage: str
    version: int
    round: int
    weights: Weights
    file: str
    optimizer: ServerOptimizer | None = None
    """The server optimiser's moments after the step that made this version."""
    optimizer_file: str | None = None
    epoch: int = 0
    """The lineage's epoch, carried (signed) in every model message; see `new_epoch`."""


@dataclass(frozen=True)
class Resumed:
    """What a restart carries on from."""

    model: SavedModel
    round: Round | None
    last_round: int
    noised_rounds: int = 0


class Persistence:
    """Which files hold the committed state, and writing the next one."""

    def __init__(self, config: AggregatorConfig, exporter: Exporter, store: StateStore) -> None:
        self.config = config
        self.exporter = exporter
        self.store = store
        self.retained: dict[str, str] = {}
        """Retained payload name ("global", "metrics") -> its file."""
        # The accumulator file of a round, by round id: written by `save_accumulator`,
        # named by the commits while that round is open.
        self._sum: tuple[int, str] | None = None
        # (last round, noised rounds) of a state left behind for a new lineage: round ids
        # go on growing and the privacy accountant keeps counting what the houses spent.
        self._carried = (0, 0)

    # -- start -------------------------------------------------------------------

    def load(self) -> Resumed | None:
        """The committed state, checked against the configuration; None on first start."""
        record = self.store.load()
        if record is None:
            return None
        weights = [
            np.asarray(a, dtype=np.float32) for a in self.store.read_arrays(record.model.file)
        ]
        expected = self.exporter.specs(self.exporter.initial_weights())
        trainable = {HEAD_NAMES, LAST_LEVEL_NAMES}
        if record.model.lineage and record.model.names in trainable - {self.exporter.names}:
            # rounds.trainable changed: the other model needs the other backbone, so it is
            # a new lineage (its own backbone, version 0), as a new backbone is.
            log.warning(
                "%s: rounds.trainable is now %s but the saved model (version %d, lineage %s) "
                "trains %s: starting a new lineage (doorbells follow it, with its backbone)",
                self.store.path,
                self.config.rounds.trainable,
                record.model.version,
                record.model.lineage,
                ", ".join(record.model.names),
            )
            self._carried = (record.last_round, record.noised_rounds)
            return None
        if not record.model.lineage or tuple(self.exporter.specs(weights)) != tuple(expected):
            log.warning(
                "%s: the saved model (version %d, lineage %r) is not this aggregator's "
                "embedding head: starting a new lineage (doorbells follow it)",
                self.store.path,
                record.model.version,
                record.model.lineage,
            )
            return None
        # A state from before chunked backbones saved the one-message backbone: the
        # coordinator now builds the backbone's messages at each connection instead.
        self.retained = {name: file for name, file in record.retained.items() if name != "tflite"}
        model = SavedModel(
            record.model.lineage,
            record.model.version,
            record.model.round,
            weights,
            record.model.file,
            self._load_optimizer(record.model),
            record.model.optimizer_file,
            record.model.epoch,
        )
        current = None
        if record.round is not None:
            current = self._load_round(record, [w.shape for w in weights])
        return Resumed(model, current, record.last_round, record.noised_rounds)

    def _load_round(self, record: StateRecord, shapes: list[tuple[int, ...]]) -> Round:
        saved = record.round
        assert saved is not None
        settings = self.config.rounds
        secure = saved.announcement.secagg is not None
        if saved.status in OPEN and saved.strategy != settings.strategy and not secure:
            raise StateError(
                f"{self.store.path}: round {saved.announcement.round} was started "
                f"with strategy {saved.strategy}, the config says "
                f"{settings.strategy}: set it back until the round ends"
            )
        if saved.sum_file is not None:
            self._sum = (saved.announcement.round, saved.sum_file)
        arrays = None if saved.sum_file is None else self.store.read_arrays(saved.sum_file)
        try:
            accumulator = restore(
                settings,
                shapes,
                arrays,
                total=saved.total_weight,
                count=len(saved.received),
                sparse=saved.announcement.codec == "topk",
                secure=saved.announcement.secagg is not None,
                weighting=saved.weighting,
            )
        except InconsistentUpdate as err:
            raise StateError(
                f"{self.store.path}: round {saved.announcement.round}: {err}"
            ) from None
        return Round.from_record(saved, accumulator, settings.strategy)

    def _load_optimizer(self, record: ModelRecord) -> ServerOptimizer | None:
        """The configured optimiser with its saved moments (fresh if the kind changed)."""
        optimizer = make_optimizer(self.config.rounds)
        if optimizer is None or record.optimizer_file is None:
            return optimizer
        if record.optimizer != optimizer.kind:
            log.warning(
                "server optimiser changed from %s to %s: starting from fresh moments",
                record.optimizer,
                optimizer.kind,
            )
            return optimizer
        try:
            optimizer.restore(self.store.read_arrays(record.optimizer_file), record.optimizer_steps)
        except ValueError as err:
            raise StateError(f"{self.store.path}: {err}") from None
        return optimizer

    def initialise(self) -> Resumed:
        """Create and commit model version 0: the first start's state, or a new lineage's."""
        lineage, epoch = secrets.token_hex(8), self.new_epoch()
        log.info(
            "starting lineage %s (epoch %d) in %s: model version 0",
            lineage,
            epoch,
            self.config.state_dir,
        )
        weights = self.exporter.initial_weights()
        release = self.exporter.release(
            weights, version=0, round_id=0, lineage=lineage, epoch=epoch
        )
        model = self.save_release(release, make_optimizer(self.config.rounds), lineage, epoch)
        last_round, noised_rounds = self._carried
        self.commit(model, None, last_round=last_round, noised_rounds=noised_rounds)
        return Resumed(model, None, last_round, noised_rounds)

    def new_epoch(self) -> int:
        """A new lineage's epoch: the clock in ms, and above any lineage this folder held.

        Only grows, so a doorbell can refuse a signed head of an older lineage replayed on
        model/global; the clock makes it grow across a wiped state folder too.
        """
        try:
            record = self.store.load()
        except StateError:
            record = None
        previous = record.model.epoch if record is not None else 0
        return max(int(time.time() * 1000), previous + 1)

    # -- writing -----------------------------------------------------------------

    def save_release(
        self, release: Release, optimizer: ServerOptimizer | None, lineage: str, epoch: int
    ) -> SavedModel:
        """Write a release's files (not yet committed) and return the model record."""
        self.retained["global"] = self.store.write_blob("global", release.global_payload)
        model_file = self.store.write_arrays("model", release.weights)
        optimizer_file = None
        if optimizer is not None and optimizer.steps > 0:
            optimizer_file = self.store.write_arrays("optimizer", optimizer.arrays())
        return SavedModel(
            lineage,
            release.version,
            release.round,
            release.weights,
            model_file,
            optimizer,
            optimizer_file,
            epoch,
        )

    def save_metrics(self, metrics: bytes) -> None:
        """Write a round's metrics (not yet committed): the retained ones from the next commit."""
        self.retained["metrics"] = self.store.write_blob("metrics", metrics)

    def last_metrics(self) -> bytes | None:
        """The last metrics written (committed or not): the next one's history comes from it."""
        file = self.retained.get("metrics")
        return None if file is None else self.store.read_blob(file)

    def save_accumulator(self, current: Round) -> None:
        """Write an open round's accumulator (not yet committed)."""
        self._sum = (current.id, self.store.write_arrays("sum", current.accumulator.arrays()))

    def retained_payloads(self, names: Container[str]) -> list[tuple[str, bytes]]:
        """The retained payloads of these names, in name order."""
        return [
            (name, self.store.read_blob(file))
            for name, file in sorted(self.retained.items())
            if name in names
        ]

    def commit(
        self, model: SavedModel, current: Round | None, last_round: int, noised_rounds: int = 0
    ) -> None:
        """Make this the state a restart resumes from; files it no longer names go."""
        round_record = None
        if current is not None:
            round_record = current.to_record(self._sum_file(current))
        self.store.commit(
            StateRecord(
                model=ModelRecord(
                    lineage=model.lineage,
                    version=model.version,
                    epoch=model.epoch,
                    round=model.round,
                    names=self.exporter.names,
                    file=model.file,
                    optimizer=model.optimizer.kind if model.optimizer else None,
                    optimizer_file=model.optimizer_file,
                    optimizer_steps=model.optimizer.steps if model.optimizer else 0,
                ),
                round=round_record,
                last_round=last_round,
                noised_rounds=noised_rounds,
                retained=dict(self.retained),
            )
        )

    def _sum_file(self, current: Round) -> str | None:
        """The round's accumulator file, if it has one and still needs it."""
        if current.status not in OPEN or self._sum is None or self._sum[0] != current.id:
            return None
        return self._sum[1]
