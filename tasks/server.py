"""Server-side tasks that run beside the round engine."""

from __future__ import annotations

from fedtune.fl import evaluation
from fedtune.fl.config import DataConfig
from fedtune.tasks import TASK_OPTIONS
from prefect import task


@task(name="pooled-baseline", **TASK_OPTIONS)
def pooled_baseline(data: DataConfig, seed: int) -> float | None:
    """Simulation-only diagnostic: OLS on the pooled rows, never used for training."""
    return evaluation.pooled_baseline(data, seed)
