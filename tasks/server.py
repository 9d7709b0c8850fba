"""Server-side tasks that run beside the round engine."""

from __future__ import annotations

from prefect import task

from fl import evaluation
from fl.config import DataConfig
from tasks import TASK_OPTIONS


@task(name="pooled-baseline", **TASK_OPTIONS)
def pooled_baseline(data: DataConfig, seed: int) -> float | None:
    """Simulation-only diagnostic: OLS on the pooled rows, never used for training."""
    return evaluation.pooled_baseline(data, seed)
