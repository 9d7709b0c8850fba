"""Privacy through the Prefect flow: DP-FedAvg with its accountant, and secure aggregation,
against a real temporary Prefect API and SQLite MLflow store."""

from __future__ import annotations

import re
import time

import dp_accounting
import numpy as np
import pytest
from mlflow import MlflowClient

from fl.config import load_config
from fl.secagg_run import Quorum, RunKeysClient, share_holders
from fl.simulation import simulate
from flows.training import federated_training
from tests.test_flow import _task_runs

DP = [
    "data.num_clients=80",
    "rounds.num_rounds=4",
    "rounds.fraction=0.25",
    "privacy.noise_multiplier=1.1",
    "privacy.delta=1e-4",
    "privacy.adaptive_clipping=true",
    "experiment.log_round_models=false",
]


def _independent_epsilon(q: float, z: float, rounds: int, delta: float) -> float:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds
    )
    rdp = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta)
    pld = (
        dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
        .compose(event)
        .get_epsilon(delta)
    )
    return min(rdp, pld)


def test_dp_flow_reports_the_accountants_epsilon_every_round(prefect_api, mlflow_uri):
    config = load_config(None, DP)
    result = federated_training(config)
    client = MlflowClient(mlflow_uri)
    history = sorted(client.get_metric_history(result.run_id, "dp_epsilon"), key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2, 3, 4]
    for m in history:
        assert m.value == pytest.approx(_independent_epsilon(0.25, 1.1, m.step, 1e-4), abs=1e-6)
    assert np.diff([m.value for m in history]).min() > 0
    summary = client.get_run(result.run_id).data
    assert summary.metrics["dp_noise_multiplier"] == 1.1

    plain = simulate(config)
    raw = plain.params.to_raw(plain.stats)
    np.testing.assert_allclose(result.coef, raw.coef, rtol=0, atol=1e-12)
    assert [h["clients_ok"] for h in result.history] == [h["clients_ok"] for h in plain.history]


def test_target_epsilon_stops_before_the_budget_is_exceeded(prefect_api, mlflow_uri):
    budget = _independent_epsilon(0.25, 1.1, 2, 1e-4) + 1e-3  # room for two rounds, not three
    result = federated_training(load_config(None, [*DP, f"privacy.target_epsilon={budget}"]))
    eps = [h["dp_epsilon"] for h in result.history]
    assert len(eps) == 2 and eps[-1] <= budget


def test_target_epsilon_alone_calibrates_the_noise(prefect_api, mlflow_uri):
    overrides = [o for o in DP if not o.startswith("privacy.noise_multiplier")]
    result = federated_training(load_config(None, [*overrides, "privacy.target_epsilon=3.0"]))
    assert len(result.history) == 4
    assert 2.9 <= result.history[-1]["dp_epsilon"] <= 3.0


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


def test_a_share_holder_that_does_not_unmask_is_replaced_and_its_update_still_counts(
    prefect_api, mlflow_uri, monkeypatch
):
    config = load_config(
        None,
        [
            "privacy.secure_aggregation=true",
            "privacy.secagg_committee=5",  # of 10 clients; any 3 holders unmask
            "rounds.num_rounds=2",
            "experiment.log_round_models=false",
        ],
    )
    holders = {r: share_holders(range(10), 5, r) for r in (1, 2)}
    answer = RunKeysClient.unmasking

    def unreachable_first_holder(self, round_num, *args, **kwargs):
        # A client cannot vanish between two exchanges of a round here: make one.
        if self.client_id == holders[round_num][0]:
            raise ConnectionError("unreachable")
        return answer(self, round_num, *args, **kwargs)

    monkeypatch.setattr(RunKeysClient, "unmasking", unreachable_first_holder)
    result = federated_training(config)
    plain = simulate(config)
    np.testing.assert_allclose(
        result.coef, plain.params.to_raw(plain.stats).coef, rtol=0, atol=1e-12
    )
    # Its masked update is in the sum: it is not reported as left out.
    assert [(h["clients_ok"], h["clients_failed"]) for h in result.history] == [(10, 0)] * 2
    flow_run_id = MlflowClient(mlflow_uri).get_run(result.run_id).data.tags["prefect.flow_run_id"]
    expected = {f"secagg-unmask-r{r:02d}-site-{c}" for r in (1, 2) for c in holders[r][:4]}
    runs, _ = _task_runs(flow_run_id, expected)
    asked = {t.name for t in runs if t.name.startswith("secagg-unmask")}
    assert asked == expected  # three holders, then one more for the one that did not answer


def test_secure_aggregation_fails_closed_below_threshold(prefect_api, mlflow_uri):
    # One client a round can never be hidden in a sum: every round must abort, model unchanged.
    config = load_config(
        None,
        [
            "privacy.secure_aggregation=true",
            "rounds.num_rounds=2",
            "rounds.clients_per_round=1",
            "experiment.log_round_models=false",
        ],
    )
    result = federated_training(config)
    assert result.coef == [0.0] or np.allclose(result.coef, 0.0)
    assert [h["clients_failed"] for h in result.history] == [1, 1]
    assert [h["clients_ok"] for h in result.history] == [0, 0]


def test_dp_and_secure_aggregation_compose(prefect_api, mlflow_uri):
    config = load_config(
        None,
        [
            "data.num_clients=30",
            "rounds.num_rounds=2",
            "rounds.fraction=0.5",
            "privacy.noise_multiplier=0.7",
            "privacy.secure_aggregation=true",
            "experiment.log_round_models=false",
        ],
    )
    result = federated_training(config)
    plain = simulate(config)
    np.testing.assert_allclose(
        result.coef, plain.params.to_raw(plain.stats).coef, rtol=0, atol=1e-12
    )
    assert result.history[-1]["dp_epsilon"] == pytest.approx(
        _independent_epsilon(0.5, 0.7, 2, 1e-5), abs=1e-6
    )


# Per-round keys recover from dropouts at every step: tests/test_secagg.py covers that protocol.
@pytest.mark.parametrize("keys", ["run"])
def test_secure_aggregation_recovers_from_thirty_percent_dropouts(prefect_api, mlflow_uri, keys):
    config = load_config(
        None,
        [
            "data.num_clients=20",
            "rounds.num_rounds=3",
            "faults.crash_probability=0.3",
            "privacy.secure_aggregation=true",
            f"privacy.secagg_keys={keys!r}",
            "experiment.log_round_models=false",
        ],
    )
    result = federated_training(config)
    plain = simulate(config)  # the same seeded crashes, summed in the clear
    np.testing.assert_allclose(
        result.coef, plain.params.to_raw(plain.stats).coef, rtol=0, atol=1e-12
    )
    failed = [h["clients_failed"] for h in result.history]
    assert all(f > 0 for f in failed) and sum(failed) >= 0.2 * 60
    assert [h["clients_ok"] for h in result.history] == [h["clients_ok"] for h in plain.history]
    if keys == "run":
        # With dropouts, every survivor is asked to unmask (each holds round seeds shared with
        # the dropped), not only a committee.
        flow_run_id = (
            MlflowClient(mlflow_uri).get_run(result.run_id).data.tags["prefect.flow_run_id"]
        )

        def asked() -> list[int]:
            runs, _ = _task_runs(flow_run_id, set())
            return [
                sum(t.name.startswith(f"secagg-unmask-r{h['round']:02d}-") for t in runs)
                for h in result.history
            ]

        deadline = time.monotonic() + 60  # the server records task runs asynchronously
        while asked() != [h["clients_ok"] for h in result.history]:
            assert time.monotonic() < deadline, asked()
            time.sleep(0.5)
