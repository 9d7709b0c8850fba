"""The rest of what a client sends in a secure round, inside the masked vector: its example
count, its training-loss sum and the evaluation sums of the model it received, so that the
server learns their sums over the survivors and no client's own.

After the strategy's contribution (:class:`fl.strategies.aggregation.Contribution`) each client
appends :data:`SIZE` values: ``n``, ``L``, and the evaluation sums ``n_test``, ``SSE``, ``SAE``,
``sum(y - m)``, ``sum((y - m)^2)``, where ``L`` is the training loss times ``n`` (the sum of
squared training residuals).

**Fixed point needs a bound, and losses have none.** The values are therefore put on the scale
of the target's pooled statistics ``m`` and ``s`` (public: every client is sent them, and they
are in the released model): residuals and labels in units of ``s``, labels centred on ``m``.
A sum over a client's rows is then about its row count, whatever the data's units. The
segment's codec (:func:`codec`) has the default resolution 2^-24 and the largest bound the
round's ``n`` clients can sum without overflow, ``2^38 / n`` (2.7e9 for 100 clients); a client
whose value exceeds it (a model that diverged, ``|residual| > 5000 s`` on 100 rows) sends the
bound instead, so the round's loss and scores are then too low, never its model. A non-finite
value drops the client out, as a non-finite update does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from fedtune.fl.evaluation import EvalSums
from fedtune.fl.params import ClientUpdate, FeatureStats
from fedtune.fl.secagg.primitives import FRAC_BITS, MOD_BITS, FixedPoint, Segments
from fedtune.fl.strategies.aggregation import Contribution

SIZE = 7
"""Values appended to the contribution: count, loss sum and five evaluation sums."""


def codec(num_clients: int) -> FixedPoint:
    """The scalars' segment for a round of ``num_clients``: resolution 2^-24, and the largest
    bound their sum allows."""
    return FixedPoint(math.ldexp(2.0 ** (MOD_BITS - 2) / max(1, num_clients), -FRAC_BITS))


def round_codec(contribution: Contribution, size: int, num_clients: int) -> Segments:
    """A secure round's codec: the ``size`` values of the contribution in its own bound
    (:meth:`Contribution.bound`), then the scalars in theirs (:func:`codec`)."""
    return Segments(
        ((size, FixedPoint(contribution.bound(num_clients))), (SIZE, codec(num_clients)))
    )


def with_scalars(
    contribution: np.ndarray, update: ClientUpdate, stats: FeatureStats, codec: Segments
) -> np.ndarray:
    """What a client masks: its ``contribution`` vector, then its scalars, clipped to the
    bound of the last segment of ``codec``."""
    return np.concatenate([contribution, vector(update, stats, codec.parts[-1][1].bound)])


def _scale(stats: FeatureStats) -> tuple[float, float]:
    s, m = float(stats.target_scale), float(stats.target_mean)
    return (s if math.isfinite(s) and s > 0 else 1.0), (m if math.isfinite(m) else 0.0)


def vector(update: ClientUpdate, stats: FeatureStats, bound: float) -> np.ndarray:
    """The :data:`SIZE` values of ``update``, on the target's scale, clipped to ``bound``."""
    s, m = _scale(stats)
    e = update.evaluation or EvalSums()
    n = update.num_examples
    values = np.array(
        [
            n,
            update.metrics["train_loss"] * n / s**2,
            e.n,
            e.sse / s**2,
            e.sae / s,
            (e.sum_y - e.n * m) / s,
            (e.sum_y2 - 2 * m * e.sum_y + e.n * m * m) / s**2,
        ],
        dtype=np.float64,
    )
    return np.minimum(np.maximum(values, -bound), bound)  # NaN stays NaN: the encoder refuses it


@dataclass(frozen=True)
class RoundScalars:
    """The survivors' scalars, from the sum of their :func:`vector`."""

    num_examples: int
    train_loss: float
    """Example-weighted mean training loss, raw units (as :func:`fl.evaluation.train_loss`)."""
    evaluation: EvalSums

    @classmethod
    def from_sum(cls, total: np.ndarray, stats: FeatureStats) -> RoundScalars:
        s, m = _scale(stats)
        n, loss, n_test, sse, sae, centred, centred2 = (float(v) for v in total)
        count, count_test = round(n), round(n_test)  # sums of integers: exact in fixed point
        sum_y = s * centred + count_test * m
        return cls(
            num_examples=count,
            train_loss=loss * s**2 / count if count > 0 else float("nan"),
            evaluation=EvalSums(
                n=count_test,
                sse=sse * s**2,
                sae=sae * s,
                sum_y=sum_y,
                sum_y2=s**2 * centred2 + 2 * m * sum_y - count_test * m * m,
            ),
        )
