"""`rounds.trainable: last_level` on the aggregator, in process (issue 20 item 3).

The coordinator on a fake clock (tests/test_aggregator_rounds.py's harness) with the
real Exporter: dlib's last level and the head as the model, the backbone cut before
that level. What a real round with doorbells does is in tests/test_last_level_round.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.config import AggregatorConfig, EvaluationSettings
from aggregator.coordinator import Coordinator
from aggregator.export import Exporter
from aggregator.sizes import MessageTooLarge, measure
from aggregator.state import StateStore
from fedbell.config import load_config
from fedbell.errors import ConfigError
from fedbell.faces import dlib_resnet, last_level
from fedbell.faces.embedding import HEAD_NAMES, LAST_LEVEL_NAMES
from fedbell.faces.features import Backbone
from fedbell.wire.backbone import parse_manifest
from fedbell.wire.messages import AGGREGATOR, Signer, build_update, parse_global
from fedbell.wire.topics import Topics
from tests.test_aggregator_rounds import Harness, harness_config

LAST_LEVEL = {"trainable": "last_level", "codec": "int8"}
"""float32 updates of the last level (2.55 MB) do not fit the broker's 1 MiB: int8 does."""


@pytest.fixture(scope="module")
def head_exporter(aggregator_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Exporter:
    config = harness_config(tmp_path_factory.mktemp("unused"), aggregator_cache)
    return Exporter(config, Signer(AGGREGATOR))


@pytest.fixture(scope="module")
def level_exporter(last_level_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Exporter:
    config = harness_config(tmp_path_factory.mktemp("unused"), last_level_cache, **LAST_LEVEL)
    return Exporter(config, Signer(AGGREGATOR))


def test_trainable_is_checked_like_every_key(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.yaml"
    path.write_text("site: home\nstate_dir: /tmp/x\nrounds:\n  trainable: last_levl\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, AggregatorConfig)
    assert str(path) in str(err.value)
    assert "rounds.trainable" in str(err.value)
    assert "'head' or 'last_level'" in str(err.value)
    path.write_text("site: home\nstate_dir: /tmp/x\nrounds:\n  trainables: last_level\n")
    with pytest.raises(ConfigError, match=r"rounds\.trainables: unknown key"):
        load_config(path, AggregatorConfig)
    path.write_text("site: home\nstate_dir: /tmp/x\n")
    assert load_config(path, AggregatorConfig).rounds.trainable == "head"


def test_the_exporter_trains_dlibs_last_level_on_the_cut_backbone(
    head_exporter: Exporter, level_exporter: Exporter
) -> None:
    assert head_exporter.names == HEAD_NAMES
    assert level_exporter.names == LAST_LEVEL_NAMES
    start = level_exporter.initial_weights()
    dlib = dlib_resnet.load()
    dlibs = [*last_level.initial(dlib), dlib_resnet.dlib_projection(dlib)]
    for got, want in zip(start, dlibs, strict=True):
        np.testing.assert_array_equal(got, want)
    cut = Backbone(level_exporter.backbone_models.float_model, num_threads=1)
    whole = Backbone(head_exporter.backbone_models.float_model, num_threads=1)
    assert (cut.ends_before_last_level, cut.size) == (True, last_level.LEVEL_INPUTS)
    assert (whole.ends_before_last_level, whole.size) == (False, dlib_resnet.FEATURES)
    assert level_exporter.backbone_sha256 != head_exporter.backbone_sha256


def _update(harness: Harness, device: str, round_id: int, shapes: list[tuple[int, ...]]) -> None:
    model = harness.coordinator.federation.model
    harness.send(
        harness.topics.update(device),
        build_update(
            site=harness.config.site,
            signer=Signer(device),
            round_id=round_id,
            base_version=model.version,
            num_examples=2,
            names=LAST_LEVEL_NAMES,
            delta=[np.full(shape, 1e-3, np.float32) for shape in shapes],
            codec="int8",
        ),
    )


def test_a_level_tensor_of_another_shape_is_refused_counted_and_changes_nothing(
    tmp_path: Path, level_exporter: Exporter
) -> None:
    harness = Harness(tmp_path, level_exporter, **LAST_LEVEL)
    before = [w.copy() for w in harness.coordinator.federation.model.weights]
    harness.online("a", "b")
    harness.command(cmd="start_round")
    shapes = [tuple(w.shape) for w in before]
    wrong = [(last_level.PATCH, 128), *shapes[1:]]  # conv1 with half its outputs
    _update(harness, "a", 1, wrong)
    fed = harness.coordinator.federation
    assert fed.rejected["bad_shapes"] == 1
    assert fed.round is not None
    assert fed.round.received == []
    assert harness.versions() == [0]
    for got, was in zip(fed.model.weights, before, strict=True):
        np.testing.assert_array_equal(got, was)

    _update(harness, "a", 1, shapes)  # the right shapes from the same doorbell: taken
    _update(harness, "b", 1, shapes)
    assert harness.versions() == [0, 1]
    published = parse_global(
        harness.payloads(harness.topics.global_model)[-1],
        site=harness.config.site,
        max_bytes=harness.config.mqtt.max_message_bytes,
        keys=None,
    )
    assert published.names == LAST_LEVEL_NAMES
    assert published.backbone == level_exporter.backbone_sha256
    assert not np.allclose(published.weights[0], before[0])  # the level moved
    assert harness.metrics()[-1].rejected == {"bad_shapes": 1}


def test_changing_trainable_starts_a_new_lineage_and_keeps_the_round_count(
    tmp_path: Path,
    head_exporter: Exporter,
    level_exporter: Exporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    harness = Harness(tmp_path, head_exporter)
    harness.online("a")
    harness.command(cmd="start_round")
    harness.update("a", 1)
    head_model = harness.coordinator.federation.model
    assert (head_model.version, harness.coordinator.federation.last_round) == (1, 1)

    with caplog.at_level("WARNING", logger="aggregator"):
        level = Harness(tmp_path, level_exporter, **LAST_LEVEL)
    assert "rounds.trainable is now last_level" in caplog.text
    assert f"lineage {head_model.lineage}) trains head/projection" in caplog.text
    fed = level.coordinator.federation
    assert fed.model.version == 0
    assert fed.model.lineage != head_model.lineage
    assert fed.model.epoch > head_model.epoch  # doorbells accept it over the old lineage
    assert fed.last_round == 1  # round ids go on: a doorbell never sees round 1 twice
    assert [w.shape for w in fed.model.weights] == [
        *last_level.SHAPES,
        (dlib_resnet.FEATURES, dlib_resnet.DESCRIPTOR),
    ]
    # The new lineage's backbone is published (the cut one), and its version 0.
    manifest = parse_manifest(
        level.payloads(Topics(level.config.site).tflite_model)[-1],
        site=level.config.site,
        max_bytes=level.config.mqtt.max_message_bytes,
        keys=None,
    )
    assert (manifest.lineage, manifest.float_sha256) == (
        fed.model.lineage,
        level_exporter.backbone_sha256,
    )
    assert level.versions() == [0]
    level.online("a")
    level.command(cmd="start_round")
    assert fed.round is not None
    assert fed.round.id == 2

    # and back: the head again, a lineage of its own
    caplog.clear()
    with caplog.at_level("WARNING", logger="aggregator"):
        back = Harness(tmp_path, head_exporter)
    assert "rounds.trainable is now head" in caplog.text
    model = back.coordinator.federation.model
    assert model.lineage not in (head_model.lineage, fed.model.lineage)
    assert [w.shape for w in model.weights] == [(dlib_resnet.FEATURES, dlib_resnet.DESCRIPTOR)]


@pytest.mark.parametrize(
    ("rounds", "match"),
    [
        ({"codec": "float16"}, r"an update as float16 is 1,2\d\d,\d{3} bytes"),
        ({"codec": "int8", "downlink_codec": "float16"}, r"global model as float16 is 1,"),
    ],
)
def test_a_setting_whose_messages_do_not_fit_is_refused_at_start(
    tmp_path: Path, level_exporter: Exporter, rounds: dict[str, str], match: str
) -> None:
    config = harness_config(tmp_path, level_exporter.config.cache_dir or tmp_path, **rounds)
    with pytest.raises(MessageTooLarge, match=match) as err:
        Coordinator(
            config,
            level_exporter,
            StateStore(config.state_dir),
            publish=lambda _topic, _payload: None,
            clock=lambda: 0.0,
            trusted_keys=None,
        )
    assert "mqtt.max_message_bytes 1,048,576" in str(err.value)
    assert not (tmp_path / "state" / "state.json").exists()  # refused before any state


def test_a_bare_site_whose_doorbells_calibrate_cannot_train_the_last_level(
    tmp_path: Path, last_level_cache: Path
) -> None:
    """Its calibration rounds' announcement carries the candidate and the start model, each
    capped at a quarter of a round message: the last level's (446 kB as int8) is not."""
    config = harness_config(tmp_path, last_level_cache, **LAST_LEVEL, secure_aggregation=True)
    config = config.model_copy(update={"evaluation": EvaluationSettings(require_calibration=True)})
    exporter = Exporter(config, Signer(AGGREGATOR))
    assert exporter.uncalibrated
    with pytest.raises(MessageTooLarge, match="a calibration round's announcement carries two"):
        measure(config, exporter)
    head = config.model_copy(
        update={"rounds": config.rounds.model_copy(update={"trainable": "head"})}
    )
    assert measure(head, Exporter(head, Signer(AGGREGATOR))).masked is not None
