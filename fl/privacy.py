"""Client-level differential privacy for federated averaging.

- DP-FedAvg: McMahan, Ramage, Talwar and Zhang, 2018, "Learning Differentially Private
  Recurrent Language Models" (ICLR). Each client's update (its trained model minus the global
  one) is clipped to L2 norm ``C``; the server adds Gaussian noise of standard deviation
  ``z * C`` to the *sum* of clipped updates and divides by the *expected* number of clients
  per round, a fixed denominator, so that one client's presence changes the released mean by
  at most ``C / (q N)``.
- Adaptive clipping: Andrew, Thakkar, McMahan and Ramaswamy, 2021, "Differentially Private
  Learning with Adaptive Clipping" (NeurIPS). ``C`` follows a target quantile of the update
  norms, estimated privately from the noised fraction of unclipped updates; the noise is split
  between the update sum and that count so that the total privacy cost is unchanged.

Clients are sampled by Poisson sampling (each independently with rate ``q``), which is the
sampling the accountant in :mod:`fl.accounting` assumes. The mechanism is written over *sums*
so the same code runs on a sum formed in the clear or recovered by secure aggregation
(:mod:`fl.secagg`); see :meth:`DPFedAvg.aggregate_sum`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fl.params import ClientUpdate, ModelParams

if TYPE_CHECKING:
    from fl.config import FLConfig

_STREAM_POISSON = 32
_STREAM_DP_NOISE = 41


def clip_update(delta: np.ndarray, clip_norm: float) -> tuple[np.ndarray, bool]:
    """Scale ``delta`` to L2 norm at most ``clip_norm``.

    Returns the clipped copy and whether the update was left as it was (norm <= ``clip_norm``),
    the indicator adaptive clipping counts. The bound holds up to floating-point rounding.
    """
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm: must be a positive finite number (got {clip_norm!r})")
    delta = np.asarray(delta, dtype=np.float64)
    if not np.all(np.isfinite(delta)):
        raise ValueError("delta: the update has non-finite values")
    norm = float(np.linalg.norm(delta))
    if norm <= clip_norm:
        return delta.copy(), True
    return delta * (clip_norm / norm), False


def client_contribution(
    global_params: ModelParams, params: ModelParams, clip_norm: float
) -> np.ndarray:
    """What one client adds to the round's sum: ``[clipped delta..., unclipped]``.

    The last element is 1.0 if the update needed no clipping, else 0.0. Every element lies in
    ``[-max(clip_norm, 1), max(clip_norm, 1)]``, the bound to give secure aggregation.
    """
    clipped, unclipped = clip_update(params.to_vector() - global_params.to_vector(), clip_norm)
    return np.append(clipped, 1.0 if unclipped else 0.0)


def poisson_sample(num_clients: int, sampling_rate: float, seed: int, round_num: int) -> list[int]:
    """Indices of the clients of round ``round_num``, each included independently with
    probability ``sampling_rate``.

    Derived from the seed and the round alone, so a resumed run samples exactly as an
    uninterrupted one. The sample may be empty; the round must still be run (noise only),
    because skipping it would reveal that nobody was sampled, which the accountant does not
    cover.
    """
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate: must be in (0, 1] (got {sampling_rate!r})")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _STREAM_POISSON, round_num]))
    return [int(i) for i in np.flatnonzero(rng.random(num_clients) < sampling_rate)]


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


class DPFedAvg:
    """DP-FedAvg with a fixed denominator, optionally with adaptive clipping.

    The next global model is ``global + (sum_i clip(delta_i) + noise) / expected_clients``.
    Every client weighs the same: an example-count weight would have to be bounded, and is
    itself private.

    Parameters
    ----------
    noise_multiplier : z, the noise standard deviation relative to the clip norm. It is the
        *total* multiplier the accountant uses; with adaptive clipping part of it goes to the
        unclipped count. ``0`` adds no noise anywhere (not private; a baseline).
    clipping_norm : C, the L2 bound on one client's update; the initial value with adaptive
        clipping.
    expected_clients : q * N, the expected number of clients per round (the denominator).
    seed : seeds the noise; the noise of a round depends only on the seed and the round.
    adaptive_clipping : move C towards the ``target_unclipped_quantile`` of update norms.
    target_unclipped_quantile : gamma, the fraction of updates that should fit under C.
    clip_learning_rate : eta_C, the step of the geometric update of C.
    unclipped_count_stddev : sigma_b, the noise on the unclipped count; default
        ``expected_clients / 20`` (the paper's recommendation).

    The strategy state carries ``round`` (rounds aggregated), ``clip_norm`` (the C to clip the
    *next* round with) and, with adaptive clipping, ``unclipped_fraction`` (the noised b of
    the last round, safe to log).
    """

    def __init__(
        self,
        noise_multiplier: float,
        clipping_norm: float,
        expected_clients: float,
        seed: int = 0,
        adaptive_clipping: bool = False,
        target_unclipped_quantile: float = 0.5,
        clip_learning_rate: float = 0.2,
        unclipped_count_stddev: float | None = None,
    ):
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.expected_clients = expected_clients
        self.seed = seed
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
            if not 0 < self.target_unclipped_quantile < 1:
                raise ValueError(
                    "target_unclipped_quantile: must be in (0, 1) "
                    f"(got {self.target_unclipped_quantile!r})"
                )
            if not self.clip_learning_rate >= 0:
                raise ValueError(
                    f"clip_learning_rate: must be >= 0 (got {self.clip_learning_rate!r})"
                )
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

    def clip_norm(self, state: dict[str, Any]) -> float:
        """The C clients clip this round's update to (public: derived from released values)."""
        return float(state.get("clip_norm", self.clipping_norm))

    def aggregate(
        self, global_params: ModelParams, updates: list[ClientUpdate], state: dict[str, Any]
    ) -> tuple[ModelParams, dict[str, Any]]:
        """Clip each update, sum, and hand the sum to :meth:`aggregate_sum`. An empty list is a
        valid (noise-only) round under Poisson sampling."""
        clip_norm = self.clip_norm(state)
        total = np.zeros(global_params.num_features + 2)
        for update in updates:
            total += client_contribution(global_params, update.params, clip_norm)
        return self.aggregate_sum(global_params, total, len(updates), state)

    def aggregate_sum(
        self,
        global_params: ModelParams,
        contribution_sum: np.ndarray,
        num_clients: int,
        state: dict[str, Any],
    ) -> tuple[ModelParams, dict[str, Any]]:
        """The next model from the sum of :func:`client_contribution` vectors of ``num_clients``
        clients, summed in the clear or by secure aggregation.

        The noise is added here, by the server, to the recovered sum: secure aggregation hides
        individual updates from the server, the noise protects clients from whoever sees the
        released models.
        """
        self.check_params()
        contribution_sum = np.asarray(contribution_sum, dtype=np.float64)
        size = global_params.num_features + 2
        if contribution_sum.shape != (size,):
            raise ValueError(
                f"contribution_sum: expected shape ({size},) = model vector plus the unclipped "
                f"count, got {contribution_sum.shape}"
            )
        clip_norm = self.clip_norm(state)
        round_num = int(state.get("round", 0))
        rng = np.random.default_rng(
            np.random.SeedSequence([self.seed, _STREAM_DP_NOISE, round_num])
        )
        mean_delta = noised_mean_update(
            contribution_sum[:-1],
            clip_norm,
            self.update_noise_multiplier(),
            self.expected_clients,
            rng,
        )
        new_state = {**state, "round": round_num + 1, "clip_norm": clip_norm}
        if self.adaptive_clipping:
            count_noise = self.count_stddev() if self.noise_multiplier > 0 else 0.0
            fraction = noised_unclipped_fraction(
                float(contribution_sum[-1]), num_clients, count_noise, self.expected_clients, rng
            )
            new_state["unclipped_fraction"] = fraction
            new_state["clip_norm"] = adapt_clip_norm(
                clip_norm, fraction, self.target_unclipped_quantile, self.clip_learning_rate
            )
        return ModelParams.from_vector(global_params.to_vector() + mean_delta), new_state


@dataclass(frozen=True)
class PrivacyPlan:
    """How a run aggregates under ``[privacy]``: the noise, the sampling, the denominator."""

    noise_multiplier: float
    """z (0 without DP: secure aggregation alone)."""
    sampling_rate: float
    """q: Poisson rate under DP; the fixed fraction of clients per round otherwise."""
    expected_clients: float
    delta: float
    dp: bool
    secure_aggregation: bool

    @property
    def poisson(self) -> bool:
        return self.dp


def plan_privacy(config: FLConfig, num_clients: int) -> PrivacyPlan | None:
    """The privacy plan of a run, or None when ``[privacy]`` asks for nothing.

    Under DP the sampling rate is ``rounds.fraction``, else ``clients_per_round / N``, else 1;
    with ``target_epsilon`` the noise multiplier is calibrated for ``rounds.num_rounds``.
    """
    from fl.accounting import calibrate_noise_multiplier
    from fl.rounds import clients_per_round

    p = config.privacy
    if not (p.dp or p.secure_aggregation):
        return None
    if p.dp:
        if config.rounds.fraction is not None:
            q = config.rounds.fraction
        else:
            q = clients_per_round(config.rounds, num_clients) / num_clients
        z = p.noise_multiplier
        if z is None:
            z = calibrate_noise_multiplier(p.target_epsilon, p.delta, q, config.rounds.num_rounds)
        return PrivacyPlan(z, q, q * num_clients, p.delta, True, p.secure_aggregation)
    k = clients_per_round(config.rounds, num_clients)
    return PrivacyPlan(0.0, k / num_clients, float(k), p.delta, False, True)


def make_dp_strategy(config: FLConfig, plan: PrivacyPlan) -> DPFedAvg:
    p = config.privacy
    strategy = DPFedAvg(
        noise_multiplier=plan.noise_multiplier,
        clipping_norm=p.clipping_norm,
        expected_clients=plan.expected_clients,
        seed=config.experiment.seed,
        adaptive_clipping=p.adaptive_clipping,
        target_unclipped_quantile=p.target_unclipped_quantile,
        clip_learning_rate=p.clip_learning_rate,
    )
    try:
        strategy.check_params()
    except ValueError as exc:
        raise ValueError(f"privacy.{exc}") from None
    return strategy


def privacy_accountant(plan: PrivacyPlan | None):
    """The accountant of a DP run (None without DP)."""
    from fl.accounting import Accountant

    if plan is None or not plan.dp:
        return None
    return Accountant(plan.noise_multiplier, plan.sampling_rate, plan.delta)


def budget_exhausted(accountant, target_epsilon: float | None) -> bool:
    """Whether the next round would take epsilon above ``target_epsilon``."""
    return (
        accountant is not None
        and target_epsilon is not None
        and accountant.would_exceed(target_epsilon)
    )


def sample_round(plan: PrivacyPlan | None, num_clients: int, k: int, seed: int, round_num: int):
    """The round's client indices: Poisson sampling under DP (what the accountant assumes),
    else ``k`` clients without replacement."""
    from fl.rounds import sample_clients

    if plan is not None and plan.poisson:
        return poisson_sample(num_clients, plan.sampling_rate, seed, round_num)
    return sample_clients(num_clients, k, seed, round_num)


def privacy_summary(plan: PrivacyPlan | None, accountant) -> dict[str, Any]:
    """The run's privacy guarantee, for summaries and model-version tags."""
    if plan is None:
        return {"dp_epsilon": None, "dp_delta": None}
    spent = accountant.spent() if accountant is not None else None
    return {
        "dp_epsilon": None if spent is None else spent.epsilon,
        "dp_delta": None if spent is None else spent.delta,
        "dp_noise_multiplier": plan.noise_multiplier,
        "dp_sampling_rate": plan.sampling_rate,
        "secure_aggregation": plan.secure_aggregation,
    }
