"""Fine-tuning lifecycle against real Prefect and MLflow: start from a champion, compare,
promote (or not), personalization report, Prefect artifacts."""

from __future__ import annotations

import pytest
from fedtune.fl.config import load_config
from fedtune.flows.training import federated_training
from mlflow import MlflowClient

from tests.test_flow import SEED

pytestmark = pytest.mark.integration

NAME = "seed-champion"


def _config(*overrides):
    return load_config(
        SEED,
        [
            "rounds.num_rounds=5",
            f"experiment.register_as='{NAME}'",
            "experiment.log_round_models=false",
            *overrides,
        ],
    )


def _metric(client, run_id, key, step):
    return next(m.value for m in client.get_metric_history(run_id, key) if m.step == step)


def test_champion_challenger_lifecycle(prefect_api, mlflow_uri):
    client = MlflowClient(mlflow_uri)

    # Scheduled-style: fine-tune your own champion; the first run has none and starts fresh.
    first = federated_training(
        _config("client.personalize_epochs=3", f"experiment.init_model='models:/{NAME}@champion'")
    )
    assert first.promoted is True  # no champion yet
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert str(champion.version) == first.registered_version
    assert champion.tags["fedtune.promotion"] == "promoted"
    champion_mse = first.history[-1]["fed_mse"]

    metrics = client.get_run(first.run_id).data.metrics
    assert "personalized_gain" in metrics
    assert metrics["personalized_mse_before"] == pytest.approx(champion_mse, rel=1e-12)
    assert "personalized/site-3/mse_after" in metrics

    # Fine-tune from the champion for 5 more rounds.
    second = federated_training(_config(f"experiment.init_model='models:/{NAME}@champion'"))
    initial = _metric(client, second.run_id, "initial_fed_mse", 0)
    assert initial == pytest.approx(champion_mse, rel=1e-9)  # round 0 is the champion
    assert second.history[-1]["fed_mse"] <= champion_mse
    improved = second.history[-1]["fed_mse"] < champion_mse
    assert second.promoted is improved
    tags = client.get_run(second.run_id).data.tags
    assert float(tags["fedtune.champion_mse"]) == pytest.approx(champion_mse, rel=1e-9)
    assert float(tags["fedtune.challenger_mse"]) == pytest.approx(
        second.history[-1]["fed_mse"], rel=1e-12
    )
    now = str(client.get_model_version_by_alias(NAME, "champion").version)
    assert now == (second.registered_version if improved else first.registered_version)

    # A margin no fine-tune can clear: the alias must stay where it is.
    third = federated_training(
        _config(f"experiment.init_model='{second.run_id}'", "experiment.promote_margin=0.5")
    )
    assert third.promoted is False
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == now
    version = client.get_model_version(NAME, third.registered_version)
    assert version.tags["fedtune.promotion"] == "kept-champion"
    start = _metric(client, third.run_id, "initial_fed_mse", 0)
    assert start == pytest.approx(second.history[-1]["fed_mse"], rel=1e-9)

    _assert_prefect_artifacts(client.get_run(third.run_id).data.tags["prefect.flow_run_id"])

    # A model of another feature space cannot be fine-tuned: refused before any round.
    with pytest.raises(
        ValueError, match=r"experiment\.init_model: .* has 1 features, the clients have 3"
    ):
        federated_training(
            _config(
                "rounds.num_rounds=2",
                "data.num_features=3",
                f"experiment.init_model='{third.run_id}'",
            )
        )


def _assert_prefect_artifacts(flow_run_id: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}),
            artifact_filter=ArtifactFilter(),
        )
    by_key = {a.key: a for a in artifacts}
    assert {"fedtune-summary", "fedtune-rounds"} <= set(by_key)
    summary = by_key["fedtune-summary"].data
    assert "kept-champion" in summary and "federated eval MSE" in summary
