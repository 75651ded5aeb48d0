"""Secure aggregation (SecAgg+): the aggregator learns the sum of a round's updates, not one.

Bonawitz et al. 2017 ("Practical Secure Aggregation"), with Bell et al. 2020's
sparse neighbour graph (SecAgg+). Each doorbell adds to its fixed-point update
(fedbell.wire.masking) a self mask PRG(b) and, for each neighbour v, +PRG(s_uv)
or -PRG(s_uv) (s_uv agreed with X25519); pairwise masks cancel in the sum of
survivors. Each doorbell Shamir-shares b and the seed of its mask key among its
neighbours (t of k); after masking, each survivor reveals for each neighbour
either its share of b (the neighbour survived: its self mask is removed) or its
share of the mask key (it dropped: its pairwise masks are removed), never both.

What the aggregator (or whoever runs the broker) learns: the sum of the inputs
of at least min_cohort survivors, nothing about one of them (each masked input
alone is indistinguishable from uniform). It never sees a sum of fewer: the
server fails closed (`secagg_below_min_cohort`) and every doorbell refuses to
unmask such a round too. With distributed DP noise (fedbell.wire.dp) even that
sum is differentially private.

What a malicious server could still try, and what stops it:
- Claim a live doorbell dropped to some neighbours and survived to others, to
  get both its self seed and its mask key: each doorbell answers one request
  per round and never reveals both secrets of one doorbell, and t > k/2 means
  two disjoint sets of t neighbours do not exist.
- Substitute keys: adverts are signed by the provisioned identity over the
  round and lineage (a replay from another round fails), and each doorbell
  checks its own advert is in the roster unaltered and, given its neighbours'
  provisioned keys (`peer_keys`), their adverts. A doorbell without them
  cannot tell a neighbour's keys from the server's: against such a server
  (active, not merely curious) the shares dealt to that neighbour are exposed.
- Pick the graph: it is seeded by the round and computed by everyone.
- Send different rosters to different doorbells (Bonawitz's consistency round
  is not implemented): this can make the round fail, not reveal one input,
  as long as the doorbells' checks above hold.
What a malicious doorbell can do: lie about a share (caught by the dealer's
commitments and named), deal inconsistent shares (caught by the seed or key
commitment at reconstruction, named, the round fails), or add any value within
the fixed-point range to the sum (not detectable under masking: bounded by the
range and the accuracy gates, not by robust statistics).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedbell.wire.secagg_client import SecAggClient
from fedbell.wire.secagg_messages import SecAggError
from fedbell.wire.secagg_params import (
    DEFAULT_MAX_DROPOUT,
    SecAggParams,
    default_neighbours,
    default_scale,
    default_threshold,
    neighbour_graph,
    neighbours_of,
)
from fedbell.wire.secagg_server import SecAggServer

__all__ = [
    "DEFAULT_MAX_DROPOUT",
    "SecAggClient",
    "SecAggError",
    "SecAggParams",
    "SecAggServer",
    "default_neighbours",
    "default_scale",
    "default_threshold",
    "neighbour_graph",
    "neighbours_of",
    "run_secure_round",
]


def run_secure_round(
    clients_vectors: Mapping[str, np.ndarray],
    params: SecAggParams,
    identities: Mapping[str, Ed25519PrivateKey] | None,
    drop_after_masking: Collection[str] = (),
    drop_after_sending: Collection[str] = (),
) -> np.ndarray:
    """One whole round in process, every step through bytes: the uint32 sum of the survivors.

    drop_after_masking: doorbells that go silent after dealing their shares
    (their masked input never arrives; their pairwise masks are removed).
    drop_after_sending: doorbells whose masked input arrives but that never
    answer the unmask request (they count as survivors: their self mask is
    rebuilt from their neighbours' shares). identities None: nothing signed.
    """
    names = sorted(clients_vectors)
    device_keys = None if identities is None else {n: identities[n].public_key() for n in names}
    server = SecAggServer(params, device_keys, names)
    clients = {
        name: SecAggClient(
            name, params, None if identities is None else identities[name], device_keys
        )
        for name in names
    }
    for name, client in clients.items():
        server.add_advert(name, client.advertise())
    roster = server.roster()
    for name, client in clients.items():
        server.add_shares(name, client.share(roster))
    for name, client in clients.items():
        client.receive(server.inbox(name), server.holders)
    for name, client in clients.items():
        if name not in drop_after_masking:
            server.add_masked(name, client.masked_input(clients_vectors[name]))
    request = server.unmask_request()
    for name, client in clients.items():
        if name not in drop_after_masking and name not in drop_after_sending:
            server.add_unmask(name, client.unmask(request))
    total, _ = server.result()
    return total
