"""Privacy accounting for DP-FedAvg with Poisson-sampled clients.

One round is ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``; ``T`` rounds are that event
self-composed ``T`` times. epsilon at a given delta is computed with Google's ``dp_accounting``
by two methods and the smaller is reported; both are valid upper bounds:

- RDP: Mironov, 2017, "Renyi Differential Privacy"; Mironov, Talwar and Zhang, 2019, "Renyi
  Differential Privacy of the Sampled Gaussian Mechanism".
- PLD: Koskela, Jalko and Honkela, 2020, "Computing Tight Differential Privacy Guarantees
  Using FFT"; Doroshenko, Ghazi, Kamath, Kumar and Manurangsi, 2022, "Connect the Dots:
  Tighter Discrete Approximations of Privacy Loss Distributions". Its pessimistic
  discretisation keeps it an upper bound at any grid step.

With adaptive clipping (:class:`fl.privacy.DPFedAvg`), ``z`` is the *total* noise multiplier:
the split between the update sum and the unclipped count costs the same as one Gaussian
mechanism with ``z`` (Andrew et al., 2021, Theorem 1).

The feature statistics of a DP run (:func:`fl.statistics.dp_statistics`) are one more Gaussian
mechanism, over every registered client (no sampling), with their own multiplier ``z_s``: the
whole run is ``Compose[Gaussian(z_s), T x PoissonSampled(q, Gaussian(z))]``, and the epsilon
reported includes that share.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import dp_accounting
from dp_accounting import pld, rdp

PLD_DISCRETIZATION = 1e-3
"""PLD grid step. dp_accounting's default (1e-4) is ~10x slower per round and changes epsilon
only in the fourth significant digit."""


def round_event(sampling_rate: float, noise_multiplier: float) -> dp_accounting.DpEvent:
    """One round: Poisson sampling with rate q, then the Gaussian mechanism with multiplier z."""
    return dp_accounting.PoissonSampledDpEvent(
        sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
    )


def training_event(
    sampling_rate: float,
    noise_multiplier: float,
    rounds: int,
    statistics_noise: float | None = None,
) -> dp_accounting.DpEvent:
    """``rounds`` rounds, after the feature statistics' Gaussian mechanism (multiplier
    ``statistics_noise``) when the run released DP statistics."""
    training = dp_accounting.SelfComposedDpEvent(
        round_event(sampling_rate, noise_multiplier), rounds
    )
    if statistics_noise is None:
        return training
    statistics = dp_accounting.GaussianDpEvent(statistics_noise)
    return statistics if rounds == 0 else dp_accounting.ComposedDpEvent([statistics, training])


class _DropRdpConvergenceNotes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


@contextmanager
def _quiet_rdp() -> Iterator[None]:
    # The RDP accountant logs one warning per fractional order it cannot evaluate (dozens per
    # call at small orders) and then leaves that order out, which keeps the bound valid. Drop
    # just those notes, and only for the duration of our own call.
    logger = logging.getLogger("absl")
    note_filter = _DropRdpConvergenceNotes()
    logger.addFilter(note_filter)
    try:
        yield
    finally:
        logger.removeFilter(note_filter)


def rdp_epsilon(
    sampling_rate: float,
    noise_multiplier: float,
    rounds: int,
    delta: float,
    statistics_noise: float | None = None,
) -> float:
    """epsilon of ``rounds`` rounds (and the statistics, with ``statistics_noise``) at
    ``delta`` by the RDP accountant (default orders)."""
    if rounds == 0 and statistics_noise is None:
        return 0.0
    with _quiet_rdp():
        accountant = rdp.RdpAccountant()
        accountant.compose(
            training_event(sampling_rate, noise_multiplier, rounds, statistics_noise)
        )
        return float(accountant.get_epsilon(delta))


def pld_epsilon(
    sampling_rate: float,
    noise_multiplier: float,
    rounds: int,
    delta: float,
    discretization: float = PLD_DISCRETIZATION,
    statistics_noise: float | None = None,
) -> float:
    """epsilon of ``rounds`` rounds (and the statistics, with ``statistics_noise``) at
    ``delta`` by the PLD accountant."""
    if rounds == 0 and statistics_noise is None:
        return 0.0
    if (noise_multiplier == 0 and rounds > 0) or statistics_noise == 0:
        return math.inf
    accountant = pld.PLDAccountant(value_discretization_interval=discretization)
    accountant.compose(training_event(sampling_rate, noise_multiplier, rounds, statistics_noise))
    return float(accountant.get_epsilon(delta))


@lru_cache(maxsize=512)
def _epsilons(
    sampling_rate: float,
    noise_multiplier: float,
    rounds: int,
    delta: float,
    discretization: float,
    statistics_noise: float | None,
) -> tuple[float, float]:
    # Cached because the flow asks for the same round twice: the epsilon after round t, and
    # would_exceed before round t.
    return (
        rdp_epsilon(sampling_rate, noise_multiplier, rounds, delta, statistics_noise),
        pld_epsilon(
            sampling_rate, noise_multiplier, rounds, delta, discretization, statistics_noise
        ),
    )


@dataclass(frozen=True)
class PrivacySpent:
    """epsilon at ``delta`` after ``rounds`` rounds: the smaller of the two methods' bounds."""

    epsilon: float
    delta: float
    rounds: int
    method: Literal["rdp", "pld"]
    rdp_epsilon: float
    pld_epsilon: float


class Accountant:
    """Tracks the privacy spent by DP-FedAvg rounds with fixed ``z`` and ``q``.

    Parameters
    ----------
    noise_multiplier : z, the total noise multiplier (``DPFedAvg.noise_multiplier``).
    sampling_rate : q, the Poisson sampling rate (expected clients / number of clients).
    delta : the delta at which epsilon is reported; typically below 1 / number of clients.
    pld_discretization : the PLD grid step.
    statistics_noise : z_s, the multiplier of the DP feature statistics released before round
        1 (None when the run released none); counted from round 0 on.

    ``rounds_`` counts the rounds recorded with :meth:`step`. :meth:`to_dict` and
    :meth:`from_dict` checkpoint the accountant.
    """

    def __init__(
        self,
        noise_multiplier: float,
        sampling_rate: float,
        delta: float,
        pld_discretization: float = PLD_DISCRETIZATION,
        statistics_noise: float | None = None,
    ):
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(
                f"noise_multiplier: must be >= 0 and finite (got {noise_multiplier!r})"
            )
        if not 0 < sampling_rate <= 1:
            raise ValueError(f"sampling_rate: must be in (0, 1] (got {sampling_rate!r})")
        if not 0 < delta < 1:
            raise ValueError(f"delta: must be in (0, 1) (got {delta!r})")
        self.noise_multiplier = float(noise_multiplier)
        self.sampling_rate = float(sampling_rate)
        self.delta = float(delta)
        self.pld_discretization = float(pld_discretization)
        self.statistics_noise = None if statistics_noise is None else float(statistics_noise)
        self.rounds_ = 0

    def spent(self, rounds: int | None = None) -> PrivacySpent:
        """epsilon after ``rounds`` rounds (default: the rounds recorded so far)."""
        rounds = self.rounds_ if rounds is None else rounds
        if rounds < 0:
            raise ValueError(f"rounds: must be >= 0 (got {rounds!r})")
        by_rdp, by_pld = _epsilons(
            self.sampling_rate,
            self.noise_multiplier,
            rounds,
            self.delta,
            self.pld_discretization,
            self.statistics_noise,
        )
        method: Literal["rdp", "pld"] = "pld" if by_pld <= by_rdp else "rdp"
        return PrivacySpent(min(by_rdp, by_pld), self.delta, rounds, method, by_rdp, by_pld)

    def step(self, rounds: int = 1) -> PrivacySpent:
        """Record ``rounds`` more rounds and return the privacy spent after them."""
        if rounds < 0:
            raise ValueError(f"rounds: must be >= 0 (got {rounds!r})")
        self.rounds_ += rounds
        return self.spent()

    def would_exceed(self, target_epsilon: float) -> bool:
        """Whether running one more round would take epsilon above ``target_epsilon``."""
        return self.spent(self.rounds_ + 1).epsilon > target_epsilon

    def to_dict(self) -> dict[str, Any]:
        return {
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
            "delta": self.delta,
            "statistics_noise": self.statistics_noise,
            "rounds": self.rounds_,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Accountant:
        accountant = cls(
            data["noise_multiplier"],
            data["sampling_rate"],
            data["delta"],
            statistics_noise=data.get("statistics_noise"),
        )
        accountant.rounds_ = int(data["rounds"])
        return accountant


def _bracket(gap: Callable[[float], float], guess: float) -> tuple[float, float]:
    """``(lower, upper)`` with ``gap(lower) > 0 >= gap(upper)``, for ``gap`` decreasing in z."""
    lower = upper = guess
    for _ in range(60):
        if gap(upper) <= 0:
            break
        lower, upper = upper, upper * 2
    else:
        raise ValueError("no noise multiplier below 2^60 meets the target epsilon")
    for _ in range(60):
        if lower < upper:
            return lower, upper
        lower /= 2
        if gap(lower) > 0:
            return lower, upper
        upper = lower
    raise ValueError("the target epsilon is met without noise")


@lru_cache(maxsize=64)
def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    rounds: int,
    tol: float = 1e-4,
    pld_discretization: float = PLD_DISCRETIZATION,
    statistics_noise: float | None = None,
) -> float:
    """The smallest noise multiplier (within ``tol``) for which ``rounds`` rounds spend at most
    ``target_epsilon`` as :class:`Accountant` reports it (the smaller of RDP and PLD).

    PLD is calibrated first: it is usually the tighter bound and, with Poisson sampling, the
    cheaper one to evaluate. RDP is searched only if it beats PLD at PLD's answer. Cached: the
    CLI checks a config (calibrating) before the run plans privacy with the same numbers.
    """
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon: must be positive (got {target_epsilon!r})")
    if not 0 < delta < 1:
        raise ValueError(f"delta: must be in (0, 1) (got {delta!r})")
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate: must be in (0, 1] (got {sampling_rate!r})")
    if not rounds >= 1:
        raise ValueError(f"rounds: must be >= 1 (got {rounds!r})")

    def make_event(z: float) -> dp_accounting.DpEvent:
        return training_event(sampling_rate, z, rounds, statistics_noise)

    def pld_gap(z: float) -> float:
        eps = pld_epsilon(sampling_rate, z, rounds, delta, pld_discretization, statistics_noise)
        return eps - target_epsilon

    def rdp_gap(z: float) -> float:
        return rdp_epsilon(sampling_rate, z, rounds, delta, statistics_noise) - target_epsilon

    z_pld = float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: pld.PLDAccountant(value_discretization_interval=pld_discretization),
            make_event,
            target_epsilon,
            delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(*_bracket(pld_gap, 1.0)),
            tol=tol,
        )
    )
    if rdp_gap(z_pld) > 0:
        return z_pld
    with _quiet_rdp():
        z_rdp = float(
            dp_accounting.calibrate_dp_mechanism(
                rdp.RdpAccountant,
                make_event,
                target_epsilon,
                delta,
                bracket_interval=dp_accounting.ExplicitBracketInterval(*_bracket(rdp_gap, z_pld)),
                tol=tol,
            )
        )
    return min(z_pld, z_rdp)
