"""FedAvg: McMahan et al., 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (AISTATS). The next global model is the example-weighted mean of the
clients' models."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from fl.params import ClientUpdate, ModelParams


def weighted_mean(vectors: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``sum_i w_i v_i / sum_i w_i``, written as a sum so that it also applies to sums formed
    under secure aggregation."""
    total = weights.sum()
    if not total > 0:
        raise ValueError("aggregation weights sum to zero")
    return (weights[:, None] * vectors).sum(axis=0) / total


class FedAvg:
    """Weighted averaging of client parameters.

    Parameters
    ----------
    weighting : "num_examples" weighs each client by its training examples (the paper's
        choice); "uniform" gives every client the same weight.
    """

    def __init__(self, weighting: Literal["num_examples", "uniform"] = "num_examples"):
        self.weighting = weighting

    def aggregate(
        self, global_params: ModelParams, updates: list[ClientUpdate], state: dict[str, Any]
    ) -> tuple[ModelParams, dict[str, Any]]:
        if not updates:
            raise ValueError("no client updates to aggregate")
        vectors = np.stack([u.params.to_vector() for u in updates])
        if self.weighting == "uniform":
            weights = np.ones(len(updates))
        else:
            weights = np.array([u.num_examples for u in updates], dtype=np.float64)
        return ModelParams.from_vector(weighted_mean(vectors, weights)), state
