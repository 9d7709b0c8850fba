"""Client-level membership-inference audit of everything a run releases: a loss-threshold
attack (Yeom et al., 2018, "Privacy Risk in Machine Learning: Analyzing the Connection to
Overfitting", CSF) against the final model and every round's model, scored so that it can fail.

The attacker sees a released model and one client's data and guesses "member" when the model's
mean squared error on that data is below a threshold. Members are the run's registered clients
(the population DP's neighbouring relation is about); non-members are held-out clients from the
same distribution, never registered. Nothing replays who was sampled in which round: under DP
that sample is secret, and the guarantee covers every registered client anyway.

Honest statistics, because the audit decides pass or fail:

- *Two disjoint splits.* Clients (members and non-members alike) are split at random into a
  selection split and a scoring split. Every choice the attacker makes, the threshold of each
  model and which model to attack, is made on the selection split; only the chosen (model,
  threshold) is scored on the scoring split, so picking the best of many cannot inflate the
  score (the per-model scores are reported, but decide nothing).
- *An exact, conservative interval.* On the scoring split TP of m members and FP of n
  non-members are binomial counts. Clopper-Pearson intervals (Clopper & Pearson, 1934) at
  confidence ``1 - alpha/2`` each hold jointly with probability at least ``1 - alpha``
  (Bonferroni), so ``[TPR_low - FPR_high, TPR_high - FPR_low]`` covers the true advantage
  TPR - FPR with at least that probability; DP audits bound FPR and FNR the same way
  (Jagielski et al., 2020, "Auditing Differentially Private Machine Learning", NeurIPS).
  A DP run that keeps its promise is therefore reported as failing with probability at most
  ``alpha/2`` (2.5%): the lower bound misses only if TPR's interval misses low or FPR's
  misses high, ``alpha/4`` each. The counts are treated as independent trials, the usual
  assumption of such audits, although all members' outcomes depend on the one model.
- *The bound of the game actually played.* (epsilon, delta)-DP bounds the advantage of any
  test between neighbouring inputs by ``(e^eps - 1 + 2 delta) / (e^eps + 1)`` (Kairouz, Oh and
  Viswanath, 2015). The accountant's epsilon is for adding or removing one client, but this
  audit compares a member with a *different* held-out client on the same model: a
  replacement, two add/remove steps apart. Its bound is the one-step bound at the
  group-privacy parameters ``(2 eps, (1 + e^eps) delta)``: the (eps, delta) inequality
  applied twice (group privacy; Dwork & Roth, 2014, section 2.3).

This is a simulation tool: it needs the held-out clients a simulated source can generate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from fedtune.fl import partition
from fedtune.fl.config import FLConfig
from fedtune.fl.data import ClientRef, central_test_set, open_client, registry
from fedtune.fl.params import ModelParams

CONFIDENCE = 0.95
"""Two-sided confidence of the advantage's interval."""

_HELD_OUT_SEED_OFFSET = 1_000_003


# -- the bounds ---------------------------------------------------------------------------------


def dp_advantage_bound(epsilon: float, delta: float) -> float:
    """The largest advantage (TPR - FPR) of any test between two neighbouring inputs of an
    (epsilon, delta)-DP mechanism (Kairouz et al., 2015)."""
    if math.isinf(epsilon):
        return 1.0
    e = math.exp(epsilon)
    return min(1.0, (e - 1 + 2 * delta) / (e + 1))


def replacement_bound(epsilon: float, delta: float) -> float:
    """The largest advantage of a test between inputs that differ by replacing one client, for
    a mechanism (epsilon, delta)-DP under adding or removing one: the one-step bound at the
    group-privacy parameters ``(2 eps, (1 + e^eps) delta)``. The bound this audit's
    member-versus-held-out game must meet. (It never exceeds twice the one-step bound, which the
    triangle inequality for total variation would give: their ratio is
    ``(e^eps + 1)^2 / (2 e^(2 eps) + 2) <= 1``.)"""
    if math.isinf(epsilon):
        return 1.0
    return dp_advantage_bound(2 * epsilon, (1 + math.exp(epsilon)) * delta)


# -- the statistics -----------------------------------------------------------------------------


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The exact two-sided interval for a binomial proportion after ``k`` successes in ``n``
    trials (Clopper & Pearson, 1934)."""
    from scipy.stats import beta

    if not 0 <= k <= n or n < 1:
        raise ValueError(f"clopper_pearson: need 0 <= k <= n and n >= 1 (got k={k}, n={n})")
    alpha = 1.0 - confidence
    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def advantage_interval(
    true_positives: int,
    members: int,
    false_positives: int,
    non_members: int,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """An interval that covers TPR - FPR with probability at least ``confidence``: each rate's
    Clopper-Pearson interval at ``1 - alpha/2``, combined by Bonferroni."""
    each = 1.0 - (1.0 - confidence) / 2
    tpr_low, tpr_high = clopper_pearson(true_positives, members, each)
    fpr_low, fpr_high = clopper_pearson(false_positives, non_members, each)
    return tpr_low - fpr_high, tpr_high - fpr_low


def auc(member_losses: np.ndarray, non_member_losses: np.ndarray) -> float:
    """P(a random member's loss < a random non-member's), ties counting half."""
    m = np.asarray(member_losses)[:, None]
    n = np.asarray(non_member_losses)[None, :]
    return float(np.mean((m < n) + 0.5 * (m == n)))


def attack_counts(
    member_losses: np.ndarray, non_member_losses: np.ndarray, threshold: float
) -> tuple[int, int]:
    """(true positives, false positives) of the guess "member if loss < threshold"."""
    return int(np.sum(member_losses < threshold)), int(np.sum(non_member_losses < threshold))


def choose_threshold(
    member_losses: np.ndarray, non_member_losses: np.ndarray
) -> tuple[float, float]:
    """The threshold with the largest TPR - FPR on these clients, and that advantage.

    Candidates are the smallest loss (nobody is guessed a member: advantage 0) and the
    midpoints between consecutive distinct losses; ties go to the smallest threshold.
    """
    losses = np.unique(np.concatenate([member_losses, non_member_losses]))
    candidates = np.concatenate([losses[:1], (losses[:-1] + losses[1:]) / 2])
    tp = (member_losses[None, :] < candidates[:, None]).sum(axis=1)
    fp = (non_member_losses[None, :] < candidates[:, None]).sum(axis=1)
    m, n = member_losses.size, non_member_losses.size
    best = int(np.argmax(tp * n - fp * m))  # TPR - FPR in integers, so ties are exact
    return float(candidates[best]), float(tp[best] / m - fp[best] / n)


# -- the split and the audit --------------------------------------------------------------------


@dataclass(frozen=True)
class AuditSplit:
    """Row indices of the member and non-member loss tables: the selection split chooses, the
    scoring split scores. The two are disjoint."""

    select_members: np.ndarray
    score_members: np.ndarray
    select_non_members: np.ndarray
    score_non_members: np.ndarray


def split_clients(
    members: int, non_members: int, selection_fraction: float = 0.5, seed: int = 0
) -> AuditSplit:
    """A random split of the members and of the non-members, ``selection_fraction`` of each
    (rounded) to the selection split and the rest to the scoring split; at least one of each
    kind on each side."""
    if not 0 < selection_fraction < 1:
        raise ValueError(f"selection_fraction: must be in (0, 1) (got {selection_fraction!r})")
    if min(members, non_members) < 2:
        raise ValueError(
            f"the audit needs at least 2 members and 2 held-out clients, one for each split "
            f"(got {members} and {non_members})"
        )
    rng = np.random.default_rng(seed)

    def halves(n: int) -> tuple[np.ndarray, np.ndarray]:
        order = rng.permutation(n)
        cut = min(n - 1, max(1, round(selection_fraction * n)))
        return np.sort(order[:cut]), np.sort(order[cut:])

    select_m, score_m = halves(members)
    select_n, score_n = halves(non_members)
    return AuditSplit(select_m, score_m, select_n, score_n)


@dataclass(frozen=True)
class ModelAttack:
    """The attack on one released model: threshold and advantage on the selection split, then
    that threshold's advantage, interval and AUC on the scoring split."""

    model: str
    threshold: float
    selection_advantage: float
    advantage: float
    ci_low: float
    ci_high: float
    auc: float
    true_positives: int
    false_positives: int


def attack_model(
    model: str,
    member_losses: np.ndarray,
    non_member_losses: np.ndarray,
    split: AuditSplit,
    confidence: float = CONFIDENCE,
) -> ModelAttack:
    """Choose the threshold on the selection split; score it on the scoring split."""
    threshold, selected = choose_threshold(
        member_losses[split.select_members], non_member_losses[split.select_non_members]
    )
    scored_m = member_losses[split.score_members]
    scored_n = non_member_losses[split.score_non_members]
    tp, fp = attack_counts(scored_m, scored_n, threshold)
    low, high = advantage_interval(tp, scored_m.size, fp, scored_n.size, confidence)
    return ModelAttack(
        model=model,
        threshold=threshold,
        selection_advantage=selected,
        advantage=tp / scored_m.size - fp / scored_n.size,
        ci_low=low,
        ci_high=high,
        auc=auc(scored_m, scored_n),
        true_positives=tp,
        false_positives=fp,
    )


@dataclass(frozen=True)
class AuditResult:
    """The chosen attack (the model with the best selection-split advantage), scored on the
    scoring split, beside every model's attack and the bounds the run's (or a claimed)
    (epsilon, delta) places on it."""

    model: str
    threshold: float
    selection_advantage: float
    advantage: float
    ci_low: float
    ci_high: float
    auc: float
    confidence: float
    members: int
    non_members: int
    scored_members: int
    scored_non_members: int
    dp_epsilon: float | None
    dp_delta: float | None
    dp_advantage_bound: float | None
    """The add/remove-one bound on any attack (Kairouz et al., 2015)."""
    bound: float | None
    """The bound this audit's game must meet (:func:`replacement_bound`): the decision's."""
    models: tuple[ModelAttack, ...]

    @property
    def passed(self) -> bool:
        """False when the advantage's lower confidence bound exceeds the bound: the release
        leaks more than (epsilon, delta) allows. True without a bound."""
        return self.bound is None or self.ci_low <= self.bound

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def membership_audit(
    model_names: Sequence[str],
    member_losses: np.ndarray,
    non_member_losses: np.ndarray,
    split: AuditSplit,
    dp_epsilon: float | None = None,
    dp_delta: float | None = None,
    confidence: float = CONFIDENCE,
) -> AuditResult:
    """Attack each model (column of the loss tables: one row per client); choose the model on
    the selection split (the first on ties) and report its scoring-split advantage."""
    members = np.asarray(member_losses, dtype=np.float64).reshape(len(member_losses), -1)
    others = np.asarray(non_member_losses, dtype=np.float64).reshape(len(non_member_losses), -1)
    if members.shape[1] != len(model_names) or others.shape[1] != len(model_names):
        raise ValueError("the loss tables need one column per model")
    attacks = tuple(
        attack_model(name, members[:, j], others[:, j], split, confidence)
        for j, name in enumerate(model_names)
    )
    chosen = max(attacks, key=lambda a: a.selection_advantage)  # max keeps the first of ties
    delta = dp_delta or 0.0
    dp = dp_epsilon is not None
    return AuditResult(
        model=chosen.model,
        threshold=chosen.threshold,
        selection_advantage=chosen.selection_advantage,
        advantage=chosen.advantage,
        ci_low=chosen.ci_low,
        ci_high=chosen.ci_high,
        auc=chosen.auc,
        confidence=confidence,
        members=members.shape[0],
        non_members=others.shape[0],
        scored_members=int(split.score_members.size),
        scored_non_members=int(split.score_non_members.size),
        dp_epsilon=dp_epsilon,
        dp_delta=dp_delta if dp else None,
        dp_advantage_bound=dp_advantage_bound(dp_epsilon, delta) if dp else None,
        bound=replacement_bound(dp_epsilon, delta) if dp else None,
        models=attacks,
    )


# -- the losses ---------------------------------------------------------------------------------


def _loss_table(X: np.ndarray, y: np.ndarray, models: Sequence[ModelParams]) -> np.ndarray:
    """Per-model sums of squared errors on ``(X, y)``."""
    coef = np.stack([m.coef for m in models], axis=1)
    intercept = np.array([m.intercept for m in models])
    return np.sum((X @ coef + intercept - y[:, None]) ** 2, axis=0)


def _client_losses(
    ref: ClientRef, models: Sequence[ModelParams], chunk_size: int
) -> tuple[np.ndarray, int]:
    """One client's training-split MSE under each model, and its row count. The client's
    data is read once for all models."""
    sse, n = np.zeros(len(models)), 0
    for X, y in open_client(ref).chunks("train", chunk_size):
        sse += _loss_table(X, y, models)
        n += y.shape[0]
    return sse / max(n, 1), n


def client_losses(config: FLConfig, models: Sequence[ModelParams]) -> tuple[np.ndarray, np.ndarray]:
    """Training-split MSE under each raw-unit model (one column per model) of every registered
    client (the members) and of as many held-out clients (the non-members)."""
    data, seed, chunk = config.data, config.experiment.seed, config.client.chunk_size
    if data.source not in ("synthetic", "diabetes"):
        raise ValueError(
            "data.source: the membership audit needs held-out clients from the same "
            "distribution, which only simulated sources (synthetic, diabetes) can provide"
        )
    rows = [_client_losses(ref, models, chunk) for ref in registry(data, seed)]
    members = np.array([losses for losses, _ in rows])
    if data.source == "synthetic":
        fresh = registry(data, seed + _HELD_OUT_SEED_OFFSET)
        others = np.array([_client_losses(ref, models, chunk)[0] for ref in fresh])
    else:
        size = int(np.median([n for _, n in rows]))
        others = _held_out_groups(config, models, size)
        if others.shape[0] < 2:
            raise ValueError(
                f"diabetes: the central hold-out makes {others.shape[0]} held-out client(s) of "
                f"a member's {size} training rows, and the audit needs 2; raise "
                "data.holdout_fraction or data.num_clients"
            )
    return members, others


def _held_out_groups(config: FLConfig, models: Sequence[ModelParams], size: int) -> np.ndarray:
    """diabetes: the central hold-out rows dealt into groups of about a member's training-split
    size, by the run's own partition scheme, so that a group's loss differs from a member's in
    nothing but membership (a group of other size would have a loss of other spread)."""
    held_out = central_test_set(config.data, config.experiment.seed)
    if held_out is None:
        return np.zeros((0, len(models)))
    X, y = held_out
    groups = partition.partition(
        y,
        max(1, y.shape[0] // max(size, 1)),
        config.data.partition,
        np.random.default_rng([config.experiment.seed, _HELD_OUT_SEED_OFFSET]),
        alpha=config.data.alpha,
        strictness=config.data.strictness,
    )
    return np.array([_loss_table(X[g], y[g], models) / g.size for g in groups if g.size])
