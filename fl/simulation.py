"""The round loop as plain Python over the ``fl`` functions, with no orchestration.

It is the reference the Prefect flow must match bit for bit (same config, same seed), and the
quickest way to try a configuration in a notebook.

Round ``r`` trains ``w_r`` from ``w_{r-1}``. Federated evaluation rides along: the clients of
round ``r + 1`` score ``w_r`` on their test splits before training from it, and every client
scores the final model once at the end. Early stopping looks at that score, so a stop found in
round ``r + 1`` keeps ``w_r`` and discards the round's updates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fl import client, faults
from fl.config import FLConfig
from fl.data import registry
from fl.evaluation import (
    EvalSums,
    central_evaluate,
    named,
    received_evaluation,
    train_loss,
)
from fl.params import FeatureStats, ModelParams, screen_updates
from fl.privacy import (
    budget_exhausted,
    client_contribution,
    plan_privacy,
    privacy_accountant,
    sample_round,
)
from fl.rounds import EarlyStopping, clients_per_round
from fl.secagg import FixedPoint
from fl.statistics import combine_reports
from fl.strategies import make_strategy


@dataclass
class SimulationResult:
    params: ModelParams
    stats: FeatureStats
    feature_names: list[str]
    history: list[dict[str, Any]] = field(default_factory=list)
    initial: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False


def simulate(config: FLConfig) -> SimulationResult:
    seed, chunk = config.experiment.seed, config.client.chunk_size
    refs = registry(config.data, seed)
    names, stats = combine_reports([client.feature_moments(ref, chunk) for ref in refs])
    params = ModelParams.zeros(len(names))
    plan = plan_privacy(config, len(refs))
    strategy, state = make_strategy(config, plan), {}
    accountant = privacy_accountant(plan)
    k = clients_per_round(config.rounds, len(refs))
    stopper = EarlyStopping(config.rounds.tolerance, config.rounds.patience)
    result = SimulationResult(params, stats, names)
    for r in range(1, config.rounds.num_rounds + 1):
        if budget_exhausted(accountant, config.privacy.target_epsilon):
            break
        sampled = [refs[i] for i in sample_round(plan, len(refs), k, seed, r)]
        trained = []
        for ref in sampled:
            try:
                trained.append(
                    faults.train(config.injected_faults, ref, params, stats, config.client, r)
                )
            except faults.InjectedFault:
                continue
        updates, _ = screen_updates(trained, params, config.server.max_update_norm)
        failed_round = plan is None and len(updates) < config.rounds.min_clients
        scored = named("fed", received_evaluation(updates)) if updates else {}
        if r == 1:
            result.initial = scored
        elif scored:
            result.history[-1].update(scored)
            if stopper.update(scored["fed_mse"]):
                result.stopped_early = True
                break
        entry: dict[str, Any] = {"round": r}
        if failed_round:
            entry["round_failed"] = 1
        elif plan is not None and plan.secure_aggregation:
            params, state = _secure_sum_aggregate(strategy, params, updates, state)
        else:
            params, state = strategy.aggregate(params, updates, state)
        if accountant is not None:
            entry["dp_epsilon"] = accountant.step().epsilon
        central = central_evaluate(params, stats, config.data, seed)
        entry.update(
            {
                "train_loss": train_loss(updates),
                **named("central", central),
                "clients_ok": len(updates),
            }
        )
        result.history.append(entry)
    if not result.stopped_early:
        final = EvalSums.merge_all(client.evaluate(ref, params, stats, chunk) for ref in refs)
        result.history[-1].update(named("fed", final))
    result.params = params
    return result


def _secure_sum_aggregate(strategy, params, updates, state):
    """What secure aggregation recovers, without running the protocol: masks cancel exactly
    in Z_(2^64), so the server's sum is the decoded sum of the encoded contributions."""
    clip = strategy.clip_norm(state)
    codec = FixedPoint(bound=max(clip, 1.0))
    encoded = [codec.encode(client_contribution(params, u.params, clip)) for u in updates]
    total = codec.decode(np.sum(encoded, axis=0, dtype=np.uint64))
    return strategy.aggregate_sum(params, total, len(updates), state)
