"""DP-FedAvg as a wrapper around any sum-based strategy: McMahan, Ramage, Talwar and Zhang,
2018, "Learning Differentially Private Recurrent Language Models" (ICLR), with adaptive clipping
from Andrew, Thakkar, McMahan and Ramaswamy, 2021 (NeurIPS). Flower's
``DifferentialPrivacyServerSideFixedClipping`` and TFF's ``DifferentiallyPrivateFactory`` wrap a
strategy the same way.

Each client's update is clipped to L2 norm ``C`` and every client weighs the same (an example
count would itself be private and unbounded); the server adds Gaussian noise of standard
deviation ``z * C`` to the *sum* and divides by the *expected* number of clients per round, a
fixed denominator, so that one client's presence changes the mean update by at most
``C / (q N)``. The noised mean then goes to the inner strategy's server step, which therefore
never touches un-noised data: FedAvg adds it to the model, a server optimizer treats it as a
pseudo-gradient. Because the noise is added to a sum, the same code runs on a sum formed in the
clear or recovered by secure aggregation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from fedtune.fl.params import ClientUpdate, ModelParams
from fedtune.fl.privacy.mechanisms import (
    adapt_clip_norm,
    noised_mean_update,
    noised_unclipped_fraction,
    sum_noise_multiplier,
)
from fedtune.fl.strategies.aggregation import (
    Contribution,
    SumStrategy,
    check_sum,
    sum_contributions,
)


@dataclass(frozen=True)
class DPState:
    """What DP-FedAvg carries between rounds: the clip norm for the *next* round (public: it is
    derived from released values), the last noised unclipped fraction (adaptive clipping), and
    the inner strategy's own state."""

    clip_norm: float
    unclipped_fraction: float | None = None
    inner: Any = None


class DPFedAvg:
    """Client-level DP around a sum-based ``inner`` strategy.

    Parameters
    ----------
    inner : the strategy whose server step follows the noised mean (FedAvg: plain DP-FedAvg).
    noise_multiplier : z, the *total* noise multiplier the accountant uses; with adaptive
        clipping part of it goes to the unclipped count. ``0`` adds no noise (not private).
    clipping_norm : C, the L2 bound on one client's update; the initial C with adaptive clipping.
    expected_clients : q * N, the expected number of clients per round (the denominator).
    rng : the noise source; it must be secret (:func:`fl.privacy.mechanisms.secret_rng`).
    adaptive_clipping, target_unclipped_quantile, clip_learning_rate : move C geometrically
        towards the quantile ``gamma`` of update norms, with step ``eta_C``.
    unclipped_count_stddev : sigma_b, the noise on the unclipped count; default
        ``expected_clients / 20`` (the paper's recommendation).
    """

    sum_based = True

    def __init__(
        self,
        inner: SumStrategy,
        noise_multiplier: float,
        clipping_norm: float,
        expected_clients: float,
        rng: np.random.Generator,
        adaptive_clipping: bool = False,
        target_unclipped_quantile: float = 0.5,
        clip_learning_rate: float = 0.2,
        unclipped_count_stddev: float | None = None,
    ):
        self.inner = inner
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.expected_clients = expected_clients
        self.rng = rng
        self.adaptive_clipping = adaptive_clipping
        self.target_unclipped_quantile = target_unclipped_quantile
        self.clip_learning_rate = clip_learning_rate
        self.unclipped_count_stddev = unclipped_count_stddev

    def check_params(self) -> None:
        """Raise ``ValueError`` naming the first invalid parameter."""
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(
                f"noise_multiplier: must be >= 0 and finite (got {self.noise_multiplier!r})"
            )
        if not (math.isfinite(self.clipping_norm) and self.clipping_norm > 0):
            raise ValueError(f"clipping_norm: must be positive (got {self.clipping_norm!r})")
        if not self.expected_clients > 0:
            raise ValueError(f"expected_clients: must be positive (got {self.expected_clients!r})")
        if self.adaptive_clipping:
            self._check_adaptive()

    def _check_adaptive(self) -> None:
        if not 0 < self.target_unclipped_quantile < 1:
            raise ValueError(
                "target_unclipped_quantile: must be in (0, 1) "
                f"(got {self.target_unclipped_quantile!r})"
            )
        if not self.clip_learning_rate >= 0:
            raise ValueError(f"clip_learning_rate: must be >= 0 (got {self.clip_learning_rate!r})")
        if not self.count_stddev() > 0:
            raise ValueError(
                f"unclipped_count_stddev: must be positive (got {self.count_stddev()!r})"
            )
        sum_noise_multiplier(self.noise_multiplier, self.count_stddev())

    def count_stddev(self) -> float:
        """sigma_b, the noise on the unclipped count (adaptive clipping only)."""
        if self.unclipped_count_stddev is not None:
            return self.unclipped_count_stddev
        return self.expected_clients / 20.0

    def update_noise_multiplier(self) -> float:
        """The noise multiplier applied to the update sum: z, or z_delta with adaptive
        clipping."""
        if not self.adaptive_clipping:
            return self.noise_multiplier
        return sum_noise_multiplier(self.noise_multiplier, self.count_stddev())

    # -- state --------------------------------------------------------------------------------

    def init_state(self) -> DPState:
        return DPState(self.clipping_norm, None, self.inner.init_state())

    def too_few(self, num_updates: int) -> str | None:
        return None  # an empty Poisson sample is a valid, noise-only round

    def save_state(self, state: DPState) -> dict[str, Any]:
        return {
            "clip_norm": state.clip_norm,
            "unclipped_fraction": state.unclipped_fraction,
            "inner": self.inner.save_state(state.inner),
        }

    def load_state(self, data: dict[str, Any]) -> DPState:
        return DPState(
            float(data["clip_norm"]),
            data.get("unclipped_fraction"),
            self.inner.load_state(data["inner"]),
        )

    def clip_norm(self, state: DPState) -> float:
        """The C clients clip this round's update to."""
        return state.clip_norm

    # -- aggregation --------------------------------------------------------------------------

    def contribution(self, state: DPState) -> Contribution:
        """Clipped to this round's C, every client weighing the same."""
        return Contribution(weighted=False, clip_norm=state.clip_norm)

    def aggregate(
        self, global_params: ModelParams, updates: list[ClientUpdate], state: DPState
    ) -> tuple[ModelParams, DPState]:
        """Clip each update, sum, and hand the sum to :meth:`aggregate_sum`. An empty list is a
        valid (noise-only) round under Poisson sampling."""
        total = sum_contributions(self.contribution(state), global_params, updates)
        return self.aggregate_sum(global_params, total, len(updates), state)

    def aggregate_sum(
        self, global_params: ModelParams, total: np.ndarray, num_clients: int, state: DPState
    ) -> tuple[ModelParams, DPState]:
        """Noise the sum of ``num_clients`` clipped contributions (formed in the clear or by
        secure aggregation), divide by the expected client count, and take the inner
        strategy's server step with that mean. ``num_clients`` is used only inside the
        noised unclipped count, never released."""
        self.check_params()
        total = check_sum(total, global_params)
        mean_delta = noised_mean_update(
            total[:-2],
            state.clip_norm,
            self.update_noise_multiplier(),
            self.expected_clients,
            self.rng,
        )
        fraction, next_clip = None, state.clip_norm
        if self.adaptive_clipping:
            count_noise = self.count_stddev() if self.noise_multiplier > 0 else 0.0
            fraction = noised_unclipped_fraction(
                float(total[-1]), num_clients, count_noise, self.expected_clients, self.rng
            )
            next_clip = adapt_clip_norm(
                state.clip_norm, fraction, self.target_unclipped_quantile, self.clip_learning_rate
            )
        params, inner = self.inner.server_step(global_params, mean_delta, state.inner)
        return params, DPState(next_clip, fraction, inner)
