"""The round loop as plain Python over the ``fl`` functions, with no orchestration.

It is the reference the Prefect flow must match bit for bit (same config, same seed), and the
quickest way to try a configuration in a notebook.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fl import client
from fl.config import FLConfig
from fl.data import registry
from fl.evaluation import EvalSums, central_evaluate, round_metrics
from fl.params import FeatureStats, ModelParams
from fl.rounds import EarlyStopping, clients_per_round, sample_clients
from fl.statistics import combine_reports
from fl.strategies import make_strategy


@dataclass
class SimulationResult:
    params: ModelParams
    stats: FeatureStats
    feature_names: list[str]
    history: list[dict[str, float]] = field(default_factory=list)


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
        params, state = strategy.aggregate(params, updates, state)
        federated = EvalSums.merge_all(client.evaluate(ref, params, stats, chunk) for ref in refs)
        central = central_evaluate(params, stats, config.data, seed)
        result.history.append({"round": r, **round_metrics(updates, federated, central)})
        if stopper.update(result.history[-1]["fed_mse"]):
            break
    result.params = params
    return result
