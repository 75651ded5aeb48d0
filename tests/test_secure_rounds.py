"""Secure aggregation with real processes (issue 22 item 6): Mosquitto, `python -m
aggregator` and `python -m edge` doorbells with houses of generated people.

What each doorbell computed is recomputed here, in process, by the same client
step (`edge.trainer.train_delta` then the round's subset, clipped as
`edge.secure.secure_update` does) from what the doorbell keeps in its state
folder (its gallery's cached backbone features) and the round's signed plan.
No debug route: the doorbell never publishes its plain update anywhere. The
published head must move by exactly the mean of the survivors' vectors (scaled
by dimension / size, as the server step does), to the fixed-point and float32
resolution, and measurably not by the mean of any other set of doorbells.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.accountant import epsilon, noise_multiplier_for
from aggregator.config import RoundSettings
from broker.local import LocalBroker
from edge.config import EdgeConfig
from edge.gallery import (
    FEATURE_CACHE,
    STRANGER_STORE,
    Gallery,
    GalleryFeatures,
    StrangerPart,
    StrangerStore,
)
from edge.state import NodeState
from edge.trainer import round_seed, train_delta
from fedbell.config import load_config
from fedbell.faces.embedding import AdamMoments, Features, TrainParams
from fedbell.wire import dp, masking
from fedbell.wire.messages import GlobalModel, parse_global
from fedbell.wire.protocol import RoundAnnouncement, RoundMetrics, SecAggPlan
from fedbell.wire.secagg_messages import Masked
from fedbell.wire.signing import load_public_keys, verify_announcement, write_key_pair
from simulation.data import write_synthetic
from tests.federation import STARTUP, Process, Recorder, aggregator_process, node_process
from tests.test_aggregator import MAX_BYTES, SITE, TOPICS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

PHASE = 40.0
"""Each phase's deadline (rounds.timeout_s): a doorbell that died is dropped after it."""
ROUND = 4 * PHASE + 60
HOUSE = {"persons": 3, "photos": 4}
EVERY_MODEL = {"max_gallery_accuracy_drop": None}
"""These rounds count on every doorbell installing every release. A 12-photo generated
gallery moves 8 points a photo, and which photos a release flips depends on the masks'
random rounding, so the doorbell's own gate sometimes kept an older model and sat out the
next round (round 5 abandoned, 4 of 5 keys); the gate has its own tests
(test_influence_doorbell)."""
TRAIN = {"epochs": 2, "batch_size": 8}
FLOAT32_HEAD = 1e-7
"""float32 rounding of a head of entries ~0.1 (~1e-8), with room."""


def resolution(plan: SecAggPlan) -> float:
    """How close the published mean must be to the recomputed one: each survivor's value is
    stochastically rounded to within one fixed-point step (1/scale: 1.2e-6 with 24-bit
    values at 10 doorbells clipped at 1), so their mean is too, plus float32 rounding.
    Leaving one survivor out of the mean moves it by ~5e-5 here (checked in each round, so
    the comparison can fail)."""
    return 1.0 / plan.scale + FLOAT32_HEAD


@dataclass(frozen=True)
class Doorbell:
    name: str
    gallery: Path
    process: Process


class Killer:
    """SIGKILLs doorbells the moment their message on a secagg leaf reaches the broker.

    A paho callback does it (no polling): the doorbell dies milliseconds after its
    message, while the phase still waits for other doorbells.
    """

    def __init__(self, port: int, leaf: str, doorbells: dict[str, Doorbell], count: int) -> None:
        self.doorbells, self.count = doorbells, count
        self.killed: list[str] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"{TOPICS.base}/secagg/{leaf}/+", qos=1)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        name = message.topic.rsplit("/", 1)[1]
        with self.lock:
            if len(self.killed) >= self.count or name in self.killed:
                return
            process = self.doorbells[name].process.process
            if process is not None:
                process.send_signal(signal.SIGKILL)
                self.killed.append(name)

    def close(self) -> list[str]:
        self.client.loop_stop()
        self.client.disconnect()
        for name in self.killed:
            self.doorbells[name].process.kill()  # reap it
        return self.killed


def secure_aggregator(tmp_path: Path, port: int, cache: Path, **settings: Any) -> Process:
    """The aggregator of these tests: secure rounds of at least 5, short phases, every
    version published (generated houses), the doorbells' quick training plan."""
    return aggregator_process(
        tmp_path,
        port,
        cache,
        secure_aggregation=True,
        min_cohort=5,
        timeout_s=PHASE,
        max_accuracy_drop=None,
        train=TRAIN,
        **settings,
    )


def start_federation(
    tmp_path: Path,
    broker: LocalBroker,
    *,
    recorder: Recorder,
    processes: list[Process],
    aggregator: Process,
    names: list[str],
    signing: dict[str, dict[str, str]] | None = None,
) -> dict[str, Doorbell]:
    """The aggregator, then one doorbell per name (a house of generated people each);
    `signing`: each doorbell's signing settings (its key, the aggregator's public key)."""
    processes.append(aggregator)
    aggregator.start().wait_log("ready: site", timeout=STARTUP)
    doorbells = {}
    for seed, name in enumerate(names):
        gallery = tmp_path / f"house-{name}"
        write_synthetic(gallery, seed=seed, **HOUSE)
        settings: dict[str, Any] = {"accept": EVERY_MODEL}
        if signing is not None:
            settings["signing"] = signing[name]
        process = node_process(tmp_path, broker.port, name, gallery, **settings)
        processes.append(process.start())
        doorbells[name] = Doorbell(name, gallery, process)
    for name in names:
        recorder.status(name, lambda s: s.model_version == 0, timeout=STARTUP)
    return doorbells


def global_model(recorder: Recorder, version: int) -> GlobalModel:
    for payload in recorder.payloads(TOPICS.global_model):
        model = parse_global(payload, site=SITE, max_bytes=MAX_BYTES, keys=None)
        if model.version == version:
            return model
    raise AssertionError(f"no global model version {version} was published")


class _CachedBackbone:
    """Only what `Gallery.features` reads when every image's features are cached: the
    doorbell computed them with the real backbone; running it here is not needed."""

    def __init__(self, sha256: str, size: int) -> None:
        self.sha256, self.size = sha256, size

    def features(self, chips: object) -> npt.NDArray[np.float32]:
        raise AssertionError(f"the doorbell's cache lacks features of {chips}")


def doorbell_inputs(
    tmp_path: Path, doorbell: Doorbell, base: GlobalModel, strangers: StrangerPart = "all"
) -> tuple[GalleryFeatures, Features]:
    """What this doorbell's client step reads, from its state folder: its gallery's cached
    features and its stranger store (or the half of it `strangers` names)."""
    config = load_config(tmp_path / f"{doorbell.name}.yaml", EdgeConfig)
    with np.load(config.state_dir / FEATURE_CACHE, allow_pickle=False) as cache:
        backbone = _CachedBackbone(str(cache["backbone"]), base.weights[0].shape[0])
    data = Gallery(doorbell.gallery, config.state_dir).features(
        backbone,  # type: ignore[arg-type]
        config.training.max_images_per_person,
    )
    store = StrangerStore(config.state_dir / STRANGER_STORE, config.training.max_strangers)
    return data, store.features(backbone.sha256, backbone.size, strangers)


def kept_adam(tmp_path: Path, doorbell: Doorbell) -> AdamMoments | None:
    """The local Adam this doorbell stored after its last training (`adam_moments: kept`):
    read before a round, it is what that round's training continues."""
    config = load_config(tmp_path / f"{doorbell.name}.yaml", EdgeConfig)
    stored = NodeState(config.state_dir).load_moments()
    return None if stored is None else stored.moments


def plain_vector(
    tmp_path: Path,
    doorbell: Doorbell,
    base: GlobalModel,
    announcement: RoundAnnouncement,
    moments: AdamMoments | None = None,
) -> npt.NDArray[np.float64]:
    """What this doorbell masked in this round, before noise and fixed point: its client
    step recomputed from its state folder (`moments`: its kept Adam before the round)."""
    data, strangers = doorbell_inputs(tmp_path, doorbell, base)
    plan, train = announcement.secagg, announcement.train
    assert plan is not None
    params = TrainParams(
        epochs=train.epochs,
        batch_size=train.batch_size,
        learning_rate=train.learning_rate,
        prox_mu=train.prox_mu,
        adam_moments=train.adam_moments,
        seed=round_seed(doorbell.name, announcement.round),
    )
    # a secure round trains from the global head alone (no error feedback: edge/secure.py)
    result = train_delta(
        base.weights, data.features, data.labels, strangers, params, moments=moments
    )
    flat = np.concatenate([d.ravel() for d in result.delta])
    subset = masking.shared_subset(
        plan.dimension, plan.density, announcement.round, announcement.lineage
    )
    clipped, _ = dp.clip(flat[subset], plan.clip_norm)
    return clipped.astype(np.float64)


def published_move(
    old: GlobalModel, new: GlobalModel, plan: SecAggPlan, announcement: RoundAnnouncement
) -> npt.NDArray[np.float64]:
    subset = masking.shared_subset(
        plan.dimension, plan.density, announcement.round, announcement.lineage
    )
    moved = np.concatenate(
        [(n.astype(np.float64) - o).ravel() for n, o in zip(new.weights, old.weights, strict=True)]
    )
    assert np.all(np.delete(moved, subset) == 0), "only the round's shared subset may move"
    # the server step scales the subset's mean by dimension / size (unbiased random-k)
    return np.asarray(moved[subset] * (plan.size / plan.dimension))


def secure_round(recorder: Recorder, round_id: int) -> tuple[RoundMetrics, RoundAnnouncement]:
    mark = recorder.mark()
    recorder.command(cmd="start_round")
    metrics = recorder.metrics(round_id, timeout=ROUND, since=mark)
    keys = recorder.round(round_id, "keys")
    return metrics, keys


def watcher_sees_only_noise(
    recorder: Recorder, plan: SecAggPlan, vectors: dict[str, npt.NDArray[np.float64]]
) -> None:
    """Every doorbell's masked update, as anyone reading `fedbell/#` got it, is noise: it
    decodes to nothing near any house's true vector, is uncorrelated with all of them, and
    its 3-byte values spread evenly over 24 bits; and no plain update was published at all."""
    seen = recorder.everything()
    assert not [t for t, _ in seen if t.startswith(f"{TOPICS.base}/update/")]
    masked = {
        t.rsplit("/", 1)[1]: Masked.model_validate_json(p)
        for t, p in seen
        if t.startswith(f"{TOPICS.base}/secagg/masked/")
    }
    assert sorted(masked) == sorted(vectors)
    for device, message in masked.items():
        words = masking.unpack(base64.b64decode(message.values))
        assert words.size == plan.size
        decoded = masking.decode_sum(words, plan.scale)
        for owner, vector in vectors.items():
            close = np.mean(np.abs(decoded - vector) < 1e-3)
            correlation = abs(float(np.corrcoef(decoded, vector)[0, 1]))
            assert close < 0.01, (device, owner, close)
            assert correlation < 0.2, (device, owner, correlation)
        counts = np.bincount(words >> np.uint32(masking.MODULUS_BITS - 4), minlength=16)
        expected = words.size / 16
        assert np.all(np.abs(counts - expected) < 0.5 * expected), (device, counts)


@pytest.fixture
def killers() -> Iterator[list[Killer]]:
    made: list[Killer] = []
    yield made
    for killer in made:
        killer.close()


def test_ten_doorbells_two_killed_the_round_publishes_the_exact_mean_of_the_rest(
    tmp_path: Path,
    broker: LocalBroker,
    recorder: Recorder,
    *,
    processes: list[Process],
    killers: list[Killer],
    aggregator_cache: Path,
) -> None:
    """Issue 22 item 6: SIGKILLed doorbells, the exact mean of the others; and what a
    watcher subscribed to everything under the site sees of one house: noise."""
    names = [f"d{i}" for i in range(10)]
    aggregator = secure_aggregator(tmp_path, broker.port, aggregator_cache)
    doorbells = start_federation(
        tmp_path, broker, recorder=recorder, processes=processes, aggregator=aggregator, names=names
    )

    # Round 1: the first two doorbells to deal their shares die before masking. The
    # aggregator drops them at the send phase's deadline and rebuilds the masks the
    # others added for them from their shares: the sum is of the eight.
    killer = Killer(broker.port, "shares", doorbells, count=2)
    killers.append(killer)
    metrics, announcement = secure_round(recorder, 1)
    killed = killer.close()
    killers.remove(killer)
    alive = [n for n in names if n not in killed]
    assert (metrics.outcome, metrics.secure) == ("published", True), metrics
    assert sorted(metrics.dropped) == sorted(killed)
    assert metrics.participants == len(alive) == 8
    unmask = RoundAnnouncement.model_validate_json(
        recorder.wait_for(TOPICS.round, lambda p: json.loads(p)["phase"] == "unmask")
    )
    assert unmask.secagg is not None
    assert sorted(unmask.secagg.dropped) == sorted(killed)
    assert sorted(unmask.secagg.survivors) == alive

    base, new = global_model(recorder, 0), global_model(recorder, 1)
    plan = announcement.secagg
    assert plan is not None
    vectors = {n: plain_vector(tmp_path, doorbells[n], base, announcement) for n in alive}
    moved = published_move(base, new, plan, announcement)
    expected = np.mean([vectors[n] for n in alive], axis=0)
    error = float(np.max(np.abs(moved - expected)))
    # the mean of seven of them is what a doorbell left out would give: far off
    others = min(
        float(np.max(np.abs(moved - np.mean([vectors[m] for m in alive if m != n], axis=0))))
        for n in alive
    )
    print(json.dumps({"round": 1, "error": error, "one_left_out": others, "killed": killed}))
    assert error <= resolution(plan)
    assert others > 10 * resolution(plan)
    watcher_sees_only_noise(recorder, plan, vectors)

    # Round 2: two doorbells die right after their masked update reached the broker.
    # Their inputs are in (a masked input, once received, is never taken out: the
    # aggregator would then hold both of a doorbell's secrets); their self masks are
    # rebuilt from the others' shares, and the round needs no answer from them.
    for name in killed:  # their last will: the aggregator no longer selects them
        recorder.status(name, lambda s: s.state == "offline", timeout=60)
    # Each doorbell continues the Adam it kept from round 1: read it before round 2.
    moments = {n: kept_adam(tmp_path, doorbells[n]) for n in alive}
    assert all(m is not None for m in moments.values())
    killer = Killer(broker.port, "masked", {n: doorbells[n] for n in alive}, count=2)
    killers.append(killer)
    metrics, announcement = secure_round(recorder, 2)
    killed_after = killer.close()
    killers.remove(killer)
    assert (metrics.outcome, metrics.participants) == ("published", 8), metrics
    assert metrics.dropped == []
    newer = global_model(recorder, 2)
    plan = announcement.secagg
    assert plan is not None
    vectors = {
        n: plain_vector(tmp_path, doorbells[n], new, announcement, moments[n]) for n in alive
    }
    moved = published_move(new, newer, plan, announcement)
    error = float(np.max(np.abs(moved - np.mean(list(vectors.values()), axis=0))))
    without = np.mean([v for n, v in vectors.items() if n not in killed_after], axis=0)
    print(json.dumps({"round": 2, "error": error, "killed_after_masking": killed_after}))
    assert error <= resolution(plan)
    assert float(np.max(np.abs(moved - without))) > 10 * resolution(plan)


def test_with_the_default_privacy_the_round_publishes_the_mean_plus_the_plans_noise(
    tmp_path: Path,
    broker: LocalBroker,
    recorder: Recorder,
    *,
    processes: list[Process],
    aggregator_cache: Path,
) -> None:
    """House-level DP as the product ships it (epsilon 8 over 60 rounds): six doorbells,
    the noise multiplier the accountant gives for 6 of 6 houses at delta 1/6, each doorbell
    adding its share; the round publishes, the head moves by the survivors' mean plus noise
    of the plan's size, the metrics carry epsilon, and the aggregator says in one line that
    so few houses drown in that noise."""
    names = [f"d{i}" for i in range(6)]
    # the product's default privacy, not the tests' (make_config turns DP off)
    aggregator = secure_aggregator(tmp_path, broker.port, aggregator_cache, privacy={})
    doorbells = start_federation(
        tmp_path, broker, recorder=recorder, processes=processes, aggregator=aggregator, names=names
    )
    metrics, announcement = secure_round(recorder, 1)
    assert (metrics.outcome, metrics.participants) == ("published", 6), metrics
    plan = announcement.secagg
    assert plan is not None
    settings = RoundSettings().privacy
    assert settings.epsilon_budget is not None
    z = noise_multiplier_for(settings.epsilon_budget, 1.0, settings.planned_rounds, 1 / 6)
    # the noise is split among the 5 that must survive (min_cohort; 70 % of 6 is fewer)
    assert plan.noise_std == pytest.approx(z * plan.clip_norm / 5**0.5, rel=1e-9)
    assert metrics.epsilon == pytest.approx(epsilon(z, 1.0, 1, 1 / 6), rel=1e-9)
    assert metrics.epsilon_total == metrics.epsilon
    aggregator.wait_log("too few houses a round for this noise to leave any signal")

    base, new = global_model(recorder, 0), global_model(recorder, 1)
    vectors = [plain_vector(tmp_path, doorbells[n], base, announcement) for n in names]
    noise = published_move(base, new, plan, announcement) - np.mean(vectors, axis=0)
    # six doorbells' noise in the mean: std noise_std * sqrt(6) / 6 per coordinate
    expected = plan.noise_std * 6**0.5 / 6
    measured = float(np.std(noise))
    print(json.dumps({"noise_std_of_mean": measured, "expected": expected, "size": plan.size}))
    assert 0.8 * expected < measured < 1.25 * expected  # ~1,650 coordinates: +/- 4 %
    assert abs(float(np.mean(noise))) < 0.2 * expected


class Injector:
    """A compromised doorbell's login (the test broker has no ACL; in production the
    ACL confines it to its own secagg topics): on a phase's announcement, publishes a
    bad message on its secagg topic at once, while the phase still collects."""

    def __init__(self, port: int, recorder: Recorder) -> None:
        self.recorder = recorder
        self.plans: dict[str, tuple[str, Callable[[RoundAnnouncement], bytes]]] = {}
        self.sent: list[str] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_round
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(TOPICS.round, qos=1)
        self.client.loop_start()

    def on(self, phase: str, topic: str, payload: Callable[[RoundAnnouncement], bytes]) -> None:
        self.plans[phase] = (topic, payload)

    def _on_round(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        announcement = RoundAnnouncement.model_validate_json(message.payload)
        planned = self.plans.pop(announcement.phase, None)
        if planned is not None:
            topic, payload = planned
            self.client.publish(topic, payload(announcement), qos=1)
            self.sent.append(announcement.phase)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def keyed_aggregator(tmp_path: Path, port: int, cache: Path, key: Path, trusted: Path) -> Process:
    """`python -m aggregator` that signs with `key` and trusts the doorbells in `trusted`."""
    signing = {"private_key_file": str(key), "trusted_keys_dir": str(trusted)}
    return secure_aggregator(tmp_path, port, cache, sections={"signing": signing})


def refusals(aggregator: Process, recorder: Recorder, since: int) -> list[tuple[str, str]]:
    """(device, reason) of each secagg refusal, from the aggregator's log: a refusal is
    counted and logged, never answered (issue 22), so no reply may say so."""
    replies = [json.loads(p) for p in recorder.payloads(TOPICS.reply, since)]
    assert not [r for r in replies if r["about"] == "secagg" and not r["ok"]], replies
    found = re.findall(r"rejected secagg \w+ from (\S+): (\w+):", aggregator.log())
    return [(device, reason) for device, reason in found]


def test_bad_messages_a_small_cohort_a_removed_doorbell_and_rotated_keys(
    tmp_path: Path,
    broker: LocalBroker,
    recorder: Recorder,
    *,
    processes: list[Process],
    killers: list[Killer],
    aggregator_cache: Path,
) -> None:
    """Six signed doorbells, min_cohort 5: (d) a replayed advert, malformed shares and a
    masked update of the wrong size over MQTT are refused, counted and the round publishes;
    (c) two die after dealing their shares: four would be unmasked, so the round is
    abandoned and says why, nothing is published; (e) a doorbell removed and another's key
    rotated, then the aggregator's key rotated: the next rounds work."""
    names = [f"d{i}" for i in range(6)]
    keys = tmp_path / "keys"
    for name in [*names, "aggregator"]:
        write_key_pair(keys / f"{name}.key", keys / "devices" / f"{name}.pub")
    trusted_by_doorbells = tmp_path / "trusted"
    trusted_by_doorbells.mkdir()
    shutil.move(keys / "devices" / "aggregator.pub", trusted_by_doorbells / "aggregator.pub")
    signing = {
        n: {
            "private_key_file": str(keys / f"{n}.key"),
            "trusted_keys_dir": str(trusted_by_doorbells),
        }
        for n in names
    }
    aggregator = keyed_aggregator(
        tmp_path, broker.port, aggregator_cache, keys / "aggregator.key", keys / "devices"
    )
    doorbells = start_federation(
        tmp_path,
        broker,
        recorder=recorder,
        processes=processes,
        aggregator=aggregator,
        names=names,
        signing=signing,
    )
    metrics, _ = secure_round(recorder, 1)
    assert (metrics.outcome, metrics.participants) == ("published", 6), metrics
    old_advert = recorder.payloads(TOPICS.secagg("keys", "d0"))[0]

    # (d) bad messages from a compromised doorbell's login, each in its phase of round 2
    injector = Injector(broker.port, recorder)
    injector.on("keys", TOPICS.secagg("keys", "d0"), lambda _a: old_advert)
    injector.on("shares", TOPICS.secagg("shares", "d1"), lambda _a: b'{"round": 2, "shares": [')
    injector.on(
        "send",
        TOPICS.secagg("masked", "d2"),
        lambda a: json.dumps(
            {
                "round": a.round,
                "lineage": a.lineage,
                "device": "d2",
                "values": base64.b64encode(np.zeros(7, "<u4").tobytes()).decode(),
            }
        ).encode(),
    )
    mark = recorder.mark()
    try:
        metrics, _ = secure_round(recorder, 2)
    finally:
        injector.close()
    assert injector.sent == ["keys", "shares", "send"]
    assert (metrics.outcome, metrics.participants) == ("published", 6), metrics
    refused = refusals(aggregator, recorder, mark)
    print(json.dumps({"round": 2, "refused": refused, "rejected": metrics.rejected}))
    # Each is refused and counted whether it came before or after the doorbell's own
    # message. One that lands after its phase closed (all six had sent: the injector's
    # client can lag under load) is refused for its phase before it is parsed, so either
    # reason is right here; each kind's own reason is pinned in process, without the race
    # (tests/test_secure_coordinator.py).
    expected = {"d0": "secagg_replay", "d1": "secagg_bad_message", "d2": "secagg_wrong_size"}
    assert sorted(device for device, _ in refused) == sorted(expected), refused
    for device, reason in refused:
        assert reason in {expected[device], "secagg_wrong_phase"}, refused
    for reason, count in Counter(reason for _, reason in refused).items():
        assert metrics.rejected.get(reason) == count, metrics.rejected

    # (c) two doorbells die after dealing their shares: four would be unmasked
    killer = Killer(broker.port, "shares", doorbells, count=2)
    killers.append(killer)
    metrics, _ = secure_round(recorder, 3)
    killed = killer.close()
    killers.remove(killer)
    assert metrics.outcome == "abandoned", metrics
    assert metrics.version == 0
    assert metrics.rejected.get("secagg_below_min_cohort") == 1
    assert "phase send: 4 of 6 doorbells answered, min_cohort is 5" in metrics.detail
    assert recorder.round(3, "abandoned").secagg is not None
    assert recorder.versions()[-1] == 2  # nothing published since round 2
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["model"]["version"] == 2

    # (e) the two come back; one doorbell is removed (its key revoked, its process gone)
    # and another's key is rotated: the next round runs with the five that have keys
    removed, rotated = [n for n in reversed(names) if n not in killed][:2]
    mark = recorder.mark()
    for name in killed:
        doorbells[name].process.start()
    (keys / "devices" / f"{removed}.pub").unlink()
    doorbells[removed].process.stop()
    write_key_pair(keys / f"{rotated}.key", keys / "devices" / f"{rotated}.pub")
    # Rewritten in place, a key leaves its folder unchanged, so the aggregator would
    # see it only at its next look at every file (>= 1 s, longer under load); an
    # operator reloads it, as docs/security.md says. Without this, round 4 could
    # start on the old key and refuse the rotated doorbell's advert.
    assert aggregator.process is not None
    aggregator.process.send_signal(signal.SIGHUP)
    aggregator.wait_log("SIGHUP: re-reading the trusted device keys")
    doorbells[rotated].process.stop()
    doorbells[rotated].process.start()
    for name in [*killed, rotated]:
        recorder.status(name, lambda s: s.state == "online", timeout=STARTUP, since=mark)
    metrics, announcement = secure_round(recorder, 4)
    assert removed not in announcement.selected
    assert (metrics.outcome, metrics.participants) == ("published", 5), metrics

    # ...and the aggregator's key is rotated: doorbells are given the new public key
    aggregator.stop()
    write_key_pair(keys / "aggregator.key", trusted_by_doorbells / "aggregator.pub")
    aggregator.start().wait_log("ready: site", timeout=STARTUP)
    mark = recorder.mark()
    kept = [n for n in names if n != removed]
    for name in kept:
        doorbells[name].process.stop()
        doorbells[name].process.start()
    for name in kept:
        recorder.status(name, lambda s: s.state == "online", timeout=STARTUP, since=mark)
    metrics, announcement = secure_round(recorder, 5)
    verify_announcement(announcement, SITE, load_public_keys(trusted_by_doorbells)["aggregator"])
    assert (metrics.outcome, metrics.participants) == ("published", 5), metrics
