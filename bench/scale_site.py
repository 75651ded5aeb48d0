"""The site of a `bench.scale` run: signing keys, the broker (loopback, or the production
TLS set-up made by the real provisioner) and the aggregator's config.

`signing_keys` and `seed_backbone_cache` serve every benchmark that starts the real
aggregator and doorbells (`bench.secure_rounds`, `bench.soak`, `bench.edge`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from broker.local import LocalBroker
from fedbell.wire.envelope import Codec

SITE = "scale"
REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "reports" / "cache"


# --- the site: keys, broker, configs ----------------------------------------------------


@dataclass
class Site:
    """Everything one run needs to start the broker, the aggregator and the swarm."""

    folder: Path
    names: list[str]
    keys_dir: Path
    """Private keys of the doorbells (`<name>.key`), read by the swarm workers."""
    trusted_dir: Path
    """Public keys of the doorbells (`<name>.pub`), trusted by the aggregator."""
    aggregator_key: Path
    aggregator_pub: Path
    host: str = "127.0.0.1"
    tls: dict[str, str] | None = None
    passwords: Path | None = None
    watcher_login: tuple[str, str] | None = None
    watcher_bundle: Path | None = None
    """TLS client certificate of the watcher's login (the operator's bundle)."""
    aggregator_mqtt: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


def _write_key_pair(key: Ed25519PrivateKey, private: Path, public: Path) -> None:
    private.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    public.write_bytes(
        key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )


def signing_keys(folder: Path, names: Sequence[str]) -> tuple[Path, Path, Path, Path]:
    """(private keys dir, trusted public keys dir, aggregator key, aggregator pub)."""
    keys_dir, trusted = folder / "device-keys", folder / "trusted"
    keys_dir.mkdir(parents=True, exist_ok=True)
    trusted.mkdir(parents=True, exist_ok=True)
    for name in names:
        _write_key_pair(
            Ed25519PrivateKey.generate(), keys_dir / f"{name}.key", trusted / f"{name}.pub"
        )
    aggregator_key, aggregator_pub = folder / "aggregator.key", folder / "aggregator.pub"
    _write_key_pair(Ed25519PrivateKey.generate(), aggregator_key, aggregator_pub)
    return keys_dir, trusted, aggregator_key, aggregator_pub


def signed_site(folder: Path, names: list[str], **broker: Any) -> Site:
    """A site with fresh signing keys for the aggregator and every doorbell."""
    return Site(folder, names, *signing_keys(folder, names), **broker)


def loopback_site(folder: Path, names: list[str], port: int) -> Site:
    return signed_site(folder, names, aggregator_mqtt={"host": "127.0.0.1", "port": port})


def provision_site(root: Path, names: Sequence[str]) -> dict[str, str]:
    """A site made by the real provisioner; returns {login: password} of the doorbells."""
    import secrets

    from deploy import provision
    from deploy.acl import Role

    def run(*args: str) -> None:
        provision.run([*args, "--site-dir", str(root)])

    run("init", "--site", SITE, "--broker-host", "localhost")
    run("add-aggregator", "--no-reload")
    run("add-operator", "--no-reload")
    run("add-device", names[0], "--no-reload")
    passwords = {names[0]: (root / "clients" / names[0] / "mqtt-password").read_text().strip()}
    site = provision.Site.load(root)
    for name in names[1:]:
        site.logins[name] = Role.DEVICE
        passwords[name] = secrets.token_urlsafe(32)
    site.save()  # the provisioner's own ACL for every doorbell
    plain = root / "bench-passwords"  # hashed apart: -U would hash the hashed lines again
    plain.touch(mode=0o600)
    plain.write_text("".join(f"{n}:{p}\n" for n, p in passwords.items() if n != names[0]))
    subprocess.run(
        [provision._mosquitto_passwd(), "-U", str(plain)], check=True, capture_output=True
    )
    with site.passwd.open("a") as passwd:
        passwd.write(plain.read_text())
    plain.unlink()
    provision._fix_passwd_mode(site.passwd)
    return passwords


def tls_site(folder: Path, names: list[str]) -> tuple[Site, Path]:
    """(the site, the broker's conf folder)."""
    root = folder / "site"
    passwords = provision_site(root, names)
    passwords_file = folder / "passwords.json"
    passwords_file.touch(mode=0o600)
    passwords_file.write_text(json.dumps(passwords))
    first = root / "clients" / names[0]
    aggregator = root / "clients" / "aggregator"
    operator = root / "clients" / "operator"
    template = yaml.safe_load((aggregator / "aggregator.yaml").read_text())
    site = signed_site(
        folder,
        names,
        host="localhost",
        tls={
            "ca": str(first / "ca.crt"),
            "cert": str(first / "client.crt"),
            "key": str(first / "client.key"),
        },
        passwords=passwords_file,
        watcher_login=("operator", (operator / "mqtt-password").read_text().strip()),
        watcher_bundle=operator,
        aggregator_mqtt=template["mqtt"],
        env={"CREDENTIALS_DIRECTORY": str(aggregator)},
    )
    return site, root / "broker"


_CONVERTED: list[bool] = []


def seed_backbone_cache(state_dir: Path) -> None:
    """The aggregator converts dlib's network to TFLite on first start (minutes, with
    TensorFlow): hand it the converted backbone from reports/cache instead. Checked
    in a child process, so this one (the doorbells' side) never imports TensorFlow."""
    if not _CONVERTED:
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from pathlib import Path; "
                "from aggregator.backbone import backbone_models; "
                "backbone_models(Path(sys.argv[1]))",
                str(CACHE),
            ],
            cwd=REPO,
            check=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        _CONVERTED.append(True)
    cache = state_dir / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    for folder in CACHE.glob("backbone-*"):
        link = cache / folder.name
        if not link.exists():
            link.symlink_to(folder.resolve(), target_is_directory=True)


def aggregator_config(site: Site, port: int, nodes: int, codec: Codec) -> Path:
    """The example config's defaults, with quorum N, one automatic round, a long deadline,
    signing on (its key, a trusted key per doorbell)."""
    state_dir = site.folder / "state"
    seed_backbone_cache(state_dir)
    path = site.folder / "aggregator.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "site": SITE,
                "state_dir": str(state_dir),
                "mqtt": {**site.aggregator_mqtt, "port": port, "keepalive": 60},
                "signing": {
                    "private_key_file": str(site.aggregator_key),
                    "trusted_keys_dir": str(site.trusted_dir),
                },
                "rounds": {
                    "codec": codec,
                    "timeout_s": 3600,
                    "min_updates": nodes,
                    "auto_pause_s": 0,
                },
                "auto_rounds": 1,
            }
        )
    )
    return path


def make_broker(kind: str, folder: Path, names: list[str]) -> tuple[LocalBroker, Site]:
    if kind == "loopback":
        broker = LocalBroker(folder / "broker")
        return broker, loopback_site(folder, names, broker.port)
    from broker.secure import SecureBroker

    site, conf_dir = tls_site(folder, names)
    return SecureBroker(conf_dir, folder / "broker"), site
