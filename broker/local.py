"""Run a private Mosquitto on a free loopback port with the project's config.

Like Mosquitto's own test-suite: write a config, start the real broker, and
poll until it accepts connections. Used by the tests and by the simulation.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Self

from console import STATIC_DIR

CONFIG_TEMPLATE = Path(__file__).with_name("local.conf")
LISTENERS_FILE = "listeners.json"
"""Written into the data folder on start: the ports, for whoever only knows the folder."""


class BrokerError(RuntimeError):
    """The broker could not be started."""


def find_mosquitto() -> str:
    """Path of the mosquitto binary, or a clear error saying how to install it."""
    path = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if path is None:
        raise BrokerError(
            "mosquitto is not installed: run `sudo apt-get install mosquitto` "
            "(or `make deps`, which does it when run as root)"
        )
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` different TCP ports on 127.0.0.1 that nobody listens on right now (held
    open together while chosen, so no two are the same)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def read_listeners(data_dir: Path) -> dict[str, int]:
    """{"mqtt": port, "websockets": port} of the broker started in `data_dir`."""
    ports = json.loads((data_dir / LISTENERS_FILE).read_text())
    return {"mqtt": int(ports["mqtt"]), "websockets": int(ports["websockets"])}


def signal_and_wait(process: subprocess.Popen[bytes], sig: signal.Signals, timeout: float) -> None:
    """Send `sig` to a running child and reap it; SIGKILL it if it outlives `timeout` seconds."""
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Service:
    """Started by `with` and stopped however the block ends."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def wait_for_port(port: int, timeout: float) -> None:
    """Poll until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise BrokerError(f"nothing accepted connections on 127.0.0.1:{port} within {timeout}s")


class LocalBroker(Service):
    """A Mosquitto process with its own config and data folder.

    The ports and data folder survive `kill()`/`start()`, so a test can crash
    the broker and bring it back with its persisted retained messages.
    `ws_port` is the websockets listener: the operator console's page and its
    MQTT connection (see console/).
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        template: Path = CONFIG_TEMPLATE,
        ws_port: int | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.ws_port = ws_port or free_port()
        while self.ws_port == self.port:  # two free ports, not the same one twice
            self.ws_port = free_port()
        self.config_path = data_dir / "mosquitto.conf"
        self._template = template
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The running broker's process id (None when stopped)."""
        return None if self._process is None else self._process.pid

    @property
    def log_path(self) -> Path:
        return self.data_dir / "mosquitto.log"

    def start(self, timeout: float = 10.0) -> LocalBroker:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if " " in str(STATIC_DIR):  # Mosquitto reads an option up to the end of its line
            raise BrokerError(f"the console folder's path has a space: {STATIC_DIR}")
        config = self._template.read_text().format(
            port=self.port,
            data_dir=self.data_dir,
            ws_port=self.ws_port,
            http_dir=STATIC_DIR,
            user=getpass.getuser(),  # as root: stay root, able to write data_dir
        )
        self.config_path.write_text(config)
        self._process = subprocess.Popen(
            [find_mosquitto(), "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_for_port(self.port, timeout)
            if f"listener {self.ws_port}" in config:  # a template may have no console
                wait_for_port(self.ws_port, timeout)
        except BrokerError as err:
            self._process.kill()
            _, stderr = self._process.communicate()
            log = self.log_path.read_text() if self.log_path.exists() else ""
            raise BrokerError(f"{err}\n{stderr.decode(errors='replace')}{log}") from None
        ports = {"mqtt": self.port, "websockets": self.ws_port}
        (self.data_dir / LISTENERS_FILE).write_text(json.dumps(ports))
        return self

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown (unsaved state is lost)."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM: a clean shutdown that saves the persistence file."""
        self._signal(signal.SIGTERM)

    def reload(self) -> None:
        """SIGHUP: re-read the password file and ACL (revocations)."""
        if self._process is not None:
            self._process.send_signal(signal.SIGHUP)

    def _signal(self, sig: signal.Signals) -> None:
        if self._process is None:
            return
        signal_and_wait(self._process, sig, timeout=10)
        if self._process.stderr is not None:
            self._process.stderr.close()
        self._process = None
