"""Secure aggregation (fl.secagg): correctness, masking, dropouts, failing closed."""

from __future__ import annotations

import numpy as np
import pytest
from fedtune.fl.config import ConfigError, load_config
from fedtune.fl.params import ClientUpdate, ModelParams
from fedtune.fl.privacy.dp_fedavg import DPFedAvg
from fedtune.fl.secagg.bonawitz import SecAggClient, SecAggServer, secure_sum
from fedtune.fl.secagg.primitives import (
    SHAMIR_PRIME,
    FixedPoint,
    SecAggAbort,
    prg,
    shamir_reconstruct,
    shamir_split,
)
from fedtune.fl.strategies import Contribution, FedAvg
from scipy import stats


def _seeds(ids, seed=0) -> dict[int, bytes]:
    rng = np.random.default_rng(seed)
    return {u: rng.bytes(32) for u in ids}


UNIFORM_P = 1e-6
"""A masked vector passes the uniformity test when its p-value is above this. Some 70 such
checks run in the suite, each on fresh randomness from the OS: at 1e-6 each, a false alarm is
rarer than 1e-4 a run, while a vector that is not masked scores below 1e-10 (each test checks
that first)."""


def _top_byte_p_value(v: np.ndarray) -> float:
    """Chi-square p-value that the top bytes of uint64 values are uniform on 0..255."""
    counts = np.bincount((v >> np.uint64(56)).astype(np.int64), minlength=256)
    return stats.chisquare(counts).pvalue


# --- fixed point ----------------------------------------------------------------------------


def test_fixed_point_round_trip_within_half_resolution():
    codec = FixedPoint(bound=4.0)
    x = np.random.default_rng(0).uniform(-4, 4, 10_000)
    assert np.max(np.abs(codec.decode(codec.encode(x)) - x)) <= codec.resolution / 2
    np.testing.assert_array_equal(
        codec.decode(codec.encode(np.array([-4.0, 0.0, 4.0]))), [-4.0, 0.0, 4.0]
    )


def test_fixed_point_rejects_values_outside_the_bound():
    with pytest.raises(ValueError, match="bound"):
        FixedPoint(bound=1.0).encode(np.array([0.5, -1.5]))
    with pytest.raises(ValueError, match="non-finite"):
        FixedPoint(bound=1.0).encode(np.array([np.inf]))


def test_capacity_check_names_the_bound_and_is_exact():
    codec = FixedPoint(bound=1.0, frac_bits=24)
    limit = 2**63 // 2**24  # n * 2^24 < 2^63  <=>  n < 2^39
    codec.check_capacity(limit - 1)
    with pytest.raises(ValueError, match=r"num_clients \* ceil\(bound \* 2\^frac_bits\)"):
        codec.check_capacity(limit)
    # And the bound matters: at the limit the sum of extreme values does wrap around.
    n = 4
    tight = FixedPoint(bound=2.0**61 / 2**24, frac_bits=24)  # n * R * 2^f = 2^63
    with pytest.raises(ValueError):
        tight.check_capacity(n)
    total = sum(tight.encode(np.array([tight.bound])) for _ in range(n))
    assert tight.decode(total)[0] != n * tight.bound


# --- Shamir sharing -------------------------------------------------------------------------


def test_shamir_any_threshold_subset_rebuilds_the_secret():
    rng = np.random.default_rng(1)
    secret = int.from_bytes(rng.bytes(32), "big")
    shares = shamir_split(secret, 4, range(1, 11), rng.bytes)
    for subset in ([1, 2, 3, 4], [10, 7, 5, 2], [3, 4, 8, 9, 10]):
        assert shamir_reconstruct({x: shares[x] for x in subset}, 4) == secret
    # Fewer than the threshold interpolate a different polynomial: not the secret.
    assert shamir_reconstruct({x: shares[x] for x in [1, 2, 3]}, 3) != secret
    assert all(0 <= s < SHAMIR_PRIME for s in shares.values())
    with pytest.raises(SecAggAbort):
        shamir_reconstruct({x: shares[x] for x in [1, 2, 3]}, 4)


# --- the protocol ---------------------------------------------------------------------------


def test_recovered_sum_equals_plain_sum_within_quantisation():
    rng = np.random.default_rng(2)
    n = 12
    vectors = {u: rng.uniform(-3, 3, 5) for u in range(n)}
    codec = FixedPoint(bound=3.0)
    result = secure_sum(vectors, threshold=7, codec=codec, seeds=_seeds(range(n)))
    assert result.included == list(range(n))
    exact = np.sum(list(vectors.values()), axis=0)
    assert np.max(np.abs(result.total - exact)) <= n * codec.resolution / 2 + 1e-12
    # Without secure seeds (fresh OS randomness) the protocol works the same.
    unseeded = secure_sum(vectors, threshold=7, codec=codec)
    assert np.max(np.abs(unseeded.total - exact)) <= n * codec.resolution / 2 + 1e-12


def test_masked_vectors_look_uniform_and_reveal_nothing_alone():
    n, dim = 8, 4096
    codec = FixedPoint(bound=1.0)
    rng = np.random.default_rng(3)
    vectors = {u: rng.uniform(0, 0.01, dim) for u in range(n)}  # far from uniform in Z_2^64
    clients = {u: SecAggClient(u, 5, codec, s) for u, s in _seeds(range(n), 3).items()}
    server = SecAggServer(5, codec, dim)
    roster = server.collect_keys([c.advertise_keys() for c in clients.values()])
    inboxes = server.route_shares([c.share_keys(roster) for c in clients.values()])
    masked = {u: c.masked_input(vectors[u], roster, inboxes[u]) for u, c in clients.items()}
    # The test has power: an encoded but unmasked input fails it.
    assert _top_byte_p_value(codec.encode(vectors[0])) < 1e-10
    for u, y in masked.items():
        assert _top_byte_p_value(y) > UNIFORM_P, u
    # Even the server's running sum is masked until the unmasking round.
    survivors = server.collect_masked_inputs(masked)
    assert _top_byte_p_value(sum(masked.values())) > UNIFORM_P
    responses = [clients[u].unmasking_shares(roster, inboxes[u], survivors) for u in survivors]
    exact = np.sum(list(vectors.values()), axis=0)
    assert np.max(np.abs(server.unmask(responses) - exact)) <= n * codec.resolution / 2 + 1e-12
    # What the server legitimately learns, the self-mask seeds, still leaves each input hidden
    # behind the pairwise masks. (Client u's Shamir point is u + 1.)
    for u, y in masked.items():
        seed = shamir_reconstruct({r.sender + 1: r.self_mask_shares[u] for r in responses}, 5)
        assert _top_byte_p_value(y - prg(seed.to_bytes(32, "big"), dim)) > UNIFORM_P, u


def test_thirty_percent_dropouts_recover_the_survivors_sum():
    n = 100
    rng = np.random.default_rng(4)
    vectors = {u: rng.uniform(-1, 1, 3) for u in range(n)}
    codec = FixedPoint(bound=1.0)
    order = [int(u) for u in rng.permutation(n)]
    before_sharing, before_masking, before_unmasking = order[:5], order[5:20], order[20:30]
    result = secure_sum(
        vectors,
        threshold=51,
        codec=codec,
        drop_before_sharing=before_sharing,
        drop_before_masking=before_masking,
        drop_before_unmasking=before_unmasking,
        seeds=_seeds(range(n), 4),
    )
    # Clients that sent masked input count, even if they vanished before unmasking.
    expected_ids = sorted(set(range(n)) - set(before_sharing) - set(before_masking))
    assert result.included == expected_ids
    exact = np.sum([vectors[u] for u in expected_ids], axis=0)
    assert np.max(np.abs(result.total - exact)) <= n * codec.resolution / 2 + 1e-12


@pytest.mark.parametrize(
    ("drops", "step"),
    [
        ({"drop_before_sharing": [0, 1, 2, 3, 4]}, "share keys"),
        ({"drop_before_masking": [0, 1, 2, 3, 4]}, "masked input"),
        ({"drop_before_masking": [0, 1], "drop_before_unmasking": [2, 3, 4]}, "unmasking"),
    ],
)
def test_below_threshold_fails_closed(drops, step):
    vectors = {u: np.full(2, 0.5) for u in range(10)}
    with pytest.raises(SecAggAbort, match=f"{step}: only 5 clients left, below the threshold 6"):
        secure_sum(vectors, threshold=6, codec=FixedPoint(1.0), seeds=_seeds(range(10)), **drops)


def test_client_never_reveals_both_shares_and_checks_the_survivor_list():
    n, codec = 6, FixedPoint(1.0)
    clients = {u: SecAggClient(u, 4, codec, s) for u, s in _seeds(range(n), 5).items()}
    server = SecAggServer(4, codec, 2)
    roster = server.collect_keys([c.advertise_keys() for c in clients.values()])
    inboxes = server.route_shares([c.share_keys(roster) for u, c in clients.items() if u != 5])
    survivors = [0, 1, 2, 3]  # 4 dropped before masking, 5 before sharing
    response = clients[0].unmasking_shares(roster, inboxes[0], survivors)
    assert set(response.self_mask_shares) == {0, 1, 2, 3}
    assert set(response.mask_key_shares) == {4}  # 5 never shared keys: no masks to remove
    assert not set(response.self_mask_shares) & set(response.mask_key_shares)
    with pytest.raises(SecAggAbort, match="never shared keys"):
        clients[0].unmasking_shares(roster, inboxes[0], [0, 1, 2, 5])
    with pytest.raises(SecAggAbort, match="fewer than the threshold"):
        clients[0].unmasking_shares(roster, inboxes[0], [0, 1, 2])


def test_tampered_share_is_detected():
    n, codec = 5, FixedPoint(1.0)
    clients = {u: SecAggClient(u, 3, codec, s) for u, s in _seeds(range(n), 6).items()}
    server = SecAggServer(3, codec, 1)
    roster = server.collect_keys([c.advertise_keys() for c in clients.values()])
    inboxes = server.route_shares([c.share_keys(roster) for c in clients.values()])
    share = inboxes[0][0]
    forged = type(share)(
        share.sender, share.recipient, bytes([share.ciphertext[0] ^ 1]) + share.ciphertext[1:]
    )
    with pytest.raises(SecAggAbort, match="failed authentication"):
        clients[0].unmasking_shares(roster, [forged, *inboxes[0][1:]], list(range(n)))


def test_server_refuses_a_sum_that_could_overflow():
    keys = [SecAggClient(u, 2, FixedPoint(1.0)).advertise_keys() for u in range(3)]
    server = SecAggServer(2, FixedPoint(bound=2.0**40, frac_bits=22), 1)  # 3 * 2^62 >= 2^63
    with pytest.raises(ValueError, match="overflow"):
        server.collect_keys(keys)


# --- fitting with the rest of fl/ -------------------------------------------------------------


def test_only_known_sum_based_strategies_run_under_secure_aggregation():
    load_config(None, ["privacy.secure_aggregation=true", "server.strategy='fedavg'"])
    with pytest.raises(ConfigError, match=r"^server.strategy: "):
        load_config(None, ["privacy.secure_aggregation=true", "server.strategy='something-new'"])


@pytest.mark.parametrize("weighted", [True, False])
def test_a_secure_sum_of_contributions_aggregates_as_the_plain_sum(weighted):
    rng = np.random.default_rng(7)
    global_params = ModelParams.from_vector(rng.standard_normal(3))
    updates = [
        ClientUpdate(str(u), ModelParams.from_vector(rng.standard_normal(3)), 10 + 7 * u, {})
        for u in range(10)
    ]
    if weighted:  # FedAvg, example-weighted, no DP: counts summed masked inside the vector
        strategy, contribution = FedAvg(), Contribution(weighted=True)
    else:  # DP-FedAvg: clipped, equal weights; the same injected noise on both sums
        strategy = DPFedAvg(FedAvg("uniform"), 0.8, 0.5, 10.0, np.random.default_rng(3))
        twin = DPFedAvg(FedAvg("uniform"), 0.8, 0.5, 10.0, np.random.default_rng(3))
        contribution = Contribution(weighted=False, clip_norm=0.5)
    codec = FixedPoint(bound=contribution.bound(len(updates)))
    vectors = {u: contribution.vector(global_params, up) for u, up in enumerate(updates)}
    secure = secure_sum(vectors, threshold=6, codec=codec, seeds=_seeds(range(10), 7))
    state = strategy.init_state()
    via_secagg, _ = strategy.aggregate_sum(global_params, secure.total, len(secure.included), state)
    plain, _ = (strategy if weighted else twin).aggregate(global_params, updates, state)
    # Each of the 10 summands is rounded to within half the resolution; the weighted mean
    # divides by the summed weights (>= 10), DP by the fixed denominator 10.
    atol = len(updates) * codec.resolution / 2 / 10.0
    if weighted:
        atol = len(updates) * codec.resolution / 2 * 2 / sum(u.num_examples for u in updates)
        n = np.array([u.num_examples for u in updates], dtype=float)
        by_hand = (n[:, None] * [u.params.to_vector() for u in updates]).sum(0) / n.sum()
        np.testing.assert_allclose(via_secagg.to_vector(), by_hand, rtol=0, atol=1e-12 + atol)
    np.testing.assert_allclose(via_secagg.to_vector(), plain.to_vector(), rtol=0, atol=atol)
