"""FedAdam: Reddi et al., 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2.
``v_t = beta2 v_{t-1} + (1 - beta2) delta_t^2``, Adam's exponential average, without Adam's
bias correction. See :mod:`fl.strategies.adaptive`."""

from __future__ import annotations

import numpy as np
from fedtune.fl.strategies.adaptive import AdaptiveOptimizer


class FedAdam(AdaptiveOptimizer):
    """Adam on the server (parameters: :class:`~fl.strategies.adaptive.AdaptiveOptimizer`)."""

    name = "fedadam"

    def second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1.0 - self.beta2) * squared
