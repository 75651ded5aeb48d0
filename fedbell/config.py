"""YAML configuration loaded into strict pydantic models.

Every model forbids unknown keys, so a typo in a YAML file is an error that
names the file and the key, never a silently ignored setting. Secrets are
read from files (systemd's LoadCredential=): a path may use
`${CREDENTIALS_DIRECTORY}` or any other environment variable.
"""

from __future__ import annotations

import os
import re
from difflib import get_close_matches
from pathlib import Path
from typing import Any, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedbell.errors import ConfigError
from fedbell.redact import redact
from fedbell.wire.topics import check_segment

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsSettings(StrictModel):
    ca_file: Path = Field(title="CA certificate", description="PEM file of the site CA.")
    cert_file: Path | None = Field(
        default=None,
        title="Client certificate",
        description="PEM client certificate, if the broker authenticates clients by certificate.",
    )
    key_file: Path | None = Field(
        default=None, title="Client key", description="PEM private key of the client certificate."
    )


class MqttSettings(StrictModel):
    host: str = Field(default="127.0.0.1", title="Broker host", description="Host name or IP.")
    port: int = Field(
        default=1883,
        ge=1,
        le=65535,
        title="Broker port",
        description="1883 for plain MQTT on loopback, 8883 for TLS.",
    )
    username: str | None = Field(
        default=None,
        title="User name",
        description="Broker login; a device logs in as its device id.",
    )
    password_file: Path | None = Field(
        default=None,
        title="Password file",
        description="File holding the broker password (never the password itself in YAML).",
    )
    tls: TlsSettings | None = Field(
        default=None, title="TLS", description="Connect with TLS; omit for loopback tests."
    )
    topic_root: str = Field(
        default="fedbell",
        title="Topic root",
        description="First segment of every federation topic.",
    )
    keepalive: int = Field(
        default=30,
        ge=5,
        le=3600,
        title="Keep-alive (s)",
        description="MQTT keep-alive; the last will fires after 1.5× this.",
    )
    session_expiry: int = Field(
        default=3600,
        ge=0,
        title="Session expiry (s)",
        description="How long the broker keeps this client's subscriptions and queued QoS 1 "
        "messages while it is offline.",
    )
    max_message_bytes: int = Field(
        default=1024 * 1024,  # the broker's message_size_limit: a backbone chunk is 512 KiB
        ge=1024,
        title="Largest message (bytes)",
        description="Messages larger than this are rejected before parsing.",
    )

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
    private_key_file: Path | None = Field(
        default=None,
        title="Signing key",
        description="Ed25519 private key (PEM) this process signs its messages with.",
    )
    trusted_keys_dir: Path | None = Field(
        default=None,
        title="Trusted keys",
        description="Folder of `<name>.pub` Ed25519 public keys whose signatures are accepted. "
        "When set, unsigned or wrongly signed messages are rejected.",
    )


def site_id(value: str) -> str:
    return check_segment(value, "site id")


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
