"""FedAvgM: Hsu, Qi and Brown, 2019, "Measuring the Effects of Non-Identical Data Distribution
for Federated Visual Classification" (arXiv:1909.06335). The server keeps a momentum buffer of
the round's mean updates: ``v = beta * v + delta``, ``x = x + eta * v``. With ``beta = 0`` and
``eta = 1`` it is FedAvg exactly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from fedtune.fl.config import ServerConfig
from fedtune.fl.params import ModelParams
from fedtune.fl.strategies.aggregation import SumStrategy


@dataclass(frozen=True)
class MomentumState:
    """The server's momentum buffer ``v`` (``[coef..., intercept]``); None before round 1,
    where it stands for zeros."""

    velocity: np.ndarray | None = None


class FedAvgM(SumStrategy):
    """FedAvg with server momentum.

    Parameters
    ----------
    weighting : "num_examples" or "uniform", as for :class:`fl.strategies.fedavg.FedAvg`.
    learning_rate : eta, the server learning rate.
    momentum : beta, in [0, 1).
    """

    def __init__(
        self, weighting: str = "num_examples", learning_rate: float = 0.1, momentum: float = 0.9
    ):
        super().__init__(weighting)
        self.learning_rate = learning_rate
        self.momentum = momentum

    @classmethod
    def from_config(cls, server: ServerConfig) -> FedAvgM:
        # Default eta = 1 - beta: a steady update then moves the model as far as FedAvg's
        # (eta / (1 - beta) = 1), where eta = 1 would take ten times FedAvg's step and swing.
        lr = server.learning_rate
        return cls(
            weighting=server.weighting or "num_examples",
            learning_rate=1.0 - server.momentum if lr is None else lr,
            momentum=server.momentum,
        )

    def init_state(self) -> MomentumState:
        return MomentumState()

    def save_state(self, state: MomentumState) -> dict[str, Any]:
        # tolist() keeps every float64 exactly (JSON writes the shortest round-trip repr).
        v = state.velocity
        return {"velocity": None if v is None else v.tolist()}

    def load_state(self, data: dict[str, Any]) -> MomentumState:
        v = data.get("velocity")
        return MomentumState(None if v is None else np.asarray(v, dtype=np.float64))

    def server_step(
        self, global_params: ModelParams, mean_delta: np.ndarray, state: MomentumState
    ) -> tuple[ModelParams, MomentumState]:
        delta = np.asarray(mean_delta, dtype=np.float64)
        previous = np.zeros_like(delta) if state.velocity is None else state.velocity
        if previous.shape != delta.shape:
            raise ValueError(
                f"fedavgm state: momentum of shape {previous.shape}, update of {delta.shape}"
            )
        velocity = self.momentum * previous + delta
        params = global_params.to_vector() + self.learning_rate * velocity
        return ModelParams.from_vector(params), MomentumState(velocity)
