"""Integration: the Prefect flow against a real temporary Prefect API and a real SQLite MLflow
store. What a round does is tested on the engine (tests/test_engine.py); here, that the flow
runs that engine over Prefect tasks and MLflow, and gives the in-process result."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fedtune.fl.config import load_config
from fedtune.fl.data import open_client, registry
from fedtune.fl.evaluation import ols_baseline
from fedtune.fl.privacy.release import WITHHELD
from fedtune.fl.rounds import sample_round
from fedtune.fl.simulation import simulate
from fedtune.flows.training import federated_training
from fedtune.tasks.client import batch_run_name
from mlflow import MlflowClient

from tests.conftest import write_client_files

pytestmark = pytest.mark.integration

SEED = Path(__file__).resolve().parents[1] / "configs" / "seed.toml"


@pytest.fixture(scope="module")
def seed_run(prefect_api, mlflow_template, tmp_path_factory):
    """One 20-round run of the seed example, shared by the assertions below."""
    work = tmp_path_factory.mktemp("seed-run")
    shutil.copy(mlflow_template, work / "mlflow.db")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    config = load_config(
        SEED, [f"experiment.tracking_uri='{uri}'", "experiment.register_as='seed-model'"]
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        result = federated_training(config)
    return config, result, MlflowClient(uri)


def test_seed_example_converges_to_the_truth_and_the_pooled_baseline(seed_run):
    _, result, _ = seed_run
    assert abs(result.coef[0] - 2.0) < 0.02
    assert abs(result.intercept - 1.0) < 0.02
    assert result.history[-1]["central_mse"] <= 1.02 * result.baseline_mse
    assert result.rounds_completed == 20


def test_flow_equals_a_plain_loop_over_fl(seed_run):
    config, result, _ = seed_run
    plain = simulate(config)
    raw = plain.params.to_raw(plain.stats)
    np.testing.assert_allclose(result.coef, raw.coef, rtol=0, atol=1e-12)
    assert abs(result.intercept - raw.intercept) <= 1e-12
    for a, b in zip(result.history, plain.history, strict=True):
        assert a["fed_mse"] == b["fed_mse"]


def _bad_client_dir(tmp_path) -> list[str]:
    directory = write_client_files(tmp_path / "silos", [120, 200, 80, 150], seed=3)
    (directory / "broken.csv").write_text("income,ratio,age,target\n1,2,3,4\n5,x,7,8\n")
    return ["data.source=files", f"data.path='{directory}'", "data.target=target"]


# The same engine in both: one plumbing check per mode of the exchange and of the strategy.
CASES = {
    "crashes-exclusions-early-stop": lambda tmp: [
        *_bad_client_dir(tmp),
        "rounds.num_rounds=12",
        "rounds.patience=1",
        "rounds.tolerance=0.02",
        "faults.crash_probability=0.3",
    ],
    "dp-injected-noise": lambda tmp: [
        "data.num_clients=80",
        "rounds.num_rounds=3",
        "rounds.fraction=0.25",
        "privacy.noise_multiplier=1.1",
        "privacy.delta=1e-4",
        "privacy.adaptive_clipping=true",
    ],
    "secure-aggregation-dp": lambda tmp: [
        "data.num_clients=16",
        "rounds.num_rounds=2",
        "rounds.fraction=0.75",
        "privacy.noise_multiplier=0.7",
        "privacy.secure_aggregation=true",
    ],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_flow_runs_the_engine_and_logs_what_it_did(
    prefect_api, mlflow_uri, tmp_path, monkeypatch, case
):
    # DP noise is secret in a real run; a test injects one seed into both runs' generators.
    monkeypatch.setattr(
        "fedtune.fl.privacy.mechanisms.secret_rng", lambda: np.random.default_rng(11)
    )
    config = load_config(None, [*CASES[case](tmp_path), "experiment.log_round_models=false"])
    result = federated_training(config)
    plain = simulate(config)
    raw = plain.params.to_raw(plain.stats)
    np.testing.assert_allclose(result.coef, raw.coef, rtol=0, atol=1e-12)
    assert abs(result.intercept - raw.intercept) <= 1e-12
    assert [h["clients_ok"] for h in result.history] == [h["clients_ok"] for h in plain.history]
    assert result.stopped_early == plain.stopped_early

    client = MlflowClient(mlflow_uri)
    summary = json.loads(Path(client.download_artifacts(result.run_id, "summary.json")).read_text())
    dp = config.privacy.dp  # under DP only dp_* and central_* are released (release policy)
    assert summary["excluded_clients"] == (WITHHELD if dp else dict(plain.excluded))
    for key in ("fed_mse", "clients_ok", "dp_epsilon"):
        if key in plain.history[-1]:
            steps = sorted(m.step for m in client.get_metric_history(result.run_id, key))
            released = not dp or key.startswith("dp_")
            assert steps == (list(range(1, len(plain.history) + 1)) if released else []), key
    if case.startswith("crashes"):
        assert plain.stopped_early and "broken" in summary["excluded_clients"]
        assert "row 1" in summary["excluded_clients"]["broken"]
        assert sum(h["clients_failed"] for h in plain.history) > 0


def test_mlflow_has_every_round_and_loadable_models(seed_run):
    import mlflow
    import mlflow.models
    from mlflow.entities import LoggedModelStatus

    config, result, client = seed_run
    mlflow.set_tracking_uri(client.tracking_uri)  # other tests' runs set it to their stores
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["rounds.num_rounds"] == "20"
    per_round = [k for k in result.history[0] if k not in ("round", "failed_clients")]
    assert {"train_loss", "fed_mse", "fed_r2", "central_mse", "clients_ok"} <= set(per_round)
    for key in per_round:
        steps = sorted(m.step for m in client.get_metric_history(result.run_id, key))
        assert steps == list(range(1, 21)), key
    assert client.get_metric_history(result.run_id, "baseline_mse")[0].value == pytest.approx(
        result.baseline_mse
    )

    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{result.run_id}'",
    )
    rounds = {m.name: m for m in models if m.name.startswith("round-")}
    assert sorted(rounds) == [f"round-{r:03d}" for r in range(1, 21)]
    X = pd.DataFrame({"x0": [-1.0, 0.0, 2.5]})
    previous = None
    first = None
    for name in sorted(rounds):
        uri = f"models:/{rounds[name].model_id}"
        assert rounds[name].status == LoggedModelStatus.READY, name
        info = mlflow.models.get_model_info(uri)  # MLmodel names this model, not another round's
        assert (info.model_id, info.model_uuid) == (rounds[name].model_id,) * 2, name
        assert info.signature.inputs.input_names() == ["x0"], name
        pred = mlflow.sklearn.load_model(uri).predict(X)
        assert pred.shape == (3,) and np.isfinite(pred).all()
        first = pred if first is None else first
        previous = pred
    assert not np.allclose(first, previous)  # each round's own coefficients, not a copy
    final = mlflow.sklearn.load_model(result.model_uri)
    expected = X["x0"].to_numpy() * result.coef[0] + result.intercept
    np.testing.assert_allclose(final.predict(X), expected, rtol=1e-10)
    np.testing.assert_allclose(previous, expected, rtol=1e-10)  # the last round is the final
    assert final.named_steps["scaler"].n_samples_seen_ == 800  # the federated statistics

    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"convergence.png", "rounds.json", "rounds.csv", "summary.json"} <= artifacts
    version = client.get_model_version("seed-model", result.registered_version)
    assert version.run_id == result.run_id


def _task_runs(flow_run_id: str, expected: set[str], timeout: float = 60.0):
    """Task runs of a flow run, read from the Prefect API once every ``expected`` name is
    there in a final state (the server records task runs asynchronously, from events)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter
    from prefect.client.schemas.sorting import TaskRunSort

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs, offset = [], 0
            while batch := client.read_task_runs(
                flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}),
                sort=TaskRunSort.NAME_ASC,
                limit=200,
                offset=offset,
            ):
                runs += batch
                offset += len(batch)
            # Offset pages can overlap while the server is still recording runs.
            runs = list({r.id: r for r in runs}.values())
            done = {r.name for r in runs if r.state and r.state.is_final()}
            if expected <= done or time.monotonic() > deadline:
                return runs, client.read_flow_run(flow_run_id)
            time.sleep(0.5)


def test_task_runs_are_named_by_round_and_client(seed_run):
    _, result, client = seed_run
    flow_run_id = client.get_run(result.run_id).data.tags["prefect.flow_run_id"]
    # One thread runs the tasks, so "auto" trains a round's ten clients in one task.
    expected = {f"train-r{r:02d}-site-0..site-9" for r in range(1, 21)}
    expected |= {f"log-r{r:02d}" for r in range(1, 21)}
    expected |= {f"stats-site-{c}" for c in range(10)} | {f"final-site-{c}" for c in range(10)}
    runs, _ = _task_runs(flow_run_id, expected)
    names = {r.name for r in runs}
    assert expected <= names, sorted(expected - names)[:5]


def _pooled_split(refs, split):
    chunks = [c for ref in refs for c in open_client(ref).chunks(split, 10_000)]
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


def test_files_source_trains_and_no_raw_data_leaves_a_client(prefect_api, mlflow_uri, tmp_path):
    directory = write_client_files(tmp_path / "silos", [150, 400, 60, 250, 90], seed=7)
    config = load_config(
        None, ["data.source=files", f"data.path='{directory}'", "data.target=target"]
    )
    result = federated_training(config)

    # Within 5% of ordinary least squares on the pooled rows (which fedtune never pools).
    refs = registry(config.data, config.experiment.seed)
    baseline = ols_baseline(*_pooled_split(refs, "train"), *_pooled_split(refs, "test"))
    assert result.history[-1]["fed_mse"] <= 1.05 * baseline
    assert result.feature_names == ["income", "ratio", "age"]

    # The raw values, as they would appear if a row were logged or passed around.
    raw = pd.concat(pd.read_csv(p) for p in sorted(directory.glob("*.csv")))
    needles = {repr(float(v))[:12] for v in raw.to_numpy().ravel()[::7]}
    assert len(needles) > 100

    client = MlflowClient(mlflow_uri)
    run = client.get_run(result.run_id)
    haystack = [Path(mlflow_uri.removeprefix("sqlite:///")).read_bytes().decode("latin-1")]
    for path in Path(".").rglob("*"):  # every artifact and logged model under the store
        if path.is_file() and path.suffix != ".db" and path.parent.name != "silos":
            if directory not in path.parents:
                haystack.append(path.read_bytes().decode("latin-1"))
    flow_run_id = run.data.tags["prefect.flow_run_id"]
    clients = [ref.client_id for ref in refs]
    expected = set()
    for r in range(1, 21):  # one thread runs the tasks: "auto" trains a round in one task
        sampled = [refs[i] for i in sample_round(config.rounds, 0, None, len(refs), r)]
        expected |= {batch_run_name({"refs": b, "round_num": r}) for b in [sampled]}
    expected |= {f"stats-{c}" for c in clients} | {f"final-{c}" for c in clients}
    task_runs, flow_run = _task_runs(flow_run_id, expected)
    haystack.append(json.dumps(flow_run.parameters, default=str))
    haystack += [t.model_dump_json() for t in task_runs]
    assert expected <= {t.name for t in task_runs}
    leaked = [n for n in needles if any(n in h for h in haystack)]
    assert not leaked, leaked[:5]
