"""What every strategy is: the ``Strategy`` protocol, and the sum-based strategies that can
aggregate a sum formed in the clear or by secure aggregation.

A sum-based strategy sees a round only through the sum of the clients' *contributions*
(:class:`Contribution`): ``[w_i * delta_i..., w_i, b_i]``, with ``delta_i`` the client's update
(its trained model minus the global one), ``w_i`` its weight and ``b_i`` whether its update fitted
under the clip norm. From the sum it forms the mean update ``sum w_i delta_i / sum w_i`` and hands
it to its server step, so a server optimizer (FedAvgM, FedAdam, ...) only writes
:meth:`SumStrategy.server_step`, and DP (:class:`fl.privacy.dp_fedavg.DPFedAvg`) wraps any of
them by changing the contribution (clipped, equal weights) and the mean (noised, fixed
denominator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from fedtune.fl.config import ServerConfig
from fedtune.fl.params import ClientUpdate, ModelParams
from fedtune.fl.privacy.mechanisms import clip_update
from fedtune.fl.secagg.primitives import FRAC_BITS


@runtime_checkable
class Strategy(Protocol):
    """Turns a round's client updates into the next global model.

    ``state`` is the strategy's own typed state (``None`` for a stateless one), carried from
    round to round by the engine and checkpointed through :meth:`save_state` /
    :meth:`load_state`.
    """

    sum_based: bool
    """Whether :meth:`aggregate` depends on the updates only through their sum (then the
    strategy also has :meth:`SumStrategy.contribution` and :meth:`SumStrategy.aggregate_sum`,
    and runs under secure aggregation)."""

    @classmethod
    def from_config(cls, server: ServerConfig) -> Strategy:
        """The strategy as ``[server]`` configures it."""
        ...

    def init_state(self) -> Any: ...

    def too_few(self, num_updates: int) -> str | None:
        """Why a round of ``num_updates`` usable updates cannot be aggregated (Krum needs more
        than 2f + 2), or None."""
        ...

    def aggregate(
        self, global_params: ModelParams, updates: list[ClientUpdate], state: Any
    ) -> tuple[ModelParams, Any]:
        """The next global model, and the state to pass to the next round."""
        ...

    def save_state(self, state: Any) -> dict[str, Any]: ...

    def load_state(self, data: dict[str, Any]) -> Any: ...


@dataclass(frozen=True)
class Contribution:
    """What one client adds to a round's sum: ``[w * delta..., w, unclipped]``.

    Public (it is sent to the clients): no secrets, only how to weigh and clip.

    Parameters
    ----------
    weighted : weigh by the client's example count (``w = num_examples``), else ``w = 1``.
    clip_norm : clip ``delta`` to this L2 norm first (DP), else leave it as it is.
    """

    weighted: bool
    clip_norm: float | None = None

    def vector(self, global_params: ModelParams, update: ClientUpdate) -> np.ndarray:
        delta = update.params.to_vector() - global_params.to_vector()
        unclipped = True
        if self.clip_norm is not None:
            delta, unclipped = clip_update(delta, self.clip_norm)
        weight = float(update.num_examples) if self.weighted else 1.0
        return np.concatenate([weight * delta, [weight, 1.0 if unclipped else 0.0]])

    def bound(self, num_clients: int) -> float:
        """The largest absolute value any element of :meth:`vector` may take under secure
        aggregation: ``max(C, 1)`` for equal-weight clipped contributions, else the largest
        value ``num_clients`` summands can take in 64-bit fixed point without overflow
        (a client beyond it drops out of the round)."""
        if self.clip_norm is not None and not self.weighted:
            return max(self.clip_norm, 1.0)
        return math.ldexp(2.0**62 / max(1, num_clients), -FRAC_BITS)


def sum_contributions(
    contribution: Contribution, global_params: ModelParams, updates: list[ClientUpdate]
) -> np.ndarray:
    """The sum a secure-aggregation server would recover, formed in the clear."""
    total = np.zeros(global_params.num_features + 3)
    for update in updates:
        total += contribution.vector(global_params, update)
    return total


class Stateless:
    """The defaults of a strategy that keeps no state between rounds and can aggregate any
    non-empty round; a strategy with state or a floor of its own overrides them."""

    def init_state(self) -> Any:
        return None

    def too_few(self, num_updates: int) -> str | None:
        return None

    def save_state(self, state: Any) -> dict[str, Any]:
        return {}

    def load_state(self, data: dict[str, Any]) -> Any:
        return None


class SumStrategy(Stateless):
    """A strategy that needs only the sum of the clients' contributions.

    Subclasses write :meth:`server_step` (and, if they keep state, :meth:`init_state`,
    :meth:`save_state`, :meth:`load_state`). ``weighting`` is "num_examples" (weigh each client
    by its training examples, as FedAvg's paper does) or "uniform".
    """

    sum_based = True

    def __init__(self, weighting: str = "num_examples"):
        self.weighting = weighting

    @classmethod
    def from_config(cls, server: ServerConfig) -> SumStrategy:
        """The strategy as ``[server]`` configures it (subclasses with more parameters read
        their own keys)."""
        return cls(weighting=server.weighting or "num_examples")

    def contribution(self, state: Any) -> Contribution:
        return Contribution(weighted=self.weighting == "num_examples")

    def server_step(
        self, global_params: ModelParams, mean_delta: np.ndarray, state: Any
    ) -> tuple[ModelParams, Any]:
        """The next model from the round's mean update (a pseudo-gradient, negated)."""
        raise NotImplementedError

    def aggregate(
        self, global_params: ModelParams, updates: list[ClientUpdate], state: Any
    ) -> tuple[ModelParams, Any]:
        if not updates:
            raise ValueError("no client updates to aggregate")
        total = sum_contributions(self.contribution(state), global_params, updates)
        return self.aggregate_sum(global_params, total, len(updates), state)

    def aggregate_sum(
        self, global_params: ModelParams, total: np.ndarray, num_clients: int, state: Any
    ) -> tuple[ModelParams, Any]:
        """The next model from the sum of ``num_clients`` contributions."""
        total = check_sum(total, global_params)
        weight = float(total[-2])
        if not weight > 0:
            raise ValueError("aggregation weights sum to zero")
        return self.server_step(global_params, total[:-2] / weight, state)


def check_sum(total: np.ndarray, global_params: ModelParams) -> np.ndarray:
    """``total`` as float64, after checking it has the shape of a sum of contributions."""
    total = np.asarray(total, dtype=np.float64)
    size = global_params.num_features + 3
    if total.shape != (size,):
        raise ValueError(
            f"contribution sum: expected shape ({size},) = model vector, weight and unclipped "
            f"count, got {total.shape}"
        )
    return total
