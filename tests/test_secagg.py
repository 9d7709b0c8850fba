"""Secure aggregation (fl.secagg): correctness, masking, dropouts, failing closed, signed keys and
the consistency check of the per-round protocol, the directory, and the scalars that ride inside
the masked vector. Attacks by an active server: tests/test_secagg_attacks.py."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from fedtune.fl.config import ConfigError, load_config
from fedtune.fl.evaluation import EvalSums
from fedtune.fl.params import ClientUpdate, FeatureStats, ModelParams
from fedtune.fl.privacy.dp_fedavg import DPFedAvg
from fedtune.fl.secagg import scalars
from fedtune.fl.secagg.bonawitz import SecAggClient, SecAggServer, secure_sum
from fedtune.fl.secagg.identity import (
    Directory,
    Identity,
    Membership,
    PublicParameters,
    survivor_statement,
)
from fedtune.fl.secagg.primitives import (
    EXACT_RING,
    SHAMIR_PRIME,
    WRAP,
    ExactFixedPoint,
    FixedPoint,
    Ring,
    SecAggAbort,
    Segments,
    prg,
    shamir_reconstruct,
    shamir_split,
    signed_sum,
)
from fedtune.fl.strategies import Contribution, FedAvg
from scipy import stats


def _seeds(ids, seed=0) -> dict[int, bytes]:
    rng = np.random.default_rng(seed)
    return {u: rng.bytes(32) for u in ids}


def members(
    ids, parameters: PublicParameters, seed: int = 0, directory: Directory | None = None
) -> dict[int, Membership]:
    """A directory holding a fresh identity for every client id, and each client's view of it."""
    directory = directory if directory is not None else Directory()
    out = {}
    for u, s in _seeds(ids, seed + 1000).items():
        identity = Identity(u, s)
        directory.publish(u, identity.public)
        out[u] = Membership(identity, directory, parameters)
    return out


def _clients(n: int, threshold: int, codec, seed: int, round_num: int = 1):
    """Per-round protocol clients whose published threshold is ``threshold`` of ``n``."""
    group = members(range(n), PublicParameters((threshold - 0.5) / n), seed)
    return {
        u: SecAggClient(group[u], "session", round_num, threshold, codec, s)
        for u, s in _seeds(range(n), seed).items()
    }


def _signatures(clients, roster, inboxes, survivors) -> dict[int, bytes]:
    return {u: clients[u].consistency_check(roster, inboxes[u], survivors) for u in survivors}


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
    clients = _clients(n, 5, codec, 3)
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
    signatures = server.collect_signatures(_signatures(clients, roster, inboxes, survivors))
    responses = [
        clients[u].unmasking_shares(roster, inboxes[u], survivors, signatures) for u in survivors
    ]
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
        ({"drop_before_masking": [0, 1], "drop_before_unmasking": [2, 3, 4]}, "consistency check"),
    ],
)
def test_below_threshold_fails_closed(drops, step):
    vectors = {u: np.full(2, 0.5) for u in range(10)}
    with pytest.raises(SecAggAbort, match=f"{step}: only 5 clients left, below the threshold 6"):
        secure_sum(vectors, threshold=6, codec=FixedPoint(1.0), seeds=_seeds(range(10)), **drops)


def test_client_never_reveals_both_shares_and_checks_the_survivor_list():
    n, codec = 6, FixedPoint(1.0)
    clients = _clients(n, 4, codec, 5)
    server = SecAggServer(4, codec, 2)
    roster = server.collect_keys([c.advertise_keys() for c in clients.values()])
    inboxes = server.route_shares([c.share_keys(roster) for u, c in clients.items() if u != 5])
    survivors = [0, 1, 2, 3]  # 4 dropped before masking, 5 before sharing
    signatures = _signatures(clients, roster, inboxes, survivors)
    response = clients[0].unmasking_shares(roster, inboxes[0], survivors, signatures)
    assert set(response.self_mask_shares) == {0, 1, 2, 3}
    assert set(response.mask_key_shares) == {4}  # 5 never shared keys: no masks to remove
    assert not set(response.self_mask_shares) & set(response.mask_key_shares)
    with pytest.raises(SecAggAbort, match="never shared keys"):
        clients[1].unmasking_shares(roster, inboxes[1], [0, 1, 2, 5], signatures)
    with pytest.raises(SecAggAbort, match="fewer than the threshold"):
        clients[1].unmasking_shares(roster, inboxes[1], [0, 1, 2], signatures)


def test_tampered_share_is_detected():
    n, codec = 5, FixedPoint(1.0)
    clients = _clients(n, 3, codec, 6)
    server = SecAggServer(3, codec, 1)
    roster = server.collect_keys([c.advertise_keys() for c in clients.values()])
    inboxes = server.route_shares([c.share_keys(roster) for c in clients.values()])
    signatures = _signatures(clients, roster, inboxes, list(range(n)))
    share = inboxes[0][0]
    forged = type(share)(
        share.sender, share.recipient, bytes([share.ciphertext[0] ^ 1]) + share.ciphertext[1:]
    )
    with pytest.raises(SecAggAbort, match="failed authentication"):
        clients[0].unmasking_shares(roster, [forged, *inboxes[0][1:]], list(range(n)), signatures)


def test_server_refuses_a_sum_that_could_overflow():
    keys = [c.advertise_keys() for c in _clients(3, 2, FixedPoint(1.0), 0).values()]
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


# --- the directory, signatures and the consistency check of the per-round protocol ------------


def test_the_directory_holds_one_key_per_client_and_verifies_only_exact_triples():
    directory = Directory()
    alice, mallory = Identity(1, bytes(32)), Identity(1, bytes([1]) * 32)
    directory.publish(1, alice.public)
    directory.publish(1, alice.public)  # publishing the same key again is harmless
    with pytest.raises(SecAggAbort, match="directory: client 1 already published a different"):
        directory.publish(1, mallory.public)
    signature = alice.sign(b"message")
    assert directory.verify(1, signature, b"message")
    assert directory.verify(1, signature, b"message")  # remembered: still exactly this triple
    assert not directory.verify(1, signature, b"messagE")
    assert not directory.verify(1, mallory.sign(b"message"), b"message")
    assert not directory.verify(2, signature, b"message")  # nobody published id 2
    assert not Directory(memoize=False).verify(1, signature, b"message")


def test_endorsements_count_distinct_members_with_valid_signatures_only():
    group = members(range(5), PublicParameters(0.6))
    directory = group[0].directory
    statement = survivor_statement("s", 3, range(5), [0, 1, 2, 3])
    signatures = {v: group[v].identity.sign(statement) for v in range(5)}
    # 4 is no member of the set; 3's signature is on another round's statement.
    signatures[3] = group[3].identity.sign(survivor_statement("s", 4, range(5), [0, 1, 2, 3]))
    with pytest.raises(SecAggAbort, match="only 3 member.s. of the survivor set of round 3"):
        directory.require_endorsements(0, 3, statement, signatures, [0, 1, 2, 3], 4)
    directory.require_endorsements(0, 3, statement, signatures, [0, 1, 2, 3], 3)
    assert group[0].identity.endorse(3, statement) == signatures[0]  # a retry: same answer
    with pytest.raises(SecAggAbort, match="already answered for another survivor set in round 3"):
        group[0].identity.endorse(3, survivor_statement("s", 3, range(5), [0, 1, 2]))


def test_per_round_clients_sign_one_survivor_set_and_unmask_only_with_t_signatures():
    n, codec = 6, FixedPoint(1.0)
    clients = _clients(n, 4, codec, 8)
    server = SecAggServer(4, codec, 2)
    roster = server.collect_keys([c.advertise_keys() for c in clients.values()])
    inboxes = server.route_shares([c.share_keys(roster) for c in clients.values()])
    masked = {u: c.masked_input(np.zeros(2), roster, inboxes[u]) for u, c in clients.items()}
    survivors = server.collect_masked_inputs(masked)
    signatures = {u: clients[u].consistency_check(roster, inboxes[u], survivors) for u in (0, 1, 2)}
    with pytest.raises(SecAggAbort, match="already answered for another survivor set in round 1"):
        clients[0].consistency_check(roster, inboxes[0], [0, 1, 2, 3, 4])
    with pytest.raises(SecAggAbort, match="only 3 member.s. of the survivor set of round 1"):
        clients[1].unmasking_shares(roster, inboxes[1], survivors, signatures)
    signatures[3] = clients[3].consistency_check(roster, inboxes[3], survivors)
    response = clients[1].unmasking_shares(roster, inboxes[1], survivors, signatures)
    assert set(response.self_mask_shares) == set(survivors)
    # A second key session for the same round (to sum the same inputs twice) is refused.
    with pytest.raises(SecAggAbort, match="already answered for another key session in round 1"):
        SecAggClient(clients[0].member, "another session", 1, 4, codec)


# --- what rides inside the masked vector ------------------------------------------------------


def test_segments_encode_each_part_within_its_own_bound():
    codec = Segments(((2, FixedPoint(1.0)), (1, FixedPoint(2.0**30, frac_bits=8))))
    x = np.array([0.5, -0.25, 1e9 + 0.5])
    np.testing.assert_array_equal(codec.decode(codec.encode(x)), x)  # all exact in binary
    total = codec.encode(x) + codec.encode(x) + codec.encode(-x / 2)
    np.testing.assert_array_equal(codec.decode(total), 1.5 * x)
    with pytest.raises(
        ValueError, match=r"outside the secure-aggregation bound \[-1.0, 1.0\]"
    ) as e:
        codec.encode(np.array([1.2345678, 0.0, 0.0]))
    assert "1.23" not in str(e.value)  # the refusal reaches the server: no client value in it
    with pytest.raises(ValueError, match="expected 3 values"):
        codec.encode(np.zeros(2))
    with pytest.raises(ValueError, match="overflow"):  # 2^30 * 2^8 * 2^25 = 2^63
        codec.check_capacity(2**25)


def test_segments_encode_in_one_go_what_each_segment_encodes_and_refuse_what_it_refuses():
    parts = ((5, FixedPoint(1.0)), (3, FixedPoint(2.0**20, frac_bits=10)), (2, FixedPoint(4.0)))
    codec = Segments(parts)
    bounds = np.repeat([1.0, 2.0**20, 4.0], [5, 3, 2])
    x = np.random.default_rng(5).uniform(-1, 1, 10) * bounds
    x[[0, 5, 9]] = [-1.0, 2.0**20, 4.0]  # each segment's bound is inside it
    one_by_one = np.concatenate(
        [c.encode(p) for (_, c), p in zip(parts, (x[:5], x[5:8], x[8:]), strict=True)]
    )
    np.testing.assert_array_equal(codec.encode(x), one_by_one)
    for where, value, match in [
        (0, 1.0 + 1e-9, r"bound \[-1.0, 1.0\]"),
        (6, -1.5 * 2.0**20, r"bound \[-1048576.0, 1048576.0\]"),
        (9, np.nan, "non-finite"),
        (1, -np.inf, "non-finite"),
    ]:
        bad = np.zeros(10)
        bad[where] = value
        with pytest.raises(ValueError, match=match):
            codec.encode(bad)


def test_signed_sums_wrap_in_z_2_64():
    rng = np.random.default_rng(6)
    plus = [rng.integers(0, 2**64, 7, dtype=np.uint64) for _ in range(4)]
    minus = [rng.integers(0, 2**64, 7, dtype=np.uint64) for _ in range(3)]
    exact = [
        (sum(int(v[i]) for v in plus) - sum(int(v[i]) for v in minus)) % 2**64 for i in range(7)
    ]
    total = signed_sum([v.tobytes() for v in plus], [v.tobytes() for v in minus], 7, WRAP)
    assert total.dtype == np.uint64 and total.tolist() == exact
    assert signed_sum([], [], 7, WRAP).tolist() == [0] * 7
    minus_one = signed_sum([], [plus[0].tobytes()], 7, WRAP)
    assert minus_one.tolist() == [(-int(v)) % 2**64 for v in plus[0]]


def _words(numbers: list[int], words: int) -> np.ndarray:
    """Python integers in [0, 2^(64 words)) as the ring's flat uint64 words, by bytes."""
    blob = b"".join(n.to_bytes(8 * words, "little") for n in numbers)
    return np.frombuffer(blob, dtype="<u8").astype(np.uint64)


def _numbers(v: np.ndarray, words: int) -> list[int]:
    blob = np.asarray(v, dtype="<u8").tobytes()
    return [int.from_bytes(blob[8 * words * i : 8 * words * (i + 1)], "little") for i in
            range(len(blob) // (8 * words))]  # fmt: skip


@pytest.mark.parametrize("words", [1, 2, 6])
def test_the_rings_arithmetic_is_pythons_modulo_2_to_the_64_words(words):
    # Expected values from Python's big integers and %, never from the ring itself; the edge
    # cases make carries and borrows run through every word.
    rng, mod = np.random.default_rng(words), 2 ** (64 * words)
    ring = Ring(words)

    def draw(count: int) -> list[int]:
        return [int.from_bytes(rng.bytes(8 * words), "little") for _ in range(count)]

    edges = [0, 1, mod - 1, 2**64 - 1, 2**64 % mod, mod // 2, mod // 2 - 1, mod - 2**64 + 1]
    a, b = draw(200) + edges, draw(200) + edges[::-1]
    x, y = _words(a, words), _words(b, words)
    assert _numbers(ring.add(x, y), words) == [(p + q) % mod for p, q in zip(a, b, strict=True)]
    assert _numbers(ring.sub(x, y), words) == [(p - q) % mod for p, q in zip(a, b, strict=True)]
    assert _numbers(ring.neg(x), words) == [(-p) % mod for p in a]
    rows = [draw(9) for _ in range(300)] + [[mod - 1] * 9] * 5
    stack = np.stack([_words(r, words) for r in rows])
    assert _numbers(ring.sum(stack), words) == [sum(c) % mod for c in zip(*rows, strict=True)]
    assert ring.sum(stack[:0]).tolist() == [0] * 9 * words
    plus, minus = [_words(r, words).tobytes() for r in rows[:7]], [stack[9].tobytes()]
    total = signed_sum(plus, minus, 9 * words, ring)
    want = [(sum(c) - m) % mod for *c, m in zip(*rows[:7], rows[9], strict=True)]
    assert _numbers(total, words) == want
    if words == 1:  # one word: numpy's own uint64 arithmetic, bit for bit
        assert ring == WRAP and FixedPoint(1.0).ring == WRAP
        np.testing.assert_array_equal(ring.add(x, y), x + y)
        np.testing.assert_array_equal(ring.sub(x, y), x - y)
        np.testing.assert_array_equal(ring.neg(x), np.uint64(0) - x)
        np.testing.assert_array_equal(ring.sum(stack), stack.sum(axis=0, dtype=np.uint64))


def test_exact_sums_mask_each_value_as_one_number_in_z_2_384():
    # Both protocols, dropouts included, sum exact values as 384-bit numbers: the exact total.
    codec = ExactFixedPoint(3)
    assert codec.ring == EXACT_RING and EXACT_RING.words * 64 == 384 and codec.size == 18
    assert _numbers(codec.encode([-1, 0, 2**-160]), 6) == [2**384 - 2**160, 0, 1]
    rng = np.random.default_rng(3)
    vectors = {u: [-(1e20 * rng.random()), rng.standard_normal(), u - 3] for u in range(7)}
    result = secure_sum(vectors, 4, codec, drop_before_masking=[2], drop_before_unmasking=[5])
    kept = [u for u in vectors if u != 2]
    assert result.included == kept
    assert result.total == [sum(Fraction(vectors[u][k]) for u in kept) for k in range(3)]


def _stats(target_mean: float, target_scale: float) -> FeatureStats:
    return FeatureStats(10, np.zeros(1), np.ones(1), target_mean, target_scale)


def test_counts_losses_and_scores_sum_masked_to_the_pooled_ones():
    rng = np.random.default_rng(11)
    stats = _stats(1000.0, 25.0)  # labels far from zero: the centring matters
    ys = [1000 + 25 * rng.standard_normal(k) for k in (7, 30, 12)]
    preds = [y + 10 * rng.standard_normal(y.size) for y in ys]
    updates = [
        ClientUpdate(
            str(i), ModelParams.zeros(1), 20 + i, {"train_loss": 3.0 + i}, EvalSums.of(y, p)
        )
        for i, (y, p) in enumerate(zip(ys, preds, strict=True))
    ]
    updates.append(ClientUpdate("3", ModelParams.zeros(1), 5, {"train_loss": 2.0}))  # no test
    codec = scalars.codec(len(updates))
    vectors = {i: scalars.vector(u, stats, codec.bound) for i, u in enumerate(updates)}
    total = secure_sum(vectors, threshold=3, codec=codec, seeds=_seeds(range(4), 11)).total
    sums = scalars.RoundScalars.from_sum(total, stats)
    # By hand: the pooled rows' sums, and sum(loss_i * n_i) / sum(n_i). Each of the 4 clients'
    # values is rounded to within 2^-25 in units of s (s^2 for squares), and sum(y^2) also
    # carries 2m times sum(y)'s error; counts are exact.
    q, s, m = 4 * 2.0**-25, 25.0, 1000.0
    y, p = np.concatenate(ys), np.concatenate(preds)
    assert sums.num_examples == 20 + 21 + 22 + 5 and sums.evaluation.n == y.size
    loss = (3 * 20 + 4 * 21 + 5 * 22 + 2 * 5) / 68
    assert sums.train_loss == pytest.approx(loss, abs=q * s**2 / 68)
    pooled = {
        "sse": (float(np.sum((p - y) ** 2)), q * s**2),
        "sae": (float(np.sum(np.abs(p - y))), q * s),
        "sum_y": (float(y.sum()), q * s),
        "sum_y2": (float(y @ y), q * s**2 + 2 * m * q * s),
    }
    for name, (value, error) in pooled.items():
        assert getattr(sums.evaluation, name) == pytest.approx(value, abs=error + 1e-9), name
    sst = float(np.sum((y - y.mean()) ** 2))
    assert sums.evaluation.metrics()["r2"] == pytest.approx(1 - pooled["sse"][0] / sst, abs=1e-6)


def test_a_diverged_clients_scalars_saturate_and_a_nan_drops_it():
    stats, codec = _stats(0.0, 2.0), scalars.codec(100)
    assert codec.bound == 2.0**38 / 100  # 2^62 / n at resolution 2^-24
    huge = EvalSums(n=100, sse=1e12, sae=1e7, sum_y=0.0, sum_y2=400.0)
    update = ClientUpdate("0", ModelParams.zeros(1), 100, {"train_loss": 1.0}, huge)
    v = scalars.vector(update, stats, codec.bound)
    assert v[3] == codec.bound  # sse / s^2 = 2.5e11 is past the bound: sent as the bound
    assert v[4] == 1e7 / 2 and v[6] == 400.0 / 4  # the others as they are
    codec.encode(v)
    bad = ClientUpdate("0", ModelParams.zeros(1), 100, {"train_loss": float("nan")}, huge)
    with pytest.raises(ValueError, match="non-finite"):
        codec.encode(scalars.vector(bad, stats, codec.bound))
