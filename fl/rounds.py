"""The round schedule: which clients a round samples, and when training stops early.

Without DP, sampling depends only on the seed and the round, so a resumed run samples exactly
as an uninterrupted one. Under DP it is secret: Poisson draws from the OS's CSPRNG, which
nothing logs, so a reader of the run cannot tell who took part in a round.
"""

from __future__ import annotations

import math

import numpy as np
from fedtune.fl.config import RoundsConfig

_STREAM_SAMPLING = 31


def clients_per_round(cfg: RoundsConfig, num_clients: int) -> int:
    """How many clients a round samples: ``clients_per_round``, else ``fraction``, else all."""
    if cfg.clients_per_round is not None:
        if cfg.clients_per_round > num_clients:
            raise ValueError(
                f"rounds.clients_per_round: {cfg.clients_per_round} is more than the "
                f"{num_clients} clients found"
            )
        return cfg.clients_per_round
    if cfg.fraction is not None:
        return max(1, math.ceil(cfg.fraction * num_clients))
    return num_clients


def sample_clients(num_clients: int, k: int, seed: int, round_num: int) -> list[int]:
    """Indices of the ``k`` clients of round ``round_num``, sorted. Derived from the seed and
    the round alone, so a resumed run samples exactly as an uninterrupted one."""
    if k >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng(np.random.SeedSequence([seed, _STREAM_SAMPLING, round_num]))
    return sorted(int(i) for i in rng.choice(num_clients, size=k, replace=False))


def poisson_sample(num_clients: int, sampling_rate: float, rng: np.random.Generator) -> list[int]:
    """Indices of one round's clients, each included independently with probability
    ``sampling_rate``: the sampling DP's accountant assumes.

    ``rng`` must be secret (:func:`fl.privacy.mechanisms.secret_rng`): amplification by
    sampling holds only against someone who cannot tell who was sampled, so the sample must not
    be replayable from anything a run logs (such as ``experiment.seed``). The sample may be
    empty; the round must still be run (noise only), because skipping it would reveal that
    nobody was sampled, which the accountant does not cover.
    """
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate: must be in (0, 1] (got {sampling_rate!r})")
    return [int(i) for i in np.flatnonzero(rng.random(num_clients) < sampling_rate)]


def sample_round(
    cfg: RoundsConfig,
    seed: int,
    sampling_rate: float | None,
    num_clients: int,
    round_num: int,
    secret: np.random.Generator | None = None,
) -> list[int]:
    """The indices of round ``round_num``'s clients: under DP (``sampling_rate`` set), Poisson
    sampling at that rate from the ``secret`` generator (what the accountant assumes); else
    :func:`clients_per_round` of them without replacement, seeded, so a non-DP run replays."""
    if sampling_rate is not None:
        if secret is None:
            raise ValueError("DP sampling needs a secret generator")
        return poisson_sample(num_clients, sampling_rate, secret)
    return sample_clients(num_clients, clients_per_round(cfg, num_clients), seed, round_num)


class EarlyStopping:
    """Stop when the monitored loss has improved by less than ``tolerance`` (relative) for
    ``patience`` consecutive rounds. ``patience=None`` never stops."""

    def __init__(self, tolerance: float = 0.0, patience: int | None = None):
        self.tolerance = tolerance
        self.patience = patience
        self.best_ = math.inf
        self.stale_ = 0

    def update(self, loss: float) -> bool:
        """Record this round's loss; True when training should stop."""
        if loss < self.best_ * (1.0 - self.tolerance) or self.best_ == math.inf:
            self.best_ = loss
            self.stale_ = 0
        else:
            self.stale_ += 1
            self.best_ = min(self.best_, loss)
        return self.patience is not None and self.stale_ >= self.patience

    def to_list(self) -> list[float | int]:
        return [self.best_, self.stale_]

    def load(self, saved: list[float | int]) -> None:
        self.best_, self.stale_ = float(saved[0]), int(saved[1])
