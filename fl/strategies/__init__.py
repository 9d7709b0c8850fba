"""Aggregation strategies: pure functions of the global model, the clients' updates and the
strategy's own state. One strategy per module, each citing its paper."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from fl.config import FLConfig
from fl.params import ClientUpdate, ModelParams
from fl.strategies.fedavg import FedAvg

if TYPE_CHECKING:
    from fl.privacy import PrivacyPlan

StrategyState = dict[str, Any]


class Strategy(Protocol):
    def aggregate(
        self, global_params: ModelParams, updates: list[ClientUpdate], state: StrategyState
    ) -> tuple[ModelParams, StrategyState]:
        """The next global model, and the state to pass to the next round."""
        ...


def make_strategy(config: FLConfig, plan: PrivacyPlan | None = None) -> Strategy:
    """The strategy named by ``server.strategy``, wrapped in DP-FedAvg when ``plan`` (from
    :func:`fl.privacy.plan_privacy`) asks for DP or secure aggregation."""
    if plan is not None:
        from fl.privacy import make_dp_strategy

        return make_dp_strategy(config, plan)
    if config.server.strategy == "fedavg":
        return FedAvg(weighting=config.server.weighting)
    raise ValueError(f"server.strategy: unknown strategy {config.server.strategy!r}")


__all__ = ["FedAvg", "Strategy", "StrategyState", "make_strategy"]
