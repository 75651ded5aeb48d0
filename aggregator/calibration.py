"""Federated calibration: a bare site's trained head gets its threshold from the doorbells.

A site that must calibrate (`evaluation.require_calibration`) but was given neither
stranger photos nor an evaluation set cannot set a trained head's threshold or gate
it on the aggregator. With secure aggregation it asks the doorbells instead:

    round N     a secure training round; its unmasked sum makes a candidate head,
                held in memory (`Federation.candidate`), not published; the round
                closes with outcome `aggregated`
    round N+1   a calibration round, started at once and holding the candidate
                (`Round.candidate`: one round per candidate, whatever its end): a
                secure round whose keys-phase announcement carries the candidate and
                the lineage's start head (`CalibrationPlan`, signed with the rest);
                each selected doorbell scores both on its stranger store and its
                gallery and masks the histograms (fedbell/faces/histograms.py)
                instead of an update
    its sum     `histograms.calibrate`: the threshold at evaluation.target_false_accept
                and the true-accept rates at it; the candidate is published with that
                threshold if its rate is within rounds.max_accuracy_loss of the start
                head's (measured on the same houses in the same round), else refused

Why a round of its own rather than histograms appended to the next training round's
masked vector: the histograms must score the candidate, which exists only once a
round's sum is unmasked, so appending them would either score a head one round old
or make every doorbell train from an unpublished candidate; a round needs fresh
masks anyway (a round id is what the masks and the key adverts are bound to). The
round is the existing secure round with another vector: the same phases, dropout
handling, min_cohort, clip norm (`histograms.VECTOR_NORM`, what one house can
change), privacy noise and ledger; nothing new is unmasked and nothing per house is
ever seen. The cost is one extra secure round per release, ~6 kB up per doorbell.

The candidate lives in memory only, like a secure round's key agreement: an
aggregator restarted before the calibration round's sum drops it (the model stays).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import numpy.typing as npt

from aggregator.export import Candidate
from aggregator.federation import Federation
from aggregator.gates import accuracy_bar
from aggregator.releases import Releases
from aggregator.rounds import Round
from fedbell.errors import RejectedMessage
from fedbell.faces import histograms
from fedbell.wire.protocol import CalibrationPlan, SecAggPlan

log = logging.getLogger("aggregator")


def calibration_plan(fed: Federation, candidate: Candidate) -> CalibrationPlan:
    """The heads a calibration round scores, as the doorbells would hold them."""
    return CalibrationPlan.of(
        fed.exporter.names,
        candidate.release.weights,
        fed.exporter.initial_weights(),
        fed.config.rounds.downlink_codec,
    )


def check_sum(summed: npt.NDArray[np.float64], survivors: int, plan: SecAggPlan) -> None:
    """RejectedMessage(calibration_sum_out_of_bounds) unless each histogram's mass and the
    stranger count lie where `survivors` honest houses can put them: each adds at most 1
    to each, plus the privacy noise (6 standard deviations of a section's summed noise)
    and the fixed-point rounding. A doorbell that masked something else shows here; one
    that moved mass inside those bounds cannot be told apart (docs/privacy.md)."""
    width = histograms.BINS
    slack = 6 * plan.noise_std * math.sqrt(survivors * width) + width / plan.scale
    sections = [summed[i * width : (i + 1) * width].sum() for i in range(len(histograms.SECTIONS))]
    for name, mass in [*zip(histograms.SECTIONS, sections, strict=True), ("count", summed[-1])]:
        if not -slack <= float(mass) <= survivors + slack:
            raise RejectedMessage(
                "calibration_sum_out_of_bounds",
                f"the {name} histogram of {survivors} doorbells sums to {float(mass):.4g}, "
                f"outside [0, {survivors}] by more than the noise and rounding "
                f"({slack:.3g}): a doorbell masked something other than its histograms",
            )


class Calibrations:
    """Ends a calibration round: the candidate published with its threshold, or refused."""

    def __init__(self, federation: Federation, releases: Releases) -> None:
        self.federation = federation
        self.releases = releases

    def on_sum(self, current: Round, summed: npt.NDArray[np.float64], survivors: int) -> None:
        """A calibration round's unmasked sum (not divided: `histograms.calibrate` wants it)."""
        fed = self.federation
        candidate, plan = current.candidate, current.announcement.secagg
        assert plan is not None
        if candidate is None:  # cannot happen: a restart abandons the calibration round
            self.releases.abandon("calibration round without a candidate head")
            return
        version = candidate.release.version
        try:
            check_sum(summed, survivors, plan)
            noise = plan.noise_std * math.sqrt(survivors)  # each value of the sum
            result = histograms.calibrate(summed, fed.config.evaluation.target_false_accept, noise)
        except RejectedMessage as err:
            fed.count(err.reason)
            self.releases.abandon(
                f"{err.reason}: version {version} is not published: {err.detail}; "
                f"doorbells keep version {fed.model.version}"
            )
            return
        measured = (
            f"threshold {result.threshold:.3f} lets {100 * result.false_accept:.1f} % of "
            f"{result.strangers} strangers at {survivors} doorbells in, names "
            f"{100 * result.true_accept:.1f} % of residents (start head: "
            f"{100 * result.start_true_accept:.1f} % at {result.start_threshold:.3f})"
        )
        log.info("round %d: calibrated version %d: %s", current.id, version, measured)
        rounds = fed.config.rounds
        refusal = accuracy_bar(result.true_accept, None, result.start_true_accept, rounds)
        if refusal is not None:
            fed.count(refusal.reason)
            fed.strikes.round_ended(list(candidate.trained_by), refused=True)
            self.releases.abandon(
                f"version {version}: {measured}; more than {100 * refusal.bar:.1f} points "
                f"below the start head (rounds.max_{refusal.reason}): not published"
            )
            return
        release = candidate.release
        calibrated = fed.exporter.release(
            release.weights,
            release.version,
            release.round,
            fed.model.lineage,
            fed.model.epoch,
            threshold=result.threshold,
        )
        self.releases.publish(calibrated, detail=f"federated calibration: {measured}")
