"""What a run tells people outside MLflow: Prefect artifacts (a markdown summary and the
per-round table, on the flow run's page) and the personalization report's numbers."""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from fl.client import FinalReport
from fl.config import FLConfig
from fl.evaluation import EvalSums
from tasks.tracking import tracking_uri


def personalization_metrics(reports: list[FinalReport]) -> dict[str, float]:
    """Per-client and example-weighted test MSE before and after local fine-tuning;
    ``personalized_gain`` is the relative drop of the weighted MSE."""
    metrics: dict[str, float] = {}
    for rep in reports:
        if rep.personalized is not None:
            before, after = rep.evaluation.metrics()["mse"], rep.personalized.metrics()["mse"]
            metrics[f"personalized/{rep.client_id}/mse_before"] = before
            metrics[f"personalized/{rep.client_id}/mse_after"] = after
    before = EvalSums.merge_all(r.evaluation for r in reports if r.personalized is not None)
    after = EvalSums.merge_all(r.personalized for r in reports if r.personalized is not None)
    if before.n:
        b, a = before.metrics()["mse"], after.metrics()["mse"]
        metrics.update(
            personalized_mse_before=b, personalized_mse_after=a, personalized_gain=(b - a) / b
        )
    return metrics


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
