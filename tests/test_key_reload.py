"""Issue 13 item 6: the aggregator re-reads device signing keys while it runs.

It used to load them once at start: `remove-device` did not revoke a signing
key until a restart, and a newly added doorbell was refused (while still
selected, so automatic rounds waited for the whole deadline).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.local import LocalBroker
from fedbell.config import SigningSettings
from fedbell.wire.messages import GlobalModel, Signer, build_update
from fedbell.wire.signing import KeyRing
from tests.mqtt_helpers import wait_until
from tests.test_aggregator import (
    SITE,
    FakeDevice,
    Watcher,
    control,
    devices,  # noqa: F401 - fixture
    make_config,
    random_delta,
    running,
    watcher,  # noqa: F401 - fixture
)


def write_public(key: Ed25519PrivateKey, path: Path) -> None:
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def signed_update(
    name: str, key: Ed25519PrivateKey, base: GlobalModel, round_id: int, seed: int
) -> bytes:
    return build_update(
        site=SITE,
        signer=Signer(name, key),
        round_id=round_id,
        base_version=base.version,
        num_examples=4,
        names=base.names,
        delta=random_delta(base, seed),
        codec="float32",
    )


def test_a_new_doorbell_is_trusted_and_a_removed_one_revoked_without_a_restart(
    broker: LocalBroker,
    watcher: Watcher,  # noqa: F811 - fixture
    devices: Callable[..., list[FakeDevice]],  # noqa: F811 - fixture
    tmp_path: Path,
    aggregator_cache: Path,
) -> None:
    folder = tmp_path / "device-keys"
    folder.mkdir()
    keys = {name: Ed25519PrivateKey.generate() for name in ("door1", "door2")}
    write_public(keys["door1"], folder / "door1.pub")
    config = make_config(tmp_path, broker.port, aggregator_cache, timeout_s=60)
    config = config.model_copy(update={"signing": SigningSettings(trusted_keys_dir=folder)})
    door1, door2 = devices("door1", "door2")
    with running(config) as service:
        base = watcher.global_model(0)
        wait_until(lambda: {"door1", "door2"} <= set(service.coordinator.federation.online))

        # door2 is provisioned while the aggregator runs (provision add-device).
        write_public(keys["door2"], folder / "door2.pub")
        control(door1, {"cmd": "start_round"})
        assert watcher.round(1, "train").selected == ("door1", "door2")
        for seed, device in enumerate((door1, door2)):
            device.send(signed_update(device.name, keys[device.name], base, 1, seed))
        first = watcher.metrics(1, "published")
        assert (first.participants, first.rejected) == (2, {}), first

        # door1 is removed (provision remove-device deletes its key): revoked at
        # once, and no longer selected, so the round does not wait for it.
        (folder / "door1.pub").unlink()
        model = watcher.global_model(1)
        control(door2, {"cmd": "start_round"})
        assert watcher.round(2, "train").selected == ("door2",)
        door1.send(signed_update("door1", keys["door1"], model, 2, 5))
        door2.send(signed_update("door2", keys["door2"], model, 2, 6))
        second = watcher.metrics(2, "published")
        assert second.participants == 1
        assert second.rejected == {"unknown_signer": 1}


def test_a_key_rewritten_in_place_is_read_again_on_request(tmp_path: Path) -> None:
    """What SIGHUP (`systemctl reload fedbell-aggregator`) does: re-read every key now."""
    first, second = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    write_public(first, tmp_path / "door1.pub")
    ring = KeyRing(tmp_path, rescan_s=3600)
    folder_stat = tmp_path.stat()
    write_public(second, tmp_path / "door1.pub")  # same name and size: the folder is unchanged
    os.utime(tmp_path, ns=(folder_stat.st_atime_ns, folder_stat.st_mtime_ns))
    assert ring.keys()["door1"].public_bytes_raw() == first.public_key().public_bytes_raw()
    ring.request_reload()
    assert ring.keys()["door1"].public_bytes_raw() == second.public_key().public_bytes_raw()
    # A key file that cannot be read keeps the others and says why.
    (tmp_path / "door2.pub").write_text("not a key")
    assert set(ring.keys()) == {"door1"}
    assert ring.error is not None
    assert "door2.pub" in ring.error


def test_a_large_folder_is_looked_at_less_often_than_rescan_s(tmp_path: Path) -> None:
    """Issue 23: stating 10,000 doorbells' keys took 0.43 s on the loaded machine, and a
    look every second held the aggregator's main loop; the interval grows with the scan."""
    key, replacement = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    for index in range(5000):
        write_public(key, tmp_path / f"door{index}.pub")
    now = [0.0]
    ring = KeyRing(tmp_path, rescan_s=0.001, clock=lambda: now[0])
    folder_stat = tmp_path.stat()
    write_public(replacement, tmp_path / "door0.pub")  # in place: the folder is unchanged
    os.utime(tmp_path, ns=(folder_stat.st_atime_ns, folder_stat.st_mtime_ns))
    # Ten times rescan_s, but 5,000 stats take well over 0.1 ms (x 1 / RESCAN_SHARE: 10 ms).
    now[0] = 0.01
    assert ring.keys()["door0"].public_bytes_raw() == key.public_key().public_bytes_raw()
    now[0] = 3600.0
    assert ring.keys()["door0"].public_bytes_raw() == replacement.public_key().public_bytes_raw()
