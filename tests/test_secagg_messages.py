"""Secure aggregation's messages on the doorbell: the roster it reads, the holders it is
given, the adverts the server takes into a roster; each malformed or altered one refused."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedbell.wire.secagg import (
    SecAggClient,
    SecAggError,
    SecAggParams,
    SecAggServer,
    neighbour_graph,
)
from fedbell.wire.secagg_messages import Advert, advert_record
from tests.test_secagg import NAMES, Round, graph_params, params, reason_of


def record_of(advert: bytes) -> str:
    """An advert's roster record (what the server makes of it)."""
    return base64.b64encode(advert_record(Advert.model_validate_json(advert))).decode()


def with_record(roster: dict[str, Any], name: str, record: str) -> bytes:
    """The roster with `name`'s record replaced."""
    records = [
        record if d == name else r
        for d, r in zip(roster["devices"], roster["records"], strict=True)
    ]
    return json.dumps({**roster, "records": records}).encode()


def test_a_doorbell_refuses_a_roster_that_omits_it_or_swaps_a_neighbours_key() -> None:
    round_ = Round(params())
    roster = json.loads(round_.advertise())
    kept = [i for i, d in enumerate(roster["devices"]) if d != "bell-02"]
    without = {
        **roster,
        "devices": [roster["devices"][i] for i in kept],
        "records": [roster["records"][i] for i in kept],
    }
    with pytest.raises(SecAggError) as omitted:
        round_.clients["bell-02"].share(json.dumps(without).encode())
    assert reason_of(omitted) == "secagg_bad_roster"
    fake = SecAggClient("bell-03", params(), Ed25519PrivateKey.generate()).advertise()
    with pytest.raises(SecAggError) as bad:
        round_.clients["bell-02"].share(with_record(roster, "bell-03", record_of(fake)))
    assert reason_of(bad) == "secagg_bad_signature"
    assert bad.value.device == "bell-03"
    mine = SecAggClient("bell-02", params(), round_.identities["bell-02"]).advertise()
    with pytest.raises(SecAggError) as altered:  # signed by bell-02, but not this advert
        round_.clients["bell-02"].share(with_record(roster, "bell-02", record_of(mine)))
    assert reason_of(altered) == "secagg_bad_roster"
    short = {**roster, "records": roster["records"][1:]}
    with pytest.raises(SecAggError) as uneven:
        round_.clients["bell-02"].share(json.dumps(short).encode())
    assert reason_of(uneven) == "secagg_bad_message"
    round_.clients["bell-02"].share(json.dumps(roster).encode())  # state kept: still works


def test_a_doorbell_reads_its_neighbours_adverts_strictly_and_no_other() -> None:
    names = [f"d{i:02d}" for i in range(30)]
    p = graph_params(neighbours=6, threshold=4, min_cohort=10, round_id=2)
    round_ = Round(p, names)
    roster = json.loads(round_.advertise())
    me = round_.clients["d00"]
    neighbours = neighbour_graph(names, me.params)["d00"]
    stranger = next(name for name in names if name not in (*neighbours, "d00"))
    record = base64.b64decode(roster["records"][names.index(neighbours[0])])
    replayed = SecAggClient(
        neighbours[1],
        SecAggParams(**{**p.to_dict(), "round_id": 3}),
        round_.identities[neighbours[1]],
    ).advertise()
    for name, bad, reason in (
        (neighbours[0], "!" * 172, "secagg_bad_message"),  # not base64
        (neighbours[0], base64.b64encode(record + b"\0").decode(), "secagg_bad_message"),
        (neighbours[1], record_of(replayed), "secagg_bad_signature"),  # signed for round 3
        (
            neighbours[-1],
            base64.b64encode(record[:64] + bytes(64)).decode(),
            "secagg_bad_signature",
        ),
    ):
        with pytest.raises(SecAggError) as err:
            me.share(with_record(roster, name, bad))
        assert err.value.device == name
        assert reason_of(err) == reason
    misnamed = {**roster, "devices": [d if d != stranger else "d00 " for d in roster["devices"]]}
    with pytest.raises(SecAggError) as wrong_name:
        me.share(json.dumps(misnamed).encode())
    assert reason_of(wrong_name) == "secagg_bad_message"
    me.share(with_record(roster, stranger, "!" * 172))  # never used: never read


def test_the_holders_a_doorbell_is_given_are_checked() -> None:
    round_ = Round(params())
    round_.share()
    inbox = round_.server.inbox("bell-00")
    holders = round_.server.holders
    client = round_.clients["bell-00"]
    for bad, reason in (
        (tuple(reversed(holders)), "secagg_bad_message"),  # not sorted
        (holders[1:], "secagg_bad_inbox"),  # leaves bell-00 out
        ((*holders, "zz-stranger"), "secagg_bad_inbox"),  # not in the roster
        (holders[:3], "secagg_below_min_cohort"),
    ):
        with pytest.raises(SecAggError) as err:
            client.receive(inbox, bad)
        assert reason_of(err) == reason
    client.receive(inbox, holders)


def test_an_advert_with_a_key_or_signature_of_the_wrong_length_is_refused() -> None:
    server = SecAggServer(params(), None, NAMES)
    advert = json.loads(SecAggClient("bell-00", params(), None).advertise())
    for field, value in (
        ("enc_key", base64.b64encode(bytes(33)).decode()),  # 44 characters, 33 bytes
        ("signature", base64.b64encode(bytes(63)).decode()),
    ):
        with pytest.raises(SecAggError) as err:
            server.add_advert("bell-00", json.dumps({**advert, field: value}).encode())
        assert reason_of(err) == "secagg_bad_message"
        assert field in str(err.value)
    server.add_advert("bell-00", json.dumps(advert).encode())


def test_a_message_nested_too_deep_is_refused_not_a_crash() -> None:
    client = Round(params()).clients["bell-00"]
    client.advertise()
    for payload in (b"[" * 100_000, b'{"round": 5, "devices": [' + b"[" * 100_000 + b"]}"):
        with pytest.raises(SecAggError) as err:
            client.share(payload)
        assert reason_of(err) == "secagg_bad_message"
    with pytest.raises(SecAggError) as large:
        client.share(b" " * (400 * 10_000 + 1))
    assert "limit" in str(large.value)
