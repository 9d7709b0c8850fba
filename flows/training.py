"""The federated training flow: the round loop, read top to bottom.

statistics -> for each round: sample -> train (one task per client) -> aggregate -> evaluate
-> log -> stop or continue -> final model.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, unmapped
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote
from pydantic import BaseModel

import fl
from fl.config import FLConfig
from fl.data import duplicate_clients, registry
from fl.evaluation import EvalSums, named, received_evaluation, train_loss
from fl.lifecycle import decide_promotion
from fl.params import ModelParams, screen_updates
from fl.privacy import (
    budget_exhausted,
    plan_privacy,
    privacy_accountant,
    privacy_summary,
    sample_round,
)
from fl.rounds import EarlyStopping, clients_per_round
from fl.secagg import SecAggAbort
from fl.statistics import consistent_reports
from fl.strategies import make_strategy
from flows.outcomes import collect
from flows.reporting import personalization_metrics, publish_summary
from flows.secure_aggregation import SecureAggregation, open_secure_aggregation
from tasks.client import client_statistics, final_report, train_client
from tasks.server import (
    aggregate,
    aggregate_sum,
    central_evaluate,
    feature_statistics,
    pooled_baseline,
)
from tasks.tracking import (
    end_run,
    load_champion,
    load_checkpoint,
    load_init_model,
    log_final,
    log_round,
    own_champion_uri,
    start_run,
)


def default_task_runner() -> ThreadPoolTaskRunner:
    """Threads, as many as Prefect's ``PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS`` says,
    else one.

    One is the measured optimum for small clients: their tasks hold the GIL (Prefect's own
    orchestration as much as ``partial_fit``), so more threads only contend. Clients that wait
    on I/O gain from more. Any Prefect task runner (e.g. prefect-dask's ``DaskTaskRunner``)
    plugs in with ``federated_training.with_options(task_runner=...)``.
    """
    from prefect.settings import get_current_settings

    workers = get_current_settings().tasks.runner.thread_pool_max_workers
    return ThreadPoolTaskRunner(max_workers=workers or 1)


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
    history: list[dict[str, Any]]


class RoundFailed(RuntimeError):
    """A round could not produce a new global model; the previous one stands."""


@flow(
    name="federated-training",
    persist_result=False,
    task_runner=default_task_runner(),
    log_prints=False,
)
def federated_training(
    config: FLConfig = FLConfig(),  # noqa: B008
    resume_run_id: str | None = None,
) -> TrainingResult:
    """Train one model across the clients of ``config.data`` with federated averaging.

    With ``resume_run_id``, continue that MLflow run from its last completed round (its
    checkpoint); the result equals an uninterrupted run's.

    Round ``r`` trains ``w_r`` from ``w_{r-1}``; the clients of round ``r + 1`` score ``w_r`` on
    their local test splits before training from it (one model broadcast per round, not two),
    and every client scores the final model at the end. A round's line is reported once its
    federated score is in.
    """
    logger = get_run_logger()
    seed, chunk, total = config.experiment.seed, config.client.chunk_size, config.rounds.num_rounds
    refs = registry(config.data, seed)
    k = clients_per_round(config.rounds, len(refs))
    run_id = resume_run_id or start_run(config, tags=_run_tags(config))
    logs: list[PrefectFuture] = []
    pending: dict[int, dict[str, float]] = {}
    secure: SecureAggregation | None = None

    def log(
        step: int,
        metrics: dict[str, float],
        params: ModelParams | None = None,
        checkpoint: dict[str, Any] | None = None,
    ) -> None:
        """Queue ``metrics`` at ``step``; with ``params``, send the queue with the round's
        model and checkpoint (one MLflow batch per round)."""
        pending.setdefault(step, {}).update(metrics)
        if params is not None:
            send(step, params, checkpoint)

    def send(
        step: int, params: ModelParams | None, checkpoint: dict[str, Any] | None = None
    ) -> None:
        # Logging overlaps the next round; chaining keeps MLflow writes in order.
        batch = dict(pending)
        pending.clear()
        logs.append(
            log_round.submit(
                config, run_id, step, batch, params, stats, names, checkpoint, wait_for=logs[-1:]
            )
        )

    def scored(entry: dict[str, Any], fed: dict[str, float]) -> None:
        entry.update(fed)
        log(entry["round"], fed)
        logger.info(
            "round %d/%d  clients %d ok %d failed  train_loss %.5g  fed_mse %.5g",
            entry["round"],
            total,
            entry["clients_ok"],
            entry["clients_failed"],
            entry["train_loss"],
            entry.get("fed_mse", float("nan")),
        )

    try:
        champion = load_champion(config)
        init = None
        if config.experiment.init_model == own_champion_uri(config) and champion is None:
            # A scheduled fine-tune of its own champion: the very first run has none yet.
            logger.info(
                "no champion of %s yet: training from scratch", config.experiment.register_as
            )
        elif config.experiment.init_model:
            init = load_init_model(config)
        answered, excluded = collect(client_statistics.map(refs, unmapped(chunk)), refs)
        reports = list(answered.values())
        excluded = duplicate_clients(config.data) + excluded
        reports, mismatched = consistent_reports(reports)
        excluded += mismatched
        for cid, why in excluded:
            logger.warning("client %s excluded from this run: %s", cid, why)
        if not reports:
            raise RoundFailed("no client has usable data: " + "; ".join(w for _, w in excluded[:3]))
        usable = {r.client_id for r in reports}
        refs = [ref for ref in refs if ref.client_id in usable]
        k = clients_per_round(config.rounds, len(refs))
        names, stats = feature_statistics(reports)
        if init is not None:
            stats = init[1].stats_for(stats, init[0])
        baseline = pooled_baseline.submit(config.data, seed)
        plan = plan_privacy(config, len(refs))
        strategy = make_strategy(config, plan)
        accountant = privacy_accountant(plan)
        if plan is not None and resume_run_id is None:
            log(
                0,
                {
                    "dp_noise_multiplier": plan.noise_multiplier,
                    "dp_sampling_rate": plan.sampling_rate,
                },
            )
        params = (
            ModelParams.zeros(len(names)) if init is None else init[1].raw.to_standardised(stats)
        )
        state: dict[str, Any] = {}
        stopper = EarlyStopping(config.rounds.tolerance, config.rounds.patience)
        history: list[dict[str, Any]] = []
        stopped_early = False
        first_failure: str | None = None
        trainer = train_client.with_options(
            retries=config.client.retries, retry_delay_seconds=config.client.retry_delay_s
        )
        faults = config.injected_faults

        def deadline(started: float) -> float | None:
            timeout = config.rounds.round_timeout_s
            return None if timeout is None else timeout - (time.perf_counter() - started)

        start_round = 1
        if resume_run_id is not None:
            checkpoint, history = load_checkpoint(config, run_id)
            start_round = checkpoint["round"] + 1
            params = ModelParams.from_vector(np.asarray(checkpoint["params"], dtype=np.float64))
            state = checkpoint["state"]
            stopper.best_, stopper.stale_ = checkpoint["stopper"]
            if accountant is not None:
                accountant.rounds_ = checkpoint["accountant_rounds"]
            logger.info("resuming run %s after round %d", run_id, checkpoint["round"])
        if plan is not None and plan.secure_aggregation:
            setup_started = time.perf_counter()
            secure = open_secure_aggregation(refs, config, logger)  # fresh keys on resume too
            if resume_run_id is None:
                log(0, {"secagg_setup_seconds": time.perf_counter() - setup_started})
        for r in range(start_round, total + 1):
            if budget_exhausted(accountant, config.privacy.target_epsilon):
                logger.info("privacy budget: round %d would exceed target_epsilon; stopping", r)
                break
            started = time.perf_counter()
            sampled = [refs[i] for i in sample_round(plan, len(refs), k, seed, r)]
            secure_sum = None
            try:
                if secure is not None:
                    clip = strategy.clip_norm(state)
                    timeout = config.rounds.round_timeout_s
                    until = None if timeout is None else started + timeout
                    secure_sum, updates, failures = secure.round(
                        sampled, params, stats, clip, r, until
                    )
                else:
                    answered, failures = collect(
                        trainer.map(
                            [quote(ref) for ref in sampled],
                            unmapped(quote(params)),
                            unmapped(quote(stats)),
                            unmapped(quote(config.client)),
                            r,
                            unmapped(quote(faults)),
                        ),
                        sampled,
                        deadline(started),
                    )
                    updates = list(answered.values())
            except SecAggAbort as exc:
                # Fail closed: nothing is aggregated, the global model stays as it was.
                logger.warning("round %d: secure aggregation aborted, model unchanged: %s", r, exc)
                updates, failures = [], [(ref.client_id, str(exc)) for ref in sampled]
            if secure_sum is None:
                updates, rejected = screen_updates(updates, params, config.server.max_update_norm)
                failures += rejected
            for cid, why in failures:
                logger.warning("round %d: client %s left out: %s", r, cid, why)
            failed_round = plan is None and len(updates) < config.rounds.min_clients
            if failed_round:
                reasons = "; ".join(f"{cid}: {why}" for cid, why in failures[:3])
                first_failure = first_failure or (
                    f"round {r}: {len(updates)} usable update(s), rounds.min_clients is "
                    f"{config.rounds.min_clients} ({reasons})"
                )
                logger.warning("%s; the global model stays as it was", first_failure)
            fed = named("fed", received_evaluation(updates)) if updates else {}
            if r == 1:
                log(0, {f"initial_{key}": v for key, v in fed.items()})
            elif fed:
                scored(history[-1], fed)
                if stopper.update(fed["fed_mse"]):
                    stopped_early = True
                    logger.info("early stop: round %d did not improve; keeping it", r - 1)
                    break
            entry: dict[str, Any] = {"round": r}
            if failed_round:
                entry["round_failed"] = 1
            elif secure_sum is not None:
                params, state = aggregate_sum(strategy, params, secure_sum, len(updates), state, r)
            elif updates or plan is not None:  # under DP an empty round still adds noise
                params, state = aggregate(strategy, params, updates, state, r)
            if accountant is not None:
                entry["dp_epsilon"] = accountant.step().epsilon
            if plan is not None:
                entry["dp_clip_norm"] = strategy.clip_norm(state)
            central = central_evaluate(params, stats, config.data, seed, r)
            entry.update(
                {
                    "train_loss": train_loss(updates),
                    **named("central", central),
                    "clients_ok": len(updates),
                    "clients_failed": len(failures),
                    "clients_timed_out": sum("timed out" in why for _, why in failures),
                    "round_seconds": time.perf_counter() - started,
                    "failed_clients": "; ".join(f"{cid}: {why}" for cid, why in failures),
                }
            )
            history.append(entry)
            checkpoint = {
                "round": r,
                "params": params.to_vector().tolist(),
                "state": state,
                "stopper": [stopper.best_, stopper.stale_],
                "accountant_rounds": 0 if accountant is None else accountant.rounds_,
            }
            metrics = {k: v for k, v in entry.items() if k not in ("round", "failed_clients")}
            log(r, metrics, params, checkpoint)
        if all(h.get("round_failed") for h in history) and first_failure:
            raise RoundFailed(f"no round succeeded; {first_failure}")
        # Every client scores the final model (and the champion, on the same rows), and
        # optionally how much a local fine-tune of it would gain.
        reports = final_report.map(
            [quote(ref) for ref in refs],
            unmapped(quote(params)),
            unmapped(quote(stats)),
            unmapped(quote(config.client)),
            unmapped(quote(None if champion is None else champion[1].raw)),
            len(history),
        ).result()
        final_fed = EvalSums.merge_all(rep.evaluation for rep in reports)
        if not stopped_early:
            scored(history[-1], named("fed", final_fed))
        if config.client.personalize_epochs:
            log(len(history), personalization_metrics(reports))
        promotion = None
        if config.experiment.register_as:
            champion_mse = None
            if champion is not None:
                champion_mse = EvalSums.merge_all(r.champion for r in reports).metrics()["mse"]
            promotion = decide_promotion(
                final_fed.metrics()["mse"], champion_mse, config.experiment.promote_margin
            )
            logger.info(
                "challenger fed_mse %.6g vs champion %s: %s",
                promotion.challenger_mse,
                "none" if champion_mse is None else f"{champion_mse:.6g}",
                "promote" if promotion.promote else "keep the champion",
            )
        baseline_mse = baseline.result()
        if baseline_mse is not None:
            log(0, {"baseline_mse": baseline_mse})
        send(0, None)
        for f in logs:
            f.result()
        raw = params.to_raw(stats)
        summary = {
            **privacy_summary(plan, accountant),
            "feature_names": names,
            "coef": raw.coef.tolist(),
            "intercept": raw.intercept,
            "rounds_completed": len(history),
            "stopped_early": stopped_early,
            "baseline_mse": baseline_mse,
            "final_metrics": history[-1],
            "excluded_clients": dict(excluded),
            "init_model": None if init is None else init[0],
            "promotion": None if promotion is None else promotion.tags(),
        }
        model_uri, version = log_final(
            config, run_id, params, stats, names, history, baseline_mse, summary, promotion
        )
        end_run(config, run_id)
        publish_summary(config, run_id, summary, history, model_uri, version)
    except BaseException:
        end_run(config, run_id, "FAILED")
        raise
    finally:
        if secure is not None:
            secure.close()
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
        promoted=None if promotion is None else promotion.promote,
        history=history,
    )


def _run_tags(config: FLConfig) -> dict[str, str]:
    return {
        "fedtune.version": fl.__version__,
        "fedtune.data.source": config.data.source,
        "prefect.flow_run_id": str(flow_run.get_id() or ""),
    }
