"""Adaptive server optimizers: Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar and McMahan,
2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2.

The round's mean update ``delta_t`` (weighted, or DP-noised) is a pseudo-gradient, negated. With
``m_{-1} = 0`` and ``v_{-1} = tau^2`` (the paper asks ``v_{-1} >= tau^2``)::

    m_t     = beta1 * m_{t-1} + (1 - beta1) * delta_t
    v_t     = second_moment(v_{t-1}, delta_t^2)          # Adagrad, Yogi or Adam
    x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau)

There is no bias correction, as in the paper; Flower's ``FedAdam`` divides by
``1 - beta^t`` and so takes different steps in the first rounds. Each optimizer
(:mod:`~fl.strategies.fedadagrad`, :mod:`~fl.strategies.fedyogi`,
:mod:`~fl.strategies.fedadam`) only writes its ``second_moment``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from fedtune.fl.config import ServerConfig
from fedtune.fl.params import ModelParams
from fedtune.fl.strategies.aggregation import SumStrategy


@dataclass(frozen=True)
class AdaptiveState:
    """The first and second moments ``m_{t-1}``, ``v_{t-1}`` (``[coef..., intercept]``); None
    before round 1, where they stand for ``0`` and ``tau^2``."""

    m: np.ndarray | None = None
    v: np.ndarray | None = None


def _to_list(a: np.ndarray | None) -> list[float] | None:
    # tolist() keeps every float64 exactly (JSON writes the shortest round-trip repr).
    return None if a is None else a.tolist()


def _from_list(a: list[float] | None) -> np.ndarray | None:
    return None if a is None else np.asarray(a, dtype=np.float64)


class AdaptiveOptimizer(SumStrategy):
    """Algorithm 2 of Reddi et al. (2021), up to the second-moment rule.

    Parameters
    ----------
    weighting : "num_examples" or "uniform", as for :class:`fl.strategies.fedavg.FedAvg`.
    learning_rate : eta, the server learning rate.
    beta1 : first-moment decay.
    beta2 : second-moment decay (unused by FedAdagrad).
    tau : adaptivity: the smallest denominator; ``v_{-1} = tau^2``.
    """

    default_learning_rate = 0.1
    name = "adaptive"

    def __init__(
        self,
        weighting: str = "num_examples",
        learning_rate: float = 0.1,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ):
        super().__init__(weighting)
        self.learning_rate = learning_rate
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau

    @classmethod
    def from_config(cls, server: ServerConfig) -> AdaptiveOptimizer:
        lr = server.learning_rate
        return cls(
            weighting=server.weighting or "num_examples",
            learning_rate=cls.default_learning_rate if lr is None else lr,
            beta1=server.beta1,
            beta2=server.beta2,
            tau=server.tau,
        )

    def second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        """``v_t`` from ``v_{t-1}`` and ``delta_t^2``."""
        raise NotImplementedError

    def init_state(self) -> AdaptiveState:
        return AdaptiveState()

    def save_state(self, state: AdaptiveState) -> dict[str, Any]:
        return {"m": _to_list(state.m), "v": _to_list(state.v)}

    def load_state(self, data: dict[str, Any]) -> AdaptiveState:
        return AdaptiveState(_from_list(data.get("m")), _from_list(data.get("v")))

    def server_step(
        self, global_params: ModelParams, mean_delta: np.ndarray, state: AdaptiveState
    ) -> tuple[ModelParams, AdaptiveState]:
        delta = np.asarray(mean_delta, dtype=np.float64)
        m = np.zeros_like(delta) if state.m is None else state.m
        v = np.full_like(delta, self.tau**2) if state.v is None else state.v
        if m.shape != delta.shape or v.shape != delta.shape:
            raise ValueError(
                f"{self.name} state: moments of shape {m.shape} and {v.shape}, "
                f"update of {delta.shape}"
            )
        m = self.beta1 * m + (1.0 - self.beta1) * delta
        v = self.second_moment(v, delta * delta)
        params = global_params.to_vector() + self.learning_rate * m / (np.sqrt(v) + self.tau)
        return ModelParams.from_vector(params), AdaptiveState(m, v)
