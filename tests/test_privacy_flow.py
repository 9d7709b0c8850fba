"""Privacy through the Prefect flow, against a real temporary Prefect API and SQLite MLflow
store: epsilon as logged, and the secure-aggregation exchanges as Prefect task runs. What the
mechanisms and protocols do is tested without Prefect (test_privacy, test_secagg*, test_engine).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from fedtune.fl.config import load_config
from fedtune.fl.secagg.run_keys import Quorum, share_holders
from fedtune.fl.simulation import simulate
from fedtune.flows.training import federated_training
from mlflow import MlflowClient

from tests.conftest import write_client_files
from tests.test_engine import DP as ENGINE_DP
from tests.test_engine import independent_epsilon
from tests.test_flow import _task_runs

pytestmark = pytest.mark.integration

DP = [*ENGINE_DP, "experiment.log_round_models=false"]


def test_dp_flow_reports_the_accountants_epsilon_every_round(prefect_api, mlflow_uri):
    config = load_config(None, DP)
    result = federated_training(config)
    client = MlflowClient(mlflow_uri)
    history = sorted(client.get_metric_history(result.run_id, "dp_epsilon"), key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2, 3, 4]
    for m in history:
        assert m.value == pytest.approx(independent_epsilon(0.25, 1.1, m.step, 1e-4), abs=1e-6)
    assert np.diff([m.value for m in history]).min() > 0
    summary = client.get_run(result.run_id).data
    assert summary.metrics["dp_noise_multiplier"] == 1.1
    assert "experiment.seed" in summary.params  # logged: it must not replay the noise


def _secagg_exchanges(keys: str, clients: int, rounds: int, quorum: Quorum) -> set[str]:
    """The client task runs a run without dropouts makes: every client's setup (identity key,
    and with keys once per run its key pair), then a masked update and a signature on the
    survivor set from everyone and unmasking by the first ``quorum.rebuild`` of the round's
    share holders; or per-round keys, five exchanges with everyone."""
    everyone = range(clients)
    setup = {f"secagg-setup-site-{c}" for c in everyone}
    if keys == "round":
        steps = ("secagg-keys", "secagg-shares", "train", "secagg-consistency", "secagg-unmask")
        return setup | {
            f"{s}-r{r:02d}-site-{c}" for s in steps for r in range(1, rounds + 1) for c in everyone
        }
    return (
        setup
        | {
            f"{s}-r{r:02d}-site-{c}"
            for s in ("train", "secagg-consistency")
            for r in range(1, rounds + 1)
            for c in everyone
        }
        | {
            f"secagg-unmask-r{r:02d}-site-{c}"
            for r in range(1, rounds + 1)
            for c in share_holders(everyone, quorum.holders, r)[: quorum.rebuild]
        }
    )


@pytest.mark.parametrize(
    ("keys", "committee"),
    # 40: the default, all 10 clients hold shares. A committee smaller than the round runs the
    # same Prefect tasks (tests/test_secagg_run.py covers it in-process).
    [("run", 40), ("round", 40)],
)
def test_secure_aggregation_flow_recovers_the_sum_and_matches_the_plain_loop(
    prefect_api, mlflow_uri, keys, committee
):
    config = load_config(
        None,
        [
            "privacy.secure_aggregation=true",
            f"privacy.secagg_keys={keys!r}",
            f"privacy.secagg_committee={committee}",
            "rounds.num_rounds=2",
            "experiment.log_round_models=false",
        ],
    )
    result = federated_training(config)
    plain = simulate(config)
    raw = plain.params.to_raw(plain.stats)
    np.testing.assert_allclose(result.coef, raw.coef, rtol=0, atol=1e-12)
    assert result.history[-1]["central_mse"] < result.history[0]["central_mse"]

    flow_run_id = MlflowClient(mlflow_uri).get_run(result.run_id).data.tags["prefect.flow_run_id"]
    quorum = Quorum.of(10, 0.6, committee)
    expected = _secagg_exchanges(keys, clients=10, rounds=2, quorum=quorum)
    if keys == "run":  # 0.6 of the 10 clients unmask, in each of the 2 rounds
        assert len([n for n in expected if n.startswith("secagg-unmask")]) == 2 * 6
    runs, _ = _task_runs(flow_run_id, expected)
    names = [
        t.name
        for t in runs
        if re.search(r"-site-\d+$", t.name) and not t.name.startswith(("stats-", "final-"))
    ]
    assert sorted(names) == sorted(expected)  # each exchange once per client, nothing more


def _everything_released(client: MlflowClient, run_id: str, tmp_path) -> str:
    """All an outside reader of the MLflow run can see, as one string: params, tags, metric
    names and values, every text artifact, and every logged model's metadata and files."""
    run = client.get_run(run_id)
    seen = [repr(run.data.params), repr(run.data.tags), repr(run.data.metrics)]
    for key in run.data.metrics:
        seen += [f"{key}={m.value}@{m.step}" for m in client.get_metric_history(run_id, key)]
    places = [(run.info.artifact_uri, "run")]
    for model in client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    ):
        seen += [model.name, repr(model.tags), repr(model.params), repr(model.metrics)]
        places.append((model.artifact_location, model.model_id))
    import mlflow.artifacts

    for uri, name in places:
        local = mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / name))
        for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            seen.append(path.name)
            if path.suffix != ".png":
                seen.append(path.read_bytes().decode("utf-8", errors="replace"))
    return "\n".join(seen)


def test_a_dp_run_releases_no_client_id_and_no_client_level_value(
    prefect_api, mlflow_uri, tmp_path
):
    # Five clinics, one of which has a bad value in its file (left out of the run). A reader
    # of everything the MLflow run holds finds no client id, no exclusion, no un-noised score.
    directory = tmp_path / "clinics"
    write_client_files(directory, [40, 50, 60, 45, 55])
    bad = directory / "clinic-3.csv"
    bad.write_text(bad.read_text().replace("\n", "\nnot-a-number,1,2,3\n", 1))
    config = load_config(
        None,
        [
            "data.source=files",
            f"data.path={directory}",
            "data.target=target",
            "rounds.num_rounds=2",
            "rounds.fraction=0.8",
            "privacy.noise_multiplier=1.0",
            "privacy.statistics_clip_norm=2000",
        ],
    )
    result = federated_training(config)
    assert result.excluded_clients.keys() == {"clinic-3"}  # operator-side: the --output data
    released = _everything_released(MlflowClient(mlflow_uri), result.run_id, tmp_path / "dl")
    for i in range(5):
        assert f"clinic-{i}" not in released
    for withheld in ("fed_mse", "train_loss", "clients_ok", "failed_clients", "baseline_mse"):
        assert f"'{withheld}'" not in released and f"{withheld}=" not in released
    assert "dp_epsilon" in released and "round-002" in released  # round models are released
    # The scaler in the final model carries the public client count, not the 250 rows.
    import mlflow.sklearn

    scaler = mlflow.sklearn.load_model(result.model_uri).named_steps["scaler"]
    assert scaler.n_samples_seen_ == 5
