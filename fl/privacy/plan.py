"""A run's privacy plan: the noise multiplier, the Poisson sampling rate and the fixed
denominator of DP-FedAvg, settled before round 1; the accountant that reports epsilon; the
guarantee as a summary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedtune.fl.privacy.accounting import Accountant, calibrate_noise_multiplier

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


def plan_privacy(config: FLConfig, num_clients: int) -> PrivacyPlan | None:
    """The DP plan of a run, or None without DP.

    The sampling rate is ``rounds.fraction``, else ``clients_per_round / N``, else 1; with
    ``target_epsilon`` (and no ``noise_multiplier``) z is calibrated for ``rounds.num_rounds``.
    """
    from fedtune.fl.rounds import clients_per_round

    p = config.privacy
    if not p.dp:
        return None
    if config.rounds.fraction is not None:
        q = config.rounds.fraction
    else:
        q = clients_per_round(config.rounds, num_clients) / num_clients
    z = p.noise_multiplier
    if z is None:
        z = calibrate_noise_multiplier(p.target_epsilon, p.delta, q, config.rounds.num_rounds)
    return PrivacyPlan(z, q, q * num_clients, p.delta)


def privacy_accountant(plan: PrivacyPlan | None) -> Accountant | None:
    """The accountant of a DP run (None without DP)."""
    if plan is None:
        return None
    return Accountant(plan.noise_multiplier, plan.sampling_rate, plan.delta)


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
        "secure_aggregation": secure_aggregation,
    }
