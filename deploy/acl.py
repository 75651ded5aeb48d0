"""The broker's access control list, generated from the site's registry.

One `user` block per login, with explicit topics, rather than `pattern ... %u`
lines: Mosquitto applies pattern lines to *every* user, so a pattern meant
for doorbells would also let the aggregator, the operator and Home Assistant
write `update/<their own name>`. Explicit blocks grant each login exactly its
role's topics, and removing a device removes its block (a second lock behind
the deleted password).

Subscriptions are checked against these lines too: a client may only
subscribe to a filter no wider than what it may read (a doorbell subscribes to
its exact topics; the aggregator may use `update/+`, Home Assistant
`doorbell/#` and `homeassistant/#`). `$SYS` is in nobody's list.

Secure aggregation: a doorbell writes only its own `secagg/<leaf>/<device>`
topics (key advert, encrypted shares, masked update, unmask answer) and reads
only its own `secagg/inbox/<device>`, where the aggregator routes the shares the
others encrypted for it; the aggregator reads every doorbell's secagg topics and
writes every inbox. Nobody else reads any of them. On the federation tier
(deploy/tier.py) a hub's login writes key adverts and reads inboxes only under
its own house, `secagg/keys/<house>/+`, and reads its house's inbox bundles,
`secagg/inboxes/<house>/+`, which the Retainer unpacks to each doorbell's inbox.

A house hub's Retainer (broker/cluster_hub.py) reads what the bridge to the
federation tier staged under STAGING_PREFIX and writes it, retained, on the
topics a doorbell reads: nothing else. Only the bridge writes the staging
topics (Mosquitto does not check a bridge's messages against this list).
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from fedbell.wire.topics import SECAGG_LEAVES


class Role(StrEnum):
    DEVICE = "device"
    AGGREGATOR = "aggregator"
    OPERATOR = "operator"
    HOMEASSISTANT = "homeassistant"
    RETAINER = "retainer"


STAGING_PREFIX = "_tier/"
"""Where a hub's bridge puts what comes down from the tier, for its Retainer to republish."""


# What a doorbell publishes under doorbell/<device>/ (events and state), and
# what it listens to there (written by Home Assistant or the operator).
DOORBELL_OUT = ("visitor", "ring", "present", "snapshot")
DOORBELL_IN = ("command", "label")
# What the operator console shows of each doorbell's events (no `present`
# state; a snapshot only exists where a house opted in to it).
CONSOLE_EVENTS = ("visitor", "ring", "snapshot")


def rules(role: Role, name: str, base: str) -> list[tuple[str, str]]:
    """(access, topic) pairs for one login; `base` is "<root>/<site>"."""
    match role:
        case Role.DEVICE:
            return [
                ("write", f"{base}/update/{name}"),
                ("write", f"{base}/status/{name}"),
                *(("write", f"{base}/secagg/{leaf}/{name}") for leaf in SECAGG_LEAVES),
                ("read", f"{base}/secagg/inbox/{name}"),
                ("read", f"{base}/round"),
                ("read", f"{base}/model/global"),
                ("read", f"{base}/model/tflite"),
                ("read", f"{base}/model/tflite/+"),  # the backbone's chunks
                *(("write", f"doorbell/{name}/{leaf}") for leaf in DOORBELL_OUT),
                *(("read", f"doorbell/{name}/{leaf}") for leaf in DOORBELL_IN),
                ("write", f"homeassistant/device/{name}/config"),
                ("read", "homeassistant/status"),
            ]
        case Role.AGGREGATOR:
            return [
                ("read", f"{base}/control"),
                ("read", f"{base}/update/+"),
                ("read", f"{base}/status/+"),
                *(("read", f"{base}/secagg/{leaf}/+") for leaf in SECAGG_LEAVES),
                ("write", f"{base}/secagg/inbox/+"),
                # The same across the federation tier, under each doorbell's house
                # (fedbell/wire/topics.py); on a house's own broker nobody writes them.
                ("read", f"{base}/secagg/keys/+/+"),
                ("write", f"{base}/secagg/inboxes/+/+"),
                ("write", f"{base}/round"),
                ("write", f"{base}/model/global"),
                ("write", f"{base}/model/tflite"),
                ("write", f"{base}/model/tflite/+"),
                ("write", f"{base}/metrics"),
                ("write", f"{base}/aggregator/status"),
                ("write", f"{base}/aggregator/reply"),
            ]
        case Role.OPERATOR:
            # Everything the console (console/) reads and presses, and nothing more.
            return [
                ("write", f"{base}/control"),
                ("read", f"{base}/aggregator/reply"),
                ("read", f"{base}/round"),
                ("read", f"{base}/metrics"),
                ("read", f"{base}/status/+"),
                ("read", f"{base}/aggregator/status"),
                *(("write", f"doorbell/+/{leaf}") for leaf in DOORBELL_IN),
                *(("read", f"doorbell/+/{leaf}") for leaf in CONSOLE_EVENTS),
            ]
        case Role.HOMEASSISTANT:
            return [
                ("read", "doorbell/#"),
                # A doorbell's availability is its federation status (its last will).
                ("read", f"{base}/status/+"),
                *(("write", f"doorbell/+/{leaf}") for leaf in DOORBELL_IN),
                ("read", "homeassistant/#"),
                ("write", "homeassistant/status"),
            ]
        case Role.RETAINER:
            incoming = [
                topic
                for access, topic in rules(Role.DEVICE, "+", base)
                if access == "read" and topic.startswith(base)
            ]
            return [("read", f"{STAGING_PREFIX}#"), *(("write", topic) for topic in incoming)]
    raise ValueError(f"unknown role {role!r}")  # pragma: no cover - exhaustive match


def render(topic_root: str, site: str, logins: Iterable[tuple[str, Role]]) -> str:
    """The whole acl file for the site's logins, in a stable order."""
    base = f"{topic_root}/{site}"
    lines = [
        "# fedbell broker ACL: generated by `python -m deploy.provision`; do not edit,",
        "# re-run the provisioner (see deploy/acl.py for the rules and why).",
        "# Nothing before the first `user` line: anonymous clients get nothing.",
    ]
    for name, role in sorted(logins, key=lambda login: (login[1].value, login[0])):
        lines += ["", f"# {role.value}", f"user {name}"]
        lines += [f"topic {access} {topic}" for access, topic in rules(role, name, base)]
    return "\n".join(lines) + "\n"
