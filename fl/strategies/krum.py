"""Krum and Multi-Krum: Blanchard, El Mhamdi, Guerraoui and Stainer, 2017, "Machine Learning
with Adversaries: Byzantine Tolerant Gradient Descent" (NeurIPS). With at most f Byzantine
clients among n, each model is scored by the sum of its squared distances to its n - f - 2
nearest neighbours; Krum keeps the best-scored model, Multi-Krum averages the m = n - f best.
The scores are only meaningful when n > 2f + 2."""

from __future__ import annotations

import numpy as np
from fedtune.fl.config import ServerConfig
from fedtune.fl.strategies.robust import VectorStrategy


def krum_scores(vectors: np.ndarray, f: int) -> np.ndarray:
    """Each row's sum of squared distances to its ``n - f - 2`` nearest other rows."""
    n = vectors.shape[0]
    if n <= 2 * f + 2:
        raise ValueError(too_few_message(n, f))
    diff = vectors[:, None, :] - vectors[None, :, :]
    sq = np.sort(np.einsum("ijk,ijk->ij", diff, diff), axis=1)
    # Column 0 of a sorted row is a zero: the row's distance to itself (or to an equal row,
    # which leaves the same multiset of distances to the others).
    return sq[:, 1 : n - f - 1].sum(axis=1)


def too_few_message(n: int, f: int) -> str:
    return (
        f"{n} update(s): server.byzantine_clients is {f}, and Krum needs more than "
        f"2f + 2 = {2 * f + 2}"
    )


class Krum(VectorStrategy):
    """The client model with the lowest Krum score (ties: the first in the round's order).

    Parameters
    ----------
    byzantine_clients : f, the number of Byzantine clients to tolerate.
    """

    def __init__(self, byzantine_clients: int = 0):
        if byzantine_clients < 0:
            raise ValueError(f"server.byzantine_clients: must be >= 0 (got {byzantine_clients})")
        self.byzantine_clients = byzantine_clients

    @classmethod
    def from_config(cls, server: ServerConfig) -> Krum:
        return cls(server.byzantine_clients)

    def too_few(self, num_updates: int) -> str | None:
        """Why a round of ``num_updates`` cannot aggregate, or None (the engine fails such a
        round as it fails one below ``rounds.min_clients``)."""
        f = self.byzantine_clients
        return too_few_message(num_updates, f) if num_updates <= 2 * f + 2 else None

    def combine(self, vectors: np.ndarray) -> np.ndarray:
        return vectors[int(np.argmin(krum_scores(vectors, self.byzantine_clients)))]


class MultiKrum(Krum):
    """The mean of the ``n - f`` client models with the lowest Krum scores."""

    def combine(self, vectors: np.ndarray) -> np.ndarray:
        scores = krum_scores(vectors, self.byzantine_clients)
        best = np.argsort(scores, kind="stable")[: vectors.shape[0] - self.byzantine_clients]
        return vectors[best].mean(axis=0)
