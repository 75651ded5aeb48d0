"""Configuration: a typo in YAML is an error naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aggregator.config import AggregatorConfig, RoundSettings
from edge.config import EdgeConfig
from fedbell.config import load_config
from fedbell.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "site: home\nstate_dir: /tmp/x\nrounds:\n  timeout: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, AggregatorConfig)
    assert str(path) in str(err.value)
    assert "rounds.timeout: unknown key" in str(err.value)


def test_a_typo_is_one_short_line_that_suggests_the_key(tmp_path: Path) -> None:
    """A misspelt required key once printed the whole config (723 characters) as the
    "input" of the missing one."""
    example = (CONFIG_DIR / "edge.yaml").read_text()
    path = write(tmp_path, example.replace("device_id:", "device_idd:", 1))
    with pytest.raises(ConfigError) as err:
        load_config(path, EdgeConfig)
    assert str(err.value).splitlines() == [
        f"{path}: device_id: missing (required)",
        f"{path}: device_idd: unknown key (did you mean device_id?)",
    ]
    path = write(tmp_path, "site: home\nstate_dir: /tmp/x\nrounds:\n  timeout: 3\n")
    with pytest.raises(
        ConfigError, match=r"rounds\.timeout: unknown key \(did you mean timeout_s\?\)$"
    ):
        load_config(path, AggregatorConfig)


def test_a_label_list_is_no_longer_a_setting(tmp_path: Path) -> None:
    """The open-world aggregator trains no classes: a closed-set config's `labels`
    (and its `model_seed`) are refused by name rather than silently ignored."""
    for key in ("labels: [ann, ben]", "model_seed: 3"):
        path = write(tmp_path, f"site: home\nstate_dir: /tmp/x\n{key}\n")
        with pytest.raises(ConfigError, match=f"{key.split(':')[0]}: unknown key"):
            load_config(path, AggregatorConfig)


@pytest.mark.parametrize(
    ("evaluation", "match"),
    [
        ("max_strangers: 39", r"evaluation\.max_strangers"),
        ("target_false_accept: 1.0", r"evaluation\.target_false_accept"),
        ("target_false_accept: -0.01", r"evaluation\.target_false_accept"),
        ("gallery_size: 0", r"evaluation\.gallery_size"),
        ("default_threshold: 1.5", r"evaluation\.default_threshold"),
        ("detector: mtcnn", r"evaluation\.detector"),
        ("stranger: /data", r"evaluation\.stranger: unknown key"),
    ],
)
def test_evaluation_settings_are_checked(tmp_path: Path, evaluation: str, match: str) -> None:
    path = write(tmp_path, f"site: home\nstate_dir: /tmp/x\nevaluation:\n  {evaluation}\n")
    with pytest.raises(ConfigError, match=match):
        load_config(path, AggregatorConfig)


def test_evaluation_defaults_and_cache_folder(tmp_path: Path) -> None:
    path = write(tmp_path, "site: home\nstate_dir: /tmp/x\ncache_dir: /tmp/cache\n")
    config = load_config(path, AggregatorConfig)
    assert config.cache_dir == Path("/tmp/cache")
    settings = config.evaluation
    assert (settings.strangers, settings.dataset) == (None, None)
    assert (settings.target_false_accept, settings.gallery_size) == (0.01, 5)
    assert -1.0 <= settings.default_threshold <= 1.0


def test_wrong_type_says_what_was_expected(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "device_id: door\nsite: home\nstate_dir: /s\ngallery_dir: /g\nmqtt:\n  port: many\n",
    )
    with pytest.raises(ConfigError, match=r"mqtt\.port: Input should be a valid integer"):
        load_config(path, EdgeConfig)


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "site: [unclosed\n"), EdgeConfig)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml", EdgeConfig)


def test_device_id_cannot_smuggle_topic_wildcards(tmp_path: Path) -> None:
    path = write(tmp_path, "device_id: '#'\nsite: home\nstate_dir: /s\ngallery_dir: /g\n")
    with pytest.raises(ConfigError, match="device_id"):
        load_config(path, EdgeConfig)


def test_credentials_directory_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mqtt-password").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    path = write(
        tmp_path,
        "device_id: door\nsite: home\nstate_dir: /s\ngallery_dir: /g\n"
        "mqtt:\n  password_file: ${CREDENTIALS_DIRECTORY}/mqtt-password\n",
    )
    assert load_config(path, EdgeConfig).mqtt.password() == "s3cret"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY is not set"):
        load_config(path, EdgeConfig)


@pytest.mark.parametrize(
    ("name", "model"), [("edge.yaml", EdgeConfig), ("aggregator.yaml", AggregatorConfig)]
)
def test_example_configs_load(name: str, model: type[EdgeConfig | AggregatorConfig]) -> None:
    path = CONFIG_DIR / name
    if not path.exists():
        pytest.fail(f"{path} is missing: the README points users at it")
    load_config(path, model)


@pytest.mark.parametrize(
    ("rounds", "match"),
    [
        (
            "strategy: median\n  codec: float32\n  max_devices: 10",
            "strategy median with secure_aggregation: it needs each doorbell's update",
        ),
        ("strategy: multi_krum\n  codec: int8\n  max_devices: 10", "only ever sees the sum"),
        ("weighting: examples", "a masked update carries no example count"),
        ("max_devices: 3\n  min_cohort: 5", "max_devices 3 is below min_cohort 5"),
        ("min_cohort: 1", r"rounds\.min_cohort"),
        ("secure_clip_norm: 0", r"rounds\.secure_clip_norm"),
        ("secure_clip: 0.02", r"rounds\.secure_clip: unknown key \(did you mean secure_clip_norm"),
        (
            "privacy:\n    noise_multiplier: 0",
            "noise_multiplier 0 with epsilon_budget 8: without noise every round's epsilon is "
            "infinite, so no round would fit the budget; to turn house-level DP off set "
            "epsilon_budget: null",
        ),
        ("privacy:\n    noise: 1.0", r"rounds\.privacy\.noise: unknown key"),
        (
            "privacy:\n    planed_rounds: 30",
            r"rounds\.privacy\.planed_rounds: unknown key \(did you mean planned_rounds",
        ),
        ("privacy:\n    planned_rounds: 0", r"rounds\.privacy\.planned_rounds"),
        ("privacy:\n    epsilon_budget: -1", r"rounds\.privacy\.epsilon_budget"),
    ],
)
def test_secure_aggregation_refuses_what_cannot_work_with_a_sum(
    tmp_path: Path, rounds: str, match: str
) -> None:
    """Issue 22: the robust strategies need each update; clipping moves to the doorbell."""
    path = write(
        tmp_path,
        f"site: home\nstate_dir: /tmp/x\nrounds:\n  secure_aggregation: true\n  {rounds}\n",
    )
    with pytest.raises(ConfigError, match=match):
        load_config(path, AggregatorConfig)


def test_the_example_and_provisioned_aggregators_run_secure_rounds() -> None:
    config = load_config(CONFIG_DIR / "aggregator.yaml", AggregatorConfig)
    assert config.rounds.secure_aggregation
    assert config.rounds.quorum == config.rounds.min_cohort == 5
    template = (CONFIG_DIR.parent / "deploy" / "templates" / "aggregator.yaml").read_text()
    assert "secure_aggregation: true" in template


def test_the_example_and_provisioned_aggregators_ship_the_default_privacy() -> None:
    """Issue 22: house-level DP on, as the code's defaults say (one source of the numbers
    the benchmark and the docs quote); the template's rounds section read as the example's."""
    defaults = RoundSettings()
    example = load_config(CONFIG_DIR / "aggregator.yaml", AggregatorConfig).rounds
    assert example.privacy == defaults.privacy
    assert example.secure_clip_norm == defaults.secure_clip_norm
    assert example.clip_norm == defaults.clip_norm
    template = (CONFIG_DIR.parent / "deploy" / "templates" / "aggregator.yaml").read_text()
    rounds = yaml.safe_load(template.split("\nrounds:\n", 1)[1].split("\n# ", 1)[0])
    provisioned = RoundSettings.model_validate(rounds)
    assert provisioned.privacy == defaults.privacy
    assert provisioned.privacy.epsilon_budget is not None


def test_the_aggregator_connects_to_the_clustered_tier_when_its_mqtt_section_says_so() -> None:
    """Issue 23: `protocol: "3.1.1"` and `failover` select the tier's settings; a plain
    section stays the house broker's MQTT 5, and a typo names the key in both readings."""
    from aggregator.config import AggregatorConfig
    from fedbell.config import MqttSettings
    from fedbell.tier import TierMqttSettings

    base = {"site": "home", "state_dir": "/tmp/unused"}
    house = AggregatorConfig.model_validate({**base, "mqtt": {"host": "hub", "port": 1883}})
    assert type(house.mqtt) is MqttSettings
    tier = {"host": "n1", "port": 1883, "protocol": "3.1.1", "failover": ["n2:1884", "n3:1885"]}
    clustered = AggregatorConfig.model_validate({**base, "mqtt": tier})
    assert isinstance(clustered.mqtt, TierMqttSettings)
    assert clustered.mqtt.endpoints() == [("n1", 1883), ("n2", 1884), ("n3", 1885)]
    with pytest.raises(ValueError, match=r"mqtt\.\w+\.prot"):
        AggregatorConfig.model_validate({**base, "mqtt": {"host": "n1", "prot": "3.1.1"}})
