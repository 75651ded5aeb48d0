"""Which round announcements a doorbell acts on: signed ones, with a plan it accepts.

A round announcement decides what the doorbell spends its CPU on (epochs,
batch size) and how far one round moves its model (learning rate). With
signing configured it must carry the aggregator's signature (forged, unsigned
or replayed-elsewhere announcements are refused before anything is recorded),
and whoever signed it, the plan must stay within the bounds the house set.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import model_validator

from fedbell.config import Epochs, Fraction, LearningRate, PositiveCount, StrictModel
from fedbell.errors import RejectedMessage
from fedbell.wire import signing
from fedbell.wire.protocol import RoundAnnouncement


class PlanLimits(StrictModel):
    max_epochs: Epochs = 20
    """A round asking for more local epochs is refused."""
    min_batch_size: PositiveCount = 4
    """A round asking for smaller batches (slower, noisier) is refused."""
    max_batch_size: PositiveCount = 256
    """Larger batches are refused."""
    max_learning_rate: LearningRate = 0.1
    """A round asking for a larger learning rate is refused."""

    max_gallery_accuracy_drop: Fraction | None = 0.25
    """A new global model (same lineage) naming this house's own people (leave-one-out on the
    gallery) more than this much worse than the installed one is refused and counted
    (worse_on_gallery); null installs whatever the aggregator signs."""

    @model_validator(mode="after")
    def _ordered(self) -> PlanLimits:
        if self.min_batch_size > self.max_batch_size:
            raise ValueError("min_batch_size must not exceed max_batch_size")
        return self


def check_announcement(
    announcement: RoundAnnouncement,
    *,
    site: str,
    aggregator_key: Ed25519PublicKey | None,
    require_signature: bool,
    limits: PlanLimits,
) -> None:
    """RejectedMessage (unsigned, bad_signature, plan_out_of_bounds) or nothing."""
    if require_signature:
        signing.verify_announcement(announcement, site, aggregator_key)
    plan = announcement.train
    problems = []
    if plan.epochs > limits.max_epochs:
        problems.append(f"epochs {plan.epochs} > {limits.max_epochs}")
    if not limits.min_batch_size <= plan.batch_size <= limits.max_batch_size:
        problems.append(
            f"batch size {plan.batch_size} outside "
            f"[{limits.min_batch_size}, {limits.max_batch_size}]"
        )
    if plan.learning_rate > limits.max_learning_rate:
        problems.append(f"learning rate {plan.learning_rate:g} > {limits.max_learning_rate:g}")
    if problems:
        raise RejectedMessage(
            "plan_out_of_bounds", f"round {announcement.round}: {'; '.join(problems)}"
        )
