"""The federated training flow: the round loop, read top to bottom.

statistics -> for each round: sample -> train (one task per client) -> aggregate -> evaluate
-> log -> stop or continue -> final model.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel

import fl
from fl.config import FLConfig
from fl.data import ClientRef, registry
from fl.evaluation import EvalSums, round_metrics
from fl.params import ClientUpdate, ModelParams
from fl.rounds import EarlyStopping, clients_per_round, sample_clients
from tasks.client import client_statistics, evaluate_client, train_client
from tasks.server import aggregate, central_evaluate, feature_statistics, pooled_baseline
from tasks.tracking import end_run, log_final, log_round, start_run

# Client tasks are short and mostly hold the GIL; a few threads overlap the orchestration
# round-trips without thrashing two cores. Swap in any Prefect task runner (e.g. prefect-dask)
# with `federated_training.with_options(task_runner=...)`.
DEFAULT_TASK_RUNNER = ThreadPoolTaskRunner(max_workers=4)


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
    history: list[dict[str, Any]]


class RoundFailed(RuntimeError):
    """A round could not produce a new global model; the previous one stands."""


def _collect(futures: list[PrefectFuture], refs: list[ClientRef]):
    """Split finished client tasks into updates and ``(client_id, reason)`` failures."""
    updates: list[ClientUpdate] = []
    failures: list[tuple[str, str]] = []
    for ref, future in zip(refs, futures, strict=True):
        outcome = future.result(raise_on_failure=False)
        if isinstance(outcome, BaseException):
            failures.append((ref.client_id, f"{type(outcome).__name__}: {outcome}"))
        else:
            updates.append(outcome)
    return updates, failures


@flow(
    name="federated-training",
    persist_result=False,
    task_runner=DEFAULT_TASK_RUNNER,
    log_prints=False,
)
def federated_training(config: FLConfig = FLConfig()) -> TrainingResult:  # noqa: B008
    """Train one model across the clients of ``config.data`` with federated averaging."""
    logger = get_run_logger()
    seed, chunk = config.experiment.seed, config.client.chunk_size
    refs = registry(config.data, seed)
    k = clients_per_round(config.rounds, len(refs))
    run_id = start_run(
        config,
        tags={
            "fedtune.version": fl.__version__,
            "fedtune.data.source": config.data.source,
            "prefect.flow_run_id": str(flow_run.get_id() or ""),
        },
    )
    try:
        reports = client_statistics.map(refs, unmapped(chunk)).result()
        names, stats = feature_statistics(reports)
        baseline = pooled_baseline.submit(config.data, seed)
        params = ModelParams.zeros(len(names))
        state: dict[str, Any] = {}
        stopper = EarlyStopping(config.rounds.tolerance, config.rounds.patience)
        history: list[dict[str, Any]] = []
        logs: list[PrefectFuture] = []
        stopped_early = False
        for r in range(1, config.rounds.num_rounds + 1):
            started = time.perf_counter()
            sampled = [refs[i] for i in sample_clients(len(refs), k, seed, r)]
            updates, failures = _collect(
                train_client.map(
                    sampled, unmapped(params), unmapped(stats), unmapped(config.client), r
                ),
                sampled,
            )
            if not updates:
                reasons = "; ".join(f"{cid}: {why}" for cid, why in failures[:3])
                raise RoundFailed(f"round {r}: no client update succeeded ({reasons})")
            params, state = aggregate(params, updates, state, config.server, r)
            federated = EvalSums.merge_all(
                evaluate_client.map(refs, unmapped(params), unmapped(stats), chunk, r).result()
            )
            central = central_evaluate(params, stats, config.data, seed, r)
            metrics = {
                **round_metrics(updates, federated, central),
                "clients_ok": len(updates),
                "clients_failed": len(failures),
                "round_seconds": time.perf_counter() - started,
            }
            history.append({"round": r, **metrics})
            # Logging overlaps the next round; chaining keeps MLflow writes in order.
            logs.append(
                log_round.submit(
                    config, run_id, r, metrics, params, stats, names, wait_for=logs[-1:]
                )
            )
            logger.info(
                "round %d/%d  clients %d ok %d failed  train_loss %.5g  fed_mse %.5g",
                r,
                config.rounds.num_rounds,
                len(updates),
                len(failures),
                metrics["train_loss"],
                metrics["fed_mse"],
            )
            for cid, why in failures:
                logger.warning("round %d: client %s left out: %s", r, cid, why)
            if stopper.update(metrics["fed_mse"]):
                stopped_early = r < config.rounds.num_rounds
                logger.info("early stop after round %d (no improvement)", r)
                break
        for f in logs:
            f.result()
        baseline_mse = baseline.result()
        if baseline_mse is not None:
            log_round(config, run_id, 0, {"baseline_mse": baseline_mse}, None, stats, names)
        raw = params.to_raw(stats)
        summary = {
            "feature_names": names,
            "coef": raw.coef.tolist(),
            "intercept": raw.intercept,
            "rounds_completed": len(history),
            "stopped_early": stopped_early,
            "baseline_mse": baseline_mse,
            "final_metrics": history[-1],
        }
        model_uri, version = log_final(
            config, run_id, params, stats, names, history, baseline_mse, summary
        )
        end_run(config, run_id)
    except BaseException:
        end_run(config, run_id, "FAILED")
        raise
    return TrainingResult(
        run_id=run_id,
        model_uri=model_uri,
        registered_version=version,
        feature_names=names,
        coef=raw.coef.tolist(),
        intercept=raw.intercept,
        rounds_completed=len(history),
        stopped_early=stopped_early,
        baseline_mse=baseline_mse,
        history=history,
    )
