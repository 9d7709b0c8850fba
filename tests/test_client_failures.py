"""A client's expected failures (bad data, an injected crash) are one line, never a traceback;
the task run still ends Failed with that line, and crashes are still retried."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import write_client_files

BAD_ROW = 7


def _clients_with_one_bad_file(directory: Path) -> Path:
    """Three client files; ``clinic-1`` has a non-numeric value in row ``BAD_ROW``."""
    write_client_files(directory, [60, 50, 70])
    bad = directory / "clinic-1.csv"
    frame = pd.read_csv(bad)
    frame["income"] = frame["income"].astype(object)
    frame.loc[BAD_ROW, "income"] = "n/a?"
    frame.to_csv(bad, index=False)
    return bad


# `fedtune run` on a directory with one bad file (one warning line, no traceback, the rest
# train): tests/test_user_messages.py::test_early_stop_and_a_left_out_client_are_said_and_written.


def _setup(tmp_path, *overrides):
    from fedtune.fl.config import load_config
    from fedtune.fl.data import registry
    from fedtune.fl.params import FeatureStats, ModelParams

    bad = _clients_with_one_bad_file(tmp_path / "clients")
    config = load_config(
        None,
        ["data.source=files", f"data.path={bad.parent}", "data.target=target", *overrides],
    )
    refs = {ref.client_id: ref for ref in registry(config.data, config.experiment.seed)}
    stats = FeatureStats(
        count=1, mean=np.zeros(3), scale=np.ones(3), target_mean=0.0, target_scale=1.0
    )
    return config, refs, ModelParams.zeros(3), stats, bad


def _counting_runs(task, retries: int):
    """``task`` with ``retries``, and the list its failed runs' run counts are appended to."""
    counts: list[int] = []
    hook = lambda task, task_run, state: counts.append(task_run.run_count)  # noqa: E731
    return task.with_options(retries=retries, on_failure=[hook]), counts


@pytest.mark.integration
def test_bad_data_ends_failed_with_its_line_and_is_not_retried(prefect_api, tmp_path):
    from fedtune.fl.data import ClientDataError
    from fedtune.tasks.client import client_statistics, train_client

    config, refs, params, stats, bad = _setup(tmp_path)
    trainer, runs = _counting_runs(train_client, retries=1)
    state = trainer(refs["clinic-1"], params, stats, config.client, 1, return_state=True)
    assert state.is_failed()
    assert state.message == (
        f"client 'clinic-1' ({bad}): column 'income' row {BAD_ROW}: non-numeric value 'n/a?'"
    )
    assert isinstance(state.result(raise_on_failure=False), ClientDataError)
    assert runs == [1]  # a bad file stays bad
    stats_state = client_statistics(refs["clinic-1"], 1000, return_state=True)
    assert stats_state.is_failed() and stats_state.message == state.message


@pytest.mark.integration
def test_an_injected_crash_is_retried_and_ends_failed_with_its_line(prefect_api, tmp_path):
    from fedtune.fl.faults import InjectedFault
    from fedtune.tasks.client import train_client

    config, refs, params, stats, _ = _setup(
        tmp_path, "client.retries=1", "faults.always_fail=['clinic-0']"
    )
    trainer, runs = _counting_runs(train_client, retries=config.client.retries)
    state = trainer(
        refs["clinic-0"], params, stats, config.client, 1, config.faults, return_state=True
    )
    assert state.is_failed()
    assert state.message == "InjectedFault: client 'clinic-0': configured to always fail"
    assert isinstance(state.result(raise_on_failure=False), InjectedFault)
    assert runs == [2]
    # A good client is unaffected.
    ok = trainer(refs["clinic-2"], params, stats, config.client, 1, config.faults)
    assert ok.client_id == "clinic-2"


def test_prefect_error_lines_of_expected_failures_are_dropped_or_kept_without_traceback():
    from fedtune.tasks.client import ExpectedFailureLog

    def record(msg, exc_info=None):
        return logging.LogRecord("prefect.task_runs", logging.ERROR, "x", 1, msg, (), exc_info)

    expected = "Finished in state ClientFailed(\"client 'c' (f.csv): row 3: bad\", type=FAILED)"
    retried = "Task run failed with state: ClientFailed(message='x', type=FAILED) - Retries are"
    assert not ExpectedFailureLog().filter(record(expected))
    assert not ExpectedFailureLog().filter(record(retried, (None, None, None)))
    shown = record(retried, (None, None, None))
    assert ExpectedFailureLog(show=True).filter(shown) and shown.exc_info is None
    try:
        raise KeyError("a bug")
    except KeyError:
        bug = record("Task run failed with exception: KeyError('a bug')", sys.exc_info())
    assert ExpectedFailureLog().filter(bug) and bug.exc_info[0] is KeyError
    bug_end = record("Finished in state Failed('Task run encountered an exception KeyError')")
    assert ExpectedFailureLog().filter(bug_end)
