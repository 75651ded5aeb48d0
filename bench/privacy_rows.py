"""The privacy benchmark's trials: who is drawn, what the attacker reads, how it scores.

A scenario draws houses from a list of people (the attacked ones for the
figures, the public ones for the shadow attack's training) and returns what
the attacker observes with the candidates it ranks. `run_row` scores every
attack over many trials; the best attack's figure is the row's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from bench.federated import Secure
from bench.households import NEGATIVES_PER_HOUSE
from bench.privacy_attacks import (
    Matrix,
    Observed,
    Replay,
    ShadowModel,
    attacks,
    chance,
    fit_shadow,
    fit_subspace,
    pair_statistics,
    residents_in_top,
)
from bench.privacy_data import Person, draw, house, pool, strangers_at_door
from bench.privacy_views import as_sent, dense_sum, masked_round, round_mean, update_of
from fedbell.faces.embedding import Features, TrainParams
from fedbell.wire.codecs import Weights
from fedbell.wire.envelope import Codec

Scenario = Callable[[Sequence[str], np.random.Generator], list[Observed]]


@dataclass(frozen=True)
class Context:
    """What every scenario shares."""

    people: dict[str, Person]
    strangers: Features
    """Stranger photos doorbells see at their doors (their training negatives)."""
    base: Weights
    params: TrainParams
    candidates: int
    house_size: int


def _houses(
    ctx: Context, keys: Sequence[str], count: int, rng: np.random.Generator
) -> tuple[list[str], list[Weights]]:
    """`count` houses of distinct people: (everyone drawn, each house's update)."""
    residents = draw(keys, count * ctx.house_size, rng)
    deltas = []
    for i in range(count):
        members = residents[i * ctx.house_size : (i + 1) * ctx.house_size]
        doorbell = house(
            [ctx.people[k] for k in members],
            strangers_at_door(ctx.strangers, rng, NEGATIVES_PER_HOUSE),
        )
        deltas.append(update_of(doorbell, ctx.base, f"d{rng.integers(1 << 30)}", ctx.params))
    return residents, deltas


def _others(ctx: Context, targets: int, available: int) -> int:
    """Non-targets beside `targets`: `candidates` in all, or every one `available` in a
    small dataset (the row's chance says so)."""
    return min(ctx.candidates - targets, available)


def single(ctx: Context, view: Callable[[Weights], Matrix]) -> Scenario:
    """One house's update, seen through `view`; the pool: its residents and others."""

    def run(keys: Sequence[str], rng: np.random.Generator) -> list[Observed]:
        residents, (delta,) = _houses(ctx, keys, 1, rng)
        count = _others(ctx, len(residents), len(keys) - len(residents))
        others = draw(keys, count, rng, set(residents))
        candidates = pool(ctx.people, residents, others, rng)
        return [Observed(view(delta), candidates.features, candidates.targets)]

    return run


def sent(codec: Codec, density: float) -> Callable[[Weights], Matrix]:
    return lambda delta: as_sent(delta, codec, density)[0]


def visitors(ctx: Context) -> Scenario:
    """Strangers who rang (one photo each among the house's negatives): which candidate
    rang? The pool: the visitors and others, none of the house's residents."""

    def run(keys: Sequence[str], rng: np.random.Generator) -> list[Observed]:
        residents = draw(keys, ctx.house_size, rng)
        rang = draw(keys, ctx.house_size, rng, set(residents))
        doorbell = house(
            [ctx.people[k] for k in residents],
            strangers_at_door(ctx.strangers, rng, NEGATIVES_PER_HOUSE - len(rang)),
            visitors=[ctx.people[k].enrol[:1] for k in rang],
        )
        delta = update_of(doorbell, ctx.base, f"v{rng.integers(1 << 30)}", ctx.params)
        seen = set(residents) | set(rang)
        others = draw(keys, _others(ctx, len(rang), len(keys) - len(seen)), rng, seen)
        candidates = pool(ctx.people, rang, others, rng)
        return [Observed(delta[0], candidates.features, candidates.targets)]

    return run


def masked(ctx: Context, secure: Secure, cohort: int, traffic: list[tuple[int, int]]) -> Scenario:
    """A secure round of `cohort` houses; one trial per house: its masked input. Appends
    (bytes up, bytes down) per doorbell to `traffic`."""

    def run(keys: Sequence[str], rng: np.random.Generator) -> list[Observed]:
        residents, deltas = _houses(ctx, keys, cohort, rng)
        secure_round = masked_round(deltas, secure, rng)
        traffic.append((secure_round.bytes_up, secure_round.bytes_down))
        seen = []
        for i, view in enumerate(secure_round.views):
            own = residents[i * ctx.house_size : (i + 1) * ctx.house_size]
            # others may live in the round's other houses: the question is this house
            others = draw(keys, _others(ctx, len(own), len(keys) - len(own)), rng, set(own))
            candidates = pool(ctx.people, own, others, rng)
            seen.append(Observed(view, candidates.features, candidates.targets))
        return seen

    return run


def round_pool_size(residents: int, available: int, candidates: int) -> int:
    """Non-residents beside a round's residents: as many (chance near 1/2), at least
    enough for `candidates` in all, at most what there is."""
    return min(max(candidates - residents, residents), available - residents)


@dataclass
class Bank:
    """Every house of a list of people trained once (people cut into houses of
    `house_size`, seeded): round sums draw their houses from it, so a trial costs a sum
    and an attack, not a round of training. Filled on first use per list of people."""

    ctx: Context
    seed: int
    houses: dict[tuple[str, ...], tuple[list[list[str]], list[Weights]]] = field(
        default_factory=dict
    )

    def of(self, keys: Sequence[str]) -> tuple[list[list[str]], list[Weights]]:
        if tuple(keys) not in self.houses:
            rng = np.random.default_rng([self.seed, 47, len(keys)])
            everyone, deltas = _houses(self.ctx, keys, len(keys) // self.ctx.house_size, rng)
            size = self.ctx.house_size
            members = [everyone[i : i + size] for i in range(0, len(everyone), size)]
            self.houses[tuple(keys)] = (members, deltas)
        return self.houses[tuple(keys)]


def summed(bank: Bank, houses: int, secure: Secure | None) -> Scenario:
    """A round's sum over `houses` houses of the bank: the secure mean (with `secure`'s
    DP) or the dense float32 sum; the pool: the round's residents and as many others."""

    def run(keys: Sequence[str], rng: np.random.Generator) -> list[Observed]:
        members, deltas = bank.of(keys)
        chosen = rng.choice(len(deltas), size=houses, replace=False)
        residents = [p for i in chosen for p in members[i]]
        picked = [deltas[i] for i in chosen]
        view = dense_sum(picked) if secure is None else round_mean(picked, secure, rng)
        count = round_pool_size(len(residents), len(keys), bank.ctx.candidates)
        others = draw(keys, count, rng, set(residents))
        candidates = pool(bank.ctx.people, residents, others, rng)
        return [Observed(view, candidates.features, candidates.targets)]

    return run


@dataclass
class RowResult:
    view: str
    detail: str
    epsilon: float | None
    by_attack: dict[str, float]
    chance: float
    trials: int
    candidates: int
    stderr: dict[str, float]
    """Standard error of each attack's mean over the trials."""
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def best(self) -> tuple[str, float]:
        name = max(self.by_attack, key=lambda a: self.by_attack[a])
        return name, self.by_attack[name]


def collect(scenario: Scenario, keys: Sequence[str], trials: int, seed: int) -> list[Observed]:
    """At least `trials` observations (a scenario may give several at once)."""
    rng = np.random.default_rng(seed)
    seen: list[Observed] = []
    while len(seen) < trials:
        seen.extend(scenario(keys, rng))
    return seen


def train_shadow(
    seen: Sequence[Observed],
    base: Matrix,
    centre: npt.NDArray[np.float32],
    replay: Replay | None,
) -> ShadowModel:
    return fit_shadow(
        [pair_statistics(s.change, base, s.candidates, centre, replay) for s in seen],
        [s.targets for s in seen],
    )


def score(
    seen: Sequence[Observed],
    *,
    base: Matrix,
    centre: npt.NDArray[np.float32],
    shadow: ShadowModel | None,
    replay: Replay | None,
    top: int,
    subspace: int | None = None,
) -> tuple[dict[str, float], dict[str, float], float]:
    """(mean residents_in_top per attack, its standard error, mean chance)."""
    chosen = attacks(base, centre, shadow, replay, subspace)
    hits = {
        name: [residents_in_top(attack(s), s.targets, top) for s in seen]
        for name, attack in chosen.items()
    }
    return (
        {name: float(np.mean(h)) for name, h in hits.items()},
        {name: float(np.std(h) / np.sqrt(len(h))) for name, h in hits.items()},
        float(np.mean([chance(s.targets) for s in seen])),
    )


def run_row(
    view: str,
    detail: str,
    epsilon: float | None,
    scenario: Scenario,
    *,
    attacked: Sequence[str],
    public: Sequence[str],
    trials: int,
    shadow_trials: int,
    base: Matrix,
    centre: npt.NDArray[np.float32],
    replay: Replay | None,
    top: int,
    seed: int,
) -> RowResult:
    """Every attack on `trials` observations of the attacked people; the shadow and
    subspace attacks trained on `shadow_trials` simulated on the public people (0: neither)."""
    shadow, subspace = None, None
    if shadow_trials:
        simulated = collect(scenario, public, shadow_trials, seed + 1)
        shadow = train_shadow(simulated, base, centre, replay)
        subspace = fit_subspace(simulated, centre, top)
    seen = collect(scenario, attacked, trials, seed)
    by_attack, errors, odds = score(
        seen, base=base, centre=centre, shadow=shadow, replay=replay, top=top, subspace=subspace
    )
    result = RowResult(
        view, detail, epsilon, by_attack, odds, len(seen), len(seen[0].targets), errors
    )
    if subspace is not None:
        result.extra["subspace_directions"] = subspace
    return result
