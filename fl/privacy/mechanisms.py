"""Differential-privacy mechanisms for client-level DP-FedAvg: clipping, Gaussian noise on a
sum with a fixed denominator, and adaptive clipping.

- McMahan, Ramage, Talwar and Zhang, 2018, "Learning Differentially Private Recurrent Language
  Models" (ICLR): clip each client's update to L2 norm ``C``, add Gaussian noise of standard
  deviation ``z * C`` to the sum, divide by the expected number of clients.
- Andrew, Thakkar, McMahan and Ramaswamy, 2021, "Differentially Private Learning with Adaptive
  Clipping" (NeurIPS): ``C`` follows a target quantile of the update norms, estimated privately
  from the noised count of unclipped updates.

The noise must be secret: :func:`secret_rng` draws its seed from the operating system's CSPRNG,
and nothing here logs or stores it. Tests inject a seeded generator instead.
"""

from __future__ import annotations

import math
import secrets

import numpy as np


def secret_rng() -> np.random.Generator:
    """A generator seeded from the OS CSPRNG (256 bits): DP noise that nobody can replay.

    The engine calls it once per run; tests replace it (monkeypatch) to make a DP run
    reproducible, which a real run must never be.
    """
    return np.random.Generator(np.random.PCG64DXSM(secrets.randbits(256)))


def clip_update(delta: np.ndarray, clip_norm: float) -> tuple[np.ndarray, bool]:
    """Scale ``delta`` to L2 norm at most ``clip_norm``.

    Returns the clipped copy and whether the update was left as it was (norm <= ``clip_norm``),
    the indicator adaptive clipping counts. The bound holds exactly in floating point: a
    scaled vector whose computed norm lands an ulp above ``clip_norm`` is shrunk by another
    ulp, so no coordinate can exceed the secure-aggregation bound ``max(clip_norm, 1)``.
    """
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm: must be a positive finite number (got {clip_norm!r})")
    delta = np.asarray(delta, dtype=np.float64)
    if not np.all(np.isfinite(delta)):
        raise ValueError("delta: the update has non-finite values")
    norm = float(np.linalg.norm(delta))
    if norm <= clip_norm:
        return delta.copy(), True
    clipped = delta * (clip_norm / norm)
    while float(np.linalg.norm(clipped)) > clip_norm:
        clipped *= np.nextafter(1.0, 0.0)
    return clipped, False


def noised_mean_update(
    clipped_sum: np.ndarray,
    clip_norm: float,
    noise_multiplier: float,
    expected_clients: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """``(sum + N(0, (noise_multiplier * clip_norm)^2 I)) / expected_clients``.

    The denominator is the expected, not the actual, number of clients: the actual count
    depends on who was sampled and would leak it.
    """
    noise = rng.normal(0.0, noise_multiplier * clip_norm, size=np.shape(clipped_sum))
    return (np.asarray(clipped_sum, dtype=np.float64) + noise) / expected_clients


def noised_unclipped_fraction(
    num_unclipped: float,
    num_clients: int,
    stddev: float,
    expected_clients: float,
    rng: np.random.Generator,
) -> float:
    """Private estimate of the fraction of this round's updates that needed no clipping.

    Counts ``b_i - 1/2`` rather than ``b_i``, which halves the sensitivity to 1/2 (Andrew et
    al., section 3), then adds the 1/2 back using the expected client count.
    """
    centred = num_unclipped - num_clients / 2.0
    return float((centred + rng.normal(0.0, stddev)) / expected_clients + 0.5)


def adapt_clip_norm(
    clip_norm: float, unclipped_fraction: float, target_quantile: float, learning_rate: float
) -> float:
    """Geometric update ``C * exp(-learning_rate * (b - target_quantile))``.

    If more updates than the target fit under ``C`` (``b`` above the target), ``C`` is too
    large and shrinks; if fewer do, it grows. ``b`` is first clamped to [0, 1], which the noise
    can push it out of, to bound one round's step.
    """
    b = min(1.0, max(0.0, unclipped_fraction))
    return clip_norm * math.exp(-learning_rate * (b - target_quantile))


def sum_noise_multiplier(noise_multiplier: float, unclipped_count_stddev: float) -> float:
    """The update sum's noise multiplier ``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` that leaves
    the total cost equal to one Gaussian mechanism with ``noise_multiplier`` when the unclipped
    count (sensitivity 1/2) is released with noise ``unclipped_count_stddev``."""
    if noise_multiplier == 0:
        return 0.0
    if not noise_multiplier < 2 * unclipped_count_stddev:
        raise ValueError(
            f"noise_multiplier: {noise_multiplier} leaves no noise for the update sum once the "
            f"unclipped count takes its share; it must be below 2 * unclipped_count_stddev "
            f"= {2 * unclipped_count_stddev}"
        )
    return (noise_multiplier**-2 - (2 * unclipped_count_stddev) ** -2) ** -0.5
