"""What a run tells people as it goes: one console line per round, MLflow (one batch per round,
with the round's model and checkpoint, as tasks the flow does not wait for; with the default
single worker thread they still share it with the clients' tasks), and at the end the final
model, the summary and the Prefect artifacts (a markdown summary and the per-round table)."""

from __future__ import annotations

import logging
import re
from typing import Any

from fedtune.fl.config import FLConfig
from fedtune.fl.data import registry
from fedtune.fl.engine import Outcome, RoundRecord, Run, RunState
from fedtune.fl.evaluation import named
from fedtune.fl.privacy.plan import privacy_accountant, privacy_summary
from fedtune.fl.privacy.release import released_history, released_metrics, released_summary
from fedtune.tasks.server import pooled_baseline
from fedtune.tasks.tracking import end_run, log_final, log_round, run_url, tracking_uri
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture


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
        self.dp = run.plan is not None
        """Under DP only what :mod:`fl.privacy.release` allows reaches MLflow and Prefect
        artifacts; the console still says everything (operator-side)."""

    def started(self, resumed: bool, init_model: str | None = None) -> None:
        """Say who is left out, what the run starts from (``init_model``: the model URI a
        fine-tune loaded) and what privacy it plans."""
        run = self.run
        if not self.dp:  # OLS on the pooled raw rows: never released under DP
            self.baseline = pooled_baseline.submit(self.config.data, self.config.experiment.seed)
        for cid, why in run.excluded:
            self.logger.warning("client %s excluded from this run: %s", cid, why)
        if init_model is not None and not resumed:
            self.logger.info("fine-tuning from %s", describe_init_model(self.config, init_model))
        if run.plan is not None:
            self.logger.info("privacy: %s", planned_privacy(self.config, run))
        if run.secure:
            keys = (
                f"keys per run, set up in {run.setup_seconds:.2g} s"
                if self.config.privacy.secagg_keys == "run"
                else "fresh keys every round"
            )
            self.logger.info(
                "secure aggregation: on (the server sees only the sum of the updates; %s)", keys
            )
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
        self.pending.setdefault(step, {}).update(released_metrics(metrics, self.dp))

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
            self.logger.info(
                "privacy budget: round %d would take ε above the target %g; keeping round %d's "
                "model (ε = %.3g spent)",
                r,
                self.config.privacy.target_epsilon,
                r - 1,
                state.accountant.spent().epsilon,
            )
        elif record.stop == "early":
            self.logger.info("%s", early_stop_message(self.config, state.history, r))
        if record.checkpoint is not None:
            metrics = {k: v for k, v in record.metrics.items() if k not in NOT_METRICS}
            self.queue(r, metrics)
            self.send(r, state, record.checkpoint)

    def scored(self, entry: dict[str, Any]) -> None:
        """Log the line of a round whose federated score is in."""
        fed = {k: v for k, v in entry.items() if k.startswith("fed_")}
        self.queue(entry["round"], fed)
        self.logger.info(
            "round %d/%d  clients %d ok, %d failed  train_loss %.5g  fed_mse %.5g%s",
            entry["round"],
            self.config.rounds.num_rounds,
            entry["clients_ok"],
            entry["clients_failed"],
            entry["train_loss"],
            entry.get("fed_mse", float("nan")),
            f"  ε {entry['dp_epsilon']:.3g}" if "dp_epsilon" in entry else "",
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
        baseline_mse = None if self.baseline is None else self.baseline.result()
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
        released = released_summary(summary, self.dp)
        table = released_history(history, self.dp)
        model_uri, version = log_final(
            self.config, self.run_id, state.params, run.stats, run.names, table, baseline_mse,
            released, promotion,
        )  # fmt: skip
        end_run(self.config, self.run_id)
        publish_summary(self.config, self.run_id, released, table, model_uri, version)
        return {**summary, "model_uri": model_uri, "registered_version": version}


NOT_METRICS = ("round", "failed_clients")
"""History entries that are not MLflow metrics."""


def announce_setup(config: FLConfig, logger: logging.Logger | Any) -> None:
    """One line before the slow part of setting a run up (every client's feature statistics,
    and the noise calibration of a ``target_epsilon`` run), so that a long wait is explained."""
    clients = len(registry(config.data, config.experiment.seed))
    p = config.privacy
    calibrating = p.target_epsilon is not None and p.noise_multiplier is None
    logger.info(
        "reading %d clients' feature statistics%s…",
        clients,
        f", then calibrating the noise for ε ≤ {p.target_epsilon:g} at δ = {p.delta:g} over "
        f"{config.rounds.num_rounds} rounds"
        if calibrating
        else "",
    )


def planned_privacy(config: FLConfig, run: Run) -> str:
    """``DP-FedAvg z=1.1, q=0.1, δ=1e-05, statistics z_s=20, target ε=1 over 20 rounds
    (planned)``: ε includes the feature statistics' share."""
    plan, p, rounds = run.plan, config.privacy, config.rounds.num_rounds
    calibrated = " (calibrated)" if p.noise_multiplier is None else ""
    head = (
        f"DP-FedAvg z={plan.noise_multiplier:.3g}{calibrated}, q={plan.sampling_rate:.3g}, "
        f"δ={plan.delta:g}, statistics z_s={plan.statistics_noise:g}"
    )
    if p.noise_multiplier is None:
        return f"{head}, target ε={p.target_epsilon:g} over {rounds} rounds (planned)"
    epsilon = privacy_accountant(plan).spent(rounds).epsilon
    stop = "" if p.target_epsilon is None else f"; stops at target ε={p.target_epsilon:g}"
    return f"{head}, ε={epsilon:.3g} over {rounds} rounds (planned{stop})"


def early_stop_message(config: FLConfig, history: list[dict[str, Any]], stopped_in: int) -> str:
    """Which rounds did not improve, by how much they had to, and which model is kept: the
    last scored one (round ``stopped_in``'s updates are not aggregated), or under DP round
    ``stopped_in``'s own, scored on the server's held-out set."""
    kept = history[-1]
    patience, tolerance = config.rounds.patience or 1, config.rounds.tolerance
    dp = config.privacy.dp  # decided on the server's held-out set; the stopped round is kept
    last = stopped_in if dp else kept["round"]
    rounds = f"round {last}" if patience == 1 else f"rounds {last - patience + 1}–{last}"
    by = f" by {tolerance * 100:g}%" if tolerance else ""
    if dp:
        return (
            f"early stop: {rounds} did not improve central_mse{by}; keeping round {last}'s "
            f"model (central_mse {kept['central_mse']:.3g})"
        )
    best = min((h for h in history if "fed_mse" in h), key=lambda h: h["fed_mse"])
    better = (
        f"; round {best['round']} scored {best['fed_mse']:.3g}"
        if best["fed_mse"] < kept["fed_mse"]
        else ""
    )
    return (
        f"early stop: {rounds} did not improve fed_mse{by}; keeping round {last}'s model "
        f"(fed_mse {kept['fed_mse']:.3g}{better}); round {stopped_in}'s updates discarded"
    )


def describe_init_model(config: FLConfig, model_uri: str) -> str:
    """``models:/demand@champion (version 3)``, or ``run RUN_ID's final model (models:/m-…)``."""
    ref = config.experiment.init_model
    if ref and ":/" not in ref:
        return f"run {ref}'s final model ({model_uri})"
    version = _model_version(config, model_uri)
    return model_uri if version is None else f"{model_uri} (version {version})"


def _model_version(config: FLConfig, model_uri: str) -> str | None:
    """The registered version a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI names."""
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", model_uri)
    if match is None:
        return None
    name, alias, version = match.groups()
    if version is not None:
        return version
    from mlflow import MlflowClient

    try:
        return str(
            MlflowClient(tracking_uri(config)).get_model_version_by_alias(name, alias).version
        )
    except Exception:  # noqa: BLE001 -- the line is informative only
        return None


def _run_link(config: FLConfig, run_id: str) -> str:
    uri = tracking_uri(config)
    url = run_url(uri, run_id)
    if uri.startswith(("http://", "https://")):
        return f"[MLflow run {run_id}]({url})"
    return f"MLflow run `{run_id}` (`mlflow ui --backend-store-uri {uri}`, then {url})"


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
    ]
    if "fed_mse" in final:
        lines.append(f"- federated eval MSE: {final['fed_mse']:.6g}")
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
            f"challenger {p['fedtune.challenger_mse']} ({p['fedtune.promotion.scored_on']} MSE), "
            f"champion {p['fedtune.champion_mse'] or 'none'}"
        )
    create_markdown_artifact("\n".join(lines), key="fedtune-summary", description="Run summary")
    create_table_artifact(
        [{k: v for k, v in h.items()} for h in history],
        key="fedtune-rounds",
        description="Per-round metrics",
    )
