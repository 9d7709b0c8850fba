"""FedYogi: Reddi et al., 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2, after
Yogi (Zaheer et al., 2018). ``v_t = v_{t-1} - (1 - beta2) delta_t^2 sign(v_{t-1} - delta_t^2)``:
``v`` moves towards ``delta_t^2`` by an additive step, so it grows or shrinks more slowly than
Adam's. See :mod:`fl.strategies.adaptive`."""

from __future__ import annotations

import numpy as np
from fedtune.fl.strategies.adaptive import AdaptiveOptimizer


class FedYogi(AdaptiveOptimizer):
    """Yogi on the server (parameters: :class:`~fl.strategies.adaptive.AdaptiveOptimizer`)."""

    name = "fedyogi"

    def second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        return v - (1.0 - self.beta2) * squared * np.sign(v - squared)
