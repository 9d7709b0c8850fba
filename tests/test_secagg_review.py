"""Attack review of the secure statistics round (commit 3d10f14, round 0 of fl.secagg).

Each test plays the aggregation server against the clients' own step functions
(fl.secagg.parties, real key store and directory) or against the in-process exchange, and
asserts what the threat model of docs/privacy.md promises: the server learns the sum over at
least t clients and nothing else about one client's moments, or the round aborts.
"""

from __future__ import annotations

import numpy as np
import pytest
from fedtune.fl import client as fl_client
from fedtune.fl.config import load_config
from fedtune.fl.data import registry
from fedtune.fl.exchange import InProcess
from fedtune.fl.secagg.exchange import SecureExchange
from fedtune.fl.secagg.identity import PublicParameters
from fedtune.fl.secagg.parties import (
    InProcessParties,
    advertise_keys,
    run_consistency,
    run_unmasking,
    statistics_run_masked,
    train_run_masked,
)
from fedtune.fl.secagg.primitives import EXACT_WORDS, SecAggAbort
from fedtune.fl.secagg.statistics import STATISTICS_ROUND, StatisticsRequest

from tests.conftest import write_client_files
from tests.test_secagg_attacks import SESSION, deploy
from tests.test_secagg_statistics import (
    FILES,
    KEYS,
    SECURE,
    STEPS,
    Recording,
    StatisticsRunKeysRound,
    _full_width,
    _self_masks,
    rows,
    secure_setup,
)

DP = ["rounds.fraction=0.5", "privacy.noise_multiplier=1.0"]


def _names(dep) -> tuple[str, ...]:
    return tuple(fl_client.feature_moments(dep.refs[0], 1024).feature_names)


# -- 1. what travels in the clear ----------------------------------------------------------------


@pytest.mark.parametrize("keys", KEYS)
def test_a_client_with_a_constant_target_does_not_send_its_target_value(tmp_path, keys):
    # Its target mean is one of the moments secure aggregation hides; a constant target is the
    # whole target column. The server may learn that the data is unusable and why, not the value.
    directory = write_client_files(tmp_path / "c", [50, 80, 65, 40, 70], seed=8)
    constant = "income,ratio,age,target\n" + "".join(
        f"{i},{i % 3},{20 + i},123.456\n" for i in range(30)
    )
    (directory / "constant.csv").write_text(constant)
    config = load_config(
        None, [*FILES, f"data.path='{directory}'", *SECURE, f"privacy.secagg_keys={keys!r}"]
    )
    run, parties = secure_setup(config, parties=Recording(config))
    excluded = dict(run.excluded)
    assert "the target is constant" in excluded["constant"]
    seen = repr([failed for step, _, failed in parties.seen if step == "stats-schema"])
    assert "constant" in seen  # the test has power: the schema step's failures are recorded
    assert "123.456" not in excluded["constant"] and "123.456" not in seen


# -- 2. round 0 against the training rounds, retries and replays ---------------------------------


def test_round_0_is_masked_once_and_never_replayed_into_a_training_round():
    dep = deploy(10, "run")
    request = StatisticsRequest(_names(dep))
    round_ = StatisticsRunKeysRound(dep, request)
    ref, roster = dep.refs[0], round_.roster_for(0)
    round_.mask(ref)

    def again(r: int):
        return statistics_run_masked(
            dep.store, ref, SESSION, roster, round_.quorum, round_.codec, request, 1024, r
        )

    # A retry of round 0 (or a second statistics request): refused, masks are never reused.
    with pytest.raises(SecAggAbort, match="masks are never reused"):
        again(STATISTICS_ROUND)
    # Nor can a training round be numbered 0, to reuse round 0's pair masks.
    with pytest.raises(SecAggAbort, match="masks are never reused"):
        train_run_masked(
            dep.store, ref, SESSION, roster, round_.quorum, dep.codec, dep.broadcast,
            dep.config.client, STATISTICS_ROUND,
        )  # fmt: skip
    # Fresh keys: one key session in round 0 per client, so no second masking either.
    fresh = deploy(6, "round")
    ref = fresh.refs[0]
    codec = StatisticsRequest(_names(fresh)).codec()
    advertise_keys(fresh.store, ref, "k1", SESSION, 4, codec, STATISTICS_ROUND)
    with pytest.raises(SecAggAbort, match="already answered for another key session"):
        advertise_keys(fresh.store, ref, "k2", SESSION, 4, codec, STATISTICS_ROUND)


# -- 3/4. the request: the encoding and the DP mode are the operator's, not the server's ---------


@pytest.mark.parametrize("keys", KEYS)
def test_a_server_cannot_choose_what_a_dp_client_puts_in_the_statistics_sum(keys):
    # Under DP each client sends its [means | stds] clipped to the configured C_s. A server
    # that asks for the exact count and sums instead (no clip norm), or for a clip norm other
    # than the configured one, must get nothing: the clients refuse and the round fails closed.
    C = 2.0
    overrides = ["data.num_clients=10", f"privacy.secagg_keys={keys!r}", *DP]
    config = load_config(None, [*overrides, f"privacy.statistics_clip_norm={C}", *SECURE])
    refs = registry(config.data, 0)
    for clip in (None, 1e6 * C):
        parties = Recording(config)
        exchange = SecureExchange(InProcess(config), parties, config)
        try:
            exchange.open(refs)
            with pytest.raises(SecAggAbort, match="only 0 clients left"):
                summed = exchange.summed_statistics(refs, clip)
                # What it got otherwise: under DP, the exact row count of the cohort.
                raise AssertionError(f"clip {clip}: the clients sent {summed.total[:1]}")
        finally:
            exchange.close()
        (refused,) = [failed for step, _, failed in parties.seen if step == STEPS[keys][-3]]
        assert len(refused) == 10
        assert all(f"clipped to the configured {C}" in why for _, why in refused), refused
    exchange = SecureExchange(InProcess(config), InProcessParties(config), config)
    try:
        exchange.open(refs)
        assert len(exchange.summed_statistics(refs, C).included) == 10  # the configured one
    finally:
        exchange.close()


def test_a_server_cannot_switch_a_run_without_dp_to_clipped_statistics():
    # Without DP the clients send exact sums; a request for clipped [means | stds] (a function
    # of each client's data that the run's configuration never asks for) should be refused as
    # under DP. Fails now: the check is one-sided because
    # tests/test_secagg_statistics.py::test_a_split_view_server_gets_nothing_from_the_statistics_
    # round_with_fresh_keys plays a clipped request against clients configured without DP.
    dep = deploy(10, "run")
    request = StatisticsRequest(_names(dep), 1.0)
    round_ = StatisticsRunKeysRound(dep, request)
    with pytest.raises(SecAggAbort, match="statistics request"):
        round_.mask(dep.refs[0])


# -- 3. the exact codec: what the server's sum holds beyond the sum ------------------------------


@pytest.mark.parametrize("keys", KEYS)
def test_the_exact_statistics_sum_does_not_count_the_clients_with_a_negative_mean(keys):
    # The exact codec used to send a value as 8 limbs of 48 bits, one uint64 slot each, two's
    # complement, with masks that cancelled slot by slot: the server's unmasked sum held each
    # limb's sum over the clients, not just the values' sum, and its top slot was (clients
    # with a negative column sum) * (2^48 - 1), for every column. Now a value is one number of
    # Z_2^384 (6 uint64 words, two's complement: a negative value's top word is 2^64 - 1),
    # masked and summed as one, carries included. Were the masks to cancel word by word, the
    # top word's sum would be minus the count of negative values; the server's word-wise sum
    # of what it holds (every masked vector without its self mask) must not tell it.
    n = 8
    config = load_config(
        None,
        [f"data.num_clients={n}", "data.num_features=4", f"privacy.secagg_keys={keys!r}"] + SECURE,
    )
    run, parties = secure_setup(config, parties=Recording(config))
    seen = {step: answered for step, answered, _ in parties.seen if step.startswith("stats-")}
    codec = StatisticsRequest(tuple(run.names)).codec()
    masked = {
        i: np.asarray(getattr(m.masked, "masked", m.masked))
        for i, m in seen[STEPS[keys][-3]].items()
    }
    t = PublicParameters.of(config).survivors(n)
    self_masks = _self_masks(keys, seen[STEPS[keys][-1]], t, codec)
    stripped = [codec.ring.sub(masked[i], self_masks[i]) for i in masked]
    total = sum(stripped, np.uint64(0))  # word by word
    slots = total.reshape(codec.count, EXACT_WORDS)
    columns = len(run.names) + 1
    refs = registry(config.data, 0)
    # Clients with a negative value, for every value: none for the count and the sums of
    # squares Q_j, some for the column sums S_j.
    truth = np.zeros(codec.count, dtype=int)
    for ref in refs:
        truth[1 : columns + 1] += rows(ref).sum(axis=0) < 0
    assert 0 < truth.max() and truth.min() < n  # the sign pattern is not public knowledge

    def guess(top_words) -> list[int]:  # from the top word of every value's sum
        return [(-int(w)) % 2**64 for w in top_words[:, -1]]

    # The test has power: the clients' encodings summed word by word give the count away.
    encoded = [codec.encode([0, *rows(ref).sum(axis=0), *[0] * columns]) for ref in refs]
    words = sum(encoded, np.uint64(0)).reshape(codec.count, EXACT_WORDS)
    assert guess(words) == list(truth)
    assert guess(slots) != list(truth), "the server counted the clients with a negative column sum"


# -- 5. the double request in round 0 --------------------------------------------------------------


def test_round_0_never_gives_both_a_clients_self_mask_and_its_pair_masks():
    # The classic double request: the server unmasks with every client alive (self-mask shares
    # of the target), then says the target dropped (its pair masks). Round 0 refuses the second.
    dep = deploy(10, "run")
    round_ = StatisticsRunKeysRound(dep, StatisticsRequest(_names(dep)))
    inputs = round_.masked_inputs()
    round_.server.collect_masked_inputs(inputs)
    everyone, target = round_.cohort, round_.cohort[-1]
    signatures = {
        v: run_consistency(dep.store, dep.refs[v], SESSION, everyone, STATISTICS_ROUND)
        for v in everyone
    }
    v = next(h for h in round_.server.holders if h != target)
    inbox = {u: inputs[u].shares[v] for u in everyone if u != v}
    first = run_unmasking(
        dep.store, dep.refs[v], inbox, SESSION, everyone, signatures, STATISTICS_ROUND
    )
    assert target in first.self_mask_shares and not first.pair_masks
    rest = [u for u in everyone if u != target]
    with pytest.raises(SecAggAbort, match="no unanswered masked input for round 0"):
        run_unmasking(dep.store, dep.refs[v], {}, SESSION, rest, signatures, STATISTICS_ROUND)
    # Nor does any other client sign the second set, so it never gathers t signatures.
    w = next(u for u in rest if u != v)
    with pytest.raises(SecAggAbort, match="already answered for another survivor set"):
        run_consistency(dep.store, dep.refs[w], SESSION, rest, STATISTICS_ROUND)


# -- 6. a resumed run: a second statistics round under fresh keys --------------------------------


@pytest.mark.parametrize("keys", KEYS)
def test_a_resumed_run_masks_its_statistics_again_under_unrelated_masks(keys):
    # A resumed secure run sets up again: a new session, new identities and key pairs, fresh
    # self masks. Its statistics round masks the same inputs again; the two masked vectors of
    # one client must not be related (their difference is full-width noise, not 0 or a
    # difference of known masks), also with the clients' key store kept between the two.
    config = load_config(
        None,
        ["data.num_clients=8", "data.num_features=3", f"privacy.secagg_keys={keys!r}"] + SECURE,
    )
    parties = Recording(config)
    first, _ = secure_setup(config, parties=parties)
    second, _ = secure_setup(config, parties=parties)
    masked_steps = [a for s, a, _ in parties.seen if s == STEPS[keys][-3]]
    assert len(masked_steps) == 2 and first.stats.count == second.stats.count

    def vector(answer):
        return np.asarray(getattr(answer.masked, "masked", answer.masked))

    for i in masked_steps[0]:
        a, b = vector(masked_steps[0][i]), vector(masked_steps[1][i])
        assert _full_width(a - b) >= a.size - 3
