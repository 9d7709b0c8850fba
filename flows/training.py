"""The federated training flow: the round engine (:mod:`fl.engine`) over Prefect tasks.

setup (client statistics, exclusions, privacy plan) -> for each round: engine round
(sample -> train -> screen -> aggregate -> evaluate) and report it -> finish (final scores,
final model, summary).
"""

from __future__ import annotations

from typing import Any

from fedtune import fl
from fedtune.fl.config import FLConfig
from fedtune.fl.engine import RoundFailed, Run, RunState
from fedtune.fl.lifecycle import InitModel
from fedtune.flows.exchange import open_exchange
from fedtune.flows.reporting import RunReport, announce_setup
from fedtune.flows.runner import ConfiguredTaskRunner
from fedtune.tasks.tracking import (
    end_run,
    load_champion,
    load_checkpoint,
    load_init_model,
    own_champion_uri,
    start_run,
)
from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import BaseModel

__all__ = ["RoundFailed", "TrainingResult", "federated_training"]


class TrainingResult(BaseModel):
    """What a run returns (and what ``fedtune run --output`` writes)."""

    run_id: str
    model_uri: str
    registered_version: str | None = None
    feature_names: list[str]
    coef: list[float]
    """Final coefficients in raw feature units (the standardisation folded back in)."""
    intercept: float
    rounds_completed: int
    stopped_early: bool
    baseline_mse: float | None = None
    promoted: bool | None = None
    """With ``experiment.register_as``: whether the new version became the champion."""
    promotion: dict[str, str] | None = None
    """With ``experiment.register_as``: the decision, its reason and both scores (the
    ``fedtune.promotion*`` tags of the run and the model version)."""
    init_model: str | None = None
    """The model URI the run fine-tuned from; None when it trained from scratch."""
    excluded_clients: dict[str, str] = {}
    """Clients left out of the whole run (unusable data, a duplicate id), each with why."""
    dp_epsilon: float | None = None
    """DP runs: the ε spent over ``rounds_completed`` rounds, at ``dp_delta``."""
    dp_delta: float | None = None
    dp_noise_multiplier: float | None = None
    """DP runs: z, the noise multiplier (calibrated from ``privacy.target_epsilon`` if unset)."""
    dp_sampling_rate: float | None = None
    """DP runs: q, the Poisson rate at which a client joins a round."""
    dp_statistics_noise_multiplier: float | None = None
    """DP runs: z_s, the noise multiplier of the feature statistics (their share is in
    ``dp_epsilon``)."""
    secure_aggregation: bool = False
    history: list[dict[str, Any]]


@flow(
    name="federated-training",
    persist_result=False,
    task_runner=ConfiguredTaskRunner(),  # config.runner's: threads or Dask
    log_prints=False,
)
def federated_training(
    config: FLConfig = FLConfig(),  # noqa: B008
    resume_run_id: str | None = None,
) -> TrainingResult:
    """Train one model across the clients of ``config.data`` (FedAvg, or the configured
    strategy, under the configured privacy).

    With ``resume_run_id``, continue that MLflow run from its last completed round (its
    checkpoint); without DP the result equals an uninterrupted run's.
    """
    logger = get_run_logger()
    run_id = resume_run_id or start_run(config, tags=_run_tags(config))
    exchange = open_exchange(config)
    try:
        champion = load_champion(config)
        init = _init_model(config, champion, logger)
        announce_setup(config, logger)
        run = Run.setup(config, exchange, init)
        report = RunReport(run, run_id, logger)
        report.started(resume_run_id is not None, None if init is None else init[0])
        state = _initial_state(run, init, resume_run_id, report)
        for record in run.rounds(state):
            report.round(record, state)
        outcome = run.finish(state, None if champion is None else champion[1].raw)
        summary = report.finish(state, outcome, None if init is None else init[0])
    except BaseException:
        end_run(config, run_id, "FAILED")
        raise
    finally:
        exchange.close()
    promoted = None if outcome.promotion is None else outcome.promotion.promote
    reported = {k: v for k, v in summary.items() if k in TrainingResult.model_fields}
    return TrainingResult(run_id=run_id, promoted=promoted, history=state.history, **reported)


def _init_model(
    config: FLConfig, champion: tuple[str, InitModel] | None, logger
) -> tuple[str, InitModel] | None:
    """The model to fine-tune from, if ``experiment.init_model`` names one that exists."""
    if not config.experiment.init_model:
        return None
    if config.experiment.init_model == own_champion_uri(config) and champion is None:
        # A scheduled fine-tune of its own champion: the very first run has none yet.
        logger.info("no champion of %s yet: training from scratch", config.experiment.register_as)
        return None
    return load_init_model(config)


def _initial_state(
    run: Run, init: tuple[str, InitModel] | None, resume_run_id: str | None, report: RunReport
) -> RunState:
    if resume_run_id is None:
        return run.start(None if init is None else init[1])
    state = run.resume(*load_checkpoint(run.config, resume_run_id))
    report.resumed(state)
    return state


def _run_tags(config: FLConfig) -> dict[str, str]:
    return {
        "fedtune.version": fl.__version__,
        "fedtune.data.source": config.data.source,
        "prefect.flow_run_id": str(flow_run.get_id() or ""),
    }
