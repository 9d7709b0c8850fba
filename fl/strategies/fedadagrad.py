"""FedAdagrad: Reddi et al., 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2.
The second moment sums the squared pseudo-gradients, ``v_t = v_{t-1} + delta_t^2``; the first
moment keeps ``beta1`` momentum (``beta2`` is unused). See :mod:`fl.strategies.adaptive`."""

from __future__ import annotations

import numpy as np
from fedtune.fl.strategies.adaptive import AdaptiveOptimizer


class FedAdagrad(AdaptiveOptimizer):
    """Adagrad on the server (parameters: :class:`~fl.strategies.adaptive.AdaptiveOptimizer`)."""

    name = "fedadagrad"

    def second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        return v + squared
