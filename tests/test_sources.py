"""The simulated sources and partitioners, end to end through the plain loop (no Prefect)."""

from __future__ import annotations

import pytest
from fedtune.fl.config import load_config
from fedtune.fl.evaluation import pooled_baseline
from fedtune.fl.simulation import simulate


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "label-skew"])
def test_diabetes_trains_close_to_the_pooled_baseline(partition):
    config = load_config(
        None,
        [
            "data.source=diabetes",
            f"data.partition='{partition}'",
            "data.num_clients=8",
            "rounds.num_rounds=30",
            "client.local_epochs=3",
        ],
    )
    result = simulate(config)
    baseline = pooled_baseline(config.data, config.experiment.seed)
    final = result.history[-1]
    assert final["central_r2"] > 0.35
    assert final["central_mse"] <= 1.10 * baseline, (final["central_mse"], baseline)


def test_synthetic_multifeature_recovers_the_true_weights():
    config = load_config(
        None,
        [
            "data.num_features=3",
            "data.true_coef=[2.0, -1.0, 0.5]",
            "rounds.num_rounds=30",
            "data.partition='dirichlet'",
            "data.alpha=0.3",
        ],
    )
    result = simulate(config)
    raw = result.params.to_raw(result.stats)
    for got, want in zip(raw.coef, [2.0, -1.0, 0.5], strict=True):
        assert got == pytest.approx(want, abs=0.03)


def test_partial_participation_samples_the_configured_number_of_clients():
    config = load_config(None, ["data.num_clients=20", "rounds.clients_per_round=5"])
    result = simulate(config)
    assert [h["clients_ok"] for h in result.history] == [5] * 20
    raw = result.params.to_raw(result.stats)
    assert raw.coef[0] == pytest.approx(2.0, abs=0.05)
