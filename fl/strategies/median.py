"""Coordinate-wise median: Yin, Chen, Ramchandran and Bartlett, 2018, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates" (ICML). Every coordinate of the next
model is the median of that coordinate over the clients' models, which a minority of arbitrary
updates cannot drag far."""

from __future__ import annotations

import numpy as np
from fedtune.fl.config import ServerConfig
from fedtune.fl.strategies.robust import VectorStrategy


class Median(VectorStrategy):
    """Coordinate-wise median of the clients' models (the mean of the two middle values when
    their number is even)."""

    @classmethod
    def from_config(cls, server: ServerConfig) -> Median:
        return cls()

    def combine(self, vectors: np.ndarray) -> np.ndarray:
        return np.median(vectors, axis=0)
