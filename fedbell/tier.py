"""Connecting to the federation tier (issue 23): MQTT 3.1.1 and several nodes.

A process that talks to the clustered tier (broker/cluster.py) rather than a
house's Mosquitto needs two things a house broker never asks for: MQTT 3.1.1,
because NATS speaks nothing newer, and the other nodes' addresses, so that
after a lost node it reconnects to a live one. `TierMqttSettings` is
`MqttSettings` with those two keys; fedbell/wire/mqtt.py honours them.

What MQTT 3.1.1 cannot carry, and how fedbell copes (docs/many-houses.md):
no session expiry interval (the tier keeps a `clean_session = false` session
until it is removed), no Receive Maximum (the tier's `max_ack_pending` bounds
what is in flight to the aggregator), no reason codes beyond CONNACK's return
code and SUBACK's failure (a refused publish is dropped silently by NATS and
logged there), no message expiry or user properties (fedbell puts nothing in
properties: every message is a signed payload carrying its own round and
version), and no retain-as-published across a bridge (the hub's Retainer,
broker/cluster_hub.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from fedbell.config import MqttSettings

MqttVersion = Literal["5", "3.1.1"]
MQTT_V311: MqttVersion = "3.1.1"


class TierMqttSettings(MqttSettings):
    protocol: MqttVersion = Field(
        default=MQTT_V311,
        title="MQTT version",
        description="3.1.1 for the clustered federation tier (NATS speaks nothing newer); "
        "5 for a single Mosquitto.",
    )
    failover: tuple[str, ...] = Field(
        default=(),
        title="Other nodes",
        description="host:port of the tier's other nodes: after a lost connection the client "
        "tries the next address, round the list.",
    )

    @field_validator("failover")
    @classmethod
    def _host_and_port(cls, addresses: tuple[str, ...]) -> tuple[str, ...]:
        for address in addresses:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{address!r} is not host:port")
        return addresses

    def endpoints(self) -> list[tuple[str, int]]:
        """Every node's (host, port), the configured host first."""
        others = [address.rpartition(":") for address in self.failover]
        return [(self.host, self.port), *((host, int(port)) for host, _, port in others)]
