"""Issue 13 item 10 with real processes: the federation learns, as its published score shows.

A real Mosquitto, `python -m aggregator` and three `python -m edge` doorbells,
each with a house of generated people; the operator starts rounds on the
control topic, as `mosquitto_pub` would. The aggregator scores every version
on a held-out folder of generated people no house holds and publishes the
figure in the round's metrics. The test asserts that the figure published
after the last round is clearly above the first round's, and above what
version 0 (dlib's own projection) scores on the same folder.

What the learning is, honestly: on generated faces dlib's descriptor already
ranks people right (rank 1 near 100 %), but it puts every cartoon face close to
every other (different people: cosine 0.88-0.97, none below 0.75). At the
default unknown-visitor threshold (0.75; no stranger folder here, as at a site
without real stranger photos) version 0 therefore names every stranger as
somebody: 50 % open-set accuracy. The doorbells' training (CosFace over their
own people's prototypes) pulls different people apart, and what it learns on
the houses' people carries to people no house holds: the published accuracy
rises over the rounds (here 78 % after round 1, about 90 % from round 2 on).
Measured in process on the same data, deltas of the same norm in random
directions, or with their entries shuffled, leave it at 50 % every round, and
so do negated deltas or an aggregator that ignores the updates (run as this
test: it fails). So the test proves that the real path (gallery features on
the doorbell, local training, the update on the wire, FedAvg, the release and
its evaluation) carries a learning signal that generalises to unseen
identities. It does not prove that the head improves dlib's ranking of real
faces; only real photos could.

Updates go up as float32 (`make_config`'s codec), so five rounds suffice.
The default top-k uplink at 5 % learns the same on this task but about eight
rounds later (measured in process: 0.90 at round 10), since each round sends
a twentieth of the update. (Before the error feedback trained from head +
residual, top-k 5 % drifted from 50 % to 44 % over 40 rounds here: see
`tests/test_trainer_topk.py`.)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from aggregator.export import Exporter
from fedbell.wire.messages import Signer
from fedbell.wire.protocol import DeviceStatus
from simulation.data import write_synthetic
from tests.federation import STARTUP, Federation, Recorder
from tests.test_aggregator import make_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROUND = 240.0
"""Seconds a round may take; it closes as soon as every doorbell answered."""
DOORS = ("d1", "d2", "d3")
HOUSE = {"persons": 4, "photos": 6}
"""A house: four people at the door, six photos each."""
HELD_OUT = {"persons": 30, "photos": 8}
"""The aggregator's held-out people: each enrolled from 5 photos, probed with 3."""
ROUNDS = 5
MARGIN = 0.08
"""How far the last round's accuracy must be above the first round's: 3 standard deviations
of that difference's noise. Measured in process on the same houses and training (the same
figures to the last digit as these processes publish), scored on 8 independent held-out
folders like this one: last − first = 0.151 on average, standard deviation 0.027, smallest
0.118 (this folder: 0.121). A federation that learns nothing publishes the same head every
round (difference 0); one whose rounds move the head at random would need 3 standard
deviations of luck."""
V0_MARGIN = 0.25
"""How far the last round's accuracy must be above version 0's (50 %, its spread on those 8
folders 0.003; the last version's 0.029)."""


def at_version(version: int) -> Callable[[DeviceStatus], bool]:
    return lambda status: status.model_version == version


def test_the_published_accuracy_rises_over_the_rounds(
    tmp_path: Path, recorder: Recorder, federation: Federation
) -> None:
    held_out = tmp_path / "held-out"
    write_synthetic(held_out, seed=100, **HELD_OUT)
    federation.start_aggregator(evaluation=held_out, timeout_s=ROUND, min_updates=len(DOORS))
    # Version 0's score, by the aggregator's own evaluation code on the features it cached.
    exporter = Exporter(
        make_config(tmp_path, federation.port, federation.cache, evaluation=held_out),
        Signer("aggregator"),
    )
    initial = exporter.accuracy(exporter.initial_weights())
    assert initial is not None
    for seed, door in enumerate(DOORS):
        gallery = federation.house(door, seed, **HOUSE)
        # The doorbells' own gate scores each head open-set at the threshold it ships with
        # (issue 18 item 2). Without stranger photos that is the uncalibrated 0.75, which
        # the heads trained here pull the cartoon residents below: at it, a doorbell
        # rightly finds v2 serves its house worse and refuses it. This test is about the
        # aggregator's published score, so its doorbells take every version.
        accept = {"max_gallery_accuracy_drop": None}
        federation.start_doorbell(door, gallery, accept=accept)
    recorder.statuses(DOORS, lambda s: s.model_version == 0, timeout=STARTUP)

    accuracy: list[float] = []
    for round_id in range(1, ROUNDS + 1):
        mark = recorder.mark()
        recorder.command(cmd="start_round", devices=list(DOORS))
        metrics = recorder.metrics(round_id, timeout=ROUND, since=mark)
        assert (metrics.outcome, metrics.participants) == ("published", len(DOORS)), metrics
        assert metrics.accuracy is not None, metrics
        accuracy.append(metrics.accuracy)
        # each installed it, so the next round trains from it
        recorder.statuses(DOORS, at_version(round_id), since=mark)

    report = {"version 0": initial, **{f"round {i}": a for i, a in enumerate(accuracy, 1)}}
    print(json.dumps(report))
    assert accuracy[-1] >= accuracy[0] + MARGIN, report
    assert accuracy[-1] >= initial + V0_MARGIN, report
