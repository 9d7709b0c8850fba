"""Aggregation strategies: pure functions of the global model, the clients' updates and the
strategy's own state. One strategy per module, each citing its paper."""

from __future__ import annotations

from typing import Any, Protocol

from fl.config import ServerConfig
from fl.params import ClientUpdate, ModelParams
from fl.strategies.fedavg import FedAvg

StrategyState = dict[str, Any]


class Strategy(Protocol):
    def aggregate(
        self, global_params: ModelParams, updates: list[ClientUpdate], state: StrategyState
    ) -> tuple[ModelParams, StrategyState]:
        """The next global model, and the state to pass to the next round."""
        ...


def make_strategy(cfg: ServerConfig) -> Strategy:
    """The strategy named by ``server.strategy``."""
    if cfg.strategy == "fedavg":
        return FedAvg(weighting=cfg.weighting)
    raise ValueError(f"server.strategy: unknown strategy {cfg.strategy!r}")


__all__ = ["FedAvg", "Strategy", "StrategyState", "make_strategy"]
