"""YAML configuration loaded into strict pydantic models.

Every model forbids unknown keys, so a typo in a YAML file is an error that
names the file and the key, never a silently ignored setting. Secrets are
read from files (systemd's LoadCredential=): a path may use
`${CREDENTIALS_DIRECTORY}` or any other environment variable.

Every configuration module builds on what is here: `StrictModel`, whose
settings are documented by the docstring under each field, and the value
types below, named for what a setting means (a duration, a fraction, a
count), so each model declares only its own keys, defaults and bounds.
"""

from __future__ import annotations

import os
import re
from difflib import get_close_matches
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from fedbell.errors import ConfigError
from fedbell.redact import redact
from fedbell.wire.codecs import TENSOR_CODECS
from fedbell.wire.envelope import Codec
from fedbell.wire.topics import check_segment

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class StrictModel(BaseModel):
    """A configuration section: unknown keys are errors, values never change after loading.

    The docstring under a field is its description (in the model's JSON schema too).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


Seconds = Annotated[float, Field(gt=0)]
"""A duration or deadline: some time must pass."""
NonNegativeSeconds = Annotated[float, Field(ge=0)]
"""A pause or debounce that 0 turns off."""
Positive = Annotated[float, Field(gt=0)]
"""A norm, a rate or a budget: anything above 0."""
Fraction = Annotated[float, Field(ge=0, le=1)]
"""A share of an accuracy, from 0 to 1 (a drop of 0.15 is 15 points)."""
Share = Annotated[float, Field(gt=0, le=1)]
"""A part of a whole that cannot be empty: above 0, at most all of it."""
LearningRate = Annotated[float, Field(gt=0, le=1)]
"""The step of local training (or the most a round may ask for)."""
Cosine = Annotated[float, Field(ge=-1, le=1)]
"""A cosine-similarity threshold."""
Count = Annotated[int, Field(ge=0)]
"""How many of something, 0 included."""
PositiveCount = Annotated[int, Field(ge=1)]
"""How many of something, at least one."""
Epochs = Annotated[int, Field(ge=1, le=100)]
"""Local training epochs per round (or the most a round may ask for)."""
Threads = Annotated[int, Field(ge=1, le=64)]
"""Cores a process may use."""


def site_id(value: str) -> str:
    return check_segment(value, "site id")


def device_id(value: str) -> str:
    return check_segment(value, "device id")


def member_of(allowed: tuple[str, ...]) -> AfterValidator:
    """A validator refusing any value not in `allowed` (a narrower set than its type's)."""

    def check(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")
        return value

    return AfterValidator(check)


SiteId = Annotated[str, AfterValidator(site_id)]
"""A federation's name: one MQTT topic segment."""
DeviceId = Annotated[str, AfterValidator(device_id)]
"""A doorbell's name: one MQTT topic segment, also its broker user name."""
UpdateCodec = Annotated[Codec, member_of(TENSOR_CODECS)]
"""A codec an update may travel in (every tensor codec)."""


class TlsSettings(StrictModel):
    ca_file: Path
    """PEM file of the site CA."""
    cert_file: Path | None = None
    """PEM client certificate, if the broker authenticates clients by certificate."""
    key_file: Path | None = None
    """PEM private key of the client certificate."""


class MqttSettings(StrictModel):
    host: str = "127.0.0.1"
    """Host name or IP."""
    port: int = Field(default=1883, ge=1, le=65535)
    """1883 for plain MQTT on loopback, 8883 for TLS."""
    username: str | None = None
    """Broker login; a device logs in as its device id."""
    password_file: Path | None = None
    """File holding the broker password (never the password itself in YAML)."""
    tls: TlsSettings | None = None
    """Connect with TLS; omit for loopback tests."""
    topic_root: str = "fedbell"
    """First segment of every federation topic."""
    keepalive: int = Field(default=30, ge=5, le=3600)
    """MQTT keep-alive in seconds; the last will fires after 1.5× this."""
    session_expiry: int = Field(default=3600, ge=0)
    """How long (seconds) the broker keeps this client's subscriptions and queued QoS 1 messages
    while it is offline."""
    # the broker's message_size_limit: a backbone chunk is 512 KiB
    max_message_bytes: int = Field(default=1024 * 1024, ge=1024)
    """Messages larger than this are rejected before parsing."""

    def password(self) -> str | None:
        if self.password_file is None:
            return None
        try:
            return self.password_file.read_text().strip()
        except OSError as err:
            raise ConfigError(
                f"mqtt.password_file: cannot read {self.password_file}: {err.strerror}"
            ) from None


class SigningSettings(StrictModel):
    private_key_file: Path | None = None
    """Ed25519 private key (PEM) this process signs its messages with."""
    trusted_keys_dir: Path | None = None
    """Folder of `<name>.pub` Ed25519 public keys whose signatures are accepted. When set, unsigned
    or wrongly signed messages are rejected."""


def _expand(value: Any, where: str) -> Any:
    """Expand ${VAR} in every string, refusing variables that are not set."""
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        for name in _VARIABLE.findall(value):
            if name not in os.environ:
                raise ConfigError(f"{where}: environment variable {name} is not set")
        return _VARIABLE.sub(lambda m: os.environ[m.group(1)], value)
    return value


M = TypeVar("M", bound=BaseModel)


def load_config(path: Path, model: type[M]) -> M:
    """Read a YAML file into `model`; every problem names the file and the key."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    try:
        return model.model_validate(_expand(raw, ""))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except ValidationError as err:
        # One short line per problem: the key, what is wrong, the value if it is short
        # (never a whole section: a missing key's "input" is everything around it).
        lines = []
        for problem in err.errors():
            loc = tuple(problem["loc"])
            key = ".".join(str(p) for p in loc) or "(top level)"
            if problem["type"] == "extra_forbidden":
                near = get_close_matches(str(loc[-1]), _keys_at(model, loc[:-1]), n=1)
                message = f"unknown key (did you mean {near[0]}?)" if near else "unknown key"
            elif problem["type"] == "missing":
                message = "missing (required)"
            else:
                shown = repr(problem.get("input"))
                message = problem["msg"] + (f" (got {shown})" if len(shown) <= 80 else "")
            # redact: a rejected camera URL must not print its own password
            lines.append(redact(f"{path}: {key}: {message}"))
        raise ConfigError("\n".join(lines)) from None


def _keys_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The keys the model accepts at `loc` (a section's path), [] if it is not a section."""
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", {})
        if part not in fields:
            return []
        annotation = fields[part].annotation
        sections = [
            a
            for a in (annotation, *get_args(annotation))
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if not sections:
            return []
        current = sections[0]
    return list(getattr(current, "model_fields", {}))
