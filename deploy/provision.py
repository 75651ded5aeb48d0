"""Provision a fedbell site: CA, broker, logins, signing keys, ready configs.

    python -m deploy.provision init --site home --broker-host hub.lan
    python -m deploy.provision add-aggregator
    python -m deploy.provision add-device door1
    python -m deploy.provision add-operator
    python -m deploy.provision add-homeassistant
    python -m deploy.provision add-retainer   (a hub's, see deploy/tier.py)
    python -m deploy.provision remove-device door1
    python -m deploy.provision list

and, for the federation tier that many houses' hubs bridge to (deploy/tier.py):

    python -m deploy.provision init-tier --site home --node n1.example:8883 ...
    python -m deploy.provision add-hub house1
    python -m deploy.provision remove-hub house1
    python -m deploy.provision node-config n1 --cluster-listen ... --route ...

The tier commands take `--tier-dir DIR` (default $FEDBELL_TIER_DIR, else
/etc/fedbell/tier), the others `--site-dir DIR` (default $FEDBELL_SITE_DIR,
else /etc/fedbell/site). The site folder is the single source of truth:

    site.json              registry: site id, topic root, broker, logins
    ca/ca.crt, ca/ca.key   the site CA (the key never leaves this folder)
    broker/                what Mosquitto reads: mosquitto.conf, ca.crt,
                           server.crt, server.key, passwd, acl, crl.pem
                           (the certificates of removed logins)
    keys/devices/<d>.pub   doorbell signing keys the aggregator trusts
    keys/aggregator/aggregator.pub  the aggregator's signing key (whatever its
                           login is called), trusted by doorbells
    clients/<name>/        one bundle per login, to copy to its machine:
                           ca.crt client.crt client.key mqtt-password
                           (+ signing.key, edge.yaml / aggregator.yaml)

Adding or removing a login reloads the broker (SIGHUP via `--broker-pid`, or
`systemctl try-reload-or-restart fedbell-broker.service`), so a removed
device is refused from that moment and its open connection is dropped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from broker.secure import render_config
from deploy import pki, tier, tier_node
from deploy.acl import Role, render
from deploy.files import GROUP_READABLE, make_dir, write_file, write_private, write_public
from fedbell.wire.messages import AGGREGATOR

DEFAULT_SITE_DIR = Path("/etc/fedbell/site")
DEFAULT_TIER_DIR = Path("/etc/fedbell/tier")
"""Where a house puts its hub bundle: beside its broker's own files, readable by Mosquitto."""
BROKER_UNIT = "fedbell-broker.service"
BROKER_GROUP = "mosquitto"
TEMPLATES = Path(__file__).with_name("templates")
# A login name is also an MQTT topic level, a systemd instance name and a file
# name: keep it to characters that are plain in all three.
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
TOPIC_ROOT_RE = re.compile(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*")
HOST_RE = re.compile(r"[A-Za-z0-9.:-]+")


class ProvisionError(RuntimeError):
    """A provisioning step cannot be done; the message says what to do."""


@dataclass
class Site:
    """The registry (site.json) and the folder layout around it."""

    root: Path
    site: str
    topic_root: str
    broker_hosts: list[str]
    port: int
    logins: dict[str, Role] = field(default_factory=dict)
    serials: dict[str, int] = field(default_factory=dict)
    """Serial number of each login's client certificate (what revocation names)."""
    revoked: dict[int, str] = field(default_factory=dict)
    """Revoked certificate serial -> ISO time of its revocation (the CRL)."""

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    @property
    def passwd(self) -> Path:
        return self.broker_dir / "passwd"

    @property
    def device_keys(self) -> Path:
        return self.root / "keys" / "devices"

    @property
    def aggregator_keys(self) -> Path:
        return self.root / "keys" / "aggregator"

    def bundle(self, name: str) -> Path:
        return self.root / "clients" / name

    @classmethod
    def load(cls, root: Path) -> Site:
        path = root / "site.json"
        if not path.exists():
            raise ProvisionError(f"no site in {root}: run `python -m deploy.provision init` first")
        data = json.loads(path.read_text())
        logins = {name: Role(role) for name, role in data["logins"].items()}
        return cls(
            root,
            data["site"],
            data["topic_root"],
            list(data["broker_hosts"]),
            int(data["port"]),
            logins,
            {name: int(serial, 16) for name, serial in data.get("serials", {}).items()},
            {int(serial, 16): when for serial, when in data.get("revoked", {}).items()},
        )

    def save(self) -> None:
        data = {
            "site": self.site,
            "topic_root": self.topic_root,
            "broker_hosts": self.broker_hosts,
            "port": self.port,
            "logins": {name: role.value for name, role in sorted(self.logins.items())},
            "serials": {name: f"{serial:x}" for name, serial in sorted(self.serials.items())},
            "revoked": {f"{serial:x}": when for serial, when in sorted(self.revoked.items())},
        }
        write_public(self.root / "site.json", (json.dumps(data, indent=2) + "\n").encode())
        write_file(
            self.broker_dir / "acl",
            render(self.topic_root, self.site, self.logins.items()).encode(),
            GROUP_READABLE,
            BROKER_GROUP,
        )
        if (self.root / "ca" / "ca.key").exists():
            revoked = {
                serial: dt.datetime.fromisoformat(when) for serial, when in self.revoked.items()
            }
            write_file(self.crl, pki.create_crl(self.ca(), revoked), GROUP_READABLE, BROKER_GROUP)

    @property
    def crl(self) -> Path:
        """Revoked client certificates; the broker refuses them at the TLS handshake."""
        return self.broker_dir / "crl.pem"

    def revoke(self, name: str) -> None:
        """Put the login's client certificate on the CRL (written by `save`)."""
        serial = self.serials.pop(name, None)
        cert = self.bundle(name) / "client.crt"
        if serial is None and cert.exists():  # a site provisioned before serials were kept
            serial = pki.serial_of(cert)
        if serial is not None:
            self.revoked[serial] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")

    def ca(self) -> pki.Issued:
        return pki.load(self.root / "ca" / "ca.crt", self.root / "ca" / "ca.key")

    def names(self, role: Role) -> list[str]:
        return sorted(name for name, r in self.logins.items() if r is role)


def check_name(name: str, what: str = "name") -> str:
    if not NAME_RE.fullmatch(name):
        raise ProvisionError(
            f"bad {what} {name!r}: use 1-63 of a-z 0-9 _ -, starting with a letter or digit"
        )
    return name


# ---------------------------------------------------------------- site setup


def init(
    root: Path,
    site: str,
    topic_root: str,
    hosts: list[str],
    *,
    port: int,
    data_dir: Path,
    log_dest: str,
    broker_user: str,
) -> Site:
    """Create the CA, the broker's certificate and configuration, empty logins."""
    check_name(site, "site id")
    if not TOPIC_ROOT_RE.fullmatch(topic_root):
        raise ProvisionError(f"bad topic root {topic_root!r}: levels of A-Z a-z 0-9 _ -")
    for host in hosts:
        if not HOST_RE.fullmatch(host):
            raise ProvisionError(f"bad broker host name {host!r}")
    if (root / "site.json").exists():
        raise ProvisionError(f"{root} already holds a site; nothing changed")
    make_dir(root, 0o755)
    make_dir(root / "ca", 0o700)
    make_dir(root / "clients", 0o700)
    # The broker runs as its own user: it must read its folder, nothing more.
    names = tuple(dict.fromkeys([*hosts, "localhost", "127.0.0.1", "::1"]))
    the_site = Site(root, site, topic_root, list(names), port)
    make_dir(the_site.broker_dir, 0o750, BROKER_GROUP)
    make_dir(the_site.device_keys, 0o755)
    make_dir(the_site.aggregator_keys, 0o755)

    ca = pki.create_ca(site)
    pki.save(ca, root / "ca" / "ca.crt", root / "ca" / "ca.key")
    shutil.copyfile(root / "ca" / "ca.crt", the_site.broker_dir / "ca.crt")
    server = pki.issue(ca, names[0], "broker", server_names=names)
    pki.save(
        server,
        the_site.broker_dir / "server.crt",
        the_site.broker_dir / "server.key",
        key_group=BROKER_GROUP,
    )
    write_file(the_site.passwd, b"", GROUP_READABLE, BROKER_GROUP)
    config = render_config(port, the_site.broker_dir, data_dir, log_dest=log_dest, user=broker_user)
    write_file(
        the_site.broker_dir / "mosquitto.conf", config.encode(), GROUP_READABLE, BROKER_GROUP
    )
    the_site.save()
    return the_site


# ------------------------------------------------------------------- logins


def add_login(site: Site, name: str, role: Role) -> Path:
    """Certificate, password and ACL block for a new login; returns its bundle."""
    check_name(name)
    if name in site.logins:
        raise ProvisionError(f"{name!r} already exists (as {site.logins[name].value})")
    bundle = site.bundle(name)
    if bundle.exists():
        shutil.rmtree(bundle)
    make_dir(bundle, 0o700)
    ca = site.ca()
    write_public(bundle / "ca.crt", (site.root / "ca" / "ca.crt").read_bytes())
    issued = pki.issue(ca, name, role.value)
    pki.save(issued, bundle / "client.crt", bundle / "client.key")
    site.serials[name] = issued.certificate.serial_number
    password = secrets.token_urlsafe(32)
    write_private(bundle / "mqtt-password", password.encode())
    set_password(site.passwd, name, password)
    site.logins[name] = role
    site.save()
    return bundle


def remove_login(site: Site, name: str) -> None:
    if name not in site.logins:
        raise ProvisionError(f"no login named {name!r} in {site.root}")
    delete_password(site.passwd, name)
    del site.logins[name]
    site.revoke(name)  # a copied bundle's certificate no longer passes TLS either
    site.save()
    shutil.rmtree(site.bundle(name), ignore_errors=True)


def _mosquitto_passwd() -> str:
    path = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(path).exists():
        raise ProvisionError("mosquitto_passwd not found: apt-get install mosquitto")
    return path


def set_password(passwd: Path, name: str, password: str) -> None:
    # On stdin, never on the command line where `ps` would show it.
    subprocess.run(
        [_mosquitto_passwd(), str(passwd), name],
        input=f"{password}\n{password}\n",
        text=True,
        check=True,
        capture_output=True,
    )
    _fix_passwd_mode(passwd)


def delete_password(passwd: Path, name: str) -> None:
    subprocess.run([_mosquitto_passwd(), "-D", str(passwd), name], check=True, capture_output=True)
    _fix_passwd_mode(passwd)


def _fix_passwd_mode(passwd: Path) -> None:
    # mosquitto_passwd rewrites the file; keep it readable by the broker only.
    write_file(passwd, passwd.read_bytes(), GROUP_READABLE, BROKER_GROUP)


def _fill(template: str, values: dict[str, str]) -> str:
    text = (TEMPLATES / template).read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    if "{{" in text:
        raise ProvisionError(f"unfilled placeholder in {template}: {text[text.index('{{') :][:40]}")
    yaml.safe_load(text)  # fail here, not on the Pi, if a value broke the YAML
    return text


def add_device(
    site: Site, name: str, mqtt_host: str | None, state_root: str, trusted_keys_dir: str
) -> Path:
    bundle = add_login(site, name, Role.DEVICE)
    pki.create_signing_key(bundle / "signing.key", bundle / "signing.pub")
    shutil.copyfile(bundle / "signing.pub", site.device_keys / f"{name}.pub")
    _copy_peer_keys(site, bundle)
    config = _fill(
        "edge.yaml",
        {
            "device_id": name,
            "site": site.site,
            "topic_root": site.topic_root,
            "mqtt_host": mqtt_host or site.broker_hosts[0],
            "mqtt_port": str(site.port),
            "state_root": state_root,
            "trusted_keys_dir": trusted_keys_dir,
        },
    )
    write_public(bundle / "edge.yaml", config.encode())
    return bundle


def _copy_peer_keys(site: Site, bundle: Path) -> None:
    """Give a doorbell bundle the aggregator's current public key(s)."""
    peer = bundle / "peer-keys"
    if peer.exists():
        shutil.rmtree(peer)
    make_dir(peer, 0o755)
    for key in sorted(site.aggregator_keys.glob("*.pub")):
        shutil.copyfile(key, peer / key.name)


def remove_device(site: Site, name: str) -> None:
    if site.logins.get(name) is not Role.DEVICE:
        raise ProvisionError(f"{name!r} is not a device of this site")
    remove_login(site, name)
    (site.device_keys / f"{name}.pub").unlink(missing_ok=True)


def add_aggregator(site: Site, name: str, mqtt_host: str, state_root: str) -> Path:
    if site.names(Role.AGGREGATOR):
        raise ProvisionError(f"the site already has an aggregator: {site.names(Role.AGGREGATOR)}")
    bundle = add_login(site, name, Role.AGGREGATOR)
    pki.create_signing_key(bundle / "signing.key", bundle / "signing.pub")
    # Doorbells look the aggregator's key up by its sender name, whatever its
    # login is called: `--name hub` still writes aggregator.pub.
    shutil.copyfile(bundle / "signing.pub", site.aggregator_keys / f"{AGGREGATOR}.pub")
    for device in site.names(Role.DEVICE):
        _copy_peer_keys(site, site.bundle(device))
    config = _fill(
        "aggregator.yaml",
        {
            "name": name,
            "site": site.site,
            "topic_root": site.topic_root,
            "mqtt_host": mqtt_host,
            "mqtt_port": str(site.port),
            "state_root": state_root,
            "trusted_keys_dir": str(site.device_keys.resolve()),
        },
    )
    write_public(bundle / "aggregator.yaml", config.encode())
    return bundle


def remove_any(site: Site, name: str) -> None:
    """Remove a login of any role, with the signing key trust that came with it."""
    role = site.logins.get(name)
    if role is Role.DEVICE:
        remove_device(site, name)
        return
    remove_login(site, name)
    if role is Role.AGGREGATOR:
        (site.aggregator_keys / f"{AGGREGATOR}.pub").unlink(missing_ok=True)
        for device in site.names(Role.DEVICE):
            _copy_peer_keys(site, site.bundle(device))


# ---------------------------------------------------------------- reloading


def reload_broker(pid: int | None, enabled: bool) -> str:
    """Make the broker re-read passwd and acl; returns what was done."""
    if pid is not None:
        os.kill(pid, signal.SIGHUP)
        return f"sent SIGHUP to broker pid {pid}"
    if not enabled:
        return "broker not reloaded (--no-reload): send it SIGHUP to apply"
    if Path("/run/systemd/system").is_dir() and shutil.which("systemctl"):
        subprocess.run(["systemctl", "try-reload-or-restart", BROKER_UNIT], check=True)
        return f"reloaded {BROKER_UNIT} (if running)"
    return (
        "no systemd here: reload the broker yourself "
        "(kill -HUP <mosquitto pid>) or pass --broker-pid"
    )


# ---------------------------------------------------------------------- CLI


def _folder_option(
    flag: str, variable: str, default: Path | str, what: str
) -> argparse.ArgumentParser:
    """A parent parser with one folder option: the flag, else $variable, else `default`."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        flag,
        type=Path,
        default=Path(os.environ.get(variable, default)),
        help=f"{what} folder (default ${variable} or %(default)s)",
    )
    return parent


def _parser() -> argparse.ArgumentParser:
    common = _folder_option("--site-dir", "FEDBELL_SITE_DIR", DEFAULT_SITE_DIR, "site")
    reload = argparse.ArgumentParser(add_help=False)
    reload.add_argument("--broker-pid", type=int, help="SIGHUP this mosquitto process")
    reload.add_argument("--no-reload", action="store_true", help="do not reload the broker")

    parser = argparse.ArgumentParser(
        prog="python -m deploy.provision", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", parents=[common], help="create the site CA and broker files")
    p.add_argument("--site", default="home", help="site (federation) id")
    p.add_argument("--topic-root", default="fedbell")
    p.add_argument(
        "--broker-host",
        action="append",
        default=[],
        help="name or address clients use for the broker (repeatable)",
    )
    p.add_argument("--port", type=int, default=8883)
    p.add_argument("--broker-data-dir", type=Path, default=Path("/var/lib/fedbell-broker"))
    p.add_argument("--broker-log", default="stderr", help="mosquitto log_dest value")
    p.add_argument(
        "--broker-user", default="mosquitto", help="user Mosquitto switches to if started as root"
    )

    p = sub.add_parser("add-device", parents=[common, reload], help="provision a doorbell")
    p.add_argument("name")
    p.add_argument("--mqtt-host", help="broker name for this doorbell (default: first name)")
    p.add_argument("--state-root", default="/var/lib/fedbell")
    p.add_argument(
        "--trusted-keys-dir",
        default="/etc/fedbell/keys/aggregator",
        help="where install-pi.sh puts the aggregator's public key",
    )

    p = sub.add_parser("remove-device", parents=[common, reload], help="revoke a doorbell")
    p.add_argument("name")

    p = sub.add_parser("add-aggregator", parents=[common, reload])
    p.add_argument("--name", default="aggregator")
    p.add_argument("--mqtt-host", default="localhost")
    p.add_argument("--state-root", default="/var/lib/fedbell")

    for command, role in (
        ("add-operator", "operator"),
        ("add-homeassistant", "homeassistant"),
        ("add-retainer", "retainer"),
    ):
        p = sub.add_parser(command, parents=[common, reload])
        p.add_argument("--name", default=role)

    p = sub.add_parser(
        "remove-login",
        parents=[common, reload],
        help="revoke an operator, Home Assistant, Retainer or aggregator login",
    )
    p.add_argument("name")

    sub.add_parser("list", parents=[common], help="show the site's logins")

    on_tier = _folder_option("--tier-dir", "FEDBELL_TIER_DIR", DEFAULT_TIER_DIR, "tier")
    tier.add_commands(sub, on_tier)
    tier_node.add_command(sub, on_tier)
    return parser


def run(argv: list[str] | None = None) -> str:
    """Execute one command; returns the report to print."""
    args = _parser().parse_args(argv)
    if args.command in {"init-tier", "add-hub", "remove-hub", "node-config"}:
        return _run_on_tier(args)
    root: Path = args.site_dir
    if args.command == "init":
        site = init(
            root,
            args.site,
            args.topic_root,
            args.broker_host or ["localhost"],
            port=args.port,
            data_dir=args.broker_data_dir,
            log_dest=args.broker_log,
            broker_user=args.broker_user,
        )
        return (
            f"site {site.site!r} created in {root}\n"
            f"broker names: {', '.join(site.broker_hosts)}; CA: {root / 'ca' / 'ca.crt'}"
        )
    site = Site.load(root)
    if args.command == "list":
        return (
            "\n".join(
                f"{role.value:14} {name}"
                for name, role in sorted(
                    site.logins.items(), key=lambda item: (item[1].value, item[0])
                )
            )
            or "(no logins)"
        )

    match args.command:
        case "add-device":
            bundle = add_device(
                site, args.name, args.mqtt_host, args.state_root, args.trusted_keys_dir
            )
            done = (
                f"device {args.name!r}: bundle {bundle}\n"
                f"copy it to the Pi and run: sudo deploy/install-pi.sh --bundle <copy>"
            )
            if not site.names(Role.AGGREGATOR):
                done += "\nnote: no aggregator yet; add-aggregator will update this bundle"
        case "remove-device":
            remove_device(site, args.name)
            done = f"device {args.name!r} removed: password, ACL, signing key, bundle"
        case "add-aggregator":
            bundle = add_aggregator(site, args.name, args.mqtt_host, args.state_root)
            done = (
                f"aggregator {args.name!r}: bundle {bundle}\n"
                f"doorbell bundles updated with its public key: "
                f"{', '.join(site.names(Role.DEVICE)) or '(none yet)'}"
            )
        case "add-operator" | "add-homeassistant" | "add-retainer":
            role = Role(args.command.removeprefix("add-"))
            bundle = add_login(site, args.name, role)
            done = f"{role.value} {args.name!r}: bundle {bundle}"
        case "remove-login":
            remove_any(site, check_name(args.name))
            done = f"login {args.name!r} removed"
        case _:  # pragma: no cover - argparse rejects other commands
            raise ProvisionError(f"unknown command {args.command}")
    return f"{done}\n{reload_broker(args.broker_pid, not args.no_reload)}"


def _run_on_tier(args: argparse.Namespace) -> str:
    root: Path = args.tier_dir
    if args.command == "init-tier":
        check_name(args.site, "site id")
        made = tier.init_tier(root, args.site, args.topic_root, args.node, args.hub_dir)
        return f"tier of site {made.site!r} created in {root}; CA: {made.tls_dir / 'ca.crt'}"
    if args.command == "node-config":
        return tier_node.run_command(args)
    house = check_name(args.house, "house name")
    the_tier = tier.Tier.load(root)
    if args.command == "add-hub":
        bundle = tier.add_hub(the_tier, house)
        done = (
            f"hub of {house!r}: bundle {bundle}\n"
            f"copy it to the house's {the_tier.hub_dir or bundle}, append bridge.conf to its "
            "mosquitto.conf (docs/many-houses.md)"
        )
    else:
        tier.remove_hub(the_tier, house)
        done = f"hub of {house!r} removed: login, permissions, bundle"
    return f"{done}\n{tier.reload_nodes(args.node_pid)}"


def main(argv: list[str] | None = None) -> int:
    try:
        print(run(argv))
    except (ProvisionError, tier.TierError) as err:
        print(f"provision: error: {err}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as err:
        detail = (err.stderr or "").strip() if isinstance(err.stderr, str) else ""
        print(f"provision: error: {err.cmd[0]} failed ({err.returncode}) {detail}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
