"""Robust aggregation (median, trimmed mean, Krum, Multi-Krum) and Byzantine clients, without
Prefect or MLflow.

Expected values are hand computations, written out next to each assertion.
"""

from __future__ import annotations

import functools
from pathlib import Path

import fedtune.fl.client  # noqa: F401 (used as fl.client)
import fedtune.fl.faults  # noqa: F401 (used as fl.faults)
import numpy as np
import pytest
from fedtune import fl
from fedtune.fl.config import ConfigError, FaultsConfig, load_config
from fedtune.fl.data import registry
from fedtune.fl.engine import RoundFailed
from fedtune.fl.params import ClientUpdate, ModelParams
from fedtune.fl.simulation import simulate
from fedtune.fl.statistics import combine_reports
from fedtune.fl.strategies import STRATEGIES, SUM_STRATEGIES, make_strategy
from fedtune.fl.strategies.krum import Krum, MultiKrum, krum_scores
from fedtune.fl.strategies.median import Median
from fedtune.fl.strategies.trimmed_mean import TrimmedMean

SEED = Path(__file__).resolve().parents[1] / "configs" / "seed.toml"
ROBUST = ["median", "trimmed-mean", "krum", "multi-krum"]

# Five client models [coef, intercept] (one feature); E is the outlier.
#   A = (0, 0)   B = (2, 0)   C = (0, 1)   D = (1, 1)   E = (10, 10)
CASE = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [10.0, 10.0]])
GLOBAL = ModelParams(np.array([0.5]), -0.5)  # robust rules look at the models, not the global


def updates(vectors: np.ndarray = CASE) -> list[ClientUpdate]:
    return [
        ClientUpdate(f"c{i}", ModelParams.from_vector(v), 10, {}, None)
        for i, v in enumerate(vectors)
    ]


def aggregate(strategy, vectors: np.ndarray = CASE) -> np.ndarray:
    params, state = strategy.aggregate(GLOBAL, updates(vectors), strategy.init_state())
    assert state is None and strategy.save_state(state) == {} and not strategy.sum_based
    return params.to_vector()


# -- 1. each rule by hand ----------------------------------------------------------------------


def test_median_by_hand():
    # coef: 0, 2, 0, 1, 10 -> sorted 0, 0, 1, 2, 10 -> 1; intercept: 0, 0, 1, 1, 10 -> 1.
    np.testing.assert_allclose(aggregate(Median()), [1.0, 1.0])
    # Even n: the mean of the two middle values. coef of A..D: 0, 0, 1, 2 -> 0.5; 0, 0, 1, 1 -> 0.5
    np.testing.assert_allclose(aggregate(Median(), CASE[:4]), [0.5, 0.5])


def test_trimmed_mean_by_hand():
    # beta = 0.2, n = 5: floor(1.0) = 1 value dropped at each end of each coordinate.
    # coef: sorted 0, [0, 1, 2], 10 -> 3 / 3 = 1; intercept: 0, [0, 1, 1], 10 -> 2 / 3.
    np.testing.assert_allclose(aggregate(TrimmedMean(0.2)), [1.0, 2.0 / 3.0])
    # beta = 0.1: floor(0.5) = 0, the plain mean (13 / 5, 12 / 5).
    np.testing.assert_allclose(aggregate(TrimmedMean(0.1)), [2.6, 2.4])
    with pytest.raises(ValueError, match=r"^server.trim_fraction: must be in \[0, 0.5\)"):
        TrimmedMean(0.5)


def test_krum_scores_and_pick_by_hand():
    # f = 1, n = 5 > 2f + 2 = 4: each score sums the n - f - 2 = 2 nearest squared distances.
    #   A: to B 4, C 1, D 2, E 200         -> 1 + 2 = 3
    #   B: to A 4, C 5, D 2, E 64+100=164  -> 2 + 4 = 6
    #   C: to A 1, B 5, D 1, E 100+81=181  -> 1 + 1 = 2
    #   D: to A 2, B 2, C 1, E 81+81=162   -> 1 + 2 = 3
    #   E: 200, 164, 181, 162              -> 162 + 164 = 326
    np.testing.assert_allclose(krum_scores(CASE, 1), [3.0, 6.0, 2.0, 3.0, 326.0])
    np.testing.assert_allclose(aggregate(Krum(1)), [0.0, 1.0])  # C has the lowest score


def test_multi_krum_mean_by_hand():
    # m = n - f = 4 lowest scores: C (2), A (3), D (3), B (6); E is left out.
    # mean of A, B, C, D = ((0 + 2 + 0 + 1) / 4, (0 + 0 + 1 + 1) / 4) = (0.75, 0.5).
    np.testing.assert_allclose(aggregate(MultiKrum(1)), [0.75, 0.5])


def test_krum_refuses_a_round_of_at_most_2f_plus_2_updates():
    # f = 2 needs n > 6.
    message = "5 update(s): server.byzantine_clients is 2, and Krum needs more than 2f + 2 = 6"
    for strategy in (Krum(2), MultiKrum(2)):
        with pytest.raises(ValueError) as err:
            aggregate(strategy)
        assert str(err.value) == message
        assert strategy.too_few(5) == message and strategy.too_few(7) is None


def test_from_config_reads_the_server_keys():
    keys = ["server.trim_fraction=0.3", "server.byzantine_clients=3"]
    for name, cls in zip(ROBUST, [Median, TrimmedMean, Krum, MultiKrum], strict=True):
        assert type(make_strategy(load_config(SEED, [*keys, f"server.strategy={name!r}"]))) is cls
    server = load_config(SEED, keys).server
    assert TrimmedMean.from_config(server).trim_fraction == 0.3
    assert MultiKrum.from_config(server).byzantine_clients == 3
    assert not set(ROBUST) & SUM_STRATEGIES and set(ROBUST) <= set(STRATEGIES)


# -- 2. robust rules need every update -----------------------------------------------------------


@pytest.mark.parametrize("name", ROBUST)
@pytest.mark.parametrize(
    ("privacy", "key"),
    [
        (["privacy.secure_aggregation=true"], "privacy.secure_aggregation"),
        (
            ["privacy.noise_multiplier=1.0", "server.weighting='uniform'"],
            "privacy.noise_multiplier",
        ),
        (["privacy.target_epsilon=5.0", "server.weighting='uniform'"], "privacy.target_epsilon"),
    ],
)
def test_robust_strategies_refuse_secure_aggregation_and_dp(name, privacy, key):
    with pytest.raises(ConfigError) as err:
        load_config(SEED, [f"server.strategy={name!r}", *privacy])
    message = str(err.value)
    assert message.startswith(f"server.strategy: {name!r} needs every individual update, ")
    assert key in message and "\n" not in message


# -- 3. Krum in the engine: a round that is too small fails like a too-few-clients round -------


def test_a_round_too_small_for_krum_fails_like_a_round_below_min_clients():
    # f = 4 with 10 clients: 10 <= 2f + 2 = 10, so no round can run Krum.
    config = load_config(
        SEED, ["rounds.num_rounds=2", "server.strategy='krum'", "server.byzantine_clients=4"]
    )
    with pytest.raises(
        RoundFailed,
        match=r"^no round succeeded; round 1: 10 update\(s\): server.byzantine_clients is 4, "
        r"and Krum needs more than 2f \+ 2 = 10$",
    ):
        simulate(config)


# -- 4. Byzantine clients ------------------------------------------------------------------------


def test_byzantine_selection_is_seeded_per_client_and_about_the_fraction():
    faults = FaultsConfig(byzantine_fraction=0.2)
    ids = [f"client-{i}" for i in range(2000)]
    chosen = {cid for cid in ids if fl.faults.is_byzantine(faults, 7, cid)}
    # A function of (seed, id) alone: the same again, and for any subset of the clients.
    assert chosen == {cid for cid in ids if fl.faults.is_byzantine(faults, 7, cid)}
    assert chosen & set(ids[:50]) == {c for c in ids[:50] if fl.faults.is_byzantine(faults, 7, c)}
    # Binomial(2000, 0.2): mean 400, sd sqrt(2000 * 0.2 * 0.8) = 17.9; allow 4 sd.
    assert abs(len(chosen) - 400) < 72
    assert chosen != {cid for cid in ids if fl.faults.is_byzantine(faults, 8, cid)}
    assert not any(fl.faults.is_byzantine(FaultsConfig(), 7, cid) for cid in ids)


@functools.lru_cache
def seed_setup(seed: int):
    """Seed config's refs and feature statistics for experiment seed ``seed``."""
    config = load_config(SEED, [f"experiment.seed={seed}"])
    refs = registry(config.data, seed)
    reports = [fl.client.feature_moments(ref, config.client.chunk_size) for ref in refs]
    return config, refs, combine_reports(reports)[1]


ATTACK_SEED = 3  # experiment seed whose 20% draw gives exactly 2 of the 10 clients: site-5, site-9


@pytest.mark.parametrize("kind", ["sign-flip", "scale"])
def test_byzantine_kinds_corrupt_the_honest_update_as_documented(kind):
    config, refs, stats = seed_setup(ATTACK_SEED)
    faults = FaultsConfig(byzantine_fraction=0.2, byzantine_kind=kind, byzantine_scale=-20.0)
    start = ModelParams(np.array([0.3]), 0.1)
    byzantine, honest_ref = refs[5], refs[0]
    assert fl.faults.is_byzantine(faults, ATTACK_SEED, byzantine.client_id)
    assert not fl.faults.is_byzantine(faults, ATTACK_SEED, honest_ref.client_id)

    honest = fl.client.train(byzantine, start, stats, config.client, 2)
    sent = fl.faults.train(faults, byzantine, start, stats, config.client, 2)
    g, delta = start.to_vector(), honest.params.to_vector() - start.to_vector()
    expected = g - delta if kind == "sign-flip" else g + -20.0 * delta
    np.testing.assert_allclose(sent.params.to_vector(), expected, rtol=1e-12)
    assert sent.num_examples == honest.num_examples and sent.metrics.keys() == honest.metrics.keys()

    # An honest client's update is its plain fl.client.train result.
    plain = fl.client.train(honest_ref, start, stats, config.client, 2)
    got = fl.faults.train(faults, honest_ref, start, stats, config.client, 2)
    np.testing.assert_array_equal(got.params.to_vector(), plain.params.to_vector())


def test_gaussian_byzantine_updates_are_seeded_noise_of_the_configured_scale():
    faults = FaultsConfig(byzantine_fraction=0.2, byzantine_kind="gaussian", byzantine_scale=-3.0)
    cid = next(f"c{i}" for i in range(100) if fl.faults.is_byzantine(faults, 0, f"c{i}"))
    start = ModelParams(np.full(20_000, 2.0), 2.0)

    def sent(round_num: int, honest: float) -> np.ndarray:
        update = ClientUpdate(cid, ModelParams(np.full(20_000, honest), honest), 10, {}, None)
        return fl.faults.attack(faults, 0, round_num, start, update).params.to_vector() - 2.0

    noise = sent(1, 5.0)
    # N(0, |-3|^2) per coordinate: mean 0 (sd of the mean 3 / sqrt(20001) = 0.021), sd 3.
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 3.0) < 0.1
    np.testing.assert_array_equal(sent(1, -7.0), noise)  # ignores the honest update; seeded
    assert not np.allclose(sent(2, 5.0), noise)  # a fresh draw every round


# -- 5. acceptance: 20% scale attackers on the seed config ------------------------------------


@functools.lru_cache
def final_mse(*overrides: str) -> float:
    config = load_config(SEED, [f"experiment.seed={ATTACK_SEED}", *overrides])
    return simulate(config).history[-1]["central_mse"]


ATTACK = ["faults.byzantine_fraction=0.2", "faults.byzantine_kind='scale'"]
ATTACK += ["faults.byzantine_scale=-20.0"]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize(
    "robust",
    [
        ["server.strategy='median'"],
        ["server.strategy='trimmed-mean'", "server.trim_fraction=0.2"],
        ["server.strategy='krum'", "server.byzantine_clients=2"],
    ],
    ids=["median", "trimmed-mean", "krum"],
)
def test_robust_rules_survive_20_percent_scale_attackers_and_fedavg_does_not(robust):
    config, refs, _ = seed_setup(ATTACK_SEED)
    faults = load_config(SEED, ATTACK).faults
    attackers = [
        r.client_id for r in refs if fl.faults.is_byzantine(faults, ATTACK_SEED, r.client_id)
    ]
    assert attackers == ["site-5", "site-9"]
    clean = final_mse()
    assert final_mse(*ATTACK, *robust) <= 1.1 * clean
    assert not final_mse(*ATTACK) <= 1.1 * clean  # FedAvg (also false if it ended in NaN)
