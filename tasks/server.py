"""Server-side tasks: feature statistics, aggregation and central evaluation."""

from __future__ import annotations

from prefect import task

from fl import evaluation
from fl.config import DataConfig, ServerConfig
from fl.evaluation import EvalSums
from fl.params import ClientUpdate, FeatureStats, ModelParams
from fl.statistics import StatsReport, combine_reports
from fl.strategies import StrategyState, make_strategy
from tasks import TASK_OPTIONS


@task(name="feature-statistics", **TASK_OPTIONS)
def feature_statistics(reports: list[StatsReport]) -> tuple[list[str], FeatureStats]:
    return combine_reports(reports)


@task(name="aggregate", task_run_name="aggregate-r{round_num:02d}", **TASK_OPTIONS)
def aggregate(
    global_params: ModelParams,
    updates: list[ClientUpdate],
    state: StrategyState,
    cfg: ServerConfig,
    round_num: int,
) -> tuple[ModelParams, StrategyState]:
    return make_strategy(cfg).aggregate(global_params, updates, state)


@task(name="central-evaluation", task_run_name="central-eval-r{round_num:02d}", **TASK_OPTIONS)
def central_evaluate(
    params: ModelParams, stats: FeatureStats, data: DataConfig, seed: int, round_num: int
) -> EvalSums | None:
    return evaluation.central_evaluate(params, stats, data, seed)


@task(name="pooled-baseline", **TASK_OPTIONS)
def pooled_baseline(data: DataConfig, seed: int) -> float | None:
    """Simulation-only diagnostic: OLS on the pooled rows, never used for training."""
    return evaluation.pooled_baseline(data, seed)
