"""Deployment: the install scripts, and revocation with the provisioner.

The install scripts run for real into a temporary prefix, with the flags that
skip what this machine has not got (systemd as PID 1, a camera) or what would
take minutes (apt, pip): twice each, because a re-run must be harmless.
"""

from __future__ import annotations

import shutil
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from broker.local import find_mosquitto
from broker.secure import SecureBroker
from deploy import provision

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = [
    REPO / "deploy" / name
    for name in ("install-pi.sh", "install-server.sh", "lib.sh", "ensure-tools.sh")
]
VENV = Path(sys.prefix)
SKIP_FLAGS = ["--no-systemd", "--no-apt", "--no-pip"]


def run_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "deploy" / name), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------ static checks


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script: Path) -> None:
    result = subprocess.run(
        ["bash", "-n", str(script)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(
    shutil.which("shellcheck") is None, reason="shellcheck missing: apt-get install shellcheck"
)
def test_scripts_are_shellcheck_clean() -> None:
    result = subprocess.run(
        ["shellcheck", "-x", *map(str, SCRIPTS)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------- install scripts


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A server installed into a prefix, twice; returns the prefix."""
    prefix = tmp_path_factory.mktemp("server")
    args = ["--prefix", str(prefix), "--venv", str(VENV), "--broker-host", "hub.lan"]
    args += [*SKIP_FLAGS]
    first = run_script("install-server.sh", *args)
    assert first.returncode == 0, first.stdout + first.stderr
    second = run_script("install-server.sh", *args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "site exists: kept as it is" in second.stdout
    assert "aggregator login exists" in second.stdout
    assert "unchanged: " in second.stdout
    return prefix


def test_install_server_twice(server: Path) -> None:
    etc = server / "etc" / "fedbell"
    site = etc / "site"
    assert (site / "broker" / "mosquitto.conf").exists()
    assert mode(site / "ca" / "ca.key") == 0o600
    assert mode(etc / "credentials" / "aggregator") == 0o700
    for secret in ("mqtt-password", "client.key", "signing.key"):
        assert mode(etc / "credentials" / "aggregator" / secret) == 0o600
    config = (etc / "aggregator.yaml").read_text()
    assert "labels" not in config  # who is who is decided in each house
    assert f"trusted_keys_dir: {site}/keys/devices\n" in config
    units = server / "etc" / "systemd" / "system"
    broker_unit = (units / "fedbell-broker.service").read_text()
    assert f"-c {site}/broker/mosquitto.conf" in broker_unit
    aggregator_unit = (units / "fedbell-aggregator.service").read_text()
    assert (
        f"ExecStart={VENV}/bin/python -m aggregator --config {etc}/aggregator.yaml"
        in aggregator_unit
    )
    logins = provision.run(["list", "--site-dir", str(site)])
    assert "aggregator" in logins
    assert "operator" in logins


def test_install_pi_twice(server: Path, tmp_path: Path) -> None:
    site = server / "etc" / "fedbell" / "site"
    provision.run(["add-device", "porch", "--site-dir", str(site), "--no-reload"])
    prefix = tmp_path / "pi"
    copy = tmp_path / "home" / "porch"  # what `scp -r` left in the installing user's home
    args = [
        "--bundle",
        str(copy),
        "--prefix",
        str(prefix),
        "--python",
        sys.executable,
        "--no-camera",
        *SKIP_FLAGS,
    ]
    shutil.copytree(site / "clients" / "porch", copy)
    first = run_script("install-pi.sh", *args)
    assert first.returncode == 0, first.stdout + first.stderr
    # Issue 13 item 7: the copy held the private keys and password; once they are
    # installed root-only, it is gone.
    assert not copy.exists(), sorted(p.name for p in copy.rglob("*"))
    etc = prefix / "etc" / "fedbell"
    with (etc / "edge-porch.yaml").open("a") as tuned:
        tuned.write("# tuned on the Pi\n")
    shutil.copytree(site / "clients" / "porch", copy)
    second = run_script("install-pi.sh", *args, "--keep-bundle")
    assert second.returncode == 0, second.stdout + second.stderr
    assert (copy / "signing.key").exists()  # --keep-bundle keeps it
    assert "virtualenv exists" in second.stdout
    assert "unchanged:" in second.stdout  # the unit
    assert "kept your edited" in second.stdout  # a re-run never undoes local settings

    config = (etc / "edge-porch.yaml").read_text()
    assert config.endswith("# tuned on the Pi\n")
    assert "device_id: porch\n" in config
    assert f"trusted_keys_dir: {etc}/keys/aggregator\n" in config
    assert "password_file: ${CREDENTIALS_DIRECTORY}/mqtt-password" in config
    assert (etc / "keys" / "aggregator" / "aggregator.pub").read_bytes() == (
        site / "keys" / "aggregator" / "aggregator.pub"
    ).read_bytes()
    assert mode(etc / "credentials" / "porch") == 0o700
    assert mode(etc / "credentials" / "porch" / "signing.key") == 0o600
    unit = (prefix / "etc" / "systemd" / "system" / "fedbell-edge@.service").read_text()
    assert f"ExecStart={prefix}/opt/fedbell/venv/bin/python -m edge" in unit
    venv_cfg = (prefix / "opt" / "fedbell" / "venv" / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = true" in venv_cfg  # for apt's picamera2


def test_install_stops_with_a_clear_message(tmp_path: Path) -> None:
    missing = run_script(
        "install-pi.sh",
        "--bundle",
        str(tmp_path / "nothing"),
        "--prefix",
        str(tmp_path),
        *SKIP_FLAGS,
    )
    assert missing.returncode != 0
    assert "edge.yaml missing" in missing.stderr
    unknown = run_script("install-server.sh", "--frobnicate")
    assert unknown.returncode != 0
    assert "unknown option --frobnicate" in unknown.stderr


def test_provisioned_configs_load_with_the_programs_schemas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The YAML the provisioner writes is what edge/ and aggregator/ accept."""
    from aggregator.config import AggregatorConfig
    from edge.config import EdgeConfig
    from fedbell.config import load_config

    site = tmp_path / "site"
    provision.run(["init", "--site", "home", "--broker-host", "hub.lan", "--site-dir", str(site)])
    provision.run(["add-aggregator", "--site-dir", str(site), "--no-reload"])
    provision.run(["add-device", "door1", "--site-dir", str(site), "--no-reload"])

    bundle = site / "clients" / "door1"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(bundle))
    edge = load_config(bundle / "edge.yaml", EdgeConfig)
    assert edge.device_id == "door1"
    assert edge.mqtt.username == "door1"
    assert (edge.mqtt.host, edge.mqtt.port) == ("hub.lan", 8883)
    assert edge.mqtt.password() == (bundle / "mqtt-password").read_text()
    assert edge.mqtt.tls is not None
    assert edge.mqtt.tls.key_file == bundle / "client.key"
    assert edge.signing.private_key_file == bundle / "signing.key"
    assert edge.signing.trusted_keys_dir == Path("/etc/fedbell/keys/aggregator")
    assert (bundle / "peer-keys" / "aggregator.pub").exists()  # what install-pi puts there

    bundle = site / "clients" / "aggregator"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(bundle))
    aggregator = load_config(bundle / "aggregator.yaml", AggregatorConfig)
    assert aggregator.site == "home"
    assert aggregator.mqtt.username == "aggregator"
    assert aggregator.signing.trusted_keys_dir == (site / "keys" / "devices").resolve()
    assert (site / "keys" / "devices" / "door1.pub").exists()


# --------------------------------------------------------------- revocation


class Session:
    """One MQTT v5 login over TLS, kept open."""

    def __init__(
        self,
        site: Path,
        name: str,
        port: int,
        password: str | None = None,
        certificate_of: Path | None = None,
    ) -> None:
        bundle = site / "clients" / name
        tls_bundle = certificate_of or bundle
        self.connack: ReasonCode | None = None
        self.answered = threading.Event()
        self.dropped = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"session-{name}", protocol=mqtt.MQTTv5
        )
        secret = password if password is not None else (bundle / "mqtt-password").read_text()
        self.client.username_pw_set(name, secret)
        self.client.tls_set(
            ca_certs=str(site / "ca" / "ca.crt"),
            certfile=str(tls_bundle / "client.crt"),
            keyfile=str(tls_bundle / "client.key"),
        )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        try:
            self.client.connect("localhost", port)
        except (ssl.SSLError, OSError):
            self.answered.set()
            return
        self.client.loop_start()

    @property
    def accepted(self) -> bool:
        self.answered.wait(5)
        return self.connack is not None and not self.connack.is_failure

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, *args: object) -> None:
        code = args[3]
        assert isinstance(code, ReasonCode)
        self.connack = code
        self.answered.set()

    def _on_disconnect(self, *_args: object) -> None:
        self.dropped.set()
        self.answered.set()


@pytest.fixture
def live_site(tmp_path: Path) -> Iterator[tuple[Path, SecureBroker]]:
    find_mosquitto()
    site = tmp_path / "site"
    provision.run(["init", "--site", "home", "--site-dir", str(site)])
    for name in ("door1", "door2"):
        provision.run(["add-device", name, "--site-dir", str(site), "--no-reload"])
    with SecureBroker(site / "broker", tmp_path / "broker") as broker:
        yield site, broker


def test_remove_device_revokes_at_once(live_site: tuple[Path, SecureBroker]) -> None:
    site, broker = live_site
    password = (site / "clients" / "door1" / "mqtt-password").read_text()
    connected = Session(site, "door1", broker.port)
    try:
        assert connected.accepted
        report = provision.run(
            ["remove-device", "door1", "--site-dir", str(site), "--broker-pid", str(broker.pid)]
        )
        assert "SIGHUP" in report
        # The open connection is dropped by the reload, not at its next login.
        assert connected.dropped.wait(3), "door1's open session survived its revocation"
    finally:
        connected.close()

    assert not (site / "keys" / "devices" / "door1.pub").exists()
    assert not (site / "clients" / "door1").exists()
    assert "door1" not in (site / "broker" / "acl").read_text()
    assert "door1" not in (site / "broker" / "passwd").read_text()

    # Its own bundle is gone: log in with what an attacker who copied it has.
    shutil.copytree(site / "clients" / "door2", site / "clients" / "door1")
    again = Session(site, "door1", broker.port, password=password)
    other = Session(site, "door2", broker.port)
    try:
        assert not again.accepted, f"revoked door1 logged in: {again.connack}"
        assert other.accepted, "door2 must be unaffected"
    finally:
        again.close()
        other.close()


def test_added_device_can_log_in_straight_away(live_site: tuple[Path, SecureBroker]) -> None:
    site, broker = live_site
    provision.run(["add-device", "door3", "--site-dir", str(site), "--broker-pid", str(broker.pid)])
    deadline = time.monotonic() + 3
    while True:  # the SIGHUP is asynchronous: allow the broker a moment
        session = Session(site, "door3", broker.port)
        ok = session.accepted
        session.close()
        if ok or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert ok


def test_a_removed_devices_certificate_no_longer_passes_tls(
    live_site: tuple[Path, SecureBroker], tmp_path: Path
) -> None:
    """Issue 13 item 7: remove-device puts the certificate on the broker's CRL.

    Before, a copied bundle's certificate stayed valid for five years: with any
    other login's password (door2's here) it still got through the handshake.
    """
    site, broker = live_site
    stolen = tmp_path / "stolen-door1"
    shutil.copytree(site / "clients" / "door1", stolen)
    before = Session(site, "door2", broker.port, certificate_of=stolen)
    try:
        assert before.accepted, "a valid certificate with a valid login is accepted"
    finally:
        before.close()
    provision.run(
        ["remove-device", "door1", "--site-dir", str(site), "--broker-pid", str(broker.pid)]
    )
    assert "door1" not in (site / "site.json").read_text().split('"serials"')[1].split("}")[0]
    deadline = time.monotonic() + 5
    while True:  # the SIGHUP is asynchronous: wait until the broker has re-read the CRL
        after = Session(site, "door2", broker.port, certificate_of=stolen)
        refused = not after.accepted
        after.close()
        if refused or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert refused, "the removed door1's certificate still passed the TLS handshake"
    own = Session(site, "door2", broker.port)
    try:
        assert own.accepted, "door2 with its own certificate must be unaffected"
    finally:
        own.close()
