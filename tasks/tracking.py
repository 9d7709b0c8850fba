"""Everything fedtune says to MLflow, in one place.

Every call goes through an ``MlflowClient`` with an explicit run id: MLflow's "active run" is
thread-local, and Prefect runs tasks in worker threads (or other processes).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import threading
from datetime import UTC, datetime
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


def prepare_logging(uri: str) -> None:
    """Open the MLflow store at ``uri`` (a new SQLite store creates its tables here) and load
    what logging a model and drawing the convergence plot need (modules, fonts), so that
    none of it waits inside the run: ``fedtune run`` calls this while Prefect's temporary
    server starts."""
    import matplotlib.pyplot as plt
    import mlflow.sklearn  # noqa: F401
    import skops.io  # noqa: F401
    from mlflow.models import infer_signature  # noqa: F401

    _client(uri).search_experiments(max_results=1)
    plt.close(_convergence_figure([{"round": 1, "fed_mse": 1.0}], 0.5))


@functools.lru_cache(maxsize=64)
def _experiment_of(uri: str, run_id: str) -> str:
    """A run's experiment id; asked once per run, not once per logged model."""
    return _client(uri).get_run(run_id).info.experiment_id


LOCAL_UI = "http://127.0.0.1:5000"
"""Where ``mlflow ui --backend-store-uri URI`` serves a local store (its default address)."""

TRAINING_VIEW = "workflowType=machine_learning"
"""The query that opens MLflow 3.17's UI in its model-training view; without it (and until
the user flips the toggle) an experiment opens on the GenAI view: traces, judges, agents."""


def ui_url(uri: str, experiment_id: str, run_id: str | None = None) -> str | None:
    """The MLflow UI page of an experiment, or of one of its runs, in the model-training view:
    on the tracking server itself, or where ``mlflow ui`` serves a local store; None for a
    Databricks workspace, whose URLs differ."""
    if uri.startswith("databricks"):
        return None
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI
    page = f"experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}/#/{page}?{TRAINING_VIEW}"


def run_url(uri: str, run_id: str) -> str | None:
    """:func:`ui_url` of a run."""
    return ui_url(uri, _experiment_of(uri, run_id), run_id)


@functools.cache
def _pip_requirements() -> tuple[str, ...]:
    """Pinned so that logging a model never runs requirement inference (seconds per call)."""
    from importlib.metadata import version

    return tuple(f"{pkg}=={version(pkg)}" for pkg in ("mlflow", "scikit-learn", "numpy", "skops"))


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
"""MLflow's own tag and value for a model-training (not GenAI) experiment, as its UI's
experiment-kind selector writes them. MLflow 3.17's UI picks its view from the URL instead
(:func:`ui_url`), earlier 3.x UIs from this tag; fedtune sets both."""

COMPARED_PARAMS = (
    "data.source",
    "rounds.num_rounds",
    "client.local_epochs",
    "server.strategy",
    "privacy.noise_multiplier",
    "privacy.target_epsilon",
    "privacy.secure_aggregation",
    "experiment.seed",
)
"""Config keys every run logs as MLflow parameters, so that runs compare column by column."""


@task(name="start-mlflow-run", **TASK_OPTIONS)
def start_run(config: FLConfig, tags: dict[str, str]) -> str:
    """Create the MLflow run (and its model-training experiment if needed); log the parameters
    a reader compares (:func:`run_params`) and the whole configuration as ``config.json``."""
    from mlflow.entities import Param

    uri = tracking_uri(config)
    client = _client(uri)
    experiment_id = _training_experiment(client, config.experiment.name)
    run = client.create_run(experiment_id, run_name=config.experiment.run_name, tags=tags)
    params = [Param(k, v) for k, v in run_params(config).items()]
    client.log_batch(run.info.run_id, params=params)
    client.log_dict(run.info.run_id, config.model_dump(mode="json"), "config.json")
    return run.info.run_id


def _training_experiment(client, name: str) -> str:
    """The id of experiment ``name``, created as a model-training experiment if missing; an
    existing one without a kind is marked as one (a kind someone chose is left alone)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        except MlflowException as exc:  # another run created it meanwhile
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return exp.experiment_id


def run_params(config: FLConfig) -> dict[str, str]:
    """The MLflow parameters of a run: the :data:`COMPARED_PARAMS`, and every other key set
    away from its default, as strings (lists as JSON).

    Logging all of the configuration's keys buries the few that differ between runs among
    dozens that never do; ``config.json`` holds them all.
    """
    flat, defaults = config.flat(), _default_flat()
    return {
        key: json.dumps(value) if isinstance(value, list | tuple) else str(value)
        for key, value in flat.items()
        if key in COMPARED_PARAMS or value != defaults.get(key)
    }


@functools.cache
def _default_flat() -> dict[str, Any]:
    return FLConfig().flat()


def _pipeline(params: ModelParams, stats: FeatureStats, config: FLConfig, names: list[str]):
    pipe = to_pipeline(params, stats, make_estimator(config.client))
    pipe.named_steps["scaler"].feature_names_in_ = np.asarray(names, dtype=object)
    return pipe


def _model_files(names: list[str]) -> dict[str, Any]:
    """What every model fedtune logs is saved with: its signature (a row of ``names`` in, one
    prediction out), its pinned pip requirements, and the skops format."""
    import pandas as pd
    from mlflow.models import infer_signature

    example = pd.DataFrame(np.zeros((1, len(names))), columns=names)
    return {
        "signature": infer_signature(example, np.zeros(1)),
        "pip_requirements": list(_pip_requirements()),
        "serialization_format": "skops",
    }


def _log_model(uri: str, run_id: str, pipe, name: str, names: list[str], step: int) -> str:
    """Log ``pipe`` as an MLflow logged model whose source is ``run_id`` and as the run's
    output at ``step``. Return its URI.

    Only the final model is a run output. The run page lists a run's outputs in the order of
    their model ids, which are random (MLflow's SQL store reads them by primary key), so twenty
    round models there come out scrambled. As logged models of the run's experiment, named
    ``round-001``... and created in round order (:func:`_log_round_model`), they list in order
    on the experiment's Models tab (newest first), and the run page shows the one model a
    reader is looking for.
    """
    import mlflow

    client = _client(uri)
    # `log_model` has no client argument: it writes through the global tracking URI, and would
    # file the model under the global active experiment rather than the run's. Create the
    # logged model in the run's experiment ourselves and hand log_model its id.
    mlflow.set_tracking_uri(uri)
    experiment_id = _experiment_of(uri, run_id)
    model = client.create_logged_model(experiment_id, name=name, source_run_id=run_id)
    info = mlflow.sklearn.log_model(
        pipe, name=name, model_id=model.model_id, run_id=run_id, step=step, **_model_files(names)
    )
    return info.model_uri


_TEMPLATES: dict[tuple[str, ...], tempfile.TemporaryDirectory] = {}
_TEMPLATES_LOCK = threading.Lock()


def _model_template(pipe, names: list[str]) -> Path:
    """An MLflow model directory of ``pipe`` (``mlflow.sklearn.save_model``: MLmodel with the
    signature, environment files, ``model.skops``), saved once per process and feature names.
    Round models differ only in their coefficients and their ids; the environment files and
    the signature, whose making (resolving and checking the pip requirements) costs most of a
    ``log_model``, are the same for all of them."""
    import mlflow.sklearn

    key = tuple(names)
    with _TEMPLATES_LOCK:
        if key not in _TEMPLATES:
            holder = tempfile.TemporaryDirectory(prefix="fedtune-model-")
            mlflow.sklearn.save_model(pipe, Path(holder.name) / "model", **_model_files(names))
            _TEMPLATES[key] = holder
        return Path(_TEMPLATES[key].name) / "model"


def _log_round_model(uri: str, run_id: str, pipe, name: str, names: list[str]) -> str:
    """Log ``pipe`` as logged model ``name`` of the run's experiment, as ``log_model`` would
    (same files, same MLmodel fields, status READY), from :func:`_model_template` with this
    round's ``model.skops`` and ids."""
    import skops.io
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import Model

    client = _client(uri)
    template = _model_template(pipe, names)
    model = client.create_logged_model(_experiment_of(uri, run_id), name=name, source_run_id=run_id)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model"
            shutil.copytree(template, path)
            skops.io.dump(pipe, path / "model.skops")
            meta = Model.load(path / "MLmodel")
            meta.artifact_path = model.artifact_location
            meta.model_uuid = meta.model_id = model.model_id
            meta.utc_time_created = str(datetime.now(UTC).replace(tzinfo=None))
            meta.model_size_bytes = (path / "model.skops").stat().st_size  # as save_model
            meta.save(path / "MLmodel")
            client.log_model_artifacts(model.model_id, str(path))
    except BaseException:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return f"models:/{model.model_id}"


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
    """The round's checkpoint as an artifact, then the metrics (``{step: {key: value}}``;
    non-numeric and non-finite values skipped) with the :data:`CHECKPOINT_TAG` pointing at it
    in one batch, which the store commits whole: a round's metrics and its checkpoint land
    together or not at all, so a resumed run logs no round twice. Then, with ``params``, the
    round's global model as logged model ``round-NNN``: after the commit, so that a crash in
    between loses that model rather than releasing round NNN twice (a resumed run trains the
    rounds after its checkpoint afresh; under DP a second release of a round would be one the
    accountant does not count)."""
    from mlflow.entities import Metric, RunTag
    from mlflow.utils.time import get_current_time_millis

    uri = tracking_uri(config)
    client = _client(uri)
    model_uri = None
    now = get_current_time_millis()
    batch = [
        Metric(key, float(value), now, step)
        for step, values in metrics.items()
        for key, value in values.items()
        if isinstance(value, int | float) and np.isfinite(value)
    ]
    tags = []
    if checkpoint is not None:
        path = f"checkpoints/round-{checkpoint['round']:03d}.json"
        client.log_dict(run_id, checkpoint, path)
        tags = [RunTag(CHECKPOINT_TAG, json.dumps({"round": checkpoint["round"], "path": path}))]
    if batch or tags:
        client.log_batch(run_id, metrics=batch, tags=tags)
    if params is not None and config.experiment.log_round_models:
        pipe = _pipeline(params, stats, config, feature_names)
        model_uri = _log_round_model(uri, run_id, pipe, f"round-{round_num:03d}", feature_names)
    return model_uri


CHECKPOINT_TAG = "fedtune.checkpoint"
"""``{"round": 3, "path": "checkpoints/round-003.json"}``: the last completed round and its
checkpoint artifact (global model, strategy and early-stopping state, the accountant). The
checkpoint itself is an artifact, out of the run's tags; this tag is the commit mark, set with
the round's metrics after the artifact is written, so a crash in between leaves the previous
round's checkpoint in force."""


@task(name="load-checkpoint", **TASK_OPTIONS)
def load_checkpoint(config: FLConfig, run_id: str) -> tuple[dict[str, Any], list[dict]]:
    """The last completed round's checkpoint of ``run_id`` and the per-round history its
    metrics hold; the run is marked running again."""
    client = _client(tracking_uri(config))
    run = client.get_run(run_id)
    raw = run.data.tags.get(CHECKPOINT_TAG)
    if raw is None:
        raise ValueError(f"--resume {run_id}: the run has no completed round to resume from")
    mark = json.loads(raw)
    # Runs logged before checkpoints became artifacts hold the checkpoint in the tag itself.
    checkpoint = _read_json(client, run_id, mark["path"]) if "path" in mark else mark
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
    return FLConfig.model_validate(_read_json(_client(uri), run_id, "config.json"))


def _read_json(client, run_id: str, path: str) -> Any:
    """A JSON artifact of ``run_id``."""
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, path, tmp)).read_text())


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
    if ax.lines:
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
    model_uri = _log_model(uri, run_id, pipe, "final", feature_names, step=last_round)
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


def load_released_models(uri: str, run_id: str) -> list[tuple[str, ModelParams]]:
    """Every model ``run_id`` logged, as ``(name, raw-unit parameters)``: the rounds' models
    (``round-001``, ...) in round order, then the final one. A round logged twice (a resumed
    run that repeated it) is released twice, so it is returned twice, the second named
    ``round-003#2``. Models whose upload did not finish are left out."""
    from mlflow.entities import LoggedModelStatus

    client = _client(uri)
    found, token = [], None
    while True:
        page = client.search_logged_models(
            [_experiment_of(uri, run_id)],
            filter_string=f"source_run_id = '{run_id}'",
            page_token=token,
        )
        found += [m for m in page if m.status == LoggedModelStatus.READY]
        token = page.token
        if not token:
            break

    released, seen = [], {}
    for model in sorted(found, key=_release_order):
        seen[model.name] = seen.get(model.name, 0) + 1
        name = model.name if seen[model.name] == 1 else f"{model.name}#{seen[model.name]}"
        pipe = _load_pipeline(uri, f"models:/{model.model_id}")
        released.append((name, InitModel.from_pipeline(pipe).raw))
    return released


def _release_order(model) -> tuple[int, int, int]:
    """Round models by round number, then the rest (the final model); each by creation time."""
    number = model.name.removeprefix("round-")
    if number != model.name and number.isdigit():
        return (0, int(number), model.creation_timestamp)
    return (1, 0, model.creation_timestamp)


def log_audit(uri: str, run_id: str, result: dict[str, Any]) -> None:
    """The membership audit's numbers as ``audit_*`` metrics (its top-level numbers, the
    decision as ``audit_passed`` 1 or 0) and all of it, every model's attack included, as
    ``audit.json``."""
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
