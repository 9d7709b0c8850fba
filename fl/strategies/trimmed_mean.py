"""Coordinate-wise trimmed mean: Yin, Chen, Ramchandran and Bartlett, 2018, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates" (ICML). In every coordinate the
largest and the smallest ``floor(beta * n)`` of the clients' values are dropped and the rest
averaged."""

from __future__ import annotations

import math

import numpy as np
from fedtune.fl.config import ServerConfig
from fedtune.fl.strategies.robust import VectorStrategy


class TrimmedMean(VectorStrategy):
    """Coordinate-wise beta-trimmed mean of the clients' models.

    Parameters
    ----------
    trim_fraction : beta, the fraction of values dropped at *each* end of every coordinate.
    """

    def __init__(self, trim_fraction: float = 0.1):
        if not 0 <= trim_fraction < 0.5:
            raise ValueError(f"server.trim_fraction: must be in [0, 0.5) (got {trim_fraction})")
        self.trim_fraction = trim_fraction

    @classmethod
    def from_config(cls, server: ServerConfig) -> TrimmedMean:
        return cls(server.trim_fraction)

    def combine(self, vectors: np.ndarray) -> np.ndarray:
        n = vectors.shape[0]
        k = math.floor(self.trim_fraction * n)
        if n - 2 * k < 1:  # cannot happen for beta < 0.5; kept as the guard the formula needs
            raise ValueError(
                f"server.trim_fraction: trimming {k} of {n} updates at each end leaves none"
            )
        return np.sort(vectors, axis=0)[k : n - k].mean(axis=0)
