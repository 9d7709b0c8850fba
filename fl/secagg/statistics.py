"""The feature statistics as a secure-aggregation round of their own: the server learns the sum
of the clients' moments over the round's survivors, and nothing about any one of them.

Before training, every client's feature moments go into the statistics the run releases with
every model (:mod:`fl.statistics`; under DP, :mod:`fl.privacy.statistics`). Under secure
aggregation they travel as one masked vector per client, in a round of the run's own protocol
(:mod:`fl.secagg.exchange`: keys once per run or fresh keys, the consistency round, signed keys,
dropouts), numbered :data:`STATISTICS_ROUND`, before every training round:

1. **Schema, in the clear.** Each client reads its training split, keeps its moments in its key
   store and sends its feature *names* only: the server needs them to check that the clients
   share one feature space (:func:`fl.statistics.consistent_schemas`). A client whose data is
   unusable answers with the reason instead, and is set aside with it.
2. **The masked round**, among the clients that share the majority's features. What a client
   masks (:func:`vector`), as :class:`StatisticsRequest` says:

   * under DP, its ``[column means | column standard deviations]`` of ``[X | y]``, clipped to
     ``C_s`` by the client itself (:func:`fl.privacy.statistics.clipped_vector`), encoded in
     fixed point with bound ``C_s``; the server adds the Gaussian noise to the recovered sum
     and divides by the registered N (:func:`fl.privacy.statistics.noised_statistics`): the
     same mechanism as in the clear, so the same ε;
   * without DP, its count, and per column ``S = n mean`` and ``Q = m2 + n mean^2``, exact
     rationals of its float64 moments (:func:`fl.statistics.exact_sums`), summed exactly
     (:class:`fl.secagg.primitives.ExactFixedPoint`: each value one 384-bit number, masked
     and summed as one, so only the sum is revealed): the server forms the pooled mean and
     standard deviation from the sums alone (:func:`fl.statistics.pooled_from_sums`), as
     exactly as from every client's moments in the clear, whatever the columns' magnitudes.

The round's number, 0, is below every training round's (they count from 1), so its masks, its
committee, its share-channel nonces and what each client signs or commits to are its own: with
keys once per run a client masks for a round only if it is later than the last one it masked
for, and the statistics round comes first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from fedtune.fl.privacy.statistics import clipped_vector
from fedtune.fl.secagg.primitives import Codec, ExactFixedPoint, FixedPoint, SecAggAbort, Segments
from fedtune.fl.statistics import StatsReport, exact_sums

STATISTICS_ROUND = 0
"""The protocol round of the feature statistics: training rounds count from 1."""


@dataclass(frozen=True)
class StatisticsRequest:
    """What the server sends every client of the statistics round.

    features : the feature names the round's clients share (the client checks its own).
    clip_norm : under DP, ``C_s``: each client sends its clipped ``[means | stds]``; None
        without DP: each client sends its exact count and sums.
    """

    features: tuple[str, ...]
    clip_norm: float | None = None

    @property
    def columns(self) -> int:
        """Columns of ``[X | y]``."""
        return len(self.features) + 1

    def codec(self) -> Codec:
        """How the round's vectors are encoded: ``2 c`` values within ``C_s`` under DP, else
        ``1 + 2 c`` exact values."""
        if self.clip_norm is None:
            return ExactFixedPoint(1 + 2 * self.columns)
        return Segments(((2 * self.columns, FixedPoint(self.clip_norm)),))


def vector(report: StatsReport, request: StatisticsRequest) -> list | np.ndarray:
    """What the client of ``report`` masks in the statistics round."""
    if request.clip_norm is None:
        return exact_sums(report.moments)
    return clipped_vector(report, request.clip_norm)


def checked_vector(
    report: StatsReport,
    request: StatisticsRequest,
    codec: Codec,
    clip_norm: float | None,
):
    """:func:`vector`, after the client's own checks. The encoding must be the one ``request``
    calls for: a server that picked a smaller bound would make the client's value overflow it,
    and learn from the failure. Under DP (``clip_norm``, ``C_s`` from the run's public
    parameters, never from the server) the request must ask for the vector clipped to
    ``C_s``: not for the exact count and sums, nor for another clip norm; without DP
    (``clip_norm`` None) for the exact count and sums, never for a clipped vector. A vector
    that does not fit (a value beyond the bound, or not finite) is refused with a reason that
    names no value: the reason reaches the server."""
    if tuple(report.feature_names) != request.features:
        raise SecAggAbort(
            f"client {report.client_id!r}: features {report.feature_names} are not the round's "
            f"{list(request.features)}"
        )
    if codec != request.codec():
        raise SecAggAbort(
            f"client {report.client_id!r}: the server's encoding is not the one its statistics "
            "request calls for"
        )
    if request.clip_norm != clip_norm:
        if clip_norm is None:
            raise SecAggAbort(
                f"client {report.client_id!r}: without DP its statistics are its exact count "
                "and sums, as the run's configuration says; the server's statistics request "
                "asks for clipped ones"
            )
        raise SecAggAbort(
            f"client {report.client_id!r}: under DP its statistics are its [means | stds] "
            f"clipped to the configured {clip_norm}; the server's request is another"
        )
    try:
        x = vector(report, request)
        codec.encode(x)
    except (ValueError, OverflowError):
        raise ValueError(
            f"client {report.client_id!r}: its feature statistics do not fit the secure sum (a "
            "value not finite or beyond the encoding's bound)"
        ) from None
    return x
