"""Issue 13 item 4: round announcements are signed like models.

With the aggregator's broker password alone, a forged announcement numbered
10^15 used to make doorbells save that number and ignore every real round,
and could ask for 100 epochs at batch size 1. Doorbells that trust a key now
refuse unsigned and forged announcements before recording anything, and every
doorbell bounds the training plan it accepts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.local import LocalBroker
from edge.plan import PlanLimits, check_announcement
from fedbell.errors import RejectedMessage
from fedbell.wire import signing
from fedbell.wire.protocol import RoundAnnouncement, TrainingPlan, to_json
from fedbell.wire.topics import Topics
from tests.mqtt_helpers import Probe, wait_until

SITE = "home"
DEVICE = "door1"
TOPICS = Topics(SITE)


def announcement(number: int = 1, **plan: Any) -> RoundAnnouncement:
    return RoundAnnouncement(
        round=number,
        base_version=7,
        phase="train",
        selected=(DEVICE,),
        deadline=time.time() + 120,
        codec="float16",
        train=TrainingPlan(**{"epochs": 1, "batch_size": 8, **plan}),
    )


def test_a_signature_covers_every_field_and_the_site() -> None:
    key = Ed25519PrivateKey.generate()
    signed = signing.sign_announcement(announcement(), SITE, key)
    signing.verify_announcement(signed, SITE, key.public_key())
    # The JSON on the wire parses back to something that still verifies.
    wire = RoundAnnouncement.model_validate_json(to_json(signed))
    signing.verify_announcement(wire, SITE, key.public_key())
    for changed, reason in (
        (signed.model_copy(update={"round": 10**15}), "bad_signature"),
        (
            signed.model_copy(update={"train": TrainingPlan(epochs=100, batch_size=1)}),
            "bad_signature",
        ),
        (signed.model_copy(update={"signature": None}), "unsigned"),
    ):
        with pytest.raises(RejectedMessage) as caught:
            signing.verify_announcement(changed, SITE, key.public_key())
        assert caught.value.reason == reason
    with pytest.raises(RejectedMessage, match="bad_signature"):
        signing.verify_announcement(signed, "elsewhere", key.public_key())
    with pytest.raises(RejectedMessage, match="bad_signature"):
        signing.verify_announcement(signed, SITE, Ed25519PrivateKey.generate().public_key())


@pytest.mark.parametrize(
    ("plan", "refused"),
    [
        ({"epochs": 100}, "epochs 100 > 20"),
        ({"batch_size": 1}, "batch size 1 outside [4, 256]"),
        ({"batch_size": 1024}, "batch size 1024 outside"),
        ({"learning_rate": 0.5}, "learning rate 0.5 > 0.1"),
    ],
)
def test_a_plan_out_of_bounds_is_refused_even_when_signed(
    plan: dict[str, Any], refused: str
) -> None:
    key = Ed25519PrivateKey.generate()
    signed = signing.sign_announcement(announcement(**plan), SITE, key)
    with pytest.raises(RejectedMessage, match="plan_out_of_bounds") as caught:
        check_announcement(
            signed,
            site=SITE,
            aggregator_key=key.public_key(),
            require_signature=True,
            limits=PlanLimits(),
        )
    assert refused in str(caught.value)
    check_announcement(  # the default plan passes
        signing.sign_announcement(announcement(), SITE, key),
        site=SITE,
        aggregator_key=key.public_key(),
        require_signature=True,
        limits=PlanLimits(),
    )


@contextmanager
def running_node(tmp_path: Path, port: int, trusted: Path) -> Iterator[Any]:
    from edge.config import EdgeConfig, TrainingSettings
    from edge.node import EdgeNode
    from edge.recognition_config import CameraConfig
    from fedbell.config import MqttSettings, SigningSettings

    config = EdgeConfig(
        device_id=DEVICE,
        site=SITE,
        mqtt=MqttSettings(port=port, keepalive=5),
        signing=SigningSettings(trusted_keys_dir=trusted),
        state_dir=tmp_path / "state",
        gallery_dir=tmp_path / "gallery",
        camera=CameraConfig(enabled=False),
        training=TrainingSettings(base_model_wait_s=30),
    )
    node = EdgeNode(config)
    stop = threading.Event()
    thread = threading.Thread(target=node.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(node.session.subscribed.is_set, what="the node's subscriptions")
        yield node
    finally:
        stop.set()
        thread.join(30)


def test_a_doorbell_refuses_forged_rounds_and_never_records_their_number(
    broker: LocalBroker, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    signing.write_key_pair(keys / "aggregator.key", keys / "trusted" / "aggregator.pub")
    aggregator_key = signing.load_private_key(keys / "aggregator.key")
    forger = Ed25519PrivateKey.generate()
    attacker = Probe(broker.port)  # the aggregator's broker password, not its key
    try:
        with running_node(tmp_path, broker.port, keys / "trusted") as node:
            huge = announcement(10**15)
            attacker.publish(TOPICS.round, to_json(huge), retain=True)
            attacker.publish(
                TOPICS.round, to_json(signing.sign_announcement(huge, SITE, forger)), retain=True
            )
            greedy = signing.sign_announcement(
                announcement(2, epochs=100, batch_size=1), SITE, aggregator_key
            )
            attacker.publish(TOPICS.round, to_json(greedy), retain=True)
            wait_until(lambda: sum(node.counters.values()) == 3, what="three refusals")
            assert node.counters == {"unsigned": 1, "bad_signature": 1, "plan_out_of_bounds": 1}
            assert node.rounds.last_round == 0
            assert node.rounds.held_round is None
            assert node.rounds._rounds_taken == set()

            # The real round 1 is still taken part in (it waits for its base model).
            real = signing.sign_announcement(announcement(1), SITE, aggregator_key)
            attacker.publish(TOPICS.round, to_json(real), retain=True)
            wait_until(lambda: 1 in node.rounds._rounds_taken, what="round 1 taken")
            assert sum(node.counters.values()) == 3
        from edge.state import NodeState

        assert NodeState(tmp_path / "state").load_last_round() == 0
    finally:
        attacker.close()
