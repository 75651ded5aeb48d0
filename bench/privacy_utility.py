"""Utility under secure aggregation and DP, and the published heads an attacker reads.

The federation is `bench.privacy_data.population` houses of `bench.openset`'s
training people; each setting runs `bench.federated.run_arm` (the product's
client and server steps) with `Secure` on (its clip norm and the noise
multiplier the accountant gives for the target epsilon), or the product's
plain path ("plain": top-k 5 % with error feedback, no secure aggregation, for
comparison). The final head is scored as `bench.openset` scores its federated
arm: the threshold calibrated for 1 % false accepts, open-set accuracy and TAR
at 1 % FAR on never-seen test houses.

Every round's published head (as the doorbells decode it) is kept where asked,
and the attacker differences consecutive ones: are its top candidates among the
round's residents?
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from aggregator.accountant import epsilon as epsilon_of
from aggregator.accountant import noise_multiplier_for
from aggregator.export import as_received
from bench import federated
from bench.households import GALLERY_SIZE, TARGET_FAR, Bench, evaluate, shipped_threshold
from bench.privacy_attacks import Observed
from bench.privacy_data import Person, draw, pool
from bench.privacy_rows import round_pool_size
from fedbell.faces.embedding import HEAD_NAMES, TrainParams
from fedbell.wire.codecs import Weights


@dataclass(frozen=True)
class Privacy:
    """One DP setting of a federation: its noise and what the accountant says of it."""

    target_epsilon: float
    """inf: secure aggregation without noise."""
    houses_per_round: int
    houses: int
    rounds: int

    @property
    def sampling_rate(self) -> float:
        return min(1.0, self.houses_per_round / self.houses)

    @property
    def delta(self) -> float:
        return 1.0 / self.houses

    @property
    def noise_multiplier(self) -> float:
        if math.isinf(self.target_epsilon):
            return 0.0
        return noise_multiplier_for(
            self.target_epsilon, self.sampling_rate, self.rounds, self.delta
        )

    @property
    def epsilon(self) -> float | None:
        """The accountant's epsilon after the run's rounds (None: no noise)."""
        z = self.noise_multiplier
        if z == 0:
            return None
        return epsilon_of(z, self.sampling_rate, self.rounds, self.delta)


@dataclass
class UtilityResult:
    setting: str
    privacy: Privacy
    open_set_accuracy: float
    tar_at_far_1pct: float
    start_open_set_accuracy: float
    """The start head's (dlib's projection), scored the same way."""
    noise_multiplier: float
    seconds: float
    bytes_up: int
    heads: list[Weights] = field(default_factory=list)
    """The published head before round 1 and after each round (when kept)."""
    rounds_houses: list[list[int]] = field(default_factory=list)
    """The houses of each round (when kept)."""
    subset_norms: dict[int, list[float]] = field(default_factory=dict)
    """Per secure round: each house's shared subset's L2 norm before the clip, as the run
    trained it (`edge.secure.secure_update`'s `norm`): what rounds.secure_clip_norm is set
    against."""


def run_setting(
    setting: str,
    bench: Bench,
    privacy: Privacy,
    *,
    clip_norm: float,
    density: float,
    params: TrainParams,
    seed: int,
    keep_heads: bool,
) -> UtilityResult:
    """One federated run; `setting` "plain" is the product's path without secure aggregation."""
    started = time.perf_counter()
    secure = None
    z = 0.0
    if setting != "plain":
        z = privacy.noise_multiplier
        secure = federated.Secure(clip_norm=clip_norm, noise_multiplier=z, density=density)
    arm = federated.Arm(setting, secure=secure)
    heads: list[Weights] = []
    houses: list[list[int]] = []

    def observe(_round: int, selected: Sequence[int], head: Weights) -> None:
        heads.append(head)
        houses.append(list(selected))

    if keep_heads:
        heads.append(as_received(HEAD_NAMES, bench.start, arm.downlink_codec))

    def score(weights: Weights) -> federated.Score:
        threshold = shipped_threshold(bench, weights, TARGET_FAR, GALLERY_SIZE)
        result = evaluate(bench, [weights], threshold)
        return federated.Score(result.open_set_accuracy, threshold, result.tar_at_far_1pct)

    outcome = federated.run_arm(
        bench.train,
        bench.start,
        arm,
        privacy.rounds,
        score,
        params=replace(params, seed=seed),
        houses_per_round=privacy.houses_per_round,
        backbone=bench.backbone,
        evaluate_every=privacy.rounds,
        observe=observe if keep_heads else None,
    )
    final = outcome.final
    return UtilityResult(
        setting,
        privacy,
        final.open_set_accuracy,
        final.tar_at_far_1pct,
        outcome.start.open_set_accuracy,
        z,
        time.perf_counter() - started,
        int(outcome.rounds[-1].bytes_up / max(1, outcome.rounds[-1].participants)),
        heads,
        houses,
        outcome.update_norms,
    )


def published_observations(
    result: UtilityResult,
    *,
    house_people: Sequence[Sequence[str]],
    people: dict[str, Person],
    outsiders: Sequence[str],
    candidates: int,
    seed: int,
) -> list[Observed]:
    """One observation per round: the difference of consecutive published heads; the pool
    the round's residents (those the attacker holds photos of) and as many outsiders."""
    rng = np.random.default_rng(seed)
    seen = []
    for index, selected in enumerate(result.rounds_houses):
        change = result.heads[index + 1][0] - result.heads[index][0]
        residents = sorted({p for h in selected for p in house_people[h] if p in people})
        count = round_pool_size(len(residents), len(residents) + len(outsiders), candidates)
        others = draw(outsiders, count, rng)
        chosen = pool(people, residents, others, rng)
        seen.append(Observed(np.asarray(change, np.float32), chosen.features, chosen.targets))
    return seen


NORM_PERCENTILES = (10, 50, 90)


def clip_check(
    runs: Sequence[UtilityResult], default_epsilon: float, clip_norm: float
) -> dict[str, list[float]]:
    """Percentiles of the honest subsets' norms before clipping in the first and last round
    of the default run at 100 houses per round, printed beside the clip."""
    run = next(
        (
            r
            for r in runs
            if r.heads and r.setting != "plain" and r.privacy.target_epsilon == default_epsilon
        ),
        None,
    )
    if run is None:
        return {}
    found = {}
    for round_id in (1, run.privacy.rounds):
        norms = run.subset_norms[round_id]
        found[f"round {round_id}"] = [float(np.percentile(norms, q)) for q in NORM_PERCENTILES]
    print(
        f"  honest subsets' norms before clipping ({run.privacy.houses_per_round} houses, "
        f"percentiles {NORM_PERCENTILES}): "
        + "; ".join(f"{k} " + " / ".join(f"{v:.4f}" for v in p) for k, p in found.items())
        + f"; secure_clip_norm {clip_norm:g}",
        flush=True,
    )
    return found
