"""The operator console: one static page that speaks MQTT over WebSockets to the broker.

There is no console process. Mosquitto's websockets listener serves the page
from `http_dir` and carries the page's MQTT connection, so the page sees and
presses exactly what the operator's own login may (the broker's ACL is the
only authority) and keeps working while the aggregator is down. The page's
one dependency, the `mqtt` browser client from the npm registry, is vendored
into `static/vendor/` by `make deps` (`console/package.json`): nothing is
fetched from a CDN at run time.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from urllib.parse import urlencode

STATIC_DIR = Path(__file__).resolve().with_name("static")
"""What the broker serves (`http_dir`): index.html, console.js, console.css, vendor/."""

VENDORED_CLIENT = STATIC_DIR / "vendor" / "mqtt.min.js"


def page_url(
    host: str,
    ws_port: int,
    site: str,
    *,
    root: str = "fedbell",
    tls: bool = False,
    mqtt_port: int | None = None,
) -> str:
    """The console's address on a broker's websockets listener, for one site.

    `mqtt_port`: the broker's MQTT listener, for the `mosquitto_pub` line the page
    shows (the page only knows its websockets port; without it the line says 1883,
    or 8883 over TLS).
    """
    query = {"site": site} if root == "fedbell" else {"site": site, "root": root}
    if mqtt_port is not None:
        query["mqtt"] = str(mqtt_port)
    return f"{'https' if tls else 'http'}://{host}:{ws_port}/?{urlencode(query)}"


def start_round_line(host: str, port: int, site: str, root: str = "fedbell") -> str:
    """The `mosquitto_pub` command that starts a round: what the page's button publishes."""
    return shlex.join(
        [
            "mosquitto_pub",
            "-h",
            host,
            "-p",
            str(port),
            "-q",
            "1",
            "-t",
            f"{root}/{site}/control",
            "-m",
            '{"cmd":"start_round"}',
        ]
    )
