"""Client-level membership-inference audit: a loss-threshold attack (Yeom et al., 2018,
"Privacy Risk in Machine Learning: Analyzing the Connection to Overfitting", CSF).

The attacker sees the final model and one client's data and guesses "member" when the model's
loss on that data is below a threshold. Its advantage (TPR - FPR at the best threshold) and
AUC over member clients (trained on) and held-out clients (same distribution, never trained
on) measure what the model leaks about who took part. (epsilon, delta)-DP bounds the
advantage of *any* attack by ``(e^eps - 1 + 2 delta) / (e^eps + 1)`` (Kairouz et al., 2015).

This is a simulation tool: it needs the held-out clients a simulated source can generate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from fedtune.fl.config import FLConfig
from fedtune.fl.data import ClientRef, central_test_set, open_client, registry
from fedtune.fl.params import ModelParams
from fedtune.fl.privacy.plan import plan_privacy
from fedtune.fl.rounds import sample_round

_HELD_OUT_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class AuditResult:
    advantage: float
    auc: float
    auc_ci_low: float
    auc_ci_high: float
    members: int
    non_members: int
    dp_epsilon: float | None
    dp_advantage_bound: float | None

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def dp_advantage_bound(epsilon: float, delta: float) -> float:
    """The largest membership advantage an (epsilon, delta)-DP mechanism allows."""
    if math.isinf(epsilon):
        return 1.0
    e = math.exp(epsilon)
    return min(1.0, (e - 1 + 2 * delta) / (e + 1))


def auc(member_scores: np.ndarray, non_member_scores: np.ndarray) -> float:
    """P(score of a random member > score of a random non-member), ties counting half."""
    m = np.asarray(member_scores)[:, None]
    n = np.asarray(non_member_scores)[None, :]
    return float(np.mean((m > n) + 0.5 * (m == n)))


def best_advantage(member_scores: np.ndarray, non_member_scores: np.ndarray) -> float:
    """max over thresholds t of TPR - FPR for the guess "member if score >= t"."""
    thresholds = np.unique(np.concatenate([member_scores, non_member_scores]))
    tpr = (member_scores[None, :] >= thresholds[:, None]).mean(axis=1)
    fpr = (non_member_scores[None, :] >= thresholds[:, None]).mean(axis=1)
    return float(max(0.0, np.max(tpr - fpr)))


def membership_audit(
    member_losses: np.ndarray,
    non_member_losses: np.ndarray,
    dp_epsilon: float | None = None,
    dp_delta: float | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
) -> AuditResult:
    """Advantage and AUC (with a 95% bootstrap interval) of the loss-threshold attack."""
    members = -np.asarray(member_losses, dtype=np.float64)  # lower loss: more likely member
    others = -np.asarray(non_member_losses, dtype=np.float64)
    if members.size == 0 or others.size == 0:
        raise ValueError("the audit needs at least one member and one held-out client")
    rng = np.random.default_rng(seed)
    boots = [
        auc(rng.choice(members, members.size), rng.choice(others, others.size))
        for _ in range(bootstrap)
    ]
    low, high = np.percentile(boots, [2.5, 97.5])
    bound = None if dp_epsilon is None else dp_advantage_bound(dp_epsilon, dp_delta or 0.0)
    return AuditResult(
        advantage=best_advantage(members, others),
        auc=auc(members, others),
        auc_ci_low=float(low),
        auc_ci_high=float(high),
        members=int(members.size),
        non_members=int(others.size),
        dp_epsilon=dp_epsilon,
        dp_advantage_bound=bound,
    )


def _loss(X: np.ndarray, y: np.ndarray, raw: ModelParams) -> float:
    return float(np.mean((raw.predict(X) - y) ** 2))


def _client_loss(ref: ClientRef, raw: ModelParams, chunk_size: int) -> float:
    sse, n = 0.0, 0
    for X, y in open_client(ref).chunks("train", chunk_size):
        sse += float(np.sum((raw.predict(X) - y) ** 2))
        n += y.shape[0]
    return sse / n


def member_indices(config: FLConfig, num_clients: int, rounds: int) -> list[int]:
    """The clients that trained in at least one of the first ``rounds`` rounds (replaying the
    run's seeded sampling)."""
    plan = plan_privacy(config, num_clients)
    q = None if plan is None else plan.sampling_rate
    seen: set[int] = set()
    for r in range(1, rounds + 1):
        seen.update(sample_round(config.rounds, config.experiment.seed, q, num_clients, r))
    return sorted(seen)


def client_losses(config: FLConfig, raw: ModelParams, rounds: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-client training-split MSE of the (raw-unit) model for member and held-out
    clients."""
    data, seed, chunk = config.data, config.experiment.seed, config.client.chunk_size
    refs = registry(data, seed)
    members = np.array(
        [_client_loss(refs[i], raw, chunk) for i in member_indices(config, len(refs), rounds)]
    )
    if data.source == "synthetic":
        fresh = registry(data, seed + _HELD_OUT_SEED_OFFSET)
        others = np.array([_client_loss(ref, raw, chunk) for ref in fresh[: len(members)]])
    elif data.source == "diabetes":
        X, y = central_test_set(data, seed)
        parts = np.array_split(np.arange(y.shape[0]), max(2, min(len(members), y.shape[0] // 5)))
        others = np.array([_loss(X[p], y[p], raw) for p in parts])
    else:
        raise ValueError(
            "data.source: the membership audit needs held-out clients from the same "
            "distribution, which only simulated sources (synthetic, diabetes) can provide"
        )
    return members, others
