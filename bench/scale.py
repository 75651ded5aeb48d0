"""Aggregation at scale: N signed doorbells, one real Mosquitto, the real aggregator.

    python -m bench.scale [--nodes 10 100 1000] [--brokers loopback tls] [--codec topk]

For each broker set-up and each N: a fresh Mosquitto, the aggregator CLI as a
subprocess (`python -m aggregator`, quorum N, one automatic round, a long
deadline, signing on: its own Ed25519 key and a trusted key per doorbell), and
N doorbells spread over a few `bench.swarm` processes, each a real MQTT
connection with its own client id that publishes its signed update of the
federated head (built before the round) as soon as the round message arrives.

Broker set-ups:

- `loopback`: `broker/local.conf` on 127.0.0.1, no TLS, no logins;
- `tls`: the production configuration (`broker/production.conf` through
  `broker.secure.SecureBroker`) on a site made by the real provisioner
  (`deploy.provision init`, `add-aggregator`, `add-operator`, `add-device`):
  TLS 1.2 with client certificates, a password per login, the generated ACL,
  client ids bound to user names. The first doorbell is provisioned in full;
  the others are added to the same registry (so the provisioner renders their
  ACL blocks) with passwords hashed in one `mosquitto_passwd -U` pass, and
  present the first doorbell's client certificate (the broker checks the
  certificate against the CA and the CRL; the login is the password): a full
  `add-device` costs ~0.3 s each on this machine, 5 minutes for 1000.

What the figures mean (times from the aggregator's own replies on
`aggregator/reply`, one per update it accepted, stamped with its clock):

- updates_per_s: (accepted − 1) / (last accepted − first accepted): the rate
  at which it verifies, validates, decodes, folds in and acknowledges updates
  while the rest wait at the broker;
- collect_seconds: round announced → last update accepted; round_seconds:
  round announced → the round's metrics (after the release);
- rss_before_mb: the aggregator's VmRSS when the round is announced (after
  imports, dlib's weights and the backbone: what it holds idle);
  collect_rss_mb: its highest VmRSS sampled every 50 ms while the updates
  come in; collect_growth_mb: the difference, i.e. what collecting N updates
  costs. lifetime_peak_mb (VmHWM) is printed for contrast: it is the
  TensorFlow import and model loading, not aggregation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as mqtt
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.table import Table

from broker.local import LocalBroker
from fedbell.wire.envelope import Codec
from fedbell.wire.protocol import Reply, RoundAnnouncement, RoundMetrics
from fedbell.wire.topics import Topics

SITE = "scale"
REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "reports" / "cache"
CLIENTS_PER_WORKER = 250
MAX_WORKERS = 4
BROKERS = ("loopback", "tls")
GROWTH_BAR_MB = 64.0
"""Collecting 1000 updates may cost at most this much more memory than collecting 10:
a streaming aggregator holds one running sum and a bounded inbox, whatever N."""


# --- memory ----------------------------------------------------------------------------


def proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(key)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (and its reaped children) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


class RssSampler(threading.Thread):
    """Samples a process's VmRSS every 50 ms (kB, with the time), and the CPU
    seconds of the processes in `cpu_pids` (to see who is busy while updates flow)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pid = pid
        self.cpu_pids: dict[str, list[int]] = {}
        self.samples: list[tuple[float, int]] = []
        self.cpu: list[tuple[float, dict[str, float]]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            try:
                self.samples.append((time.time(), proc_status_kb(self.pid, "VmRSS")))
                self.cpu.append(
                    (
                        time.time(),
                        {name: sum(map(cpu_seconds, pids)) for name, pids in self.cpu_pids.items()},
                    )
                )
            except (OSError, KeyError):
                return

    def cpu_share(self, start: float, end: float) -> dict[str, float]:
        """Cores each process group used on average between two moments."""
        inside = [(t, c) for t, c in self.cpu if start <= t <= end]
        if len(inside) < 2:
            return {}
        (t0, c0), (t1, c1) = inside[0], inside[-1]
        return {name: round((c1[name] - c0.get(name, 0.0)) / (t1 - t0), 2) for name in c1}

    def peak_between(self, start: float, end: float) -> int:
        return max((kb for t, kb in self.samples if start <= t <= end), default=0)

    def at(self, moment: float) -> int:
        before = [kb for t, kb in self.samples if t <= moment]
        return before[-1] if before else 0


def raise_fd_limit(needed: int) -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; the broker and workers inherit it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    limit = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if limit < needed:
        raise RuntimeError(f"{needed} file descriptors needed, the hard limit is {limit}")
    return limit


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


def loopback_site(folder: Path, names: list[str], port: int) -> Site:
    keys_dir, trusted, aggregator_key, aggregator_pub = signing_keys(folder, names)
    return Site(
        folder,
        names,
        keys_dir,
        trusted,
        aggregator_key,
        aggregator_pub,
        aggregator_mqtt={"host": "127.0.0.1", "port": port},
    )


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
    keys_dir, trusted, aggregator_key, aggregator_pub = signing_keys(folder, names)
    passwords_file = folder / "passwords.json"
    passwords_file.touch(mode=0o600)
    passwords_file.write_text(json.dumps(passwords))
    first = root / "clients" / names[0]
    aggregator = root / "clients" / "aggregator"
    operator = root / "clients" / "operator"
    template = yaml.safe_load((aggregator / "aggregator.yaml").read_text())
    site = Site(
        folder,
        names,
        keys_dir,
        trusted,
        aggregator_key,
        aggregator_pub,
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


# --- watching the round -------------------------------------------------------------------


@dataclass
class Watcher:
    """The round's announcement, the aggregator's update replies and the metrics, as
    an observer receives them (the operator's login on the production broker)."""

    site: Site
    port: int
    topics: Topics = field(default_factory=lambda: Topics(SITE))
    announced: float | None = None
    accepted: list[float] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    finished: float | None = None
    metrics: RoundMetrics | None = None

    def __post_init__(self) -> None:
        self.started = time.time()
        login = self.site.watcher_login
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=login[0] if login else "", protocol=mqtt.MQTTv5
        )
        if login is not None:
            self.client.username_pw_set(*login)
        if self.site.watcher_bundle is not None:
            bundle = self.site.watcher_bundle
            self.client.tls_set(
                ca_certs=str(bundle / "ca.crt"),
                certfile=str(bundle / "client.crt"),
                keyfile=str(bundle / "client.key"),
            )
        self.client.on_message = self._on_message
        self.client.connect(self.site.host, self.port, keepalive=60)
        self.client.subscribe(
            [(self.topics.round, 1), (self.topics.metrics, 1), (self.topics.reply, 1)]
        )
        self.client.loop_start()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        now = time.time()
        payload = bytes(message.payload)
        if not payload:
            return
        if message.topic == self.topics.round:
            announcement = RoundAnnouncement.model_validate_json(payload)
            if announcement.round == 1 and announcement.phase == "train":
                self.announced = self.announced or now
        elif message.topic == self.topics.reply:
            reply = Reply.model_validate_json(payload)
            if reply.about == "update" and reply.round in (1, None) and reply.time >= self.started:
                if reply.ok:
                    self.accepted.append(reply.time)
                else:
                    self.refused.append(f"{reply.device}: {reply.reason} {reply.detail}")
        elif message.topic == self.topics.metrics:
            metrics = RoundMetrics.model_validate_json(payload)
            if metrics.round == 1:
                self.metrics, self.finished = metrics, self.finished or now

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- the swarm ------------------------------------------------------------------------------


def _lines(stream: IO[str], into: queue.Queue[str]) -> None:
    for line in stream:
        into.put(line)


class Worker:
    """One `bench.swarm` process, talked to in JSON lines over stdin/stdout."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.swarm", json.dumps(spec)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_lines, args=(self.process.stdout, self.lines), daemon=True).start()

    def read(self, timeout: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"swarm worker said nothing in {timeout}s") from None
        message: dict[str, Any] = json.loads(line)
        return message

    def stop(self) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write("stop\n")
        self.process.stdin.flush()
        report = self.read(timeout=60)
        self.process.wait(timeout=60)
        return report

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, process: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise RuntimeError(f"the aggregator exited ({process.returncode}) waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout}s")
        time.sleep(0.02)


def _swarm_spec(
    site: Site, port: int, codec: Codec, devices: list[str], seed: int
) -> dict[str, Any]:
    return {
        "port": port,
        "host": site.host,
        "site": SITE,
        "codec": codec,
        "density": 0.05,
        "devices": devices,
        "seed": seed,
        "keys_dir": str(site.keys_dir),
        "aggregator_key": str(site.aggregator_pub),
        "tls": site.tls,
        "passwords": None if site.passwords is None else str(site.passwords),
    }


def make_broker(kind: str, folder: Path, names: list[str]) -> tuple[LocalBroker, Site]:
    if kind == "loopback":
        broker = LocalBroker(folder / "broker")
        return broker, loopback_site(folder, names, broker.port)
    from broker.secure import SecureBroker

    site, conf_dir = tls_site(folder, names)
    return SecureBroker(conf_dir, folder / "broker"), site


def run_one(
    nodes: int,
    codec: Codec,
    folder: Path,
    *,
    broker_kind: str = "loopback",
    workers: int | None = None,
    timeout: float = 900.0,
) -> dict[str, Any]:
    """One aggregation round with `nodes` signed doorbells; the figures as a dict."""
    count = workers or max(1, min(MAX_WORKERS, math.ceil(nodes / CLIENTS_PER_WORKER)))
    names = [f"bell{i:04d}" for i in range(nodes)]
    broker, site = make_broker(broker_kind, folder, names)
    with broker:
        config = aggregator_config(site, broker.port, nodes, codec)
        log_path = folder / "aggregator.log"
        with log_path.open("wb") as log_file:
            aggregator = subprocess.Popen(
                [sys.executable, "-m", "aggregator", "--config", str(config)],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                env={**os.environ, **site.env, "TF_CPP_MIN_LOG_LEVEL": "3"},
            )
        sampler = RssSampler(aggregator.pid)
        sampler.start()
        watcher = Watcher(site, broker.port)
        swarm: list[Worker] = []
        try:
            swarm = [
                Worker(_swarm_spec(site, broker.port, codec, names[i::count], i))
                for i in range(count)
            ]
            sampler.cpu_pids = {
                "aggregator": [aggregator.pid],
                "broker": [broker.pid or 0],
                "doorbells": [w.process.pid for w in swarm],
            }
            for worker in swarm:
                ready = worker.read(timeout=600)
                if "ready" not in ready:
                    raise RuntimeError(f"swarm worker failed: {ready}")
            wait_for(lambda: watcher.announced is not None, 300, "round announcement", aggregator)
            wait_for(
                lambda: len(watcher.accepted) + len(watcher.refused) >= nodes,
                timeout,
                f"{nodes} update replies",
                aggregator,
            )
            wait_for(lambda: watcher.metrics is not None, 120, "round metrics", aggregator)
            lifetime_kb = proc_status_kb(aggregator.pid, "VmHWM")
            reports = [worker.stop() for worker in swarm]
        finally:
            for worker in swarm:
                worker.kill()
            watcher.close()
            sampler.done.set()
            aggregator.send_signal(signal.SIGTERM)
            try:
                aggregator.wait(timeout=60)
            except subprocess.TimeoutExpired:
                aggregator.kill()
                aggregator.wait()
    errors = [e for r in reports for e in r["errors"]]
    if errors:
        raise RuntimeError(f"swarm errors: {errors[:5]}")
    assert watcher.announced is not None
    assert watcher.metrics is not None
    assert watcher.finished is not None
    if watcher.refused or watcher.metrics.participants != nodes:
        raise RuntimeError(
            f"{len(watcher.accepted)} updates accepted, {nodes} expected; refused: "
            f"{watcher.refused[:5]}; see {log_path}"
        )
    times = sorted(watcher.accepted)
    span = times[-1] - times[0]
    before_kb = sampler.at(watcher.announced)
    collect_kb = max(sampler.peak_between(watcher.announced, times[-1]), sampler.at(times[-1]))
    return {
        "broker": broker_kind,
        "nodes": nodes,
        "codec": codec,
        "signed": True,
        "updates_per_s": round((nodes - 1) / span, 1) if span > 0 else None,
        "collect_seconds": round(times[-1] - watcher.announced, 2),
        "round_seconds": round(watcher.finished - watcher.announced, 2),
        "rss_before_mb": round(before_kb / 1024, 1),
        "collect_rss_mb": round(collect_kb / 1024, 1),
        "collect_growth_mb": round((collect_kb - before_kb) / 1024, 1),
        "lifetime_peak_mb": round(lifetime_kb / 1024, 1),
        "bytes_per_update": round(watcher.metrics.bytes_up / nodes),
        "cores_while_collecting": sampler.cpu_share(watcher.announced, times[-1]),
        "workers": count,
    }


def run_scale(
    nodes_list: Sequence[int] = (10, 100, 1000),
    codec: Codec = "topk",
    *,
    brokers: Sequence[str] = BROKERS,
    workers: int | None = None,
    workdir: Path | None = None,
    timeout: float = 900.0,
    show: bool = True,
) -> list[dict[str, Any]]:
    """The scale benchmark for each broker set-up and N; for `make bench` (`scale`)."""
    raise_fd_limit(max(nodes_list) + 256)
    results = []
    with tempfile.TemporaryDirectory(prefix="fedbell-scale-") as scratch:
        base = workdir or Path(scratch)
        for kind in brokers:
            for nodes in nodes_list:
                folder = base / f"{kind}-{codec}-{nodes}"
                folder.mkdir(parents=True, exist_ok=True)
                results.append(
                    run_one(
                        nodes, codec, folder, broker_kind=kind, workers=workers, timeout=timeout
                    )
                )
                if show:
                    print(json.dumps(results[-1]), flush=True)
    if show:
        print_table(results)
    return results


def growth_verdict(results: Sequence[dict[str, Any]]) -> list[str]:
    """Per broker: does collecting the most updates cost more than GROWTH_BAR_MB over the
    fewest? A streaming aggregator's collection memory must not grow with N."""
    lines = []
    for kind in dict.fromkeys(r["broker"] for r in results):
        rows = sorted((r for r in results if r["broker"] == kind), key=lambda r: r["nodes"])
        if len(rows) < 2:
            continue
        extra = rows[-1]["collect_growth_mb"] - rows[0]["collect_growth_mb"]
        ok = extra <= GROWTH_BAR_MB
        lines.append(
            f"{'PASS' if ok else 'FAIL'}  {kind}: collecting {rows[-1]['nodes']} updates costs "
            f"{extra:+.1f} MiB over {rows[0]['nodes']} (bar {GROWTH_BAR_MB:g} MiB)"
        )
    return lines


def print_table(results: Sequence[dict[str, Any]]) -> None:
    table = Table(
        title="aggregation at scale: signed updates, the aggregator's memory while collecting"
    )
    columns = (
        "broker",
        "nodes",
        "codec",
        "bytes_per_update",
        "updates_per_s",
        "collect_seconds",
        "round_seconds",
        "rss_before_mb",
        "collect_rss_mb",
        "collect_growth_mb",
        "lifetime_peak_mb",
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("broker", "codec") else "right")
    for row in results:
        table.add_row(*(str(row[c]) for c in columns))
    console = Console(width=160)
    console.print(table)
    for line in growth_verdict(results):
        console.print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--brokers", nargs="+", choices=BROKERS, default=list(BROKERS))
    parser.add_argument("--codec", default="topk", choices=["float32", "float16", "int8", "topk"])
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"doorbell processes (default: one per {CLIENTS_PER_WORKER}, at most {MAX_WORKERS})",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep broker and aggregator folders and logs here",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    results = run_scale(
        args.nodes, args.codec, brokers=args.brokers, workers=args.workers, workdir=args.workdir
    )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if all(line.startswith("PASS") for line in growth_verdict(results)) else 1


if __name__ == "__main__":
    sys.exit(main())
