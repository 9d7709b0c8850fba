"""Privacy through the Prefect flow, against a real temporary Prefect API and SQLite MLflow
store: epsilon as logged, and the secure-aggregation exchanges as Prefect task runs. What the
mechanisms and protocols do is tested without Prefect (test_privacy, test_secagg*, test_engine).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from fedtune.fl.config import load_config
from fedtune.fl.secagg.run_keys import Quorum, share_holders
from fedtune.fl.simulation import simulate
from fedtune.flows.training import federated_training
from mlflow import MlflowClient

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
    """The client task runs a run without dropouts makes: keys once per run, then a masked
    update from everyone and unmasking by the first ``quorum.rebuild`` of the round's share
    holders; or per-round keys, four exchanges with everyone."""
    everyone = range(clients)
    if keys == "round":
        steps = ("secagg-keys", "secagg-shares", "train", "secagg-unmask")
        return {
            f"{s}-r{r:02d}-site-{c}" for s in steps for r in range(1, rounds + 1) for c in everyone
        }
    return (
        {f"secagg-setup-site-{c}" for c in everyone}
        | {f"train-r{r:02d}-site-{c}" for r in range(1, rounds + 1) for c in everyone}
        | {
            f"secagg-unmask-r{r:02d}-site-{c}"
            for r in range(1, rounds + 1)
            for c in share_holders(everyone, quorum.holders, r)[: quorum.rebuild]
        }
    )


@pytest.mark.parametrize(
    ("keys", "committee"),
    [("run", 40), ("run", 5), ("round", 40)],  # 40: the default, all 10 clients hold shares
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
            "rounds.num_rounds=3",
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
    expected = _secagg_exchanges(keys, clients=10, rounds=3, quorum=quorum)
    if keys == "run":  # 0.6 of 10 clients, or of a committee of 5
        unmaskers = 6 if committee == 40 else 3
        assert len([n for n in expected if n.startswith("secagg-unmask")]) == 3 * unmaskers
    runs, _ = _task_runs(flow_run_id, expected)
    names = [
        t.name
        for t in runs
        if re.search(r"-site-\d+$", t.name) and not t.name.startswith(("stats-", "final-"))
    ]
    assert sorted(names) == sorted(expected)  # each exchange once per client, nothing more
