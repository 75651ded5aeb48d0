"""Secure aggregation: exact sums with dropouts, masked inputs look random, refusals named."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedbell.errors import RejectedMessage
from fedbell.wire import shamir
from fedbell.wire.masking import decode_sum, encode, reduce, unpack
from fedbell.wire.secagg import (
    SecAggClient,
    SecAggError,
    SecAggParams,
    SecAggServer,
    default_neighbours,
    default_scale,
    neighbour_graph,
    run_secure_round,
)

SIZE = 64
NAMES = [f"bell-{i:02d}" for i in range(10)]


def params(round_id: int = 5, **changes: object) -> SecAggParams:
    base = SecAggParams.for_cohort(
        round_id=round_id, lineage="home", cohort=len(NAMES), size=SIZE, clip_norm=1.0
    )
    return SecAggParams(**{**base.to_dict(), **changes})


def graph_params(
    *,
    neighbours: int,
    threshold: int,
    min_cohort: int,
    round_id: int,
    lineage: str | None = None,
    size: int = SIZE,
) -> SecAggParams:
    """Parameters with an explicit neighbour graph (k neighbours, t of them rebuild)."""
    return SecAggParams(
        round_id=round_id,
        lineage=lineage,
        min_cohort=min_cohort,
        neighbours=neighbours,
        share_threshold=threshold,
        scale=1.0,
        size=size,
    )


def random_inputs(names: Sequence[str], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.integers(0, 2**32, SIZE, dtype=np.uint64).astype(np.uint32) for n in names}


def plain_sum(inputs: dict[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    total = np.zeros(SIZE, dtype=np.uint32)
    for name in names:
        total += inputs[name]
    return reduce(total)  # what the wire keeps: the sum modulo 2^24


class Round:
    """Clients and a server driven step by step, so a test can tamper between steps."""

    def __init__(self, p: SecAggParams, names: Sequence[str] = NAMES) -> None:
        self.identities = {n: Ed25519PrivateKey.generate() for n in names}
        self.keys = {n: k.public_key() for n, k in self.identities.items()}
        self.server = SecAggServer(p, self.keys, names)
        self.clients = {n: SecAggClient(n, p, self.identities[n], self.keys) for n in names}
        self.inputs = random_inputs(names)

    def advertise(self) -> bytes:
        for name, client in self.clients.items():
            self.server.add_advert(name, client.advertise())
        return self.server.roster()

    def share(self) -> None:
        roster = self.advertise()
        for name, client in self.clients.items():
            self.server.add_shares(name, client.share(roster))

    def mask(self, dropped: Sequence[str] = ()) -> bytes:
        self.share()
        return self.deliver_and_mask(dropped)

    def deliver_and_mask(self, dropped: Sequence[str] = ()) -> bytes:
        """Each client's inbox in, each masked input but the dropped ones out."""
        self.receive()
        for name, client in self.clients.items():
            if name not in dropped:
                self.server.add_masked(name, client.masked_input(self.inputs[name]))
        return self.server.unmask_request()

    def receive(self) -> None:
        """Each client's inbox in, with the holders the server publishes (the send phase's
        announcement)."""
        for name, client in self.clients.items():
            client.receive(self.server.inbox(name), self.server.holders)

    def unmask(self, request: bytes) -> None:
        for name, client in self.clients.items():
            self.server.add_unmask(name, client.unmask(request))


def reason_of(err: pytest.ExceptionInfo[RejectedMessage]) -> str:
    return err.value.reason


def test_ten_doorbells_two_dropped_after_masking_sum_to_the_eight_survivors() -> None:
    p = params()
    identities = {n: Ed25519PrivateKey.generate() for n in NAMES}
    inputs = random_inputs(NAMES)
    dropped = {"bell-03", "bell-07"}
    total = run_secure_round(inputs, p, identities, drop_after_masking=dropped)
    assert total.dtype == np.uint32
    assert np.array_equal(total, plain_sum(inputs, [n for n in NAMES if n not in dropped]))


def test_silent_survivors_and_dropouts_together_on_a_sparse_graph() -> None:
    names = [f"d{i:03d}" for i in range(40)]
    p = graph_params(neighbours=12, threshold=7, min_cohort=20, round_id=9)
    inputs = random_inputs(names, seed=3)
    dropped, silent = {"d001", "d017", "d030"}, {"d002", "d020"}
    total = run_secure_round(inputs, p, None, drop_after_masking=dropped, drop_after_sending=silent)
    assert np.array_equal(total, plain_sum(inputs, [n for n in names if n not in dropped]))


def test_decoded_secure_sum_is_the_float_sum() -> None:
    p = params()
    rng = np.random.default_rng(7)
    floats = {n: rng.normal(0, 0.05, SIZE).astype(np.float32) for n in NAMES}
    encoded = {n: encode(v, p.scale, rng) for n, v in floats.items()}
    total = decode_sum(run_secure_round(encoded, p, None), p.scale)
    expected = np.sum([floats[n] for n in NAMES], axis=0, dtype=np.float64)
    assert np.all(np.abs(total - expected) <= len(NAMES) / p.scale)


def test_one_masked_input_is_indistinguishable_from_uniform() -> None:
    p = params(size=16_384)
    round_ = Round(p)
    round_.share()
    round_.receive()
    plain = encode(np.full(p.size, 0.01, np.float32), p.scale, np.random.default_rng(0))
    masked = json.loads(round_.clients["bell-00"].masked_input(plain))["values"]
    raw = np.frombuffer(base64.b64decode(masked), dtype=np.uint8)

    def chi2(data: np.ndarray) -> float:
        counts = np.bincount(data, minlength=256)
        expected = len(data) / 256
        return float(((counts - expected) ** 2 / expected).sum())

    # 255 degrees of freedom: mean 255, p = 1e-6 at ~370; the plain encoding is in the millions
    assert chi2(raw) < 400
    assert chi2(plain.view(np.uint8)) > 100_000
    assert np.mean(unpack(raw.tobytes()) == reduce(plain)) < 0.01


def test_a_lying_doorbell_is_named_and_the_honest_shares_still_unmask() -> None:
    round_ = Round(params())
    request = round_.mask(dropped=["bell-04"])
    liar = "bell-01"
    for name, client in round_.clients.items():
        if name == "bell-04":
            continue
        reply = json.loads(client.unmask(request))
        if name == liar:
            shares = bytearray(base64.b64decode(reply["self_shares"]))
            shares[16] ^= 1  # the last byte of the first share
            reply["self_shares"] = base64.b64encode(shares).decode()
            with pytest.raises(SecAggError) as err:
                round_.server.add_unmask(name, json.dumps(reply).encode())
            assert reason_of(err) == "secagg_bad_share"
            assert err.value.device == liar
            assert liar in str(err.value)
            continue
        round_.server.add_unmask(name, json.dumps(reply).encode())
    assert round_.server.counters["secagg_bad_share"] == 1
    total, survivors = round_.server.result()
    assert liar in survivors  # its input counts; only its lie was thrown away
    assert np.array_equal(total, plain_sum(round_.inputs, survivors))


def test_a_dealer_of_inconsistent_shares_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    round_ = Round(params())
    roster = round_.advertise()
    cheat = "bell-06"
    real_split = shamir.split
    calls = iter(range(2))

    def lying_split(secret: bytes, threshold: int, count: int) -> list[bytes]:
        shares = real_split(secret, threshold, count)
        if next(calls) == 0:  # the self seed: one share off the polynomial
            shares[0] = real_split(b"\x00" * 16, threshold, count)[0]
        return shares

    for name, client in round_.clients.items():
        if name == cheat:
            with monkeypatch.context() as patch:
                patch.setattr(shamir, "split", lying_split)
                payload = client.share(roster)
        else:
            payload = client.share(roster)
        round_.server.add_shares(name, payload)
    round_.unmask(round_.deliver_and_mask())
    with pytest.raises(SecAggError) as err:
        round_.server.result()
    assert reason_of(err) == "secagg_bad_share"
    assert err.value.device == cheat
    assert round_.server.phase == "failed"


def test_a_request_for_both_secrets_of_one_doorbell_is_refused() -> None:
    round_ = Round(params())
    request = json.loads(round_.mask(dropped=["bell-02"]))
    client = round_.clients["bell-05"]
    greedy = {**request, "dropped": sorted([*request["dropped"], "bell-08"])}
    with pytest.raises(SecAggError) as err:
        client.unmask(json.dumps(greedy).encode())
    assert reason_of(err) == "secagg_both_secrets"
    assert "bell-08" in str(err.value)
    client.unmask(json.dumps(request).encode())  # the honest request still works, once
    with pytest.raises(SecAggError) as again:
        client.unmask(json.dumps(request).encode())
    assert reason_of(again) == "secagg_wrong_phase"


def test_survivors_below_min_cohort_fail_closed_on_both_sides() -> None:
    round_ = Round(params(min_cohort=8))
    with pytest.raises(SecAggError) as err:
        round_.mask(dropped=["bell-00", "bell-01", "bell-02"])
    assert reason_of(err) == "secagg_below_min_cohort"
    assert "7 masked inputs, min_cohort 8" in str(err.value)
    assert round_.server.phase == "failed"
    with pytest.raises(SecAggError):
        round_.server.result()
    # a server that asks anyway is refused by every doorbell
    request = {
        "round": 5,
        "lineage": "home",
        "survivors": NAMES[3:],
        "dropped": NAMES[:3],
    }
    with pytest.raises(SecAggError) as refused:
        round_.clients["bell-05"].unmask(json.dumps(request).encode())
    assert reason_of(refused) == "secagg_below_min_cohort"


def test_a_replayed_advert_of_another_round_is_refused() -> None:
    identity = Ed25519PrivateKey.generate()
    old = SecAggClient("bell-00", params(round_id=5), identity).advertise()
    server = SecAggServer(params(round_id=6), {"bell-00": identity.public_key()}, NAMES)
    with pytest.raises(SecAggError) as err:
        server.add_advert("bell-00", old)
    assert reason_of(err) == "secagg_replay"
    assert err.value.device == "bell-00"
    # changing the round in the replay breaks the signature
    forged = {**json.loads(old), "round": 6}
    with pytest.raises(SecAggError) as bad:
        server.add_advert("bell-00", json.dumps(forged).encode())
    assert reason_of(bad) == "secagg_bad_signature"
    assert server.counters == {"secagg_replay": 1, "secagg_bad_signature": 1}
    # nothing was kept: the doorbell's real advert for round 6 is accepted
    server.add_advert("bell-00", SecAggClient("bell-00", params(round_id=6), identity).advertise())


def test_adverts_from_strangers_and_second_adverts_are_refused_redeliveries_ignored() -> None:
    round_ = Round(params())
    advert = round_.clients["bell-00"].advertise()
    with pytest.raises(SecAggError) as unknown:
        round_.server.add_advert("intruder", advert)
    assert reason_of(unknown) == "secagg_unknown_device"
    with pytest.raises(SecAggError) as impostor:
        round_.server.add_advert("bell-01", advert)
    assert reason_of(impostor) == "secagg_wrong_sender"
    round_.server.add_advert("bell-00", advert)
    round_.server.add_advert("bell-00", advert)  # QoS 1 redelivery: ignored
    other = SecAggClient("bell-00", params(), round_.identities["bell-00"]).advertise()
    with pytest.raises(SecAggError) as second:
        round_.server.add_advert("bell-00", other)
    assert reason_of(second) == "secagg_duplicate"


def test_malformed_shares_are_refused_and_the_round_goes_on() -> None:
    round_ = Round(params())
    roster = round_.advertise()
    payloads = {name: client.share(roster) for name, client in round_.clients.items()}
    for bad in (b"{", b"[" * 5000, b'{"round": 5}', payloads["bell-01"]):
        with pytest.raises(SecAggError) as err:
            round_.server.add_shares("bell-00", bad)
        assert reason_of(err) in {"secagg_bad_message", "secagg_wrong_sender"}
    short = json.loads(payloads["bell-00"])
    short["shares"] = short["shares"][1:]
    with pytest.raises(SecAggError) as missing:
        round_.server.add_shares("bell-00", json.dumps(short).encode())
    assert reason_of(missing) == "secagg_bad_share"
    for name, payload in payloads.items():
        round_.server.add_shares(name, payload)
    # a share altered in transit: the recipient names its dealer and keeps its state
    inbox = json.loads(round_.server.inbox("bell-04"))
    dealer = inbox["shares"][0]["peer"]
    ciphertext = bytearray(base64.b64decode(inbox["shares"][0]["ciphertext"]))
    ciphertext[0] ^= 0x80
    inbox["shares"][0]["ciphertext"] = base64.b64encode(ciphertext).decode()
    with pytest.raises(SecAggError) as altered:
        round_.clients["bell-04"].receive(json.dumps(inbox).encode(), round_.server.holders)
    assert reason_of(altered) == "secagg_bad_share"
    assert altered.value.device == dealer
    round_.unmask(round_.deliver_and_mask())
    total, survivors = round_.server.result()
    assert np.array_equal(total, plain_sum(round_.inputs, survivors))


def test_a_masked_input_of_the_wrong_size_is_refused_on_both_sides() -> None:
    round_ = Round(params())
    round_.share()
    round_.receive()
    client = round_.clients["bell-00"]
    with pytest.raises(SecAggError) as local:
        client.masked_input(np.zeros(SIZE + 1, np.uint32))
    assert reason_of(local) == "secagg_wrong_size"
    with pytest.raises(SecAggError) as dtype:
        client.masked_input(np.zeros(SIZE, np.float32))
    assert reason_of(dtype) == "secagg_wrong_size"
    masked = json.loads(client.masked_input(round_.inputs["bell-00"]))
    for values in (np.zeros(SIZE - 1, "<u4"), np.zeros(100 * SIZE, "<u4")):
        wrong = {**masked, "values": base64.b64encode(values.tobytes()).decode()}
        with pytest.raises(SecAggError) as err:
            round_.server.add_masked("bell-00", json.dumps(wrong).encode())
        assert reason_of(err) == "secagg_wrong_size"
    assert round_.server.counters["secagg_wrong_size"] == 2
    round_.server.add_masked("bell-00", json.dumps(masked).encode())


def test_too_few_adverts_give_no_roster() -> None:
    round_ = Round(params(min_cohort=4))
    for name in NAMES[:3]:
        round_.server.add_advert(name, round_.clients[name].advertise())
    with pytest.raises(SecAggError) as err:
        round_.server.roster()
    assert reason_of(err) == "secagg_below_min_cohort"


def test_the_graph_is_regular_symmetric_and_the_same_for_everyone() -> None:
    names = [f"d{i:04d}" for i in range(300)]
    p = graph_params(neighbours=18, threshold=10, min_cohort=100, round_id=2, lineage="x", size=8)
    graph = neighbour_graph(names, p)
    assert graph == neighbour_graph(list(reversed(names)), p)
    assert all(len(peers) == 18 for peers in graph.values())
    assert all(a in graph[b] for a, peers in graph.items() for b in peers)
    assert graph != neighbour_graph(names, SecAggParams(**{**p.to_dict(), "round_id": 3}))
    small = neighbour_graph(names[:5], p)  # k >= n - 1: everyone
    assert all(len(peers) == 4 for peers in small.values())


def test_defaults_grow_with_log_n_and_keep_the_sum_in_range() -> None:
    assert default_neighbours(10) == 9
    ks = [default_neighbours(n) for n in (100, 1000, 10_000)]
    assert ks == sorted(ks)
    assert ks[-1] <= 40
    assert all(k % 2 == 0 for k in ks)
    scale = default_scale(clip_norm=2.0, max_devices=1000, noise_std=0.1)
    assert 1000 * (2.0 + 0.8) * scale + 1000 < 2**23


def test_params_refuse_a_minority_threshold_and_survive_a_dict_round_trip() -> None:
    with pytest.raises(ValueError, match="majority"):
        graph_params(neighbours=10, threshold=5, min_cohort=3, round_id=1, size=4)
    p = params()
    assert SecAggParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(ValueError, match="fields"):
        SecAggParams.from_dict({**p.to_dict(), "extra": 1})
    with pytest.raises(ValueError, match="type"):
        SecAggParams.from_dict({**p.to_dict(), "size": "64"})


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=16, max_size=16), st.integers(1, 12), st.data())
def test_any_threshold_of_shares_rebuilds_the_secret(
    secret: bytes, threshold: int, data: st.DataObject
) -> None:
    count = data.draw(st.integers(threshold, 20))
    shares = shamir.split(secret, threshold, count)
    chosen = data.draw(st.permutations(range(count)))[:threshold]
    assert shamir.combine([(i + 1, shares[i]) for i in chosen]) == secret
    if threshold > 1:
        assert shamir.combine([(i + 1, shares[i]) for i in chosen[:-1]]) != secret


def test_a_self_secret_with_fewer_than_t_revealed_shares_is_named() -> None:
    names = [f"d{i:02d}" for i in range(12)]
    p = graph_params(neighbours=4, threshold=3, min_cohort=3, round_id=4)
    round_ = Round(p, names)
    request = round_.mask()
    victim = "d07"
    silent = set(neighbour_graph(names, p)[victim][:2])  # 2 of its 4 neighbours never reply
    for name, client in round_.clients.items():
        if name not in silent:
            round_.server.add_unmask(name, client.unmask(request))
    with pytest.raises(SecAggError) as err:
        round_.server.result()
    assert reason_of(err) == "secagg_unrecoverable"
    assert err.value.device == victim
    assert round_.server.phase == "unmask"  # more replies may still come
    for name in silent:
        round_.server.add_unmask(name, round_.clients[name].unmask(request))
    total, _ = round_.server.result()
    assert np.array_equal(total, plain_sum(round_.inputs, names))


def test_messages_out_of_turn_and_from_non_holders_are_refused() -> None:
    round_ = Round(params())
    with pytest.raises(SecAggError) as early:
        round_.server.unmask_request()
    assert reason_of(early) == "secagg_wrong_phase"
    client = round_.clients["bell-00"]
    with pytest.raises(SecAggError) as too_soon:
        client.masked_input(round_.inputs["bell-00"])
    assert reason_of(too_soon) == "secagg_wrong_phase"
    roster = round_.advertise()
    for name, c in round_.clients.items():
        if name != "bell-09":  # never deals its shares
            round_.server.add_shares(name, c.share(roster))
    round_.clients["bell-09"].share(roster)
    inbox = round_.server.inbox("bell-00")
    assert "bell-09" not in round_.server.holders
    with pytest.raises(SecAggError) as outsider:
        round_.server.inbox("bell-09")
    assert reason_of(outsider) == "secagg_unknown_device"
    client.receive(inbox, round_.server.holders)
    masked = client.masked_input(round_.inputs["bell-00"])
    round_.server.add_masked("bell-00", masked)
    round_.server.add_masked("bell-00", masked)  # redelivered: ignored
    assert round_.server.counters == {"secagg_wrong_phase": 1, "secagg_unknown_device": 1}


def test_rng_seed_makes_the_keys_reproducible() -> None:
    p = params()
    first = SecAggClient("bell-00", p, None, rng_seed=b"fixed").advertise()
    assert first == SecAggClient("bell-00", p, None, rng_seed=b"fixed").advertise()
    assert first != SecAggClient("bell-00", p, None, rng_seed=b"other").advertise()
    assert first != SecAggClient("bell-00", p, None).advertise()


def test_an_odd_neighbour_count_on_a_sparse_roster_rounds_down_to_even() -> None:
    p = graph_params(neighbours=9, threshold=5, min_cohort=3, round_id=1)
    assert p.degree(30) == (8, 5)
    assert p.degree(10) == (9, 5)
    assert p.degree(6) == (5, 5)
    assert p.degree(4) == (3, 2)
    names = [f"d{i:02d}" for i in range(30)]
    inputs = random_inputs(names)
    assert np.array_equal(run_secure_round(inputs, p, None), plain_sum(inputs, names))


def test_an_advert_copying_another_doorbells_keys_is_refused() -> None:
    server = SecAggServer(params(), None, NAMES)
    original = SecAggClient("bell-00", params(), None).advertise()
    server.add_advert("bell-00", original)
    copied = {**json.loads(original), "device": "bell-01"}
    with pytest.raises(SecAggError) as err:
        server.add_advert("bell-01", json.dumps(copied).encode())
    assert reason_of(err) == "secagg_duplicate"
    assert "bell-00" in str(err.value)


@settings(max_examples=25, deadline=None)
@given(st.integers(6, 16), st.integers(0, 2**32 - 1), st.data())
def test_any_recoverable_dropout_pattern_gives_the_exact_survivor_sum(
    count: int, seed: int, data: st.DataObject
) -> None:
    names = [f"h{i:02d}" for i in range(count)]
    k = data.draw(st.sampled_from([2, 4, 6, count - 1]))
    p = graph_params(
        neighbours=k, threshold=k // 2 + 1, min_cohort=3, round_id=seed % 1000 + 1, size=8
    )
    inputs = {n: v[:8] for n, v in random_inputs(names, seed).items()}
    dropped = set(data.draw(st.lists(st.sampled_from(names), max_size=count // 3, unique=True)))
    graph = neighbour_graph(names, p)
    _, t = p.degree(count)
    # only patterns the round is built to recover (the others are the refusal tests')
    assume(count - len(dropped) >= 3)
    assume(all(sum(peer not in dropped for peer in graph[name]) >= t for name in names))
    total = run_secure_round(inputs, p, None, drop_after_masking=dropped)
    expected = np.zeros(8, dtype=np.uint32)
    for name in names:
        if name not in dropped:
            expected += inputs[name]
    assert np.array_equal(total, reduce(expected))


def test_an_inbox_missing_a_neighbours_shares_or_a_request_missing_a_holder_is_refused() -> None:
    round_ = Round(params())
    round_.share()
    inbox = json.loads(round_.server.inbox("bell-00"))
    dropped_entry = {**inbox, "shares": inbox["shares"][1:]}
    holders = round_.server.holders
    with pytest.raises(SecAggError) as short:
        round_.clients["bell-00"].receive(json.dumps(dropped_entry).encode(), holders)
    assert reason_of(short) == "secagg_bad_inbox"
    for name, client in round_.clients.items():
        client.receive(round_.server.inbox(name), holders)
        round_.server.add_masked(name, client.masked_input(round_.inputs[name]))
    request = json.loads(round_.server.unmask_request())
    partial = {**request, "survivors": request["survivors"][:-1]}
    with pytest.raises(SecAggError) as missing:
        round_.clients["bell-00"].unmask(json.dumps(partial).encode())
    assert reason_of(missing) == "secagg_bad_request"
