"""A run's privacy plan: the noise multiplier, the Poisson sampling rate and the fixed
denominator of DP-FedAvg, settled before round 1; the accountant that reports epsilon; the
guarantee as a summary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedtune.fl.privacy.accounting import Accountant, calibrate_noise_multiplier, pld_epsilon

if TYPE_CHECKING:
    from fedtune.fl.config import FLConfig


@dataclass(frozen=True)
class PrivacyPlan:
    """How a DP run aggregates: the noise, the sampling, the denominator."""

    noise_multiplier: float
    """z, the total noise multiplier."""
    sampling_rate: float
    """q, the Poisson rate at which each client joins a round."""
    expected_clients: float
    """q * N, the fixed denominator."""
    delta: float
    statistics_noise: float | None = None
    """z_s of the DP feature statistics released before round 1 (None: none released)."""


def plan_privacy(config: FLConfig, num_clients: int) -> PrivacyPlan | None:
    """The DP plan of a run among ``num_clients`` *registered* clients (public, whatever their
    data), or None without DP.

    The sampling rate is ``rounds.fraction``, else ``clients_per_round / N``, else 1; with
    ``target_epsilon`` (and no ``noise_multiplier``) z is calibrated for ``rounds.num_rounds``,
    after the share of the DP feature statistics (:mod:`fl.privacy.statistics`).
    """
    from fedtune.fl.rounds import clients_per_round

    p = config.privacy
    if not p.dp:
        return None
    if config.rounds.fraction is not None:
        q = config.rounds.fraction
    else:
        q = clients_per_round(config.rounds, num_clients) / num_clients
    z_s = p.statistics_noise_multiplier
    z = p.noise_multiplier
    if z is None:
        statistics_alone = pld_epsilon(1.0, 1.0, 0, p.delta, statistics_noise=z_s)
        if statistics_alone >= p.target_epsilon:
            raise ValueError(
                f"privacy.target_epsilon: the feature statistics alone spend ε = "
                f"{statistics_alone:.3g} at privacy.statistics_noise_multiplier = {z_s}; raise "
                "one of them"
            )
        z = calibrate_noise_multiplier(
            p.target_epsilon, p.delta, q, config.rounds.num_rounds, statistics_noise=z_s
        )
    if p.secure_aggregation:
        check_abort_probability(config, num_clients, q)
    return PrivacyPlan(z, q, q * num_clients, p.delta, z_s)


def check_abort_probability(config: FLConfig, num_clients: int, q: float) -> None:
    """Under DP with secure aggregation a round aborts (noise only) when fewer than t0 clients
    are sampled, t0 being the threshold of the smallest cohort the clients accept
    (:func:`fl.secagg.identity.cohort_floor`). One client can then decide between an aborted
    round and a summed one, which the accountant's Poisson-sampled Gaussian does not cover;
    the chance of that, over all rounds, must stay below δ/10, else the config is refused."""
    import math

    from fedtune.fl.secagg.identity import cohort_floor
    from scipy.stats import binom

    p = config.privacy
    t0 = max(2, math.ceil(p.secagg_threshold * cohort_floor(config, num_clients)))
    chance = config.rounds.num_rounds * q * float(binom.cdf(t0 - 1, num_clients - 1, q))
    if chance > p.delta / 10:
        raise ValueError(
            f"privacy.secure_aggregation: with DP, a round of {num_clients} clients sampled at "
            f"q = {q:.3g} has fewer than the {t0} clients secure aggregation needs with "
            f"probability {chance:.2g} over the run, above δ/10; sample more clients a round "
            "(rounds.fraction) or lower privacy.secagg_threshold"
        )


def privacy_accountant(plan: PrivacyPlan | None) -> Accountant | None:
    """The accountant of a DP run (None without DP)."""
    if plan is None:
        return None
    return Accountant(
        plan.noise_multiplier,
        plan.sampling_rate,
        plan.delta,
        statistics_noise=plan.statistics_noise,
    )


def budget_exhausted(accountant: Accountant | None, target_epsilon: float | None) -> bool:
    """Whether the next round would take epsilon above ``target_epsilon``."""
    return (
        accountant is not None
        and target_epsilon is not None
        and accountant.would_exceed(target_epsilon)
    )


def privacy_summary(
    plan: PrivacyPlan | None, accountant: Accountant | None, secure_aggregation: bool
) -> dict[str, Any]:
    """The run's privacy guarantee, for summaries and model-version tags."""
    if plan is None:
        return {"dp_epsilon": None, "dp_delta": None, "secure_aggregation": secure_aggregation}
    spent = accountant.spent() if accountant is not None else None
    return {
        "dp_epsilon": None if spent is None else spent.epsilon,
        "dp_delta": None if spent is None else spent.delta,
        "dp_noise_multiplier": plan.noise_multiplier,
        "dp_sampling_rate": plan.sampling_rate,
        "dp_statistics_noise_multiplier": plan.statistics_noise,
        "secure_aggregation": secure_aggregation,
    }
