"""What the robust strategies (:mod:`~fl.strategies.median`, :mod:`~fl.strategies.trimmed_mean`,
:mod:`~fl.strategies.krum`) share: they are order statistics of the clients' model vectors, so
they need every individual update (never a sum: no secure aggregation, no DP) and keep no state.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fedtune.fl.params import ClientUpdate, ModelParams
from fedtune.fl.strategies.aggregation import Stateless


class VectorStrategy(Stateless):
    """A stateless strategy whose next model is a function of the clients' model vectors alone.

    Subclasses write :meth:`combine`. ``server.weighting`` does not apply: an example count is
    the client's own claim, and a Byzantine client could inflate it.
    """

    sum_based = False

    def combine(self, vectors: np.ndarray) -> np.ndarray:
        """The next model vector from the ``(n, d)`` clients' model vectors."""
        raise NotImplementedError

    def aggregate(
        self, global_params: ModelParams, updates: list[ClientUpdate], state: Any
    ) -> tuple[ModelParams, Any]:
        if not updates:
            raise ValueError("no client updates to aggregate")
        vectors = np.stack([u.params.to_vector() for u in updates])
        return ModelParams.from_vector(self.combine(vectors)), state
