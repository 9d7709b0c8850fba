"""Aggregation strategies: pure functions of the global model, the clients' updates (or their
sum) and the strategy's own state. One strategy per module, each citing its paper; privacy wraps
a strategy (:mod:`fl.privacy.dp_fedavg`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from fedtune.fl.config import FLConfig
from fedtune.fl.strategies.aggregation import Contribution, Strategy, SumStrategy
from fedtune.fl.strategies.fedadagrad import FedAdagrad
from fedtune.fl.strategies.fedadam import FedAdam
from fedtune.fl.strategies.fedavg import FedAvg
from fedtune.fl.strategies.fedavgm import FedAvgM
from fedtune.fl.strategies.fedyogi import FedYogi
from fedtune.fl.strategies.krum import Krum, MultiKrum
from fedtune.fl.strategies.median import Median
from fedtune.fl.strategies.trimmed_mean import TrimmedMean

if TYPE_CHECKING:
    from fedtune.fl.privacy.plan import PrivacyPlan

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "median": Median,
    "trimmed-mean": TrimmedMean,
    "krum": Krum,
    "multi-krum": MultiKrum,
}
"""``server.strategy`` names and their classes."""

SUM_STRATEGIES = frozenset(name for name, cls in STRATEGIES.items() if cls.sum_based)
"""Strategies that need only the sum of client contributions, so run under secure aggregation
and inside the DP wrapper."""


def check_strategy(config: FLConfig) -> None:
    """Raise ``ValueError`` (one line, naming the key) unless ``server.strategy`` can run in
    the configured privacy mode."""
    name = config.server.strategy
    if name not in STRATEGIES:
        raise ValueError(f"server.strategy: unknown strategy {name!r}")
    secure, dp = config.privacy.secure_aggregation, config.privacy.dp
    if (secure or dp) and name not in SUM_STRATEGIES:
        key = "privacy.secure_aggregation" if secure else "privacy.noise_multiplier"
        if not secure and config.privacy.noise_multiplier is None:
            key = "privacy.target_epsilon"  # the key that turned DP on
        raise ValueError(
            f"server.strategy: {name!r} needs every individual update, which {key} hides or "
            f"noises; use a sum-based strategy ({', '.join(sorted(SUM_STRATEGIES))})"
        )
    if dp and config.server.weighting == "num_examples":
        raise ValueError(
            "server.weighting: DP-FedAvg weighs every client the same (an example count is "
            'private and unbounded); set it to "uniform" or leave it unset'
        )


def make_strategy(
    config: FLConfig, plan: PrivacyPlan | None = None, rng: np.random.Generator | None = None
) -> Strategy:
    """The strategy ``server.strategy`` names, wrapped in DP-FedAvg when ``plan`` (from
    :func:`fl.privacy.plan.plan_privacy`) is a DP plan. ``rng`` is the DP noise source: a
    secret one (:func:`fl.privacy.mechanisms.secret_rng`) unless a test injects its own."""
    check_strategy(config)
    if plan is None:
        return STRATEGIES[config.server.strategy].from_config(config.server)
    # Under DP the wrapper weighs every client the same; the inner strategy says so too.
    uniform = config.server.model_copy(update={"weighting": "uniform"})
    inner = STRATEGIES[config.server.strategy].from_config(uniform)
    from fedtune.fl.privacy.dp_fedavg import DPFedAvg
    from fedtune.fl.privacy.mechanisms import secret_rng

    p = config.privacy
    strategy = DPFedAvg(
        inner,
        noise_multiplier=plan.noise_multiplier,
        clipping_norm=p.clipping_norm,
        expected_clients=plan.expected_clients,
        rng=secret_rng() if rng is None else rng,
        adaptive_clipping=p.adaptive_clipping,
        target_unclipped_quantile=p.target_unclipped_quantile,
        clip_learning_rate=p.clip_learning_rate,
    )
    try:
        strategy.check_params()
    except ValueError as exc:
        raise ValueError(f"privacy.{exc}") from None
    return strategy


__all__ = [
    "Contribution",
    "FedAvg",
    "STRATEGIES",
    "SUM_STRATEGIES",
    "Strategy",
    "SumStrategy",
    "check_strategy",
    "make_strategy",
]
