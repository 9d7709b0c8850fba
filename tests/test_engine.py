"""The round engine (fl.engine) with the in-process exchanges: failure handling, early stopping,
DP, secure aggregation and resume, without Prefect or MLflow.

Expected values come from hand computations (written out next to each assertion) or from an
independent library (dp_accounting), never from the code under test.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import shutil
import time
from collections import Counter
from pathlib import Path

import dp_accounting
import fedtune.fl.client  # noqa: F401 (used as fl.client)
import fedtune.fl.strategies  # noqa: F401 (used as fl.strategies)
import numpy as np
import pandas as pd
import pytest
from fedtune import fl
from fedtune.fl.config import ConfigError, load_config
from fedtune.fl.data import ClientDataError, registry
from fedtune.fl.engine import RoundFailed, Run
from fedtune.fl.params import ClientUpdate, ModelParams
from fedtune.fl.privacy.dp_fedavg import DPFedAvg
from fedtune.fl.privacy.plan import plan_privacy
from fedtune.fl.secagg.primitives import FRAC_BITS
from fedtune.fl.secagg.run_keys import RunKeysClient, share_holders
from fedtune.fl.simulation import in_process_exchange, simulate
from fedtune.fl.statistics import combine_reports
from fedtune.fl.strategies import make_strategy

from tests.conftest import write_client_files

SEED = Path(__file__).resolve().parents[1] / "configs" / "seed.toml"
SECURE = ["privacy.secure_aggregation=true"]
FILES = ["data.source=files", "data.target=target"]
SLOW = [
    "rounds.num_rounds=2",
    "rounds.round_timeout_s=3",
    "faults.slow_clients=['site-3']",
    "faults.slowdown_s=6.0",
]
DP = [
    "data.num_clients=80",
    "rounds.num_rounds=4",
    "rounds.fraction=0.25",
    "privacy.noise_multiplier=1.1",
    "privacy.delta=1e-4",
    "privacy.adaptive_clipping=true",
]
DP_Q, DP_Z, DP_DELTA = 0.25, 1.1, 1e-4


DP_ZS = 20.0  # privacy.statistics_noise_multiplier's default


@functools.lru_cache
def independent_epsilon(
    q: float, z: float, rounds: int, delta: float, zs: float | None = DP_ZS
) -> float:
    """epsilon of the DP feature statistics (one Gaussian mechanism with multiplier `zs`, over
    every client) and then `rounds` Poisson-sampled Gaussian rounds, straight from
    dp_accounting: the smaller of the RDP and the PLD (grid 1e-3) bounds."""
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds
    )
    if zs is not None:
        event = dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(zs), event])
    rdp = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta)
    pld = (
        dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
        .compose(event)
        .get_epsilon(delta)
    )
    return min(rdp, pld)


def play(config, rng=None, finish=True):
    """Set up, play every round and (optionally) finish; returns (run, state, records)."""
    exchange = in_process_exchange(config)
    try:
        run = Run.setup(config, exchange, rng=rng)
        state = run.start()
        records = list(run.rounds(state))
        if finish:
            run.finish(state)
    finally:
        exchange.close()
    return run, state, records


def vec(result) -> np.ndarray:
    return result.params.to_vector()


def one_line_error(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


# -- 1. exclusion at setup -----------------------------------------------------------------------


BROKEN_CSV = {
    "broken-text": "income,ratio,age,target\n1,2,3,4\n5,x,7,8\n",
    "broken-nan": "income,ratio,age,target\n1,2,3,4\n5,,7,8\n",
    "broken-schema": "income,ratio,target\n" + "".join(f"{i},{i % 3},{i}\n" for i in range(20)),
    "broken-notarget": "income,ratio,age\n1,2,3\n",
    "broken-constant": "income,ratio,age,target\n1,2,3,4\n5,6,7,4\n9,1,2,4\n",
    "broken-empty": "",
}
EXPECTED_REASONS = {
    "broken-text": "column 'ratio' row 1: non-numeric value 'x'",
    "broken-nan": "column 'ratio' row 1: nan (NaN or inf)",
    "broken-schema": "features ['income', 'ratio'] differ from the others' "
    "['income', 'ratio', 'age']",
    "broken-notarget": "missing target column 'target'",
    "broken-constant": "the target is constant (4)",
    "broken-empty": "empty file",
    "twin": "duplicate client id: twin.csv, twin.parquet",
}


def test_bad_clients_are_excluded_with_a_reason_and_the_rest_train_as_if_alone(tmp_path):
    good = write_client_files(tmp_path / "good", [120, 200, 80], seed=3)
    mixed = tmp_path / "mixed"
    shutil.copytree(good, mixed)
    for name, text in BROKEN_CSV.items():
        (mixed / f"{name}.csv").write_text(text)
    shutil.copy(mixed / "clinic-0.csv", mixed / "twin.csv")
    pd.read_csv(mixed / "clinic-0.csv").to_parquet(mixed / "twin.parquet")

    both = [*FILES, "rounds.num_rounds=3"]
    run, state, _ = play(load_config(None, [*both, f"data.path='{mixed}'"]))
    excluded = dict(run.excluded)
    assert len(run.excluded) == len(excluded) == len(EXPECTED_REASONS)
    assert set(excluded) == set(EXPECTED_REASONS)
    for cid, why in EXPECTED_REASONS.items():
        assert why in excluded[cid], (cid, excluded[cid])
        assert "\n" not in excluded[cid]
    for cid in set(EXPECTED_REASONS) - {"broken-schema"}:  # data errors name client and file
        assert excluded[cid].startswith(f"client {cid!r} ({mixed}"), excluded[cid]
    assert [r.client_id for r in run.refs] == ["clinic-0", "clinic-1", "clinic-2"]
    assert all(h["clients_ok"] == 3 and h["clients_failed"] == 0 for h in state.history)

    _, alone, _ = play(load_config(None, [*both, f"data.path='{good}'"]))
    np.testing.assert_allclose(state.params.to_vector(), alone.params.to_vector(), atol=1e-12)
    np.testing.assert_allclose(run.stats.mean, play_stats_mean(good), atol=1e-12)


def play_stats_mean(directory) -> np.ndarray:
    """The good clients' pooled training-feature means, from their own moments."""
    config = load_config(None, [*FILES, f"data.path='{directory}'"])
    reports = [fl.client.feature_moments(r, 1024) for r in registry(config.data, 0)]
    return combine_reports(reports)[1].mean


def test_no_usable_client_fails_setup_naming_why(tmp_path):
    directory = tmp_path / "bad"
    directory.mkdir()
    for name in ("broken-text", "broken-empty"):
        (directory / f"{name}.csv").write_text(BROKEN_CSV[name])
    config = load_config(None, [*FILES, f"data.path='{directory}'"])
    with pytest.raises(RoundFailed) as exc:
        Run.setup(config, in_process_exchange(config))
    message = one_line_error(exc)
    assert message.startswith("no client has usable data: ")
    assert "empty file" in message and "non-numeric value 'x'" in message


# -- 2. failed rounds and min_clients ----------------------------------------------------------


def test_rounds_below_min_clients_fail_the_run_with_the_first_reason():
    failing = ",".join(f"'site-{i}'" for i in range(1, 10))  # only site-0 ever succeeds
    config = load_config(
        SEED, ["rounds.num_rounds=2", "rounds.min_clients=2", f"faults.always_fail=[{failing}]"]
    )
    with pytest.raises(
        RoundFailed,
        match=r"^no round succeeded; round 1: 1 usable update\(s\), rounds.min_clients is 2 "
        r"\(site-1: InjectedFault",
    ):
        simulate(config)


@pytest.mark.parametrize("keys", ["run", "round"])
def test_min_clients_applies_under_secure_aggregation(keys):
    # site-9 always fails: nine masked updates, whose sum *can* be recovered (threshold 6).
    base = [
        *SECURE,
        f"privacy.secagg_keys={keys!r}",
        "rounds.num_rounds=2",
        "faults.always_fail=['site-9']",
    ]
    run, state, records = play(load_config(SEED, [*base, "rounds.min_clients=10"]), finish=False)
    for r, record in enumerate(records, start=1):
        assert record.aborted is None  # the protocol went through ...
        assert record.failed.startswith(f"round {r}: 9 usable update(s), rounds.min_clients is 10")
        assert record.metrics["round_failed"] == 1  # ... but the round did not count
    np.testing.assert_array_equal(state.params.to_vector(), 0.0)
    with pytest.raises(RoundFailed, match=r"^no round succeeded; round 1: 9 usable"):
        run.finish(state)

    # With min_clients=9 the same nine are summed: FedAvg of the nine, as in the clear.
    _, state9, records9 = play(load_config(SEED, [*base, "rounds.min_clients=9"]))
    assert all(rec.failed is None and "round_failed" not in rec.metrics for rec in records9)
    clear = simulate(load_config(SEED, ["rounds.num_rounds=2", "faults.always_fail=['site-9']"]))
    np.testing.assert_allclose(state9.params.to_vector(), vec(clear), rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_diverging_clients_never_change_the_model_and_the_run_says_why():
    # eta0 = 1e200 blows every local model up: each update exceeds server.max_update_norm.
    config = load_config(
        SEED,
        [
            "client.learning_rate='constant'",
            "client.eta0=1e200",
            "rounds.num_rounds=2",
            "server.max_update_norm=1000",
        ],
    )
    run, state, records = play(config, finish=False)
    np.testing.assert_array_equal(state.params.to_vector(), 0.0)
    assert all(r.metrics["round_failed"] == 1 and r.metrics["clients_ok"] == 0 for r in records)
    with pytest.raises(RoundFailed, match=r"^no round succeeded; round 1: 0 usable.*exceeds"):
        run.finish(state)


def test_min_clients_above_one_is_refused_under_dp():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["privacy.noise_multiplier=1.0", "rounds.min_clients=2"])
    assert one_line_error(exc).startswith("rounds.min_clients: must be 1 under DP")


# -- 3. deadlines --------------------------------------------------------------------------------


@pytest.mark.parametrize("secure", [False, True])
def test_stragglers_past_the_deadline_are_left_out_in_virtual_time(secure):
    extra = SECURE if secure else []
    started = time.perf_counter()
    slow = simulate(load_config(SEED, [*SLOW, *extra]))
    assert time.perf_counter() - started < 3.0  # the 6 s slowdown was counted, not slept
    for h in slow.history:
        assert h["clients_timed_out"] == 1 and h["clients_ok"] == 9, h
        assert h["failed_clients"] == "site-3: timed out after 3 s"
    # The nine were summed: the model is the one of a run where site-3 always fails.
    failing = simulate(load_config(SEED, ["rounds.num_rounds=2", "faults.always_fail=['site-3']"]))
    if secure:  # fixed point: 2^-24 per summand, over the summed weights of nine clients
        np.testing.assert_allclose(vec(slow), vec(failing), rtol=0, atol=1e-6)
    else:
        np.testing.assert_array_equal(vec(slow), vec(failing))
    assert not np.allclose(vec(slow), 0.0)


def test_training_survives_thirty_percent_crashing_clients():
    base = ["data.num_clients=20", "rounds.num_rounds=15"]
    faulty = simulate(load_config(SEED, [*base, "faults.crash_probability=0.3"]))
    clean = simulate(load_config(SEED, base))
    assert sum(h["clients_failed"] for h in faulty.history) > 0.2 * 20 * 15  # ~30% of 300
    assert faulty.history[-1]["central_mse"] <= 1.05 * clean.history[-1]["central_mse"]
    assert "simulated crash" in faulty.history[0]["failed_clients"]


# -- 4. retries ----------------------------------------------------------------------------------


def test_retries_recover_transient_crashes():
    crashes = ["rounds.num_rounds=3", "faults.crash_probability=0.5"]
    without = simulate(load_config(SEED, crashes))
    retried = simulate(load_config(SEED, [*crashes, "client.retries=3"]))
    lost = sum(h["clients_failed"] for h in without.history)
    assert lost >= 5  # about half of 30 updates
    # A client is lost only if all 4 independent draws crash: about 1/16 of them.
    assert sum(h["clients_failed"] for h in retried.history) < lost / 2


def test_a_data_error_is_never_retried_but_a_crash_is(monkeypatch):
    calls: Counter = Counter()
    train = fl.client.train

    def flaky(ref, params, stats, cfg, round_num):
        calls[(ref.client_id, round_num)] += 1
        if ref.client_id == "site-1":
            raise ClientDataError("site-1", "shard 1", "column 'x0' row 7: nan (NaN or inf)")
        if ref.client_id == "site-2" and calls[("site-2", round_num)] == 1:
            raise ConnectionError("transient")
        return train(ref, params, stats, cfg, round_num)

    monkeypatch.setattr(fl.client, "train", flaky)
    result = simulate(load_config(SEED, ["rounds.num_rounds=2", "client.retries=3"]))
    assert [calls[("site-1", r)] for r in (1, 2)] == [1, 1]  # not retried
    assert [calls[("site-2", r)] for r in (1, 2)] == [2, 2]  # retried once, then fine
    assert [calls[("site-0", r)] for r in (1, 2)] == [1, 1]
    for h in result.history:
        assert h["clients_ok"] == 9
        assert h["failed_clients"] == "site-1: client 'site-1' (shard 1): column 'x0' row 7: " + (
            "nan (NaN or inf)"
        )


# -- 5. NaN clients ------------------------------------------------------------------------------


@pytest.mark.parametrize("secure", [False, True])
def test_a_client_sending_nan_never_changes_the_model(secure):
    base = ["rounds.num_rounds=3", *(SECURE if secure else [])]
    poisoned = simulate(load_config(SEED, [*base, "faults.nan_clients=['site-2']"]))
    without = simulate(load_config(SEED, [*base, "faults.always_fail=['site-2']"]))
    # Same survivors, same (exact, integer) masked sum: identical bits either way.
    np.testing.assert_array_equal(vec(poisoned), vec(without))
    assert [h["fed_mse"] for h in poisoned.history] == [h["fed_mse"] for h in without.history]
    assert not np.allclose(vec(poisoned), 0.0)
    for h in poisoned.history:
        assert h["clients_ok"] == 9 and h["failed_clients"].startswith("site-2: ")
        assert ("non-finite" in h["failed_clients"]) and "\n" not in h["failed_clients"]


# -- 6. early stopping ---------------------------------------------------------------------------


def test_early_stopping_keeps_the_last_scored_model():
    stopping = ["rounds.num_rounds=30", "rounds.patience=1", "rounds.tolerance=0.05"]
    config = load_config(SEED, stopping)
    run, state, records = play(config)
    assert state.stopped_early
    stop = records[-1]
    assert stop.stop == "early" and stop.metrics == {} and stop.checkpoint is None
    kept = len(state.history)
    assert 2 <= kept < 30 and stop.round == kept + 1  # round kept+1 scored w_kept, then stopped
    assert stop.scored is state.history[-1]
    # The kept model is w_kept, the model after the last recorded round ...
    np.testing.assert_array_equal(state.params.to_vector(), records[-2].checkpoint["params"])
    # ... which is what simply running `kept` rounds gives.
    plain = simulate(load_config(SEED, [f"rounds.num_rounds={kept}"]))
    np.testing.assert_array_equal(state.params.to_vector(), vec(plain))
    # patience=1: every earlier round improved by >= 5% on the one before, the last did not.
    fed = [h["fed_mse"] for h in state.history]
    assert all(b < 0.95 * a for a, b in zip(fed[:-1], fed[1:-1], strict=False))
    assert fed[-1] >= 0.95 * fed[-2]


# -- 7. DP ---------------------------------------------------------------------------------------


def test_dp_epsilon_after_each_round_is_dp_accountings():
    _, state, _ = play(load_config(None, DP), rng=np.random.default_rng(0))
    eps = [h["dp_epsilon"] for h in state.history]
    assert len(eps) == 4
    for t, e in enumerate(eps, start=1):
        assert e == pytest.approx(independent_epsilon(DP_Q, DP_Z, t, DP_DELTA), abs=1e-6)
    assert np.diff(eps).min() > 0


def test_target_epsilon_stops_before_the_budget_is_exceeded():
    budget = independent_epsilon(DP_Q, DP_Z, 2, DP_DELTA) + 1e-3  # two rounds fit, three not
    assert independent_epsilon(DP_Q, DP_Z, 3, DP_DELTA) > budget
    config = load_config(None, [*DP, f"privacy.target_epsilon={budget}"])
    _, state, records = play(config, rng=np.random.default_rng(0))
    assert [r.stop for r in records] == [None, None, "budget"]
    assert records[-1].metrics == {}
    eps = [h["dp_epsilon"] for h in state.history]
    assert len(eps) == 2 and eps[-1] <= budget


def test_target_epsilon_alone_calibrates_the_noise():
    overrides = [o for o in DP if not o.startswith("privacy.noise_multiplier")]
    config = load_config(None, [*overrides, "privacy.target_epsilon=3.0"])
    plan = plan_privacy(config, 80)
    spent = independent_epsilon(DP_Q, plan.noise_multiplier, 4, DP_DELTA)
    assert 0.97 * 3.0 <= spent <= 3.0


def test_dp_noise_is_secret_unless_a_seeded_generator_is_injected():
    config = load_config(None, [*DP, "rounds.num_rounds=2"])
    a, b = simulate(config), simulate(config)  # same experiment.seed, OS-seeded noise
    assert not np.allclose(vec(a), vec(b))
    c = simulate(config, rng=np.random.default_rng(11))
    d = simulate(config, rng=np.random.default_rng(11))
    np.testing.assert_array_equal(vec(c), vec(d))


def test_dp_and_secure_aggregation_compose():
    # The server noises the recovered sum exactly as the clear one: same injected noise, same
    # model to fixed-point precision (clipped contributions, bound max(C, 1)).
    base = [
        "data.num_clients=30",
        "rounds.num_rounds=2",
        "rounds.fraction=0.5",
        "privacy.noise_multiplier=0.7",
    ]
    _, secure, _ = play(load_config(None, [*base, *SECURE]), rng=np.random.default_rng(2))
    _, clear, _ = play(load_config(None, base), rng=np.random.default_rng(2))
    np.testing.assert_allclose(
        secure.params.to_vector(), clear.params.to_vector(), rtol=0, atol=1e-6
    )
    assert [h["clients_ok"] for h in secure.history] == [h["clients_ok"] for h in clear.history]
    assert secure.history[-1]["dp_epsilon"] == pytest.approx(
        independent_epsilon(0.5, 0.7, 2, 1e-5), abs=1e-6
    )


# -- 8. acceptance: DP around uniform FedAvg, noised mean by hand ------------------------------


def test_dp_fedavg_uniform_noised_mean_by_hand():
    config = load_config(
        None,
        [
            "data.num_clients=8",
            "data.num_features=2",
            "rounds.fraction=0.5",
            "privacy.noise_multiplier=0.8",
            "privacy.clipping_norm=0.5",
            "server.weighting='uniform'",
        ],
    )
    plan = plan_privacy(config, 8)
    assert (plan.sampling_rate, plan.expected_clients, plan.noise_multiplier) == (0.5, 4.0, 0.8)
    strategy = make_strategy(config, plan, rng=np.random.default_rng(5))
    assert isinstance(strategy, DPFedAvg)

    z, C, qN = 0.8, 0.5, 4.0
    g = np.array([0.3, -0.2, 0.1])  # [coef..., intercept]
    deltas = [np.array([0.1, 0.2, -0.1]), np.array([3.0, -4.0, 0.0]), np.array([0.0, 1.0, 1.0])]
    updates = [
        ClientUpdate(f"c{i}", ModelParams.from_vector(g + d), n, {})
        for i, (d, n) in enumerate(zip(deltas, [5, 50, 500], strict=True))
    ]
    new, _ = strategy.aggregate(ModelParams.from_vector(g), updates, strategy.init_state())

    # clip(d, C) = d * min(1, C / |d|): 0.245 <= 0.5 stays; |(3,-4,0)| = 5 -> /10;
    # |(0,1,1)| = sqrt(2) -> * 0.5/sqrt(2). Every client weighs 1 whatever its example count.
    clipped = [
        np.array([0.1, 0.2, -0.1]),
        np.array([0.3, -0.4, 0.0]),
        np.array([0.0, 1.0, 1.0]) * 0.5 / np.sqrt(2.0),
    ]
    noise = np.random.default_rng(5).normal(0.0, z * C, size=3)
    expected = g + (sum(clipped) + noise) / qN
    np.testing.assert_allclose(new.to_vector(), expected, rtol=0, atol=1e-12)

    # An empty Poisson sample still adds the (next) noise: g + N(0, (zC)^2) / qN.
    rng = np.random.default_rng(5)
    rng.normal(size=3)
    empty, _ = strategy.aggregate(ModelParams.from_vector(g), [], strategy.init_state())
    np.testing.assert_allclose(
        empty.to_vector(), g + rng.normal(0.0, z * C, size=3) / qN, rtol=0, atol=1e-12
    )


def test_example_weighting_under_dp_is_refused_by_config():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["privacy.noise_multiplier=1.0", "server.weighting='num_examples'"])
    assert one_line_error(exc).startswith("server.weighting: ")


# -- 9. acceptance: secure aggregation without DP is FedAvg's weighted mean --------------------


@pytest.mark.parametrize("keys", ["run", "round"])
def test_secure_aggregation_gives_fedavgs_example_weighted_mean(tmp_path, keys):
    directory = write_client_files(tmp_path / "three", [12, 40, 25], seed=1)
    base = [*FILES, f"data.path='{directory}'", "rounds.num_rounds=1"]
    secure = simulate(load_config(None, [*base, *SECURE, f"privacy.secagg_keys={keys!r}"]))
    plain = simulate(load_config(None, base))

    # By hand: every client trains from zeros on the pooled statistics; FedAvg from zeros is
    # sum(n_i theta_i) / sum(n_i) with n_i the training examples.
    config = load_config(None, base)
    refs = registry(config.data, config.experiment.seed)
    _, stats = combine_reports([fl.client.feature_moments(r, 1024) for r in refs])
    updates = [fl.client.train(r, ModelParams.zeros(3), stats, config.client, 1) for r in refs]
    n = np.array([u.num_examples for u in updates])
    assert len(set(n)) == 3  # the weights really differ
    by_hand = sum(ni * u.params.to_vector() for ni, u in zip(n, updates, strict=True)) / n.sum()
    # Each summand n_i * delta_i is rounded to a multiple of 2^-24 (error <= 2^-25); the
    # weights are integers, exact. So the mean is off by at most 3 * 2^-25 / sum(n).
    bound = 3 * 2.0 ** -(FRAC_BITS + 1) / n.sum()
    np.testing.assert_allclose(vec(secure), by_hand, rtol=0, atol=bound)
    np.testing.assert_allclose(vec(plain), by_hand, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(vec(secure), vec(plain), rtol=0, atol=bound)
    assert np.abs(by_hand).min() > 1e-3  # not a trivially-zero comparison


# -- 10. secure aggregation: fail closed, dropouts, silent share holders -----------------------


@pytest.mark.parametrize("keys", ["run", "round"])
def test_secure_aggregation_fails_closed_below_threshold(keys):
    # One client a round can never be hidden in a sum: every round aborts, the model stays.
    one = ["rounds.num_rounds=2", "rounds.clients_per_round=1"]
    config = load_config(SEED, [*SECURE, f"privacy.secagg_keys={keys!r}", *one])
    run, state, records = play(config, finish=False)
    assert len(records) == 2
    for record in records:
        assert "secure aggregation needs at least 2" in record.aborted
        assert (record.metrics["clients_ok"], record.metrics["clients_failed"]) == (0, 1)
        assert record.metrics["round_failed"] == 1
    np.testing.assert_array_equal(state.params.to_vector(), 0.0)
    with pytest.raises(RoundFailed, match="^no round succeeded; round 1: 0 usable"):
        run.finish(state)


@pytest.mark.parametrize("keys", ["run", "round"])
def test_secure_aggregation_recovers_from_thirty_percent_dropouts(monkeypatch, keys):
    unmasked: Counter = Counter()
    answer = RunKeysClient.unmasking

    def counted(self, round_num, *args, **kwargs):
        unmasked[round_num] += 1
        return answer(self, round_num, *args, **kwargs)

    monkeypatch.setattr(RunKeysClient, "unmasking", counted)
    base = ["data.num_clients=20", "rounds.num_rounds=3", "faults.crash_probability=0.3"]
    secure = simulate(load_config(None, [*base, *SECURE, f"privacy.secagg_keys={keys!r}"]))
    plain = simulate(load_config(None, base))  # the same seeded crashes, summed in the clear
    np.testing.assert_allclose(vec(secure), vec(plain), rtol=0, atol=1e-6)
    failed = [h["clients_failed"] for h in secure.history]
    assert all(f > 0 for f in failed) and sum(failed) >= 0.2 * 60
    assert [h["clients_ok"] for h in secure.history] == [h["clients_ok"] for h in plain.history]
    assert all("simulated crash" in h["failed_clients"] for h in secure.history)
    if keys == "run":  # with dropouts every survivor unmasks (each holds seeds of the dropped)
        assert [unmasked[h["round"]] for h in secure.history] == [
            h["clients_ok"] for h in secure.history
        ]


def test_a_share_holder_that_does_not_unmask_is_replaced_and_still_counts(monkeypatch):
    config = load_config(
        SEED, [*SECURE, "privacy.secagg_committee=5", "rounds.num_rounds=2"]
    )  # 5 holders of 10 clients; any ceil(0.6 * 5) = 3 of them rebuild a self mask
    holders = {r: share_holders(range(10), 5, r) for r in (1, 2)}
    answer = RunKeysClient.unmasking
    asked: dict[int, list[int]] = {1: [], 2: []}

    def unreachable_first_holder(self, round_num, *args, **kwargs):
        if round_num not in asked:  # round 0, the feature statistics: every holder answers
            return answer(self, round_num, *args, **kwargs)
        asked[round_num].append(self.client_id)
        if self.client_id == holders[round_num][0]:
            raise ConnectionError("unreachable")
        return answer(self, round_num, *args, **kwargs)

    monkeypatch.setattr(RunKeysClient, "unmasking", unreachable_first_holder)
    _, state, records = play(config)
    for record in records:
        silent = holders[record.round][0]
        assert record.silent == [(f"site-{silent}", "ConnectionError: unreachable")]
        assert (record.metrics["clients_ok"], record.metrics["clients_failed"]) == (10, 0)
        # The first three holders, then the fourth in place of the silent one.
        assert asked[record.round] == holders[record.round][:4]
    plain = simulate(load_config(SEED, ["rounds.num_rounds=2"]))
    np.testing.assert_allclose(state.params.to_vector(), vec(plain), rtol=0, atol=1e-6)


# -- 11. resume ----------------------------------------------------------------------------------


def interrupted(config, after: int, rng: np.random.Generator | None = None):
    """The uninterrupted run, and a run stopped after round `after` (checkpoint through JSON,
    history as recorded then), resumed in a fresh setup and finished. Under DP the resumed run
    gets a copy of the noise generator as it stood after round `after` (a seeded stand-in for
    the secret one), so both runs draw the same noise from there on."""
    exchange = in_process_exchange(config)
    run = Run.setup(config, exchange, rng=rng)
    state = run.start()
    saved = None
    for record in run.rounds(state):
        if record.round == after:
            checkpoint = json.loads(json.dumps(run.checkpoint(state)))
            saved = checkpoint, copy.deepcopy(state.history), copy.deepcopy(rng)
    full = run.finish(state)
    exchange.close()

    checkpoint, history, noise = saved
    exchange = in_process_exchange(config)
    again = Run.setup(config, exchange, rng=noise)
    resumed = again.resume(checkpoint, history)
    assert resumed.next_round == after + 1
    list(again.rounds(resumed))
    rest = again.finish(resumed)
    exchange.close()
    return (state, full), (resumed, rest), checkpoint


def without_time(history):
    return [{k: v for k, v in h.items() if k != "round_seconds"} for h in history]


@pytest.mark.parametrize(
    "overrides",
    [
        # tolerance 0.6: every score is stale (fed_mse halves per round), so patience=3 stops
        # in round 5 only if the stale count of rounds 2-3 survives the resume.
        ["rounds.num_rounds=5", "rounds.patience=3", "rounds.tolerance=0.6"],
        [
            "rounds.num_rounds=5",
            "data.num_clients=20",
            "rounds.clients_per_round=8",
            "faults.crash_probability=0.3",
        ],
    ],
    ids=["early-stopping", "crashes"],
)
def test_resume_from_a_checkpoint_ends_where_the_uninterrupted_run_ends(overrides):
    config = load_config(SEED, overrides)
    (state, full), (resumed, rest), checkpoint = interrupted(config, after=3)
    np.testing.assert_array_equal(resumed.params.to_vector(), state.params.to_vector())
    assert without_time(resumed.history) == without_time(state.history)
    assert resumed.stopped_early == state.stopped_early
    assert rest.final.metrics() == full.final.metrics()
    if "rounds.patience=3" in overrides:
        assert checkpoint["stopper"][1] == 1 and state.stopped_early
        assert len(state.history) == 4
    else:
        assert sum(h["clients_failed"] for h in state.history) > 0


def test_a_dp_checkpoint_restores_the_accountant_and_the_clip_norm():
    config = load_config(None, DP)
    (state, _), (resumed, _), checkpoint = interrupted(
        config, after=3, rng=np.random.default_rng(3)
    )
    assert checkpoint["accountant"]["rounds"] == 3
    eps = [h["dp_epsilon"] for h in resumed.history]
    for t, e in enumerate(eps, start=1):  # round 4 continues from 3 rounds spent
        assert e == pytest.approx(independent_epsilon(DP_Q, DP_Z, t, DP_DELTA), abs=1e-6)
    assert resumed.accountant.rounds_ == 4
    # Adaptive clipping moved C away from its start, and round 4 clipped to the restored C:
    # with the same noise from there on, the resumed run is the uninterrupted one.
    assert checkpoint["strategy"]["clip_norm"] != 1.0
    np.testing.assert_array_equal(resumed.params.to_vector(), state.params.to_vector())
    assert without_time(resumed.history) == without_time(state.history)


# -- 12. strategies are refused by the configuration -------------------------------------------


def test_an_unknown_strategy_is_refused_by_config():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["server.strategy='no-such-strategy'"])
    assert one_line_error(exc).startswith("server.strategy: ")


# Robust strategies' refusal under secure aggregation and DP: tests/test_strategies_robust.py.


# -- 7b. what a DP run releases: statistics, sampling, decisions ---------------------------------


def test_dp_statistics_are_per_client_averages_of_clipped_vectors():
    from fedtune.fl.privacy.statistics import dp_statistics
    from fedtune.fl.statistics import Moments, StatsReport

    def report(cid, x, y):
        rows = [(np.asarray(x, float)[:, None], np.asarray(y, float))]
        return StatsReport(cid, ["x0"], Moments.of(rows))

    # By hand: client a has x = [1, 3] (mean 2, std 1), y = [0, 0] (mean 0, std 0); client b
    # has x = [10, 10, 10, 14] (mean 11, std sqrt(3)), y = [2, 2, 4, 4] (mean 3, std 1).
    a, b = report("a", [1, 3], [0, 0]), report("b", [10, 10, 10, 14], [2, 2, 4, 4])
    zero_noise = np.random.default_rng(0)
    stats = dp_statistics([a, b], 3, 1e6, 1e-12, zero_noise)  # 3 registered, one silent
    assert stats.count == 3  # the public number of clients, not the 6 rows
    assert stats.mean == pytest.approx([(2 + 11) / 3], abs=1e-6)
    assert stats.scale == pytest.approx([(1 + 3**0.5) / 3], abs=1e-6)
    assert (stats.target_mean, stats.target_scale) == pytest.approx((1.0, 1 / 3), abs=1e-6)
    # Clipped to C = 1: client b's vector [11, 3, sqrt(3), 1] is scaled by 1 / its norm.
    clipped = dp_statistics([b], 1, 1.0, 1e-12, zero_noise)
    norm = math.sqrt(121 + 9 + 3 + 1)
    assert clipped.mean == pytest.approx([11 / norm], abs=1e-9)
    assert clipped.target_scale == pytest.approx(1 / norm, abs=1e-9)


def test_dp_statistics_noise_has_the_planned_scale_and_no_scale_goes_below_it():
    from fedtune.fl.privacy.statistics import dp_statistics
    from fedtune.fl.statistics import Moments, StatsReport

    rows = [(np.array([[1.0], [3.0]]), np.array([0.0, 2.0]))]
    reports = [StatsReport(f"c{i}", ["x0"], Moments.of(rows)) for i in range(10)]
    rng = np.random.default_rng(5)
    means = [dp_statistics(reports, 10, 4.0, 2.0, rng).mean[0] for _ in range(4000)]
    # Each coordinate: (10 * 2 + N(0, (2 * 4)^2)) / 10, i.e. mean 2, standard deviation 0.8.
    assert np.mean(means) == pytest.approx(2.0, abs=4 * 0.8 / math.sqrt(4000))
    assert np.std(means) == pytest.approx(0.8, rel=0.05)
    scales = [dp_statistics(reports, 1000, 4.0, 2.0, rng).scale[0] for _ in range(200)]
    assert min(scales) >= 2.0 * 4.0 / 1000  # never below the noise's own stddev, never 0


def test_a_dp_run_releases_neither_exact_moments_nor_row_counts_and_never_replays():
    config = load_config(None, [*DP, "rounds.num_rounds=1"])
    refs = registry(config.data, config.experiment.seed)
    exact_names, exact = combine_reports(
        in_process_exchange(config).statistics(refs)[0]
    )  # what a non-DP run would release
    first = Run.setup(config, in_process_exchange(config))
    second = Run.setup(config, in_process_exchange(config))  # same config, same seed
    assert first.stats.count == second.stats.count == len(refs) == 80  # not the rows
    assert exact.count == 80 * 80  # 80 training rows a client (20% held out for testing)
    assert not np.allclose(first.stats.mean, exact.mean, rtol=0, atol=1e-9)
    assert not np.allclose(first.stats.mean, second.stats.mean, rtol=0, atol=1e-9)
    assert first.stats.target_mean != exact.target_mean
    # Secret sampling: whoever replays experiment.seed cannot tell who took part.
    samples = [[ref.client_id for ref in run.sample(1)] for run in (first, second)]
    assert samples[0] != samples[1]


def test_dp_early_stopping_decides_on_the_servers_held_out_set():
    config = load_config(
        None, [*DP, "rounds.num_rounds=12", "rounds.patience=1", "rounds.tolerance=0.2"]
    )
    _, state, records = play(config, rng=np.random.default_rng(4))
    assert records[-1].stop == "early" and state.stopped_early
    central = [h["central_mse"] for h in state.history]
    # patience 1, tolerance 20%: every earlier round beat the best before it by 20%, the last
    # did not (by central_mse; the un-noised fed_mse plays no part).
    best = central[0]
    for value in central[1:-1]:
        assert value < 0.8 * best
        best = value
    assert central[-1] >= 0.8 * best


def test_dp_refuses_decisions_it_has_no_public_data_for(tmp_path):
    directory = write_client_files(tmp_path / "c", [30, 30])
    base = ["data.source=files", f"data.path={directory}", "privacy.noise_multiplier=1.0"]
    for key, value in (("rounds.patience", "2"), ("experiment.register_as", "demand")):
        with pytest.raises(ConfigError, match=rf"^{key}: under DP it needs a test set"):
            load_config(None, [*base, f"{key}={value}"])
    load_config(None, [*base[:2], f"{key}={value}"])  # without DP it is fine


def test_the_release_policy_keeps_only_dp_quantities():
    from fedtune.fl.privacy.release import released_metrics, released_summary

    entry = {
        "round": 3,
        "dp_epsilon": 0.4,
        "central_mse": 1.2,
        "fed_mse": 1.1,
        "train_loss": 0.9,
        "clients_ok": 27,
        "failed_clients": "site-3: bad row",
        "initial_fed_mse": 2.0,
        "round_seconds": 0.3,
        "personalized/site-3/mse_after": 0.5,
    }
    assert released_metrics(entry, dp=True) == {"round": 3, "dp_epsilon": 0.4, "central_mse": 1.2}
    assert released_metrics(entry, dp=False) == entry
    summary = {"baseline_mse": 0.9, "excluded_clients": {}, "final_metrics": entry, "coef": [1]}
    out = released_summary(summary, dp=True)
    assert out["baseline_mse"] is None and "site-3" not in json.dumps(out)
    assert (
        out["excluded_clients"] == released_summary({**summary, "x": 1}, True)["excluded_clients"]
    )  # the same whether or not anyone was excluded


def test_bytes_on_the_wire_grow_with_clients_and_features():
    def last(*overrides):
        result = simulate(load_config(SEED, ["rounds.num_rounds=1", *overrides]))
        return result.history[-1]["bytes_broadcast"], result.history[-1]["bytes_returned"]

    five, ten = last("rounds.clients_per_round=5"), last("rounds.clients_per_round=10")
    assert ten == (2 * five[0], 2 * five[1])  # one broadcast and one update per client
    wide = last("rounds.clients_per_round=5", "data.num_features=9")
    narrow = last("rounds.clients_per_round=5", "data.num_features=1")
    # 8 more float64 features: the broadcast carries the coefficients and the statistics'
    # means and scales (3 x 8 x 8 bytes a client at least), an update its coefficients.
    assert wide[0] - narrow[0] >= 5 * 3 * 64 and wide[1] - narrow[1] >= 5 * 64


def test_dp_with_secure_aggregation_refuses_rounds_that_would_often_abort():
    # 10 clients at q = 0.2: a round samples fewer than the 2 clients secure aggregation needs
    # with probability P[Bin(9, 0.2) <= 1] = 0.8^9 + 9 * 0.2 * 0.8^8 = 0.436 (by hand); one
    # client then decides between an aborted and a summed round, which ε does not count.
    base = ["privacy.noise_multiplier=1.0", "privacy.secure_aggregation=true", *SECURE[1:]]
    with pytest.raises(ValueError, match=r"^privacy.secure_aggregation: with DP, a round"):
        plan_privacy(load_config(None, [*base, "rounds.fraction=0.2"]), 10)
    assert plan_privacy(load_config(None, [*base, "rounds.fraction=0.5"]), 80) is not None
