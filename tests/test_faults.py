"""Failure handling over Prefect: real task retries and a real round deadline (the engine's
rules for failures are tested in-process in tests/test_engine.py)."""

from __future__ import annotations

import numpy as np
import pytest
from fedtune.fl.config import load_config
from fedtune.flows.training import federated_training
from prefect.task_runners import ThreadPoolTaskRunner

from tests.test_flow import SEED

QUIET = ["experiment.log_round_models=false"]


@pytest.mark.integration
def test_retries_recover_transient_crashes(prefect_api, mlflow_uri):
    crashes = [*QUIET, "rounds.num_rounds=3", "faults.crash_probability=0.5"]
    without = federated_training(load_config(SEED, crashes))
    with_retries = federated_training(load_config(SEED, [*crashes, "client.retries=3"]))
    lost = sum(h["clients_failed"] for h in without.history)
    assert lost > 0
    assert sum(h["clients_failed"] for h in with_retries.history) < lost


# Under secure aggregation the deadline applies to the masked updates: the straggler drops out
# of the secure round like a crashed client.
@pytest.mark.integration
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


def test_data_errors_are_not_retried_but_crashes_are():
    from fedtune.fl.data import ClientDataError
    from fedtune.fl.faults import InjectedFault
    from fedtune.tasks.client import _transient
    from prefect.states import Failed

    assert _transient(None, None, Failed(data=InjectedFault("crash"))) is True
    assert _transient(None, None, Failed(data=ClientDataError("c", "f", "bad"))) is False
