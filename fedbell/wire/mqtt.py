"""A paho-mqtt client set up the way every fedbell process needs it.

MQTT v5 with a persistent session (clean_start off, session expiry), so a
restarted process or broker gets queued QoS 1 messages; automatic reconnect
with back-off; credentials and TLS from the config; an optional last will.

The aggregator also asks for manual acknowledgements (it acks an update only
once it is on disk, so the broker redelivers what a crash lost) and a Receive
Maximum (the broker never has more than that many unacknowledged messages in
flight to it, which bounds its memory).

Settings for the federation tier (fedbell/tier.py) switch to MQTT 3.1.1 with a
persistent session (`clean_session` off: 3.1.1 has no session expiry and no
Receive Maximum) and reconnect to the next node after a lost connection.
"""

from __future__ import annotations

import ssl

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedbell.config import MqttSettings
from fedbell.tier import MQTT_V311, TierMqttSettings


def _mqtt_v311(settings: MqttSettings) -> bool:
    return isinstance(settings, TierMqttSettings) and settings.protocol == MQTT_V311


def make_client(
    settings: MqttSettings,
    client_id: str,
    will: tuple[str, bytes] | None = None,
    *,
    manual_ack: bool = False,
) -> mqtt.Client:
    """A configured, not yet connected client. `will`: (topic, payload), retained.

    manual_ack: QoS 1 messages are acknowledged only by `client.ack(mid, qos)`.
    """
    v311 = _mqtt_v311(settings)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv311 if v311 else mqtt.MQTTv5,
        clean_session=False if v311 else None,
        reconnect_on_failure=True,
        manual_ack=manual_ack,
    )
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password())
    if settings.tls is not None:
        client.tls_set(
            ca_certs=str(settings.tls.ca_file),
            certfile=str(settings.tls.cert_file) if settings.tls.cert_file else None,
            keyfile=str(settings.tls.key_file) if settings.tls.key_file else None,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    if isinstance(settings, TierMqttSettings) and settings.failover:
        client.on_pre_connect = _FailOver(settings.endpoints())
    return client


class _FailOver:
    """paho's on_pre_connect: every reconnect goes to the next node, round the list.

    Any node of the cluster serves the same sessions and retained messages, so
    the next one is as good as the lost one, and it is the likeliest to be up.
    """

    def __init__(self, endpoints: list[tuple[str, int]]) -> None:
        self._endpoints = endpoints
        self._attempts = 0

    def __call__(self, client: mqtt.Client, _userdata: object) -> None:
        # paho's public host/port setters refuse while it is connecting, which
        # is when this runs (paho 2.2); reconnect() reads these two right after.
        client._host, client._port = self._endpoints[self._attempts % len(self._endpoints)]
        self._attempts += 1


def connect(
    client: mqtt.Client, settings: MqttSettings, *, receive_maximum: int | None = None
) -> None:
    """Start connecting in the background; paho keeps reconnecting after that.

    receive_maximum: at most this many unacknowledged QoS 1 messages from the
    broker at a time (MQTT v5 CONNECT property; default: the protocol's 65535).
    """
    if _mqtt_v311(settings):
        # No properties in 3.1.1; the session is kept by clean_session=False.
        client.connect_async(settings.host, settings.port, keepalive=settings.keepalive)
        client.loop_start()
        return
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = settings.session_expiry
    if receive_maximum is not None:
        properties.ReceiveMaximum = receive_maximum
    client.connect_async(
        settings.host,
        settings.port,
        keepalive=settings.keepalive,
        clean_start=False,
        properties=properties,
    )
    client.loop_start()
