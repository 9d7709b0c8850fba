"""Federated feature statistics: each client reports count, sum and sum of squares per column;
the server forms the global mean and standard deviation. No client sends rows.

Sums of squares are taken around a shift (the first chunk's column means) to avoid the
catastrophic cancellation of ``E[x^2] - E[x]^2`` on features with large offsets; the server
recombines the shifted moments exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from fedtune.fl.params import FeatureStats


@dataclass(frozen=True)
class Moments:
    """Per-column count, sum and centred sum of squares of ``[X | y]`` on one client."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def of(cls, chunks: Iterable[tuple[np.ndarray, np.ndarray]]) -> Moments:
        """Moments of a stream of ``(X, y)`` chunks (Chan et al. parallel update)."""
        total: Moments | None = None
        for X, y in chunks:
            Z = np.column_stack([X, y])
            if Z.shape[0] == 0:
                continue
            mean = Z.mean(axis=0)
            part = Moments(Z.shape[0], mean, ((Z - mean) ** 2).sum(axis=0))
            total = part if total is None else total.merge(part)
        if total is None:
            raise ValueError("no rows")
        return total

    def merge(self, other: Moments) -> Moments:
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return Moments(n, mean, m2)

    def sums(self) -> tuple[int, np.ndarray, np.ndarray]:
        """Count, sum and sum of squares: what a client reports."""
        s = self.mean * self.count
        return self.count, s, self.m2 + self.mean**2 * self.count


@dataclass(frozen=True)
class StatsReport:
    """What a client sends for the feature statistics: column names and moments."""

    client_id: str
    feature_names: list[str]
    moments: Moments


def combine_reports(reports: list[StatsReport]) -> tuple[list[str], FeatureStats]:
    """Check that all clients share one feature space, then combine their moments."""
    if not reports:
        raise ValueError("no client reported statistics")
    first = reports[0]
    for r in reports[1:]:
        if r.feature_names != first.feature_names:
            raise ValueError(
                f"client {r.client_id!r}: features {r.feature_names} differ from "
                f"{first.feature_names} (client {first.client_id!r})"
            )
    return list(first.feature_names), combine(r.moments for r in reports)


def consistent_reports(
    reports: list[StatsReport],
) -> tuple[list[StatsReport], list[tuple[str, str]]]:
    """Keep the clients whose feature columns are those most clients have; the others are
    returned as ``(client_id, reason)`` so they can be excluded and reported."""
    if not reports:
        return [], []
    counts: dict[tuple[str, ...], int] = {}
    for r in reports:
        counts[tuple(r.feature_names)] = counts.get(tuple(r.feature_names), 0) + 1
    majority = max(counts, key=counts.get)  # ties: the first seen
    kept = [r for r in reports if tuple(r.feature_names) == majority]
    rejected = [
        (r.client_id, f"features {r.feature_names} differ from the others' {list(majority)}")
        for r in reports
        if tuple(r.feature_names) != majority
    ]
    return kept, rejected


def combine(moments: Iterable[Moments]) -> FeatureStats:
    """Global statistics from the clients' moments (population std; 1 where a column is
    constant, as ``StandardScaler`` does)."""
    total: Moments | None = None
    for m in moments:
        total = m if total is None else total.merge(m)
    if total is None:
        raise ValueError("no client reported statistics")
    std = np.sqrt(total.m2 / total.count)
    std = np.where(std > 1e-12 * np.maximum(1.0, np.abs(total.mean)), std, 1.0)
    return FeatureStats(
        count=int(total.count),
        mean=total.mean[:-1].copy(),
        scale=std[:-1].copy(),
        target_mean=float(total.mean[-1]),
        target_scale=float(std[-1]),
    )
