"""Secure aggregation with keys once per run (fl.secagg.run_keys): sums across rounds, masking,
dropouts at either step, failing closed, the consistency check, and what a client refuses to
reveal. Attacks by an active server: tests/test_secagg_attacks.py."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from fedtune.fl.secagg import run_keys
from fedtune.fl.secagg.identity import PublicParameters, survivor_statement
from fedtune.fl.secagg.primitives import (
    FIELD,
    FixedPoint,
    SecAggAbort,
    prg,
    rebuild_seeds,
    split_seed,
)
from fedtune.fl.secagg.run_keys import Quorum, RunKeysClient, RunKeysServer, share_holders

from tests.test_secagg import UNIFORM_P, _seeds, _top_byte_p_value, members

SESSION = "run-session"
SIXTY = PublicParameters(0.6)
"""Every test's quorum is the one 60% of the cohort gives, unless it says otherwise."""


def _clients(
    n: int, seed: int = 0, parameters: PublicParameters = SIXTY
) -> tuple[dict[int, RunKeysClient], dict]:
    group = members(range(n), parameters, seed)
    clients = {u: RunKeysClient(group[u], SESSION, s) for u, s in _seeds(range(n), seed).items()}
    return clients, {u: c.public_key() for u, c in clients.items()}


def _sign(clients, round_num, survivors, signers=None) -> dict[int, bytes]:
    """The consistency check: every survivor (or every one of ``signers``) signs the set."""
    signers = survivors if signers is None else signers
    return {v: clients[v].consistency(round_num, survivors) for v in signers}


def _quorum(threshold: int | Quorum, n: int) -> Quorum:
    """An int t: t survivors, every cohort member a share holder, any t of them rebuild."""
    return threshold if isinstance(threshold, Quorum) else Quorum(threshold, n, threshold)


def _round(
    clients,
    keys,
    round_num,
    vectors,
    threshold,
    codec,
    *,
    drop_before_masking=(),
    silent_at_unmasking=(),
    ask_everyone=False,
):
    """One round in-process, the server asking whom :meth:`RunKeysServer.to_ask` names (or
    every survivor); returns the server's sum, the survivors, the inputs and the answers."""
    cohort = sorted(vectors)
    quorum = _quorum(threshold, len(cohort))
    server = RunKeysServer(round_num, cohort, quorum, codec, len(next(iter(vectors.values()))))
    roster = [keys[u] for u in cohort]
    inputs = {
        u: clients[u].masked_input(vectors[u], round_num, roster, quorum, codec)
        for u in cohort
        if u not in set(drop_before_masking)
    }
    survivors, dropped, inboxes = server.collect_masked_inputs(inputs)
    signatures = server.collect_signatures(_sign(clients, round_num, survivors))
    asked, responses = set(), {}
    while ask := (
        [v for v in survivors if v not in asked]
        if ask_everyone
        else server.to_ask(asked, responses)
    ):
        asked.update(ask)
        for v in ask:
            if v not in set(silent_at_unmasking):
                responses[v] = clients[v].unmasking(round_num, survivors, signatures, inboxes[v])
    return server.unmask(list(responses.values())), survivors, inputs, list(responses.values())


def _bound(n: int, codec: FixedPoint) -> float:
    return n * codec.resolution / 2 + 1e-12


def test_sums_are_right_round_after_round_for_changing_cohorts():
    clients, keys = _clients(30)
    codec = FixedPoint(bound=2.0)
    rng = np.random.default_rng(1)
    for r in range(1, 6):
        cohort = sorted(int(u) for u in rng.choice(30, size=12, replace=False))
        vectors = {u: rng.uniform(-2, 2, 7) for u in cohort}
        total, survivors, _, _ = _round(clients, keys, r, vectors, 8, codec)
        assert survivors == cohort
        exact = np.sum(list(vectors.values()), axis=0)
        assert np.max(np.abs(total - exact)) <= _bound(12, codec)


@pytest.mark.parametrize(
    ("dim", "quorum"),
    [
        (400, Quorum(5, 8, 5)),  # SHAKE-128 masks, every client a share holder
        (4096, Quorum(5, 8, 5)),  # AES-CTR masks
        (400, Quorum(5, 4, 3)),  # a committee of 4 holds the shares
    ],
)
def test_masked_vectors_look_uniform_even_after_the_server_learns_what_it_may(dim, quorum):
    n, codec = 8, FixedPoint(bound=1.0)
    clients, keys = _clients(n, 3, PublicParameters(0.6, quorum.holders))
    rng = np.random.default_rng(3)
    vectors = {u: rng.uniform(0, 0.01, dim) for u in range(n)}  # far from uniform in Z_2^64
    assert _top_byte_p_value(codec.encode(vectors[0])) < 1e-10  # the test has power
    server = RunKeysServer(1, range(n), quorum, codec, dim)
    roster = list(keys.values())
    inputs = {u: clients[u].masked_input(vectors[u], 1, roster, quorum, codec) for u in range(n)}
    late = inputs.pop(7)  # client 7's message is late: the server declares it dropped
    survivors, dropped, inboxes = server.collect_masked_inputs(inputs)
    assert dropped == [7]
    signatures = _sign(clients, 1, survivors)
    responses = {v: clients[v].unmasking(1, survivors, signatures, inboxes[v]) for v in survivors}
    for m in [*inputs.values(), late]:
        assert _top_byte_p_value(m.masked) > UNIFORM_P, m.client_id
    exact = np.sum([vectors[u] for u in survivors], axis=0)
    assert np.max(np.abs(server.unmask(list(responses.values())) - exact)) <= _bound(n, codec)

    # The server now knows every survivor's self mask and the pair masks shared with 7.
    def pair_mask(u: int, v: int, mask: bytes) -> np.ndarray:
        mask = np.frombuffer(mask, dtype=np.uint64)
        return mask if u < v else np.uint64(0) - mask

    holders = [v for v in server.holders if v in responses][: quorum.rebuild]
    xs = [v + 1 for v in holders]
    unmasked = {}
    for u, m in inputs.items():
        shares = [np.frombuffer(responses[v].self_mask_shares[u], ">u4") for v in holders]
        (seed,) = rebuild_seeds(np.array([shares], dtype=np.int64), xs)
        unmasked[u] = m.masked - prg(seed, dim) - pair_mask(u, 7, responses[u].pair_masks[7])
        # Still hidden behind the masks shared with the other survivors.
        assert _top_byte_p_value(unmasked[u]) > UNIFORM_P, u
    # (Those are the right masks: the survivors' remaining masks cancel in their sum.)
    assert np.max(np.abs(codec.decode(sum(unmasked.values())) - exact)) <= _bound(n, codec)
    # The late input minus every pairwise mask it holds is still hidden behind its self mask,
    # whose shares no client released.
    assert all(7 not in r.self_mask_shares for r in responses.values())
    stripped = late.masked - sum(pair_mask(7, v, responses[v].pair_masks[7]) for v in survivors)
    assert _top_byte_p_value(stripped) > UNIFORM_P
    assert np.max(np.abs(codec.decode(stripped) - vectors[7])) > 1  # not the input


def test_thirty_percent_dropouts_before_masking_recover_the_survivors_sum():
    n, codec = 100, FixedPoint(bound=1.0)
    clients, keys = _clients(n, 4, PublicParameters(0.51))
    rng = np.random.default_rng(4)
    for r, dropped in ((1, range(0, 100, 3)), (2, range(1, 100, 4))):
        dropped = list(dropped)[:30]
        vectors = {u: rng.uniform(-1, 1, 3) for u in range(n)}
        total, survivors, _, responses = _round(
            clients, keys, r, vectors, 51, codec, drop_before_masking=dropped
        )
        assert survivors == sorted(set(range(n)) - set(dropped))
        assert len(responses) == len(survivors)  # with dropouts, every survivor is asked
        exact = np.sum([vectors[u] for u in survivors], axis=0)
        assert np.max(np.abs(total - exact)) <= _bound(n, codec)


def test_thirty_percent_silent_at_unmasking_recover_the_full_sum():
    n, codec = 100, FixedPoint(bound=1.0)
    clients, keys = _clients(n, 5, PublicParameters(0.51))
    rng = np.random.default_rng(5)
    vectors = {u: rng.uniform(-1, 1, 3) for u in range(n)}
    silent = [int(u) for u in rng.permutation(n)[:30]]
    # Asked all survivors: 70 answer, more than the threshold of 51.
    total, survivors, _, _ = _round(
        clients, keys, 1, vectors, 51, codec, silent_at_unmasking=silent, ask_everyone=True
    )
    assert survivors == list(range(n))  # who sent masked input counts, answered or not
    exact = np.sum(list(vectors.values()), axis=0)
    assert np.max(np.abs(total - exact)) <= _bound(n, codec)


def test_share_holders_are_a_fresh_committee_each_round_that_every_party_computes_alike():
    cohort = list(range(50))
    committees = [share_holders(cohort, 10, r) for r in range(1, 31)]
    assert all(len(c) == len(set(c)) == 10 and set(c) <= set(cohort) for c in committees)
    assert share_holders(reversed(cohort), 10, 7) == committees[6]  # a function of the set
    assert len({tuple(c) for c in committees}) == 30
    # 300 seats over 50 clients: each serves; none far more than its share (6 on average).
    counts = np.bincount(np.concatenate(committees), minlength=50)
    assert counts.min() >= 1 and counts.max() <= 16
    assert share_holders(cohort[:8], 10, 1) == share_holders(cohort[:8], 8, 1)  # all of them
    assert Quorum.of(100, 0.6, 40) == Quorum(survivors=60, holders=40, rebuild=24)
    assert Quorum.of(10, 0.6, 40) == Quorum(survivors=6, holders=10, rebuild=6)
    assert Quorum.of(10, 0.6) == Quorum(survivors=6, holders=10, rebuild=6)
    with pytest.raises(ValueError, match="rebuild <= holders"):
        Quorum(5, 3, 4)


def test_a_committee_alone_holds_the_shares_and_unmasks_with_or_without_dropouts():
    n, codec = 60, FixedPoint(bound=1.0)
    quorum = Quorum.of(n, 0.6, 12)  # 36 survivors needed; 12 holders, any 8 rebuild
    clients, keys = _clients(n, 10, PublicParameters(0.6, 12))
    rng = np.random.default_rng(10)

    # Nobody drops: the server asks 8 holders, and only holders were sent shares.
    vectors = {u: rng.uniform(-1, 1, 3) for u in range(n)}
    total, survivors, inputs, responses = _round(clients, keys, 1, vectors, quorum, codec)
    holders = share_holders(range(n), 12, 1)
    assert all(set(m.shares) == set(holders) - {u} for u, m in inputs.items())
    assert [r.sender for r in responses] == holders[:8]
    exact = np.sum(list(vectors.values()), axis=0)
    assert np.max(np.abs(total - exact)) <= _bound(n, codec)

    # Two holders of the first 8 are silent: two more holders are asked.
    vectors = {u: rng.uniform(-1, 1, 3) for u in range(n)}
    holders = share_holders(range(n), 12, 2)
    total, _, _, responses = _round(
        clients, keys, 2, vectors, quorum, codec, silent_at_unmasking=holders[:2]
    )
    assert [r.sender for r in responses] == holders[2:10]
    exact = np.sum(list(vectors.values()), axis=0)
    assert np.max(np.abs(total - exact)) <= _bound(n, codec)

    # 4 holders and 14 others drop (30%): every survivor is asked, holders give shares.
    holders = share_holders(range(n), 12, 3)
    others = [u for u in range(n) if u not in holders]
    dropped = holders[:4] + others[:14]
    vectors = {u: rng.uniform(-1, 1, 3) for u in range(n)}
    total, survivors, _, responses = _round(
        clients, keys, 3, vectors, quorum, codec, drop_before_masking=dropped
    )
    assert len(responses) == len(survivors) == 42
    assert sum(bool(r.self_mask_shares) for r in responses) == 8
    exact = np.sum([vectors[u] for u in survivors], axis=0)
    assert np.max(np.abs(total - exact)) <= _bound(n, codec)

    # 5 holders drop: 7 are left of the 8 needed, and the round fails closed.
    holders = share_holders(range(n), 12, 4)
    with pytest.raises(SecAggAbort, match="only 7 of the 12 share holders left, below the thr"):
        _round(clients, keys, 4, vectors, quorum, codec, drop_before_masking=holders[:5])


@pytest.mark.parametrize(
    ("drop", "silent", "message"),
    [
        ([0, 1, 2, 3, 4], [], "masked input: only 5 clients left, below the threshold 6"),
        ([], [0, 1, 2, 3, 4], "unmasking: only 5 clients left, below the threshold 6"),
        ([0], [1], r"clients \[0\] dropped before masking and clients \[1\] did not answer"),
    ],
)
def test_fails_closed(drop, silent, message):
    clients, keys = _clients(10)
    vectors = {u: np.full(2, 0.5) for u in range(10)}
    with pytest.raises(SecAggAbort, match=message):
        _round(
            clients,
            keys,
            1,
            vectors,
            6,
            FixedPoint(1.0),
            drop_before_masking=drop,
            silent_at_unmasking=silent,
            ask_everyone=True,
        )


def test_client_answers_once_and_only_for_one_survivor_set_of_its_cohort():
    clients, keys = _clients(6, 6)
    codec = FixedPoint(1.0)
    roster = list(keys.values())
    server = RunKeysServer(1, range(6), Quorum(4, 6, 4), codec, 2)
    inputs = {
        u: clients[u].masked_input(np.zeros(2), 1, roster, Quorum(4, 6, 4), codec) for u in range(5)
    }
    survivors, dropped, inboxes = server.collect_masked_inputs(inputs)
    assert dropped == [5]
    with pytest.raises(SecAggAbort, match="not a set of clients of the cohort it masked for"):
        clients[0].consistency(1, [*survivors, 9])  # 9 was never in its cohort
    with pytest.raises(SecAggAbort, match="not a set of clients of the cohort it masked for"):
        clients[0].consistency(1, [0, 1, 1, 2, 3])
    signatures = _sign(clients, 1, survivors)
    response = clients[2].unmasking(1, survivors, signatures, inboxes[2])
    assert set(response.self_mask_shares) == set(survivors)
    assert set(response.pair_masks) == {5}  # its cohort minus the survivors; never both
    with pytest.raises(SecAggAbort, match="no unanswered masked input for round 1"):
        clients[2].unmasking(1, survivors, signatures, inboxes[2])
    # Client 3 signed [0..4]: it neither signs nor unmasks for another set of that round.
    with pytest.raises(SecAggAbort, match="already answered for another survivor set in round 1"):
        clients[3].consistency(1, [0, 1, 2, 3])
    with pytest.raises(SecAggAbort, match="already answered for another survivor set in round 1"):
        clients[3].unmasking(1, [0, 1, 2, 3], signatures, {})
    with pytest.raises(SecAggAbort, match="fewer than the threshold"):
        clients[4].unmasking(1, [0, 1, 4], signatures, {0: inboxes[4][0], 1: inboxes[4][1]})


def test_a_client_unmasks_only_with_t_member_signatures_on_exactly_its_set():
    clients, keys = _clients(6, 12)
    codec, quorum = FixedPoint(1.0), Quorum(4, 6, 4)
    roster = list(keys.values())
    server = RunKeysServer(1, range(6), quorum, codec, 2)
    inputs = {u: clients[u].masked_input(np.zeros(2), 1, roster, quorum, codec) for u in range(5)}
    survivors, _, inboxes = server.collect_masked_inputs(inputs)
    signatures = _sign(clients, 1, survivors, signers=[0, 1, 2])
    # Client 5 dropped: its real signature on the same statement is not a member's; 3's is
    # forged; 4 signed the set of another cohort. Three valid member signatures, t is 4.
    statement = survivor_statement(SESSION, 1, range(6), survivors)
    other = survivor_statement(SESSION, 1, range(7), survivors)
    signatures |= {
        5: clients[5].member.identity.sign(statement),
        3: bytes(64),
        4: clients[4].member.identity.sign(other),
    }
    with pytest.raises(SecAggAbort, match="only 3 member.s. of the survivor set of round 1 signe"):
        clients[1].unmasking(1, survivors, signatures, inboxes[1])
    assert clients[1].member.directory.verify(5, signatures[5], statement)  # the test has power
    signatures[3] = clients[3].consistency(1, survivors)
    assert clients[2].unmasking(1, survivors, signatures, inboxes[2]).pair_masks.keys() == {5}


def test_a_quorum_other_than_the_published_one_is_refused():
    clients, keys = _clients(10, 13, PublicParameters(0.6, 5))
    roster, codec = list(keys.values()), FixedPoint(1.0)
    assert Quorum.of(10, 0.6, 5) == Quorum(6, 5, 3)
    for lowered in (Quorum(2, 5, 3), Quorum(6, 2, 2), Quorum(6, 10, 6)):
        with pytest.raises(SecAggAbort, match=r"is not the published Quorum\(survivors=6, hold"):
            clients[0].masked_input(np.zeros(2), 1, roster, lowered, codec)
    clients[0].masked_input(np.zeros(2), 1, roster, Quorum(6, 5, 3), codec)


def test_a_client_outside_the_committee_takes_no_shares():
    clients, keys = _clients(6, 11, PublicParameters(0.6, 3))
    codec, quorum = FixedPoint(1.0), Quorum(4, 3, 2)
    roster = list(keys.values())
    server = RunKeysServer(1, range(6), quorum, codec, 2)
    inputs = {u: clients[u].masked_input(np.zeros(2), 1, roster, quorum, codec) for u in range(6)}
    survivors, _, inboxes = server.collect_masked_inputs(inputs)
    holder = server.holders[0]
    outsider = next(u for u in range(6) if u not in server.holders)
    assert inboxes[outsider] == {} and len(inboxes[holder]) == 5
    signatures = _sign(clients, 1, survivors)
    with pytest.raises(SecAggAbort, match=f"client {outsider}: holds no shares in round 1"):
        clients[outsider].unmasking(1, survivors, signatures, inboxes[holder])


def test_revealed_pair_masks_mask_one_round_only_and_rounds_never_repeat():
    clients, keys = _clients(4, 7)
    codec = FixedPoint(1.0)
    roster = list(keys.values())
    revealed = []
    for r in (1, 2):
        server = RunKeysServer(r, range(4), Quorum(3, 4, 3), codec, 2)
        inputs = {
            u: clients[u].masked_input(np.zeros(2), r, roster, Quorum(3, 4, 3), codec)
            for u in range(3)
        }
        survivors, _, inboxes = server.collect_masked_inputs(inputs)
        signatures = _sign(clients, r, survivors)
        response = clients[0].unmasking(r, survivors, signatures, inboxes[0])
        revealed.append(response.pair_masks[3])
    assert revealed[0] != revealed[1]
    with pytest.raises(SecAggAbort, match="masks are never reused"):
        clients[0].masked_input(np.zeros(2), 2, roster, Quorum(3, 4, 3), codec)
    with pytest.raises(SecAggAbort, match="does not hold its own key"):
        clients[0].masked_input(np.zeros(2), 3, roster[1:], Quorum(3, 4, 3), codec)


def test_tampered_shares_are_caught():
    clients, keys = _clients(5, 8)
    codec = FixedPoint(1.0)
    roster = list(keys.values())
    server = RunKeysServer(1, range(5), Quorum(3, 5, 3), codec, 1)
    inputs = {
        u: clients[u].masked_input(np.ones(1) * 0.1, 1, roster, Quorum(3, 5, 3), codec)
        for u in range(5)
    }
    survivors, _, inboxes = server.collect_masked_inputs(inputs)
    signatures = _sign(clients, 1, survivors)
    forged = dict(inboxes[0])
    forged[1] = bytes([forged[1][0] ^ 1]) + forged[1][1:]
    with pytest.raises(SecAggAbort, match="share from client 1 failed authentication"):
        clients[0].unmasking(1, survivors, signatures, forged)
    responses = [clients[v].unmasking(1, survivors, signatures, inboxes[v]) for v in (1, 2, 3)]
    bad = responses[0].self_mask_shares
    bad[4] = bytes([bad[4][0] ^ 1]) + bad[4][1:]
    with pytest.raises(SecAggAbort, match="client 4's self mask do not match its commitment"):
        server.unmask(responses)


def test_seed_sharing_needs_exactly_t_shares():
    rng = np.random.default_rng(9)
    seed = rng.bytes(32)
    xs = list(range(1, 21))
    shares = split_seed(seed, 7, xs)
    assert shares.shape == (20, 11) and shares.max() < FIELD
    for subset in ([0, 1, 2, 3, 4, 5, 6], [19, 3, 8, 11, 2, 15, 6]):
        assert rebuild_seeds(shares[None, subset], [xs[i] for i in subset]) == [seed]
    assert rebuild_seeds(shares[None, :6], xs[:6]) != [seed]
    with pytest.raises(ValueError, match="threshold"):
        split_seed(seed, 1, xs)


def test_pair_masks_are_the_aes_ctr_keystream_of_each_round_and_never_repeat():
    shared = bytes(range(32))
    u, v = run_keys._Pair(shared, 3, 8, b"u"), run_keys._Pair(shared, 8, 3, b"v")
    assert u.key == v.key and u.key != shared  # both ends derive the same K_uv
    for size in (1, 20, 128, 129, 300):
        rounds = max(1, run_keys.MASK_BLOCK_BYTES // (8 * size))  # derived in one go
        masks = []
        for r in range(40):
            block, i = divmod(r, rounds)
            nonce = size.to_bytes(8, "big") + block.to_bytes(4, "big") + bytes(4)
            stream = Cipher(algorithms.AES(u.key), modes.CTR(nonce)).encryptor()
            expected = stream.update(bytes(8 * size * rounds))[8 * size * i : 8 * size * (i + 1)]
            assert u.mask(r, size) == v.mask(r, size) == expected, (size, r)
            assert run_keys._pair_mask(u.key, r, size) == expected
            masks.append(expected)
        assert len(set(masks)) == len(masks)  # no round's mask is another's
    nonces = {run_keys._nonce(r, a, b) for r in (1, 2) for a, b in ((3, 8), (8, 3))}
    assert len(nonces) == 4  # the share channel: one nonce per round and direction


def test_a_second_run_key_of_a_peer_is_refused():
    clients, keys = _clients(4, 14)
    codec, quorum = FixedPoint(1.0), Quorum(3, 4, 3)
    clients[0].masked_input(np.zeros(2), 1, list(keys.values()), quorum, codec)
    # Client 1's identity signs a second run key: a valid signature, but not the key client 0
    # paired with.
    second = RunKeysClient(clients[1].member, SESSION, bytes(32)).public_key()
    assert second.public != keys[1].public and second.client_id == 1
    roster = [keys[0], second, keys[2], keys[3]]
    with pytest.raises(SecAggAbort, match="client 1 comes with another run key than before"):
        clients[0].masked_input(np.zeros(2), 2, roster, quorum, codec)
