"""The production broker configuration: rendering it, and running it in tests.

`render_config` is what `python -m deploy.provision init` writes to
`<site>/broker/mosquitto.conf`; `SecureBroker` starts a real Mosquitto with the
same template on a free port, against a site provisioned in a temporary
folder, so the tests exercise exactly the TLS, password and ACL settings a Pi
will meet.
"""

from __future__ import annotations

import getpass
from pathlib import Path

from broker.local import LocalBroker
from console import STATIC_DIR

PRODUCTION_TEMPLATE = Path(__file__).with_name("production.conf")
CONSOLE_PORT = 8443
"""The operator console's TLS websockets listener on a real install."""


def render_config(
    port: int,
    conf_dir: Path,
    data_dir: Path,
    *,
    log_dest: str = "stderr",
    user: str = "mosquitto",
    template: Path = PRODUCTION_TEMPLATE,
    ws_port: int = CONSOLE_PORT,
    http_dir: Path = STATIC_DIR,
) -> str:
    """The production mosquitto.conf for one broker.

    `log_dest` is a mosquitto `log_dest` value: "stderr" under systemd (the
    journal), "file /path/mosquitto.log" elsewhere.
    """
    # Mosquitto reads an option up to the end of its line and does not quote.
    for path in (conf_dir, data_dir, http_dir):
        if any(char in str(path) for char in " \n{}"):
            raise ValueError(f"unusable path in broker configuration: {path}")
    if "\n" in log_dest or not user.isprintable() or " " in user:
        raise ValueError(f"unusable log_dest or user: {log_dest!r}, {user!r}")
    return template.read_text().format(
        port=port,
        conf_dir=conf_dir,
        data_dir=data_dir,
        log_dest=log_dest,
        user=user,
        ws_port=ws_port,
        http_dir=http_dir,
    )


class SecureBroker(LocalBroker):
    """A Mosquitto running the production configuration of a provisioned site.

    `conf_dir` is a site's `broker/` folder (certificates, passwd, acl). The
    rendered configuration goes to `data_dir`, with persistence and the log.
    """

    def __init__(
        self, conf_dir: Path, data_dir: Path, port: int | None = None, bridge: Path | None = None
    ) -> None:
        super().__init__(data_dir, port=port)
        self.conf_dir = conf_dir
        self.bridge = bridge
        """A hub's bridge.conf (`provision add-hub`), appended as a house would."""

    def start(self, timeout: float = 10.0) -> SecureBroker:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Run as whoever runs the tests: as root, "root" keeps Mosquitto from
        # switching to a user that cannot read pytest's private tmp folders.
        rendered = render_config(
            self.port,
            self.conf_dir,
            self.data_dir,
            log_dest=f"file {self.log_path}",
            user=getpass.getuser(),
            ws_port=self.ws_port,
        )
        # LocalBroker formats its template with {port}/{data_dir}; a rendered
        # config has no braces left, so it passes through unchanged.
        if self.bridge is not None:
            rendered += "\n" + self.bridge.read_text()
        template = self.data_dir / "production.rendered.conf"
        template.write_text(rendered)
        self._template = template
        super().start(timeout)
        return self

    def __enter__(self) -> SecureBroker:
        return self.start()

    @property
    def pid(self) -> int | None:
        """Process id of the running broker (for `provision --broker-pid`)."""
        return self._process.pid if self._process is not None else None
