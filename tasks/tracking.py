"""Everything fedtune says to MLflow, in one place.

Every call goes through an ``MlflowClient`` with an explicit run id: MLflow's "active run" is
thread-local, and Prefect runs tasks in worker threads (or other processes).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from fedtune.fl.client import make_estimator
from fedtune.fl.config import FLConfig
from fedtune.fl.lifecycle import InitModel, Promotion
from fedtune.fl.params import FeatureStats, ModelParams, to_pipeline
from fedtune.tasks import TASK_OPTIONS
from prefect import task

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri(config: FLConfig) -> str:
    """``experiment.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``."""
    return (
        config.experiment.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or DEFAULT_TRACKING_URI
    )


@functools.cache
def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


@functools.lru_cache(maxsize=64)
def _experiment_of(uri: str, run_id: str) -> str:
    """A run's experiment id; asked once per run, not once per logged model."""
    return _client(uri).get_run(run_id).info.experiment_id


@functools.cache
def _pip_requirements() -> tuple[str, ...]:
    """Pinned so that logging a model never runs requirement inference (seconds per call)."""
    from importlib.metadata import version

    return tuple(f"{pkg}=={version(pkg)}" for pkg in ("mlflow", "scikit-learn", "numpy", "skops"))


@task(name="start-mlflow-run", **TASK_OPTIONS)
def start_run(config: FLConfig, tags: dict[str, str]) -> str:
    """Create the MLflow run (and experiment if needed); log the flattened config as params."""
    from mlflow.entities import Param

    uri = tracking_uri(config)
    client = _client(uri)
    exp = client.get_experiment_by_name(config.experiment.name)
    experiment_id = exp.experiment_id if exp else client.create_experiment(config.experiment.name)
    run = client.create_run(experiment_id, run_name=config.experiment.run_name, tags=tags)
    params = [
        Param(k, json.dumps(v) if isinstance(v, list | tuple) else str(v))
        for k, v in config.flat().items()
    ]
    client.log_batch(run.info.run_id, params=params)
    client.log_dict(run.info.run_id, config.model_dump(mode="json"), "config.json")
    return run.info.run_id


def _pipeline(params: ModelParams, stats: FeatureStats, config: FLConfig, names: list[str]):
    pipe = to_pipeline(params, stats, make_estimator(config.client))
    pipe.named_steps["scaler"].feature_names_in_ = np.asarray(names, dtype=object)
    return pipe


def _log_model(uri: str, run_id: str, pipe, name: str, step: int, names: list[str]) -> str:
    """Log ``pipe`` as an MLflow logged model of ``run_id`` at ``step``; return its URI."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    client = _client(uri)
    # `log_model` has no client argument: it writes through the global tracking URI, and would
    # file the model under the global active experiment rather than the run's. Create the
    # logged model in the run's experiment ourselves and hand log_model its id.
    mlflow.set_tracking_uri(uri)
    experiment_id = _experiment_of(uri, run_id)
    model = client.create_logged_model(experiment_id, name=name, source_run_id=run_id)
    example = pd.DataFrame(np.zeros((1, len(names))), columns=names)
    signature = infer_signature(example, np.zeros(1))
    info = mlflow.sklearn.log_model(
        pipe,
        name=name,
        model_id=model.model_id,
        run_id=run_id,
        step=step,
        signature=signature,
        pip_requirements=list(_pip_requirements()),
        serialization_format="skops",
    )
    return info.model_uri


@task(name="log-round", task_run_name="log-r{round_num:02d}", **TASK_OPTIONS)
def log_round(
    config: FLConfig,
    run_id: str,
    round_num: int,
    metrics: dict[int, dict[str, float]],
    params: ModelParams | None,
    stats: FeatureStats,
    feature_names: list[str],
    checkpoint: dict[str, Any] | None = None,
) -> str | None:
    """With ``params``, the round's global model as a logged model at ``step=round_num``; then
    the metrics (``{step: {key: value}}``; non-numeric and non-finite values skipped) and the
    round's checkpoint in one batch, which the store commits whole: a round's metrics and its
    checkpoint land together or not at all, so a resumed run logs no round twice."""
    from mlflow.entities import Metric, RunTag
    from mlflow.utils.time import get_current_time_millis

    uri = tracking_uri(config)
    model_uri = None
    if params is not None and config.experiment.log_round_models:
        pipe = _pipeline(params, stats, config, feature_names)
        model_uri = _log_model(
            uri, run_id, pipe, f"round-{round_num:03d}", round_num, feature_names
        )
    now = get_current_time_millis()
    batch = [
        Metric(key, float(value), now, step)
        for step, values in metrics.items()
        for key, value in values.items()
        if isinstance(value, int | float) and np.isfinite(value)
    ]
    tags = [] if checkpoint is None else [RunTag(CHECKPOINT_TAG, json.dumps(checkpoint))]
    if batch or tags:
        _client(uri).log_batch(run_id, metrics=batch, tags=tags)
    return model_uri


CHECKPOINT_TAG = "fedtune.checkpoint"


@task(name="load-checkpoint", **TASK_OPTIONS)
def load_checkpoint(config: FLConfig, run_id: str) -> tuple[dict[str, Any], list[dict]]:
    """The last completed round's checkpoint of ``run_id`` and the per-round history its
    metrics hold; the run is marked running again."""
    client = _client(tracking_uri(config))
    run = client.get_run(run_id)
    raw = run.data.tags.get(CHECKPOINT_TAG)
    if raw is None:
        raise ValueError(f"--resume {run_id}: the run has no completed round to resume from")
    checkpoint = json.loads(raw)
    history: dict[int, dict[str, Any]] = {
        r: {"round": r} for r in range(1, checkpoint["round"] + 1)
    }
    for key in run.data.metrics:
        for m in client.get_metric_history(run_id, key):
            if m.step in history:
                history[m.step][key] = m.value
    client.update_run(run_id, status="RUNNING")
    return checkpoint, [history[r] for r in sorted(history)]


def load_run_config(uri: str, run_id: str) -> FLConfig:
    """The exact configuration a fedtune run started with (its ``config.json``)."""
    import mlflow.artifacts

    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="config.json", dst_path=tmp, tracking_uri=uri
        )
        return FLConfig.model_validate(json.loads(Path(path).read_text()))


def _convergence_figure(history: list[dict[str, Any]], baseline: float | None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    rounds = [h["round"] for h in history]
    for key, label in [
        ("train_loss", "train loss (clients)"),
        ("fed_mse", "federated eval MSE"),
        ("central_mse", "central eval MSE"),
    ]:
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            ax.plot(rounds, values, marker="o", ms=3, label=label)
    if baseline is not None:
        ax.axhline(baseline, color="grey", ls="--", label="pooled OLS baseline")
    ax.set_xlabel("round")
    ax.set_ylabel("MSE")
    ax.set_yscale("log")
    ax.set_title("fedtune convergence")
    ax.legend()
    fig.tight_layout()
    return fig


@task(name="log-final-model", **TASK_OPTIONS)
def log_final(
    config: FLConfig,
    run_id: str,
    params: ModelParams,
    stats: FeatureStats,
    feature_names: list[str],
    history: list[dict[str, Any]],
    baseline: float | None,
    summary: dict[str, Any],
    promotion: Promotion | None = None,
) -> tuple[str, str | None]:
    """The final pipeline (with signature), a convergence plot, the per-round table, the run
    summary, and a Model Registry version if ``experiment.register_as`` is set.

    Returns the model URI and the registered version (or None).
    """
    import matplotlib.pyplot as plt
    import pandas as pd

    uri = tracking_uri(config)
    client = _client(uri)
    last_round = history[-1]["round"] if history else 0
    pipe = _pipeline(params, stats, config, feature_names)
    model_uri = _log_model(uri, run_id, pipe, "final", last_round, feature_names)
    fig = _convergence_figure([h for h in history if h["round"] > 0], baseline)
    client.log_figure(run_id, fig, "convergence.png")
    plt.close(fig)
    table = pd.DataFrame(history)
    client.log_table(run_id, data=table, artifact_file="rounds.json")
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "rounds.csv"
        table.to_csv(csv, index=False)
        client.log_artifact(run_id, str(csv))
    client.log_dict(run_id, {**summary, "model_uri": model_uri}, "summary.json")
    version = None
    if config.experiment.register_as:
        tags = {k: str(v) for k, v in summary.items() if k.startswith("dp_") and v is not None}
        if promotion is not None:
            tags.update(promotion.tags())
            for key, value in promotion.tags().items():
                client.set_tag(run_id, key, value)
        version = register(uri, config.experiment.register_as, model_uri, run_id, tags)
        if promotion is not None and promotion.promote:
            client.set_registered_model_alias(config.experiment.register_as, CHAMPION, version)
    return model_uri, version


def register(
    uri: str, name: str, model_uri: str, run_id: str, tags: dict[str, str] | None = None
) -> str:
    """A new version of registered model ``name`` (created if missing) from ``model_uri``."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    model_id = model_uri.removeprefix("models:/")
    mv = client.create_model_version(
        name, source=model_uri, run_id=run_id, model_id=model_id, tags=tags
    )
    return str(mv.version)


CHAMPION = "champion"


def own_champion_uri(config: FLConfig) -> str | None:
    """``models:/<register_as>@champion``: the model a scheduled fine-tune starts from."""
    name = config.experiment.register_as
    return f"models:/{name}@{CHAMPION}" if name else None


def _load_pipeline(uri: str, model_uri: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.sklearn.load_model(model_uri)


@task(name="load-init-model", **TASK_OPTIONS)
def load_init_model(config: FLConfig) -> tuple[str, InitModel]:
    """The model to fine-tune from ``experiment.init_model``: a model URI, or the final model
    of a previous fedtune run given by its run id."""
    uri = tracking_uri(config)
    ref = config.experiment.init_model
    model_uri = ref
    try:
        if ":/" not in ref:
            _, summary = load_run(uri, ref)
            model_uri = summary["model_uri"]
        return model_uri, InitModel.from_pipeline(_load_pipeline(uri, model_uri))
    except Exception as exc:  # noqa: BLE001 -- one line naming the key and the reference
        raise ValueError(f"experiment.init_model: cannot load {ref!r}: {exc}") from None


@task(name="load-champion", **TASK_OPTIONS)
def load_champion(config: FLConfig) -> tuple[str, InitModel] | None:
    """The registered model's current ``champion`` (version, model), if it has one."""
    from mlflow.exceptions import MlflowException

    name = config.experiment.register_as
    if not name:
        return None
    uri = tracking_uri(config)
    try:
        mv = _client(uri).get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return str(mv.version), InitModel.from_pipeline(
        _load_pipeline(uri, f"models:/{name}@{CHAMPION}")
    )


@task(name="end-mlflow-run", **TASK_OPTIONS)
def end_run(config: FLConfig, run_id: str, status: str = "FINISHED") -> None:
    _client(tracking_uri(config)).set_terminated(run_id, status)


def load_run(uri: str, run_id: str) -> tuple[FLConfig, dict[str, Any]]:
    """The configuration and summary a finished fedtune run logged."""
    import mlflow.artifacts

    with tempfile.TemporaryDirectory() as tmp:
        paths = {
            name: mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=name, dst_path=tmp, tracking_uri=uri
            )
            for name in ("config.json", "summary.json")
        }
        config = FLConfig.model_validate(json.loads(Path(paths["config.json"]).read_text()))
        summary = json.loads(Path(paths["summary.json"]).read_text())
    return config, summary


def log_audit(uri: str, run_id: str, result: dict[str, Any]) -> None:
    """The membership audit's numbers as ``audit_*`` metrics and ``audit.json``."""
    from mlflow.entities import Metric
    from mlflow.utils.time import get_current_time_millis

    client = _client(uri)
    now = get_current_time_millis()
    client.log_batch(
        run_id,
        metrics=[
            Metric(f"audit_{k}", float(v), now, 0)
            for k, v in result.items()
            if isinstance(v, int | float) and np.isfinite(v)
        ],
    )
    client.log_dict(run_id, result, "audit.json")
