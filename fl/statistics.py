"""Federated feature statistics: each client reports count, sum and sum of squares per column;
the server forms the global mean and standard deviation. No client sends rows.

Sums of squares are taken around a shift (the first chunk's column means) to avoid the
catastrophic cancellation of ``E[x^2] - E[x]^2`` on features with large offsets; the server
recombines the shifted moments exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

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
    kept, rejected = consistent_schemas([(r.client_id, r.feature_names) for r in reports])
    return [r for r in reports if r.client_id in kept], rejected


def consistent_schemas(
    schemas: list[tuple[str, list[str]]],
) -> tuple[set[str], list[tuple[str, str]]]:
    """Of ``(client_id, feature names)``, the ids of the clients whose feature columns are those
    most clients have (ties: the first seen), and ``(client_id, reason)`` for the others."""
    if not schemas:
        return set(), []
    counts: dict[tuple[str, ...], int] = {}
    for _, names in schemas:
        counts[tuple(names)] = counts.get(tuple(names), 0) + 1
    majority = max(counts, key=counts.get)  # ties: the first seen
    kept = {cid for cid, names in schemas if tuple(names) == majority}
    rejected = [
        (cid, f"features {names} differ from the others' {list(majority)}")
        for cid, names in schemas
        if tuple(names) != majority
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
    return _feature_stats(int(total.count), total.mean, np.sqrt(total.m2 / total.count))


def _feature_stats(count: int, mean: np.ndarray, std: np.ndarray) -> FeatureStats:
    """The statistics of ``[X | y]`` from its pooled count, means and standard deviations (1
    where a column is constant, as ``StandardScaler`` does)."""
    std = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)
    return FeatureStats(
        count=count,
        mean=mean[:-1].copy(),
        scale=std[:-1].copy(),
        target_mean=float(mean[-1]),
        target_scale=float(std[-1]),
    )


# -- the same statistics from sums only (secure aggregation) ---------------------------------------
#
# Under secure aggregation the server sees the clients' moments only as one sum. Each client sends
# ``[n, n * mean_j, m2_j + n * mean_j^2]`` (its count, and per column its sum and its sum of
# squares, :func:`exact_sums`) as exact rationals of its own float64 moments, and the server
# sums them exactly (:class:`fl.secagg.primitives.ExactFixedPoint`). From the sums
# ``N, S_j, Q_j`` it forms the pooled mean ``S_j / N`` and centred sum of squares
# ``Q_j - S_j^2 / N`` in exact arithmetic: that is, identically, Chan et al.'s combination
# ``sum m2_i + sum n_i (mean_i - mean)^2`` of :func:`combine`, with no cancellation however
# large a column's offset, and rounded to float64 once, at the end.


def exact_sums(moments: Moments) -> list[Fraction]:
    """What one client adds to the secure sum of the statistics: ``[n, S_1..S_c, Q_1..Q_c]``,
    ``S_j = n * mean_j`` and ``Q_j = m2_j + n * mean_j^2``, exact functions of its float64
    moments (``c`` columns of ``[X | y]``)."""
    n = int(moments.count)
    means = [Fraction(float(m)) for m in moments.mean]
    m2 = [Fraction(float(q)) for q in moments.m2]
    squares = [q + n * m * m for q, m in zip(m2, means, strict=True)]
    return [Fraction(n), *(n * m for m in means), *squares]


def pooled_from_sums(total: Sequence[Fraction]) -> FeatureStats:
    """The pooled statistics (as :func:`combine` forms them) from the exact sum of the clients'
    :func:`exact_sums`."""
    columns = (len(total) - 1) // 2
    count, sums, squares = total[0], total[1 : columns + 1], total[columns + 1 :]
    if count.denominator != 1 or count < 1 or len(squares) != columns:
        raise ValueError(f"not a sum of clients' exact sums (count {count}, {len(total)} values)")
    mean = np.array([float(s / count) for s in sums])
    # Q - S^2 / N >= 0 exactly (Cauchy-Schwarz, with each client's m2 >= 0).
    var = [max(q - s * s / count, Fraction(0)) / count for s, q in zip(sums, squares, strict=True)]
    return _feature_stats(int(count), mean, np.sqrt(np.array([float(v) for v in var])))


@dataclass
class SummedStatistics:
    """What a secure statistics round gives the server: the clients' shared feature names
    (sent in the clear, to check that they share one feature space), the sum of their vectors
    (:func:`exact_sums`, or under DP their clipped ``[means | stds]``), the ids of the clients
    in that sum, and ``(client_id, reason)`` for every client set aside."""

    names: list[str]
    total: list[Fraction] | np.ndarray | None
    included: list[str]
    excluded: list[tuple[str, str]] = field(default_factory=list)
