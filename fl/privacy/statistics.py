"""DP feature statistics: the standardisation a DP run releases with every model.

Without DP the server forms the exact pooled mean and standard deviation of every column from
the clients' moments (:func:`fl.statistics.combine_reports`), and every released model carries
them (the scaler's ``mean_``/``var_``/``n_samples_seen_``, the target's mean and scale folded
into the regressor). From two releases that differ by one client, that client's row count, Σx
and Σy would come out exactly. Under DP they are released as a Gaussian mechanism instead:

* each client's vector ``v_i = [column means | column standard deviations]`` of ``[X | y]`` is
  clipped to L2 norm ``C_s`` (``privacy.statistics_clip_norm``, data units);
* the server adds ``N(0, (z_s C_s)^2)`` to every coordinate of ``Σ v_i``
  (``z_s = privacy.statistics_noise_multiplier``) and divides by the public number of
  registered clients ``N``: the means and scales are per-client averages (each client weighs the
  same, whatever its row count, which is private);
* a scale below the noise's own standard deviation ``z_s C_s / N`` is raised to it, so noise
  cannot produce a zero or negative scale;
* ``count`` (the scaler's ``n_samples_seen_``) is ``N``, public, not a row count.

Each client clips its own vector (:func:`clipped_vector`); the server noises the sum
(:func:`noised_statistics`), which under secure aggregation is all it ever sees of the vectors
(:mod:`fl.secagg.statistics`): the mechanism and its accounting are the same either way.

Adding or removing one client moves ``Σ v_i`` by at most ``C_s``, so this is the Gaussian
mechanism with multiplier ``z_s``, over every client (no sampling); the accountant composes it
with the training rounds (:mod:`fl.privacy.accounting`) and ε includes it.

The average of per-client standard deviations leaves out the spread of client means, so under
non-IID data the scale is smaller than the pooled one. Standardisation only conditions the
optimisation (the model is folded back into raw units exactly), so this costs nothing in
correctness.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from fedtune.fl.params import FeatureStats
from fedtune.fl.privacy.mechanisms import clip_update
from fedtune.fl.statistics import StatsReport


def client_vector(report: StatsReport) -> np.ndarray:
    """``[means | standard deviations]`` of one client's ``[X | y]`` columns."""
    m = report.moments
    return np.concatenate([m.mean, np.sqrt(m.m2 / m.count)])


def clipped_vector(report: StatsReport, clip_norm: float) -> np.ndarray:
    """What one client adds to the sum: its :func:`client_vector` clipped to L2 norm
    ``clip_norm`` (so every coordinate lies within ``clip_norm``), or zeros if it is not
    finite: such a client adds nothing, and one client cannot stop the run. Under secure
    aggregation the client computes it itself and only the masked vector leaves it."""
    vector = client_vector(report)
    if not np.all(np.isfinite(vector)):
        return np.zeros_like(vector)
    return clip_update(vector, clip_norm)[0]


def dp_statistics(
    reports: Sequence[StatsReport],
    num_clients: int,
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> FeatureStats:
    """The DP feature statistics of ``reports`` among ``num_clients`` registered clients
    (clients without a report add nothing; the denominator stays ``num_clients``)."""
    if not reports:
        raise ValueError("no client reported statistics")
    if num_clients < len(reports):
        raise ValueError(f"num_clients ({num_clients}) < reports ({len(reports)})")
    total = np.zeros(2 * reports[0].moments.mean.shape[0])
    for report in reports:
        total += clipped_vector(report, clip_norm)
    return noised_statistics(total, num_clients, clip_norm, noise_multiplier, rng)


def noised_statistics(
    total: np.ndarray,
    num_clients: int,
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> FeatureStats:
    """The server's half of the mechanism: ``total``, the sum of the clients'
    :func:`clipped_vector` (in the clear, or recovered by secure aggregation), plus
    ``N(0, (z_s C_s)^2)`` on every coordinate, over the ``num_clients`` registered clients."""
    total = np.asarray(total, dtype=np.float64)
    stddev = noise_multiplier * clip_norm
    noisy = (total + rng.normal(0.0, stddev, total.shape)) / num_clients
    columns = total.shape[0] // 2
    mean = noisy[:columns]
    scale = np.maximum(noisy[columns:], stddev / num_clients)
    return FeatureStats(
        count=num_clients,
        mean=mean[:-1].copy(),
        scale=scale[:-1].copy(),
        target_mean=float(mean[-1]),
        target_scale=float(scale[-1]),
    )
