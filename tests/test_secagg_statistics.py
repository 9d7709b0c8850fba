"""The feature statistics under secure aggregation (fl.secagg.statistics): the statistics round is
a round of the run's own protocol, so the server learns the sum of the clients' moments over the
survivors and nothing about any one of them, with either key schedule, with or without DP.

Expected values come from numpy on the clients' rows (read here through fl.data, as a client
reads them), from Python's exact fractions, or from the injected noise generator: never from the
code under test. The attack harness of tests/test_secagg_attacks.py plays a split-view server
against the statistics round.
"""

from __future__ import annotations

import pickle
import struct
from fractions import Fraction

import numpy as np
import pytest
from fedtune.fl import client as fl_client
from fedtune.fl.config import load_config
from fedtune.fl.data import ClientRef, open_client, registry
from fedtune.fl.engine import RoundFailed, Run
from fedtune.fl.exchange import InProcess
from fedtune.fl.privacy.statistics import dp_statistics
from fedtune.fl.secagg import statistics as secagg_statistics
from fedtune.fl.secagg.exchange import SecureExchange
from fedtune.fl.secagg.identity import PublicParameters
from fedtune.fl.secagg.parties import (
    InProcessParties,
    statistics_round_masked,
    statistics_run_masked,
)
from fedtune.fl.secagg.primitives import (
    FRAC_BITS,
    ExactFixedPoint,
    FixedPoint,
    SecAggAbort,
    prg,
    rebuild_seeds,
    shamir_reconstruct,
    share_point,
)
from fedtune.fl.secagg.run_keys import Quorum, RunKeysClient
from fedtune.fl.secagg.statistics import STATISTICS_ROUND, StatisticsRequest

from tests.conftest import write_client_files
from tests.test_engine import BROKEN_CSV, EXPECTED_REASONS, SEED, independent_epsilon
from tests.test_secagg_attacks import (
    SESSION,
    FreshKeysRound,
    RunKeysRound,
    SkipsChecks,
    TrustsAnySurvivorSet,
    _far,
    deploy,
    reconstruct_round,
    reconstruct_run,
    split_views,
)
from tests.test_secagg_run import _clients

SECURE = ["privacy.secure_aggregation=true"]
FILES = ["data.source=files", "data.target=target"]
KEYS = ["run", "round"]
EPS = np.finfo(np.float64).eps
STEPS = {
    "run": ["stats-schema", "stats-run-masked", "stats-run-consistency", "stats-run-unmask"],
    "round": [
        "stats-schema",
        "stats-round-keys",
        "stats-round-shares",
        "stats-round-masked",
        "stats-round-consistency",
        "stats-round-unmask",
    ],
}
"""The statistics round's exchanges with the clients, in order, without dropouts."""


def rows(ref: ClientRef) -> np.ndarray:
    """``[X | y]`` of the client's training split, as the client reads it."""
    chunks = list(open_client(ref).chunks("train", 10**9))
    return np.concatenate([np.column_stack([X, y]) for X, y in chunks])


def exact_truth(Z: np.ndarray) -> np.ndarray:
    """What a client's exact statistics vector holds, by numpy: ``[n, sum x, sum x^2]``."""
    return np.concatenate([[len(Z)], Z.sum(axis=0), (Z**2).sum(axis=0)])


def dp_truth(Z: np.ndarray, clip: float) -> np.ndarray:
    """A client's clipped ``[means | stds]``, by numpy."""
    v = np.concatenate([Z.mean(axis=0), Z.std(axis=0)])
    return v * min(1.0, clip / np.linalg.norm(v))


def stats_vectors(stats) -> tuple[np.ndarray, np.ndarray]:
    """``[X | y]``'s means and scales as the run's statistics hold them."""
    return (
        np.append(stats.mean, stats.target_mean),
        np.append(stats.scale, stats.target_scale),
    )


class Recording(InProcessParties):
    """The clients in-process, and a server that keeps every answer it gets from them."""

    def __init__(self, config):
        super().__init__(config)
        self.seen: list[tuple[str, dict, list]] = []

    def call(self, step, refs, shared, each=None, timeout=None):
        answered, failed = super().call(step, refs, shared, each, timeout)
        self.seen.append((step, dict(answered), list(failed)))
        return answered, failed


def secure_setup(config, rng=None, parties=None) -> tuple[Run, InProcessParties]:
    parties = parties or InProcessParties(config)
    exchange = SecureExchange(InProcess(config), parties, config)
    try:
        return Run.setup(config, exchange, rng=rng), parties
    finally:
        exchange.close()


# -- the codec: exact sums of values of any magnitude --------------------------------------------


def test_exact_sums_are_exact_whatever_the_magnitudes_and_refuse_what_they_cannot_hold():
    codec, rng, n = ExactFixedPoint(4), np.random.default_rng(0), 50
    vectors = [
        [1e-30 * rng.standard_normal(), 1e20 * rng.standard_normal(), -3.7e15 + rng.random(), 1]
        for _ in range(n)
    ]
    vectors = [[*v[:3], Fraction(1, 3)] for v in vectors]
    # Masks that cancel in Z_2^384, each value's 6 words one number, as the protocol's do.
    ring = codec.ring
    masks = rng.integers(0, 2**64, (n, codec.size), dtype=np.uint64, endpoint=False)
    masks[-1] = ring.neg(ring.sum(masks[:-1]))
    masked = [ring.add(codec.encode(v), m) for v, m in zip(vectors, masks, strict=True)]
    decoded = codec.decode(ring.sum(np.stack(masked)))
    # Floats of these magnitudes are multiples of 2^-160: their sums come out exactly.
    for k in range(3):
        assert decoded[k] == sum(Fraction(v[k]) for v in vectors)
    assert abs(decoded[3] - Fraction(n, 3)) <= n * Fraction(1, 2**161)
    # What 64-bit fixed point at 2^-24 cannot hold, not even one value of.
    with pytest.raises(ValueError, match="bound"):
        FixedPoint(bound=2.0**38 / n).encode(np.array([1e20]))
    with pytest.raises(ValueError, match="non-finite"):
        codec.encode([np.nan, 0, 0, 0])
    with pytest.raises(ValueError, match="outside the exact bound"):
        codec.encode([2.0**208, 0, 0, 0])
    # At the limits: 2^16 clients at the bound sum without wrapping, and no more are taken.
    top = codec.bound - codec.resolution
    summed = ring.sum(np.tile(codec.encode([top, -top, 0, 0]), (2**16, 1)))
    assert codec.decode(summed) == [2**16 * top, -(2**16) * top, 0, 0]
    codec.check_capacity(2**16)
    with pytest.raises(ValueError, match="overflow"):
        codec.check_capacity(2**16 + 1)


def test_the_statistics_round_is_round_0_and_its_masks_are_its_own():
    # Training rounds count from 1: the statistics round comes first, and a client masks for a
    # round only once, so neither round's masks can ever serve the other.
    clients, keys = _clients(4, 21)
    codec, quorum = FixedPoint(1.0), Quorum(3, 4, 3)
    roster = list(keys.values())
    clients[0].masked_input(np.zeros(2), STATISTICS_ROUND, roster, quorum, codec)
    clients[0].masked_input(np.zeros(2), 1, roster, quorum, codec)
    with pytest.raises(SecAggAbort, match="masks are never reused"):
        clients[0].masked_input(np.zeros(2), STATISTICS_ROUND, roster, quorum, codec)
    pair = clients[0]._pairs[1]
    assert pair.mask(0, 2) != pair.mask(1, 2)


def test_a_client_masks_its_statistics_only_as_its_request_says(monkeypatch):
    # The server does not pick the bound: with a smaller one a client's value would overflow
    # it, and the error would tell. A vector that does not fit is refused without its values.
    dep = deploy(10, "run")
    ref, roster, quorum = dep.refs[0], list(dep.keys.values()), dep.quorum()
    request = StatisticsRequest(("x0",), 2.0)
    narrow = StatisticsRequest(("x0",), 1e-3).codec()

    def mask(req, codec):
        return statistics_run_masked(
            dep.store, ref, SESSION, roster, quorum, codec, req, 1024, STATISTICS_ROUND
        )

    with pytest.raises(SecAggAbort, match="not the one its statistics request calls for"):
        mask(request, narrow)
    with pytest.raises(SecAggAbort, match=r"features \['x0'\] are not the round's \['y'\]"):
        mask(StatisticsRequest(("y",)), StatisticsRequest(("y",)).codec())
    exact = StatisticsRequest(("x0",))
    monkeypatch.setattr(secagg_statistics, "vector", lambda report, req: [1.5e300] * 5)
    with pytest.raises(ValueError) as refused:
        mask(exact, exact.codec())
    assert "do not fit the secure sum" in str(refused.value)
    assert "e+300" not in str(refused.value) and "1500" not in str(refused.value)
    monkeypatch.undo()
    assert mask(exact, exact.codec()).masked.masked.shape == (exact.codec().size,)


# -- what the server learns: the sum, exactly or as the DP mechanism -----------------------------


@pytest.mark.parametrize("keys", KEYS)
def test_secure_statistics_without_dp_are_numpys_pooled_moments(tmp_path, keys):
    # Raw columns near 1e8 (spread 250), 1e-6 (spread 0.002) and -50 (spread 9), and a target
    # near 4e5 (spread 3): a square of the first is 1e16 a row, beyond what 64-bit fixed point
    # at 2^-24 can add up (2^39, 5.5e11), and E[x^2] - E[x]^2 in float64 would lose digits.
    offsets = (1e8, 1e-6, -50.0)
    directory = write_client_files(tmp_path / "c", [40, 75, 120, 33, 61], seed=5, offsets=offsets)
    base = [*FILES, f"data.path='{directory}'"]
    config = load_config(None, [*base, *SECURE, f"privacy.secagg_keys={keys!r}"])
    run, parties = secure_setup(config, parties=Recording(config))
    refs = registry(run.config.data, 0)
    Z = np.concatenate([rows(ref) for ref in refs])
    assert [r.client_id for r in run.refs] == [r.client_id for r in refs] and not run.excluded
    assert run.stats.count == len(Z)  # the row count is in the sum, exactly
    mean, std = stats_vectors(run.stats)
    # The codec adds nothing here (every value a multiple of 2^-160, the sums exact): what
    # remains is float64's rounding of each client's moments and of numpy's two passes. Means
    # agree to a few ulps; a standard deviation to a few ulps of the column's offset over its
    # spread (kappa = 1 + |mean| / std: 4e5 for the first column, 1e5 for the target).
    np.testing.assert_allclose(mean, Z.mean(axis=0), rtol=16 * EPS, atol=0)
    kappa = 1 + np.abs(Z.mean(axis=0)) / Z.std(axis=0)
    assert np.all(np.abs(std - Z.std(axis=0)) <= 16 * EPS * kappa * Z.std(axis=0))
    assert kappa.max() > 1e5  # the test has power: a lost offset would show
    # What a run in the clear forms from every client's moments, to the same precision.
    plain = Run.setup(load_config(None, base), InProcess(load_config(None, base)))
    np.testing.assert_allclose(mean, stats_vectors(plain.stats)[0], rtol=16 * EPS, atol=0)
    assert np.all(np.abs(std - stats_vectors(plain.stats)[1]) <= 16 * EPS * kappa * std)
    assert [s for s, _, _ in parties.seen if s.startswith("stats-")] == STEPS[keys]
    with pytest.raises(RuntimeError, match="in the clear"):
        SecureExchange(InProcess(run.config), parties, run.config).statistics(refs)


@pytest.mark.parametrize("keys", KEYS)
def test_secure_dp_statistics_are_the_clipped_sum_plus_the_injected_noise(keys):
    C, zs, N = 1.5, 20.0, 30
    dp = ["rounds.fraction=0.5", "privacy.noise_multiplier=1.0", "rounds.num_rounds=1"]
    base = [
        f"data.num_clients={N}",
        "data.num_features=3",
        *dp,
        f"privacy.statistics_clip_norm={C}",
    ]
    config = load_config(None, [*base, *SECURE, f"privacy.secagg_keys={keys!r}"])
    exchange = SecureExchange(InProcess(config), InProcessParties(config), config)
    try:
        run = Run.setup(config, exchange, rng=np.random.default_rng(7))
        state = run.start()
        list(run.rounds(state))
    finally:
        exchange.close()
    # By hand: each client's [means | stds] clipped to C, summed, plus the first child stream
    # of the injected generator (the engine's statistics noise), over the N registered.
    refs = registry(config.data, 0)
    vectors = [dp_truth(rows(ref), C) for ref in refs]
    norms = [np.linalg.norm(np.concatenate([rows(r).mean(0), rows(r).std(0)])) for r in refs]
    assert min(norms) > C  # clipping is at work
    noise = np.random.default_rng(7).spawn(1)[0].normal(0.0, zs * C, vectors[0].shape)
    noisy = (np.sum(vectors, axis=0) + noise) / N
    c = len(noisy) // 2
    expected = noisy[:c], np.maximum(noisy[c:], zs * C / N)
    # Each client's values are rounded to 2^-24 (within 2^-25); N of them, divided by N.
    tol = 2.0 ** -(FRAC_BITS + 1) + 1e-12
    for got, want in zip(stats_vectors(run.stats), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    assert run.stats.count == N
    # The mechanism in the clear (dp_statistics), with the same noise: the same release.
    reports = [fl_client.feature_moments(ref, 1024) for ref in refs]
    clear = dp_statistics(reports, N, C, zs, np.random.default_rng(7).spawn(1)[0])
    for got, want in zip(stats_vectors(run.stats), stats_vectors(clear), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    # Accounted as before: the statistics' Gaussian mechanism, then the round.
    assert state.history[-1]["dp_epsilon"] == pytest.approx(
        independent_epsilon(0.5, 1.0, 1, 1e-5), abs=1e-6
    )


# -- what a curious server gets: nothing of any one client ---------------------------------------


def _self_masks(keys: str, step_answers: dict, threshold: int, codec) -> dict[int, np.ndarray]:
    """Every survivor's self mask, rebuilt from the shares the unmasking step sent the server."""
    masks = {}
    if keys == "run":
        holders = [v for v, a in step_answers.items() if a.self_mask_shares]
        for u in step_answers[holders[0]].self_mask_shares:
            shares = [np.frombuffer(step_answers[v].self_mask_shares[u], ">u4") for v in holders]
            (seed,) = rebuild_seeds(
                np.array([shares], dtype=np.int64), [share_point(v) for v in holders]
            )
            masks[u] = prg(seed, codec.size)
        return masks
    first = next(iter(step_answers.values()))
    for u in first.self_mask_shares:
        shares = {share_point(v): a.self_mask_shares[u] for v, a in step_answers.items()}
        seed = shamir_reconstruct(shares, threshold).to_bytes(32, "big")
        masks[u] = prg(seed, codec.size)
    return masks


def _full_width(slots: np.ndarray, words: int = 1) -> int:
    """Values (of ``words`` uint64 words each) whose top word's top 16 bits are neither all 0
    nor all 1: an encoded value's never are (an exact value within 2^367, a fixed-point value
    within 2^39, sign-extends), a masked one's are but for 2 in 65536."""
    top = np.asarray(slots, dtype=np.uint64).reshape(-1, words)[:, -1] >> np.uint64(48)
    top = top.astype(np.int64)
    return int(np.sum((top != 0) & (top != 0xFFFF)))


@pytest.mark.parametrize("keys", KEYS)
@pytest.mark.parametrize("dp", [False, True], ids=["exact", "dp"])
def test_a_server_that_records_the_statistics_round_learns_no_clients_moments(keys, dp):
    C = 4.0
    extra = ["rounds.fraction=0.5", "privacy.noise_multiplier=1.0"] if dp else []
    overrides = ["data.num_clients=30", "data.num_features=4", f"privacy.secagg_keys={keys!r}"]
    config = load_config(None, [*overrides, *extra, f"privacy.statistics_clip_norm={C}", *SECURE])
    run, parties = secure_setup(config, np.random.default_rng(1) if dp else None, Recording(config))
    seen = {step: answered for step, answered, _ in parties.seen if step.startswith("stats-")}
    assert list(seen) == STEPS[keys]
    refs = registry(config.data, 0)
    Zs = {ref.index: rows(ref) for ref in refs}
    truth = {i: dp_truth(Z, C) if dp else exact_truth(Z) for i, Z in Zs.items()}
    # In the clear: the feature names, nothing else.
    assert all(names == ["x0", "x1", "x2", "x3"] for names in seen["stats-schema"].values())
    request = StatisticsRequest(("x0", "x1", "x2", "x3"), C if dp else None)
    codec = request.codec()
    masked = {
        i: np.asarray(getattr(m.masked, "masked", m.masked))
        for i, m in seen[STEPS[keys][-3]].items()
    }
    assert sorted(masked) == sorted(truth)  # every client is in the sum
    # Each masked value fills all the bits of its top word where an encoding sign-extends
    # (an exact value within 2^367 of 2^384, a fixed-point one within 2^39 of 2^64): it is
    # nowhere near the client's vector.
    ring, words = codec.ring, codec.ring.words
    assert words == (1 if dp else 6)
    assert _full_width(codec.encode(truth[0]), words) == 0  # the test has power
    slots = np.concatenate(list(masked.values()))
    assert _full_width(slots, words) >= len(slots) // words - 3
    decode = lambda y: np.array([float(v) for v in codec.decode(y)])  # noqa: E731
    assert all(_far(decode(masked[i]), truth[i]) for i in masked)
    # Unmasking gave it every survivor's self mask: the pair masks still hide each vector,
    # and only the sum comes out.
    t = PublicParameters.of(config).survivors(len(refs))
    self_masks = _self_masks(keys, seen[STEPS[keys][-1]], t, codec)
    stripped = {i: ring.sub(masked[i], self_masks[i]) for i in masked}
    slots = np.concatenate(list(stripped.values()))
    assert _full_width(slots, words) >= len(slots) // words - 3
    assert all(_far(decode(stripped[i]), truth[i]) for i in stripped)
    total = decode(ring.sum(np.stack(list(stripped.values()))))
    np.testing.assert_allclose(total, np.sum(list(truth.values()), axis=0), rtol=1e-12, atol=1e-6)
    if not dp:
        _per_word_sums_count_nothing(np.stack(list(stripped.values())), truth, codec)
    # Nothing it recorded carries a client's own moments (the float64s a client reports in
    # the clear) or its row count.
    blob = pickle.dumps(parties.seen)
    for ref in refs:
        m = fl_client.feature_moments(ref, config.client.chunk_size).moments
        for value in [*m.mean, *(m.mean * m.count), *np.sqrt(m.m2 / m.count)]:
            assert struct.pack("<d", value) not in blob and struct.pack(">d", value) not in blob


def _per_word_sums_count_nothing(stripped: np.ndarray, truth: dict, codec) -> None:
    """The exact values are masked as 384-bit numbers, so what the server may add up word by
    word (the vectors without their self masks) is not the sum of the clients' words. Were the
    masks to cancel word by word, a value's top word (0, or all ones when it is negative) would
    sum to minus the number of clients with a negative value: 0 for the count and every Q_j.
    Here a top word's sum is minus the carry out of the 320 bits below it over n uniformly
    masked numbers (the total's top word aside): 0 with probability 1/n! only."""
    n, words = len(stripped), codec.ring.words
    per_word = stripped.sum(axis=0, dtype=np.uint64).reshape(-1, words)
    vectors = list(truth.values())
    negatives = np.sum([np.asarray(v) < 0 for v in vectors], axis=0).astype(np.uint64)
    honest = np.stack([codec.encode(v) for v in vectors]).sum(axis=0, dtype=np.uint64)
    honest = honest.reshape(-1, words)
    # The test has power: the encodings summed word by word count the negative values.
    np.testing.assert_array_equal(honest[:, -1], np.uint64(0) - negatives)
    none_negative = negatives == 0
    assert none_negative.sum() > len(negatives) // 2  # the count and every Q_j at least
    assert np.all(per_word[none_negative, -1] != 0), "the top words summed to a count of 0"
    assert n >= 8  # 1/n! is then below 3e-5 a value


# -- the round's protocol: split views, dropouts, data errors --------------------------------------


class StatisticsRunKeysRound(RunKeysRound):
    """The harness's keys-once-per-run server, playing the statistics round."""

    round_num = STATISTICS_ROUND

    def __init__(self, dep, request: StatisticsRequest):
        self.request = request
        super().__init__(dep, request.codec())

    def mask(self, ref):
        return statistics_run_masked(
            self.dep.store, ref, SESSION, self.roster_for(ref.index), self.quorum, self.codec,
            self.request, 1024, self.round_num,
        ).masked  # fmt: skip


class StatisticsFreshKeysRound(FreshKeysRound):
    """The harness's fresh-keys server, playing the statistics round."""

    round_num = STATISTICS_ROUND

    def __init__(self, dep, threshold: int, party, request: StatisticsRequest):
        self.request = request
        super().__init__(dep, threshold, party, request.codec())

    def mask(self, ref, inbox, roster):
        return statistics_round_masked(
            self.dep.store, ref, inbox, self.session, self.roster_for(ref.index, roster),
            SESSION, self.request, 1024, self.round_num,
        ).masked  # fmt: skip


@pytest.mark.parametrize("party", [None, TrustsAnySurvivorSet], ids=["clients", "control"])
def test_a_split_view_server_gets_nothing_from_the_statistics_round_with_keys_once_per_run(party):
    # The review's split against round 0: 24 share holders told "nobody dropped", the target
    # "those 24 dropped", everyone else "the target dropped"; exact sums (no DP).
    dep = deploy(60, "run", party)
    round_ = StatisticsRunKeysRound(dep, StatisticsRequest(("x0",)))
    inputs = round_.masked_inputs()
    round_.server.collect_masked_inputs(inputs)
    target = next(v for v in round_.cohort if v not in round_.server.holders)
    holders = round_.server.holders[: round_.quorum.rebuild]
    answers = round_.unmask(inputs, split_views(round_.cohort, holders, target))
    x = exact_truth(rows(dep.refs[target]))
    recovered = np.array([float(v) for v in reconstruct_run(round_, target, inputs, answers)])
    if party is TrustsAnySurvivorSet:  # the attack works on clients that trust their view
        np.testing.assert_allclose(recovered, x, rtol=1e-12)
        return
    assert answers == {} and len(round_.refusals) == 60
    for v, why in round_.refusals.items():
        assert "of the survivor set of round 0 signed it, below the threshold 36" in why, (v, why)
    assert _far(recovered, x)


@pytest.mark.parametrize(
    ("threshold", "party"),
    [(12, None), (6, None), (6, SkipsChecks)],
    ids=["configured-threshold", "lowered-threshold", "control"],
)
def test_a_split_view_server_gets_nothing_from_the_statistics_round_with_fresh_keys(
    threshold, party
):
    # As against a training round: the split needs t lowered to 6 (enough clients on each
    # side), which the clients refuse; at the published 12 the sets gather too few signatures.
    # The clients are configured without DP, so the request is for exact sums (a clipped one
    # they refuse: tests/test_secagg_review.py).
    dep = deploy(20, "round")
    round_ = StatisticsFreshKeysRound(dep, threshold, party, StatisticsRequest(("x0",)))
    if threshold < 12 and party is None:
        with pytest.raises(SecAggAbort, match="share keys: only 0 clients left"):
            round_.masked_inputs()
        assert len(round_.refusals) == 20
        assert all("below the published threshold 12" in w for w in round_.refusals.values())
        return
    roster, inboxes, masked = round_.masked_inputs()
    round_.server.collect_masked_inputs(masked)
    target, everyone = 0, list(range(20))
    told_nobody_dropped = everyone[1 : threshold + 1]
    answers = round_.unmask(roster, inboxes, split_views(everyone, told_nobody_dropped, target))
    x = exact_truth(rows(dep.refs[target]))
    decoded = reconstruct_round(target, masked, answers, roster, threshold, round_.codec)
    recovered = np.array([float(v) for v in decoded])
    if party is SkipsChecks:  # the attack works on clients that skip the checks
        np.testing.assert_allclose(recovered, x, rtol=1e-12)
        return
    assert sorted(answers) == told_nobody_dropped
    assert all(not a.mask_key_shares for a in answers.values())
    for v in everyone[threshold + 1 :]:
        assert "only 7 member(s) of the survivor set of round 0 signed it" in round_.refusals[v]
    assert "8 survivors are fewer than the threshold 12" in round_.refusals[target]
    assert _far(recovered, x)


@pytest.mark.parametrize("keys", KEYS)
def test_clients_that_drop_out_of_the_statistics_round_are_left_out_of_the_sum_and_the_run(
    monkeypatch, keys
):
    lost = {"site-2", "site-7"}
    real = secagg_statistics.vector
    unmasked: list[int] = []
    answer = RunKeysClient.unmasking

    def flaky(report, request):
        if report.client_id in lost:
            raise ConnectionError("lost")
        return real(report, request)

    def counted(self, round_num, *args, **kwargs):
        unmasked.extend([self.client_id] if round_num == STATISTICS_ROUND else [])
        return answer(self, round_num, *args, **kwargs)

    monkeypatch.setattr(secagg_statistics, "vector", flaky)
    monkeypatch.setattr(RunKeysClient, "unmasking", counted)
    overrides = [*SECURE, f"privacy.secagg_keys={keys!r}", "rounds.num_rounds=2"]
    config = load_config(SEED, overrides)
    exchange = SecureExchange(InProcess(config), InProcessParties(config), config)
    try:
        run = Run.setup(config, exchange)
        state = run.start()
        records = list(run.rounds(state))
    finally:
        exchange.close()
    assert sorted(run.excluded) == [(cid, "ConnectionError: lost") for cid in sorted(lost)]
    kept = [ref for ref in registry(config.data, 0) if ref.client_id not in lost]
    assert [r.client_id for r in run.refs] == [r.client_id for r in kept]
    Z = np.concatenate([rows(ref) for ref in kept])
    mean, std = stats_vectors(run.stats)
    np.testing.assert_allclose(mean, Z.mean(axis=0), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(std, Z.std(axis=0), rtol=1e-13)
    assert run.stats.count == len(Z)
    assert all(r.metrics["clients_ok"] == 8 for r in records)
    if keys == "run":  # as in a training round with dropouts: every survivor unmasks
        assert sorted(unmasked) == [r.index for r in kept]
    # Below t = 6 survivors the round fails closed, and with it the run's setup.
    lost |= {"site-0", "site-4", "site-5"}
    exchange = SecureExchange(InProcess(config), InProcessParties(config), config)
    try:
        with pytest.raises(RoundFailed, match="failed closed: .*only 5 clients left, below the"):
            Run.setup(config, exchange)
    finally:
        exchange.close()


@pytest.mark.parametrize("keys", KEYS)
def test_clients_with_unusable_data_are_set_aside_with_a_reason_under_secure_aggregation(
    tmp_path, keys
):
    directory = write_client_files(tmp_path / "mixed", [50, 80, 65, 40, 70], seed=8)
    for name in ("broken-text", "broken-schema"):
        (directory / f"{name}.csv").write_text(BROKEN_CSV[name])
    config = load_config(
        None, [*FILES, f"data.path='{directory}'", *SECURE, f"privacy.secagg_keys={keys!r}"]
    )
    run, _ = secure_setup(config)
    excluded = dict(run.excluded)
    assert set(excluded) == {"broken-text", "broken-schema"}
    # What the server hears says what and where, never a value from the data: the bad cell
    # 'x' is named by column and row only (without secure aggregation the reason quotes it).
    public = {**EXPECTED_REASONS, "broken-text": "column 'ratio' row 1: a non-numeric value"}
    for cid in excluded:
        assert public[cid] in excluded[cid] and "\n" not in excluded[cid]
    assert "'x'" not in excluded["broken-text"]
    good = [ref for ref in registry(config.data, 0) if ref.client_id.startswith("clinic-")]
    assert [r.client_id for r in run.refs] == [r.client_id for r in good]
    Z = np.concatenate([rows(ref) for ref in good])
    mean, std = stats_vectors(run.stats)
    np.testing.assert_allclose(mean, Z.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(std, Z.std(axis=0), rtol=1e-12)
