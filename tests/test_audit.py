"""The membership-inference audit: the attack's statistics, and `fedtune audit` on a real run."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fedtune.fl.audit import (
    auc,
    best_advantage,
    client_losses,
    dp_advantage_bound,
    membership_audit,
)
from fedtune.fl.config import load_config
from fedtune.fl.simulation import simulate
from fedtune.flows.cli import main
from fedtune.flows.training import federated_training
from mlflow import MlflowClient


def test_attack_statistics_on_known_scores():
    members, others = np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0, 2.0])
    assert auc(members, others) == 1.0 and best_advantage(members, others) == 1.0
    assert auc(others, members) == 0.0
    same = np.array([1.0, 1.0])
    assert auc(same, same) == 0.5 and best_advantage(same, same) == 0.0


def test_dp_bound_is_the_hypothesis_testing_limit():
    assert dp_advantage_bound(0.0, 0.0) == 0.0
    assert dp_advantage_bound(1.0, 0.0) == pytest.approx((math.e - 1) / (math.e + 1))
    assert dp_advantage_bound(math.inf, 0.0) == 1.0
    assert dp_advantage_bound(1.0, 1e-5) > dp_advantage_bound(1.0, 0.0)


def test_the_attack_finds_an_overfit_model_out():
    # Few rows per client and many features: the model fits its members' rows better.
    config = load_config(
        None,
        [
            "data.num_features=20",
            "data.samples_per_client=30",
            "data.num_clients=20",
            "data.noise=1.0",
            "rounds.num_rounds=8",
            "client.local_epochs=10",
            "client.eta0=0.05",
        ],
    )
    result = simulate(config)
    members, others = client_losses(config, result.params.to_raw(result.stats), 8)
    audit = membership_audit(members, others)
    assert members.mean() < others.mean()
    assert audit.advantage > 0.2 and audit.auc > 0.55
    assert audit.auc_ci_low < audit.auc < audit.auc_ci_high


@pytest.mark.integration
def test_fedtune_audit_logs_to_the_run(prefect_api, mlflow_uri, capsys):
    config = load_config(
        None,
        [
            "data.num_clients=40",
            "rounds.fraction=0.5",
            "rounds.num_rounds=3",
            "privacy.noise_multiplier=0.8",
            "experiment.log_round_models=false",
        ],
    )
    result = federated_training(config)
    assert main(["audit", "--run", result.run_id]) == 0
    out = capsys.readouterr().out
    assert "advantage" in out and "bounds any attack's advantage" in out
    metrics = MlflowClient(mlflow_uri).get_run(result.run_id).data.metrics
    assert 0.0 <= metrics["audit_auc"] <= 1.0
    assert metrics["audit_dp_advantage_bound"] == pytest.approx(
        dp_advantage_bound(metrics["audit_dp_epsilon"], 1e-5)
    )
    assert metrics["audit_members"] <= 40


@pytest.mark.integration
def test_fedtune_audit_of_an_unknown_run_is_one_line(mlflow_uri, capsys):
    assert main(["audit", "--run", "no-such-run"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedtune: audit failed: run no-such-run") and "\n" not in err
