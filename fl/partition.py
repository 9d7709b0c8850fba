"""Seeded partitioners that split a pooled simulation dataset into client shards.

Each returns a list of row-index arrays, one per client; every row goes to exactly one client
and every client gets at least ``min_rows`` rows.
"""

from __future__ import annotations

import numpy as np


def iid(num_rows: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle, then split into ``num_clients`` shards of (nearly) equal size."""
    return [np.sort(s) for s in np.array_split(rng.permutation(num_rows), num_clients)]


def dirichlet(
    num_rows: int,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_rows: int = 2,
) -> list[np.ndarray]:
    """Quantity skew: shard sizes proportional to a ``Dirichlet(alpha)`` draw.

    Smaller ``alpha`` gives more unequal shards; each shard keeps at least ``min_rows``.
    """
    spare = num_rows - num_clients * min_rows
    if spare < 0:
        raise ValueError(
            f"data.num_clients: {num_clients} clients need at least {num_clients * min_rows} "
            f"rows, the data has {num_rows}"
        )
    proportions = rng.dirichlet(np.full(num_clients, alpha))
    sizes = rng.multinomial(spare, proportions) + min_rows
    bounds = np.cumsum(sizes)[:-1]
    return [np.sort(s) for s in np.split(rng.permutation(num_rows), bounds)]


def label_skew(
    y: np.ndarray, num_clients: int, strictness: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Target skew for regression: rows are ordered by a blend of their target rank and noise.

    ``strictness = 1`` gives each client a contiguous range of the sorted target;
    ``strictness = 0`` is IID.
    """
    n = y.shape[0]
    rank = np.empty(n)
    rank[np.argsort(y, kind="stable")] = np.arange(n) / max(n - 1, 1)
    key = strictness * rank + (1.0 - strictness) * rng.random(n)
    order = np.argsort(key, kind="stable")
    return [np.sort(s) for s in np.array_split(order, num_clients)]


def partition(
    y: np.ndarray,
    num_clients: int,
    method: str,
    rng: np.random.Generator,
    alpha: float = 0.5,
    strictness: float = 0.8,
) -> list[np.ndarray]:
    """Dispatch on the ``data.partition`` name."""
    if method == "iid":
        return iid(y.shape[0], num_clients, rng)
    if method == "dirichlet":
        return dirichlet(y.shape[0], num_clients, alpha, rng)
    if method == "label-skew":
        return label_skew(y, num_clients, strictness, rng)
    raise ValueError(f"data.partition: unknown partition {method!r}")
