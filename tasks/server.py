"""Server-side tasks: feature statistics, aggregation and central evaluation."""

from __future__ import annotations

import numpy as np
from prefect import task

from fl import evaluation
from fl.config import DataConfig
from fl.evaluation import EvalSums
from fl.params import ClientUpdate, FeatureStats, ModelParams
from fl.privacy import DPFedAvg
from fl.statistics import StatsReport, combine_reports
from fl.strategies import Strategy, StrategyState
from tasks import TASK_OPTIONS


@task(name="feature-statistics", **TASK_OPTIONS)
def feature_statistics(reports: list[StatsReport]) -> tuple[list[str], FeatureStats]:
    return combine_reports(reports)


@task(name="aggregate", task_run_name="aggregate-r{round_num:02d}", **TASK_OPTIONS)
def aggregate(
    strategy: Strategy,
    global_params: ModelParams,
    updates: list[ClientUpdate],
    state: StrategyState,
    round_num: int,
) -> tuple[ModelParams, StrategyState]:
    return strategy.aggregate(global_params, updates, state)


@task(name="aggregate-secure-sum", task_run_name="aggregate-r{round_num:02d}", **TASK_OPTIONS)
def aggregate_sum(
    strategy: DPFedAvg,
    global_params: ModelParams,
    contribution_sum: np.ndarray,
    num_clients: int,
    state: StrategyState,
    round_num: int,
) -> tuple[ModelParams, StrategyState]:
    """The next model from a sum recovered by secure aggregation (noise added here)."""
    return strategy.aggregate_sum(global_params, contribution_sum, num_clients, state)


@task(name="central-evaluation", task_run_name="central-eval-r{round_num:02d}", **TASK_OPTIONS)
def central_evaluate(
    params: ModelParams, stats: FeatureStats, data: DataConfig, seed: int, round_num: int
) -> EvalSums | None:
    return evaluation.central_evaluate(params, stats, data, seed)


@task(name="pooled-baseline", **TASK_OPTIONS)
def pooled_baseline(data: DataConfig, seed: int) -> float | None:
    """Simulation-only diagnostic: OLS on the pooled rows, never used for training."""
    return evaluation.pooled_baseline(data, seed)
