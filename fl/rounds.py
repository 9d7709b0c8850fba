"""The round schedule: seeded client sampling and early stopping."""

from __future__ import annotations

import math

import numpy as np

from fl.config import RoundsConfig

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
