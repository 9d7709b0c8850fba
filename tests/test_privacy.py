"""DP-FedAvg (fl.privacy: mechanisms, the wrapper around a strategy) and its accountant
(fl.privacy.accounting): fast, no Prefect/MLflow."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp
from fedtune.fl.params import ClientUpdate, ModelParams
from fedtune.fl.privacy.accounting import PLD_DISCRETIZATION, Accountant, calibrate_noise_multiplier
from fedtune.fl.privacy.dp_fedavg import DPFedAvg, DPState
from fedtune.fl.privacy.mechanisms import (
    adapt_clip_norm,
    clip_update,
    noised_mean_update,
    sum_noise_multiplier,
)
from fedtune.fl.rounds import poisson_sample
from fedtune.fl.strategies import Contribution, FedAvg
from fedtune.fl.strategies.aggregation import sum_contributions
from scipy import stats


def _dp(z, clip, expected_clients, seed=0, **kwargs) -> DPFedAvg:
    """DP-FedAvg around FedAvg, its noise from a seeded generator (tests only)."""
    rng = np.random.default_rng(seed)
    return DPFedAvg(FedAvg("uniform"), z, clip, expected_clients, rng, **kwargs)


def _update(client: int, params: np.ndarray) -> ClientUpdate:
    return ClientUpdate(f"site-{client}", ModelParams.from_vector(params), 10, {})


# --- clipping -------------------------------------------------------------------------------


def test_clipping_bounds_every_update_and_keeps_small_ones():
    rng = np.random.default_rng(0)
    clip_norm = 1.5
    for i in range(2000):
        scale = 10.0 ** rng.uniform(-6, 6)
        delta = rng.standard_normal(rng.integers(1, 20)) * scale
        clipped, unclipped = clip_update(delta, clip_norm)
        norm = np.linalg.norm(delta)
        assert np.linalg.norm(clipped) <= clip_norm * (1 + 1e-12), i
        assert unclipped == (norm <= clip_norm)
        if unclipped:
            np.testing.assert_array_equal(clipped, delta)
        else:  # direction is kept, only the length changes
            np.testing.assert_allclose(clipped / np.linalg.norm(clipped), delta / norm)
            assert np.linalg.norm(clipped) == pytest.approx(clip_norm, rel=1e-12)


def test_zero_update_is_unclipped_and_stays_zero():
    clipped, unclipped = clip_update(np.zeros(4), 0.1)
    assert unclipped
    np.testing.assert_array_equal(clipped, np.zeros(4))


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_clipping_rejects_bad_clip_norm(bad):
    with pytest.raises(ValueError, match="clip_norm"):
        clip_update(np.ones(2), bad)


def test_clipping_rejects_non_finite_update():
    with pytest.raises(ValueError, match="non-finite"):
        clip_update(np.array([1.0, np.nan]), 1.0)


# --- noise ----------------------------------------------------------------------------------


@pytest.mark.parametrize("expected_clients", [1.0, 7.5])
def test_noise_std_is_z_times_c_over_expected_clients(expected_clients):
    z, clip_norm, n = 1.3, 0.7, 50_000
    out = noised_mean_update(np.zeros(n), clip_norm, z, expected_clients, np.random.default_rng(1))
    sigma = z * clip_norm / expected_clients
    # (n - 1) s^2 / sigma^2 ~ chi2(n - 1) for Gaussian noise: a two-sided test at 0.1%.
    statistic = (n - 1) * out.var(ddof=1) / sigma**2
    p = 2 * min(stats.chi2.cdf(statistic, n - 1), stats.chi2.sf(statistic, n - 1))
    assert p > 1e-3, (out.std(ddof=1), sigma)
    assert abs(out.mean()) < 4 * sigma / math.sqrt(n)
    # The test has power: a 2% error in the scale would fail it.
    wrong = (n - 1) * out.var(ddof=1) / (1.02 * sigma) ** 2
    assert stats.chi2.cdf(wrong, n - 1) < 1e-3


def test_noise_is_added_to_the_sum_then_divided():
    total = np.array([3.0, -6.0])
    out = noised_mean_update(total, 1.0, 0.0, 3.0, np.random.default_rng(0))
    np.testing.assert_array_equal(out, [1.0, -2.0])


# --- DPFedAvg -------------------------------------------------------------------------------


def test_dpfedavg_without_noise_or_clipping_is_fedavg_of_deltas_with_fixed_denominator():
    rng = np.random.default_rng(2)
    global_vec = rng.standard_normal(4)
    params = [global_vec + rng.standard_normal(4) for _ in range(5)]
    strategy = _dp(0.0, 1e9, 8.0)
    new, state = strategy.aggregate(
        ModelParams.from_vector(global_vec),
        [_update(i, p) for i, p in enumerate(params)],
        strategy.init_state(),
    )
    expected = global_vec + sum(p - global_vec for p in params) / 8.0  # 8, not 5 clients
    np.testing.assert_allclose(new.to_vector(), expected, rtol=1e-12)
    assert state.clip_norm == 1e9 and state.unclipped_fraction is None


def test_dpfedavg_clips_each_update_before_summing():
    global_vec = np.zeros(3)
    big = np.array([30.0, 40.0, 0.0])  # norm 50, clipped to norm 1
    strategy = _dp(0.0, 1.0, 1.0)
    new, _ = strategy.aggregate(
        ModelParams.from_vector(global_vec), [_update(0, big)], strategy.init_state()
    )
    np.testing.assert_allclose(new.to_vector(), [0.6, 0.8, 0.0])


def test_dpfedavg_noise_is_fresh_every_round_and_present_in_empty_rounds():
    global_params = ModelParams.zeros(2)
    strategy = _dp(1.0, 1.0, 4.0, seed=5)
    a, state = strategy.aggregate(global_params, [], strategy.init_state())
    b, _ = strategy.aggregate(global_params, [], state)
    assert not np.array_equal(a.to_vector(), b.to_vector())
    assert np.all(a.to_vector() != 0)  # an empty Poisson sample still releases noise
    # What was added is exactly N(0, (zC)^2) / (qN) drawn from the injected generator.
    expected = np.random.default_rng(5).normal(0.0, 1.0, size=3) / 4.0  # 2 coef + intercept
    np.testing.assert_array_equal(a.to_vector(), expected)


def test_the_default_noise_source_is_secret_and_never_repeats():
    from fedtune.fl.config import load_config
    from fedtune.fl.privacy.plan import plan_privacy
    from fedtune.fl.strategies import make_strategy

    config = load_config(None, ["privacy.noise_multiplier=1.0", "experiment.seed=3"])
    plan = plan_privacy(config, 10)
    draws = [
        make_strategy(config, plan).aggregate(
            ModelParams.zeros(2), [], make_strategy(config, plan).init_state()
        )[0]
        for _ in range(2)
    ]
    # Same config, same seed: a replay of the seed must not give the same noise.
    assert not np.array_equal(draws[0].to_vector(), draws[1].to_vector())


def test_aggregate_and_aggregate_sum_agree():
    rng = np.random.default_rng(3)
    global_params = ModelParams.from_vector(rng.standard_normal(3))
    updates = [_update(i, rng.standard_normal(3) * 2) for i in range(6)]
    strategy = _dp(1.1, 1.0, 6.0, seed=9, adaptive_clipping=True, unclipped_count_stddev=2.0)
    state = DPState(clip_norm=1.3)
    twin = _dp(1.1, 1.0, 6.0, seed=9, adaptive_clipping=True, unclipped_count_stddev=2.0)
    via_updates = strategy.aggregate(global_params, updates, state)
    total = sum_contributions(Contribution(weighted=False, clip_norm=1.3), global_params, updates)
    via_sum = twin.aggregate_sum(global_params, total, len(updates), state)
    np.testing.assert_array_equal(via_updates[0].to_vector(), via_sum[0].to_vector())
    assert via_updates[1] == via_sum[1]


def test_dpfedavg_validates_parameters_when_used():
    strategy = _dp(-1.0, 1.0, 5.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        strategy.aggregate(ModelParams.zeros(1), [], DPState(1.0))
    with pytest.raises(ValueError, match="contribution sum"):
        _dp(1.0, 1.0, 5.0).aggregate_sum(ModelParams.zeros(1), np.zeros(2), 0, DPState(1.0))


# --- adaptive clipping ----------------------------------------------------------------------


def test_adaptive_update_direction():
    # All updates fit (b = 1 > 0.5): C is too large and must shrink; none fit: it must grow.
    assert adapt_clip_norm(1.0, 1.0, 0.5, 0.2) == pytest.approx(math.exp(-0.1))
    assert adapt_clip_norm(1.0, 0.0, 0.5, 0.2) == pytest.approx(math.exp(0.1))
    assert adapt_clip_norm(1.0, 0.5, 0.5, 0.2) == 1.0


@pytest.mark.parametrize("start", [0.01, 100.0])
def test_adaptive_clip_norm_moves_towards_the_target_quantile_from_both_sides(start):
    rng = np.random.default_rng(4)
    num_clients = 200
    # Update norms uniform on [1, 3]: the median, the default target, is 2.
    norms = rng.uniform(1.0, 3.0, num_clients)
    directions = rng.standard_normal((num_clients, 3))
    deltas = directions / np.linalg.norm(directions, axis=1, keepdims=True) * norms[:, None]
    global_params = ModelParams.zeros(2)
    updates = [_update(i, d) for i, d in enumerate(deltas)]
    strategy = _dp(1.0, start, float(num_clients), seed=1, adaptive_clipping=True)
    state = strategy.init_state()
    history, fractions = [start], []
    for _ in range(80):
        _, state = strategy.aggregate(global_params, updates, state)
        history.append(state.clip_norm)
        fractions.append(state.unclipped_fraction)
    moves = np.diff(history[:20])
    if start < 2.0:
        assert np.all(moves > 0), "C far below every update norm must grow"
    else:
        assert np.all(moves < 0), "C far above every update norm must shrink"
    assert 1.7 < np.mean(history[-20:]) < 2.3
    assert fractions[0] == pytest.approx(1.0 if start > 2.0 else 0.0, abs=0.2)
    assert abs(np.mean(fractions[-20:]) - 0.5) < 0.1


def test_adaptive_noise_split_costs_the_same_as_one_gaussian():
    z, sigma_b = 1.2, 5.0
    z_delta = sum_noise_multiplier(z, sigma_b)
    assert z_delta > z
    # The count query has sensitivity 1/2, so its multiplier is 2 sigma_b. Composing both
    # Gaussians must cost exactly as much as one with multiplier z, at every RDP order.
    split = dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(z_delta), dp_accounting.GaussianDpEvent(2 * sigma_b)]
    )
    for delta in (1e-5, 1e-8):
        eps_split = rdp.RdpAccountant().compose(split).get_epsilon(delta)
        eps_single = (
            rdp.RdpAccountant().compose(dp_accounting.GaussianDpEvent(z)).get_epsilon(delta)
        )
        assert eps_split == pytest.approx(eps_single, rel=1e-9)


def test_adaptive_noise_split_needs_room():
    with pytest.raises(ValueError, match="2 \\* unclipped_count_stddev"):
        sum_noise_multiplier(1.0, 0.5)
    strategy = _dp(1.0, 1.0, 10.0, adaptive_clipping=True)  # sigma_b 0.5
    with pytest.raises(ValueError, match="noise_multiplier"):
        strategy.aggregate(ModelParams.zeros(1), [], strategy.init_state())


def test_adaptive_clipping_applies_z_delta_to_the_sum():
    strategy = _dp(1.2, 0.5, 1.0, adaptive_clipping=True, unclipped_count_stddev=5.0)
    dim = 40_000
    new, _ = strategy.aggregate_sum(
        ModelParams.zeros(dim - 1), np.zeros(dim + 2), 0, strategy.init_state()
    )
    sigma = sum_noise_multiplier(1.2, 5.0) * 0.5
    statistic = (dim - 1) * new.to_vector().var(ddof=1) / sigma**2
    p = 2 * min(stats.chi2.cdf(statistic, dim - 1), stats.chi2.sf(statistic, dim - 1))
    assert p > 1e-3


# --- Poisson sampling -----------------------------------------------------------------------


def test_poisson_sampling_rate_and_independence():
    num_clients, q, rounds = 1000, 0.05, 40
    rng = np.random.default_rng(7)  # an injected generator; runs use the OS's CSPRNG
    counts = [len(poisson_sample(num_clients, q, rng)) for _ in range(rounds)]
    trials = num_clients * rounds
    # The total is Binomial(trials, q): within 4 standard deviations of its mean.
    assert abs(sum(counts) - trials * q) < 4 * math.sqrt(trials * q * (1 - q))
    assert np.std(counts) > 0  # the size varies, unlike fixed-size sampling
    # Every client is sampled at about rate q (no client is favoured).
    hits = np.zeros(50)
    for _ in range(400):
        hits[poisson_sample(50, 0.2, rng)] += 1
    assert np.all(np.abs(hits / 400 - 0.2) < 4 * math.sqrt(0.2 * 0.8 / 400))


def test_poisson_sampling_rejects_bad_rate():
    with pytest.raises(ValueError, match="sampling_rate"):
        poisson_sample(10, 0.0, np.random.default_rng(0))


# --- accounting -----------------------------------------------------------------------------


def _independent_epsilons(
    q: float, z: float, rounds: int, delta: float, round_by_round: bool = True
) -> tuple[float, float]:
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    by_rdp = rdp.RdpAccountant()
    if round_by_round:  # not self-composed as the module does
        for _ in range(rounds):
            by_rdp.compose(event)
    else:
        by_rdp.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    by_pld = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    by_pld.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return by_rdp.get_epsilon(delta), by_pld.get_epsilon(delta)


def test_accountant_reports_the_smaller_bound_after_every_round():
    q, z, delta = 0.2, 1.5, 1e-5
    accountant = Accountant(noise_multiplier=z, sampling_rate=q, delta=delta)
    assert accountant.spent().epsilon == 0.0
    previous = 0.0
    for rounds in range(1, 4):
        spent = accountant.step()
        by_rdp, by_pld = _independent_epsilons(q, z, rounds, delta)
        assert spent.rounds == rounds
        assert spent.rdp_epsilon == pytest.approx(by_rdp, abs=1e-6)
        assert spent.pld_epsilon == pytest.approx(by_pld, abs=1e-6)
        assert spent.epsilon == pytest.approx(min(by_rdp, by_pld), abs=1e-6)
        assert spent.method == ("pld" if by_pld <= by_rdp else "rdp")
        assert spent.epsilon > previous
        previous = spent.epsilon


def test_accountant_without_noise_spends_everything():
    assert Accountant(0.0, 0.5, 1e-5).step().epsilon == math.inf


def test_accountant_checkpoint_round_trip_and_budget_check():
    accountant = Accountant(2.0, 0.1, 1e-5)
    accountant.step(3)
    restored = Accountant.from_dict(accountant.to_dict())
    assert restored.to_dict() == {
        "noise_multiplier": 2.0,
        "sampling_rate": 0.1,
        "delta": 1e-5,
        "statistics_noise": None,
        "rounds": 3,
    }
    assert restored.spent() == accountant.spent()
    next_epsilon = accountant.spent(4).epsilon
    assert accountant.would_exceed(next_epsilon * 0.999)
    assert not accountant.would_exceed(next_epsilon * 1.001)
    assert accountant.rounds_ == 3  # asking does not spend


@pytest.mark.parametrize("bad", [{"delta": 0.0}, {"sampling_rate": 1.5}, {"noise_multiplier": -1}])
def test_accountant_validates(bad):
    args = {"noise_multiplier": 1.0, "sampling_rate": 0.1, "delta": 1e-5} | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        Accountant(**args)


@pytest.mark.parametrize(
    ("target", "q", "rounds", "tighter"),
    [(2.0, 0.5, 5, "pld"), (0.015, 0.01, 100, "rdp")],  # at tiny epsilon RDP is the tighter
)
def test_calibrated_noise_multiplier_just_meets_the_target(target, q, rounds, tighter):
    delta = 1e-5
    z = calibrate_noise_multiplier(target, delta, q, rounds)
    by_rdp, by_pld = _independent_epsilons(q, z, rounds, delta, round_by_round=False)
    assert min(by_rdp, by_pld) <= target
    assert min(by_rdp, by_pld) > target * 0.99
    assert ("pld" if by_pld <= by_rdp else "rdp") == tighter
    # Close to the least noise that meets the target: 1% less noise overspends.
    assert min(_independent_epsilons(q, z * 0.99, rounds, delta, round_by_round=False)) > target
