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

from fl import client
from fl.config import FLConfig
from fl.data import registry
from fl.evaluation import (
    EvalSums,
    central_evaluate,
    named,
    received_evaluation,
    train_loss,
)
from fl.params import FeatureStats, ModelParams
from fl.rounds import EarlyStopping, clients_per_round, sample_clients
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
    strategy, state = make_strategy(config.server), {}
    k = clients_per_round(config.rounds, len(refs))
    stopper = EarlyStopping(config.rounds.tolerance, config.rounds.patience)
    result = SimulationResult(params, stats, names)
    for r in range(1, config.rounds.num_rounds + 1):
        sampled = [refs[i] for i in sample_clients(len(refs), k, seed, r)]
        updates = [client.train(ref, params, stats, config.client, r) for ref in sampled]
        scored = named("fed", received_evaluation(updates))
        if r == 1:
            result.initial = scored
        else:
            result.history[-1].update(scored)
            if stopper.update(scored["fed_mse"]):
                result.stopped_early = True
                break
        params, state = strategy.aggregate(params, updates, state)
        central = central_evaluate(params, stats, config.data, seed)
        result.history.append(
            {
                "round": r,
                "train_loss": train_loss(updates),
                **named("central", central),
                "clients_ok": len(updates),
            }
        )
    if not result.stopped_early:
        final = EvalSums.merge_all(client.evaluate(ref, params, stats, chunk) for ref in refs)
        result.history[-1].update(named("fed", final))
    result.params = params
    return result
