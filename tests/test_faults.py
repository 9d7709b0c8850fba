"""Failure handling through the flow: crashing, failing and slow clients (injected, seeded)."""

from __future__ import annotations

import numpy as np
import pytest
from prefect.task_runners import ThreadPoolTaskRunner

from fl.config import load_config
from fl.simulation import simulate
from flows.training import RoundFailed, federated_training
from tests.test_flow import SEED

QUIET = ["experiment.log_round_models=false"]


def test_training_survives_thirty_percent_crashing_clients(prefect_api, mlflow_uri):
    base = [*QUIET, "data.num_clients=20", "rounds.num_rounds=30"]
    faulty = load_config(SEED, [*base, "faults.crash_probability=0.3"])
    result = federated_training(faulty)
    clean = simulate(load_config(SEED, base))
    failed = [h["clients_failed"] for h in result.history]
    assert sum(failed) > 0.2 * 20 * 30  # about 30% of 600 updates crashed
    assert result.history[-1]["central_mse"] <= 1.05 * clean.history[-1]["central_mse"]
    crashed = next(h for h in result.history if h["clients_failed"])
    assert "simulated crash" in crashed["failed_clients"]
    # The plain loop sees the same seeded crashes.
    assert [h["clients_ok"] for h in result.history] == [
        h["clients_ok"] for h in simulate(faulty).history
    ]


def test_retries_recover_transient_crashes(prefect_api, mlflow_uri):
    crashes = [*QUIET, "rounds.num_rounds=3", "faults.crash_probability=0.5"]
    without = federated_training(load_config(SEED, crashes))
    with_retries = federated_training(load_config(SEED, [*crashes, "client.retries=3"]))
    lost = sum(h["clients_failed"] for h in without.history)
    assert lost > 0
    assert sum(h["clients_failed"] for h in with_retries.history) < lost


def test_rounds_below_min_clients_keep_the_model_and_the_run_says_why(prefect_api, mlflow_uri):
    failing = ",".join(f"'site-{i}'" for i in range(1, 10))  # only site-0 ever succeeds
    config = load_config(
        SEED,
        [*QUIET, "rounds.num_rounds=2", "rounds.min_clients=2", f"faults.always_fail=[{failing}]"],
    )
    with pytest.raises(
        RoundFailed,
        match=r"no round succeeded; round 1: 1 usable update\(s\), rounds.min_clients is 2",
    ):
        federated_training(config)


# Under secure aggregation the deadline applies to the masked updates: the straggler drops out
# of the secure round like a crashed client.
@pytest.mark.parametrize("secure", [False, True])
def test_stragglers_past_the_round_deadline_are_left_out(prefect_api, mlflow_uri, secure):
    config = load_config(
        SEED,
        [
            *QUIET,
            "rounds.num_rounds=2",
            "rounds.round_timeout_s=3",
            "faults.slow_clients=['site-3']",
            "faults.slowdown_s=6.0",
            f"privacy.secure_aggregation={str(secure).lower()}",
        ],
    )
    result = federated_training.with_options(task_runner=ThreadPoolTaskRunner(max_workers=4))(
        config
    )
    for h in result.history:
        assert h["clients_timed_out"] == 1 and h["clients_ok"] == 9, result.history
        assert h["failed_clients"].startswith("site-3: timed out")
    # The nine were summed (no round was aborted): the model moved and improved.
    assert result.history[-1]["central_mse"] < result.history[0]["central_mse"]
    assert not np.allclose(result.coef, 0.0)


def test_a_client_sending_nan_never_changes_the_global_model(prefect_api, mlflow_uri):
    base = [*QUIET, "rounds.num_rounds=4"]
    poisoned = federated_training(load_config(SEED, [*base, "faults.nan_clients=['site-2']"]))
    without = federated_training(load_config(SEED, [*base, "faults.always_fail=['site-2']"]))
    assert poisoned.coef == without.coef and poisoned.intercept == without.intercept
    assert all("site-2: non-finite parameters" in h["failed_clients"] for h in poisoned.history)


def test_data_errors_are_not_retried_but_crashes_are():
    from prefect.states import Failed

    from fl.data import ClientDataError
    from fl.faults import InjectedFault
    from tasks.client import _transient

    assert _transient(None, None, Failed(data=InjectedFault("crash"))) is True
    assert _transient(None, None, Failed(data=ClientDataError("c", "f", "bad"))) is False
