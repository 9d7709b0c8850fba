"""What a run tells people as it goes: one console line per round, MLflow (one batch per round,
with the round's model and checkpoint, off the critical path), and at the end the final model,
the summary and the Prefect artifacts (a markdown summary and the per-round table)."""

from __future__ import annotations

import logging
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture

from fl.config import FLConfig
from fl.engine import Outcome, RoundRecord, Run, RunState
from fl.evaluation import named
from fl.privacy.plan import privacy_summary
from tasks.server import pooled_baseline
from tasks.tracking import end_run, log_final, log_round, tracking_uri


class RunReport:
    """Reports one run: the console lines, and MLflow through ``log_round`` tasks chained so
    that writes land in order while the next round trains."""

    def __init__(self, run: Run, run_id: str, logger: logging.Logger | Any):
        self.run = run
        self.config = run.config
        self.run_id = run_id
        self.logger = logger
        self.pending: dict[int, dict[str, float]] = {}
        self.logs: list[PrefectFuture] = []
        self.baseline: PrefectFuture | None = None

    def started(self, resumed: bool) -> None:
        run = self.run
        for cid, why in run.excluded:
            self.logger.warning("client %s excluded from this run: %s", cid, why)
        self.baseline = pooled_baseline.submit(self.config.data, self.config.experiment.seed)
        if resumed:
            return
        if run.plan is not None:
            self.queue(
                0,
                {
                    "dp_noise_multiplier": run.plan.noise_multiplier,
                    "dp_sampling_rate": run.plan.sampling_rate,
                },
            )
        if run.secure:
            self.queue(0, {"secagg_setup_seconds": run.setup_seconds})

    def resumed(self, state: RunState) -> None:
        self.logger.info("resuming run %s after round %d", self.run_id, len(state.history))

    def queue(self, step: int, metrics: dict[str, float]) -> None:
        self.pending.setdefault(step, {}).update(metrics)

    def send(self, step: int, state: RunState | None = None, checkpoint=None) -> None:
        """Send what is queued (with ``state``'s model and ``checkpoint``: one batch)."""
        batch, self.pending = self.pending, {}
        params = None if state is None else state.params
        self.logs.append(
            log_round.submit(
                self.config,
                self.run_id,
                step,
                batch,
                params,
                self.run.stats,
                self.run.names,
                checkpoint,
                wait_for=self.logs[-1:],
            )  # fmt: skip
        )

    def round(self, record: RoundRecord, state: RunState) -> None:
        r = record.round
        if record.aborted:
            self.logger.warning(
                "round %d: secure aggregation aborted, model unchanged: %s", r, record.aborted
            )
        for cid, why in record.failures:
            self.logger.warning("round %d: client %s left out: %s", r, cid, why)
        for cid, why in record.silent:
            self.logger.warning(
                "round %d: client %s did not answer the unmasking request: %s", r, cid, why
            )
        if record.failed:
            self.logger.warning("%s; the global model stays as it was", record.failed)
        if record.initial:
            self.queue(0, record.initial)
        if record.scored is not None:
            self.scored(record.scored)
        if record.stop == "budget":
            self.logger.info("privacy budget: round %d would exceed target_epsilon; stopping", r)
        elif record.stop == "early":
            self.logger.info("early stop: round %d did not improve; keeping it", r - 1)
        if record.checkpoint is not None:
            metrics = {k: v for k, v in record.metrics.items() if k not in NOT_METRICS}
            self.queue(r, metrics)
            self.send(r, state, record.checkpoint)

    def scored(self, entry: dict[str, Any]) -> None:
        """Log the line of a round whose federated score is in."""
        fed = {k: v for k, v in entry.items() if k.startswith("fed_")}
        self.queue(entry["round"], fed)
        self.logger.info(
            "round %d/%d  clients %d ok %d failed  train_loss %.5g  fed_mse %.5g",
            entry["round"],
            self.config.rounds.num_rounds,
            entry["clients_ok"],
            entry["clients_failed"],
            entry["train_loss"],
            entry.get("fed_mse", float("nan")),
        )

    def finish(self, state: RunState, outcome: Outcome, init_model: str | None) -> dict[str, Any]:
        """Log the final model, the summary and the artifacts; end the MLflow run."""
        run, history = self.run, state.history
        if outcome.scored is not None:
            self.scored(outcome.scored)
        if outcome.personalization:
            self.queue(len(history), outcome.personalization)
        promotion = outcome.promotion
        if promotion is not None:
            champion = promotion.champion_mse
            self.logger.info(
                "challenger fed_mse %.6g vs champion %s: %s",
                promotion.challenger_mse,
                "none" if champion is None else f"{champion:.6g}",
                "promote" if promotion.promote else "keep the champion",
            )
        baseline_mse = self.baseline.result()
        if baseline_mse is not None:
            self.queue(0, {"baseline_mse": baseline_mse})
        self.send(0)
        for f in self.logs:
            f.result()
        raw = state.params.to_raw(run.stats)
        summary = {
            **privacy_summary(run.plan, state.accountant, run.secure),
            "feature_names": run.names,
            "coef": raw.coef.tolist(),
            "intercept": raw.intercept,
            "rounds_completed": len(history),
            "stopped_early": state.stopped_early,
            "baseline_mse": baseline_mse,
            "final_metrics": history[-1] if history else named("fed", outcome.final),
            "excluded_clients": dict(run.excluded),
            "init_model": init_model,
            "promotion": None if promotion is None else promotion.tags(),
        }
        model_uri, version = log_final(
            self.config, self.run_id, state.params, run.stats, run.names, history, baseline_mse,
            summary, promotion,
        )  # fmt: skip
        end_run(self.config, self.run_id)
        publish_summary(self.config, self.run_id, summary, history, model_uri, version)
        return {**summary, "model_uri": model_uri, "registered_version": version}


NOT_METRICS = ("round", "failed_clients")
"""History entries that are not MLflow metrics."""


def _run_link(config: FLConfig, run_id: str) -> str:
    uri = tracking_uri(config)
    if uri.startswith(("http://", "https://")):
        return f"[MLflow run {run_id}]({uri.rstrip('/')}/#/runs/{run_id})"
    return f"MLflow run `{run_id}` (`mlflow ui --backend-store-uri {uri}`)"


def publish_summary(
    config: FLConfig,
    run_id: str,
    summary: dict[str, Any],
    history: list[dict[str, Any]],
    model_uri: str,
    version: str | None,
) -> None:
    final = summary["final_metrics"]
    lines = [
        f"# fedtune: {config.experiment.name}",
        "",
        f"- {_run_link(config, run_id)}",
        f"- model: `{model_uri}`"
        + (f", registered as `{config.experiment.register_as}` v{version}" if version else ""),
        f"- rounds: {summary['rounds_completed']}"
        + (" (stopped early)" if summary["stopped_early"] else ""),
        f"- federated eval MSE: {final.get('fed_mse', float('nan')):.6g}",
    ]
    if "central_mse" in final:
        lines.append(f"- central eval MSE: {final['central_mse']:.6g}")
    if summary.get("baseline_mse") is not None:
        lines.append(f"- pooled-data OLS baseline MSE: {summary['baseline_mse']:.6g}")
    if summary.get("dp_epsilon") is not None:
        lines.append(f"- privacy: (ε, δ) = ({summary['dp_epsilon']:.4g}, {summary['dp_delta']})")
    if summary.get("promotion"):
        p = summary["promotion"]
        lines.append(
            f"- promotion: **{p['fedtune.promotion']}** ({p['fedtune.promotion.reason']}); "
            f"challenger {p['fedtune.challenger_fed_mse']}, "
            f"champion {p['fedtune.champion_fed_mse'] or 'none'}"
        )
    create_markdown_artifact("\n".join(lines), key="fedtune-summary", description="Run summary")
    create_table_artifact(
        [{k: v for k, v in h.items()} for h in history],
        key="fedtune-rounds",
        description="Per-round metrics",
    )
