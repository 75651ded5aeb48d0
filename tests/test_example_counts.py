"""Issue 18 item 3: a claimed example count cannot buy a doorbell a larger say in a plain round.

On 884c77a a plain round (rounds.secure_aggregation off) weighed each update by the
example count its doorbell signed, capped at rounds.max_examples (200): one doorbell
claiming 200 among three honest ones of 50 took the round's mean from +0.25 to -0.04,
under fedavg and top-k alike. Now every house weighs the same by default
(rounds.weighting houses), as in a secure round. Real processes: Mosquitto,
`python -m aggregator`, and simulated doorbells publishing signed-format updates.
"""

from __future__ import annotations

import numpy as np
import pytest

from broker.local import LocalBroker
from fedbell.wire.envelope import Codec
from fedbell.wire.messages import parse_global
from tests.federation import STARTUP, Federation, Recorder
from tests.test_aggregator import MAX_BYTES, SITE, TOPICS, FakeDevice

pytestmark = pytest.mark.timeout(900)  # a real aggregator process on a loaded 2-core machine

COVER = 1000
"""Coordinates every update moves: fewer than top-k's 5 % of the head (1,639 of 32,768), so
top-k sends all of them and its coverage-corrected mean is the plain one."""
HONEST = {"door1": 0.20, "door2": 0.25, "door3": 0.30}
"""Each honest doorbell's step along one direction, 50 examples each: mean +0.25."""
HOSTILE = -0.26
"""Mallory's step, claiming 200 examples: a norm any honest doorbell could have (the clip norm
is 1.0), so only the weight it is given decides how far it pulls."""
CLAIMS = {**dict.fromkeys(HONEST, 50), "mallory": 200}


def _version(payload: bytes) -> int:
    return parse_global(payload, site=SITE, max_bytes=MAX_BYTES, keys=None).version


def direction(shape: tuple[int, ...]) -> np.ndarray:
    """A unit vector over the head: flat on its first COVER coordinates."""
    unit = np.zeros(int(np.prod(shape)), np.float64)
    unit[:COVER] = 1 / np.sqrt(COVER)
    return unit.reshape(shape)


@pytest.mark.parametrize("codec", ["float32", "topk"])
def test_a_doorbell_claiming_four_times_the_examples_weighs_as_one_house(
    broker: LocalBroker, recorder: Recorder, federation: Federation, codec: Codec
) -> None:
    steps = {**HONEST, "mallory": HOSTILE}
    equal = float(np.mean(list(steps.values())))  # +0.1225
    by_claims = sum(CLAIMS[d] * s for d, s in steps.items()) / sum(CLAIMS.values())  # -0.0414
    assert by_claims < 0 < equal  # weighed by the claims, the round would point the other way

    federation.start_aggregator(codec=codec, min_updates=len(steps), auto_rounds=1)
    devices = [FakeDevice(broker.port, name) for name in steps]
    try:
        recorder.round(1, "train", timeout=STARTUP)
        base = parse_global(
            recorder.wait_for(TOPICS.global_model, lambda p: _version(p) == 0),
            site=SITE,
            max_bytes=MAX_BYTES,
            keys=None,
        )
        unit = direction(base.weights[0].shape)
        for device in devices:
            delta = [(steps[device.name] * unit).astype(np.float32)]
            device.send(
                device.update(base, delta, examples=CLAIMS[device.name], round_id=1, codec=codec)
            )
        metrics = recorder.metrics(1, timeout=60)
        assert (metrics.outcome, metrics.participants) == ("published", 4)
        assert metrics.examples == 350  # the claims are reported, not weighed
        assert metrics.rejected == {}  # nothing was capped: no count was used
        new = parse_global(
            recorder.wait_for(TOPICS.global_model, lambda p: _version(p) == 1),
            site=SITE,
            max_bytes=MAX_BYTES,
            keys=None,
        )
        step = new.weights[0].astype(np.float64) - base.weights[0]
        along = float(np.sum(step * unit))
        print(
            f"{codec}: round mean {along:+.4f} (equal weights {equal:+.4f}, by claims "
            f"{by_claims:+.4f})"
        )
        # float32 both ways; top-k's int8 values of a flat delta are exact
        assert along == pytest.approx(equal, abs=1e-4)
        assert np.allclose(step, along * unit, atol=1e-6)  # nothing off the direction
    finally:
        for device in devices:
            device.close()
