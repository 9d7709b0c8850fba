"""Integration: the flow on a real Dask cluster (``runner.kind = "dask"``), with silo placement.

One ``LocalCluster`` of two worker processes, one of them holding a silo's resource as a worker
started with ``dask worker SCHEDULER --resources "silo-x=1"`` would. A client pinned to that silo
(``runner.silos``) must run every one of its tasks there, and the model must be the thread
runner's; what ran where is read from the task runs' own log lines in the Prefect API.
"""

from __future__ import annotations

import os
import re
import time

import numpy as np
import pytest
from fedtune.fl.config import ConfigError, load_config
from fedtune.fl.data import registry
from fedtune.flows.runner import check_placement
from fedtune.flows.training import federated_training
from mlflow import MlflowClient

from tests.conftest import write_client_files

pytestmark = pytest.mark.integration

SILO = "silo-x"
PINNED = "clinic-2"
PLACED = re.compile(r"^(.+) on Dask worker (\S+)")  # "clinic-1, clinic-3 on Dask worker ..."


@pytest.fixture(scope="module")
def cluster():
    """A ``LocalCluster``: one plain worker, one with the resource ``silo-x``; both single
    threaded processes. Yields ``(scheduler address, plain worker, silo worker)``."""
    from distributed import Client
    from fedtune.flows.dask_runner import local_cluster

    with local_cluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
    ) as local:
        plain = dict(next(iter(local.worker_spec.values())))
        local.worker_spec[SILO] = {
            **plain,
            "options": {**plain["options"], "resources": {SILO: 1}},
        }
        local.scale(2)
        with Client(local, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
            workers = client.scheduler_info(n_workers=-1)["workers"]
        by_resource = {bool(w["resources"]): address for address, w in workers.items()}
        yield local.scheduler_address, by_resource[False], by_resource[True]


def test_the_workers_start_with_the_allocator_settings_for_chunked_reads(cluster):
    """``runner.n_workers``' cluster (:func:`local_cluster`) starts its worker processes with
    glibc's allocator settings in their environment, set before the process starts (read by
    glibc at its first allocation; Dask's default would map and unmap every chunk's arrays)."""
    from distributed import Client
    from fedtune.flows.dask_runner import WORKER_ENVIRON

    with Client(cluster[0], set_as_default=False) as client:
        seen = client.run(lambda: {k: os.environ.get(k) for k in WORKER_ENVIRON})
    assert len(seen) == 2
    for environ in seen.values():
        assert environ == {k: str(v) for k, v in WORKER_ENVIRON.items()}


def _files(tmp_path) -> list[str]:
    directory = write_client_files(tmp_path / "silos", [150, 120, 90, 200], seed=5, kind="parquet")
    return [
        "data.source=files",
        f"data.path='{directory}'",
        "data.target=target",
        "rounds.num_rounds=3",
        "experiment.log_round_models=false",
    ]


def _placements(flow_run_id: str, expected: int, timeout: float = 30.0) -> dict[str, list[str]]:
    """``{task run name: [worker address, ...]}`` from the task runs' placement lines (each
    Dask worker sends its logs to the API every few seconds: wait for ``expected`` lines)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter
    from prefect.client.schemas.filters import LogFilterFlowRunId as ByFlowRun

    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + timeout
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            names = {run.id: run.name for run in runs}
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=ByFlowRun(any_=[flow_run_id])), limit=200
            )
            placed: dict[str, list[str]] = {}
            for log in logs:
                match = PLACED.match(log.message)
                if match and log.task_run_id in names:
                    placed.setdefault(names[log.task_run_id], []).append(match[2])
            if sum(map(len, placed.values())) >= expected or time.monotonic() > deadline:
                return placed
            time.sleep(1.0)


def test_pinned_client_runs_only_on_its_silo_worker_and_the_model_is_the_thread_runners(
    prefect_api, mlflow_uri, tmp_path, cluster
):
    address, plain_worker, silo_worker = cluster
    base = _files(tmp_path)
    threads = federated_training(load_config(None, base))
    on_dask = [
        'runner.kind="dask"',
        f"runner.address='{address}'",
        f'runner.silos={{"{PINNED}" = "{SILO}"}}',
    ]
    dask = federated_training(load_config(None, base + on_dask))

    np.testing.assert_allclose(dask.coef, threads.coef, rtol=0, atol=1e-12)
    assert abs(dask.intercept - threads.intercept) <= 1e-12
    assert [h["fed_mse"] for h in dask.history] == [h["fed_mse"] for h in threads.history]

    flow_run_id = MlflowClient(mlflow_uri).get_run(dask.run_id).data.tags["prefect.flow_run_id"]
    # One placement line per client task run: statistics and final report, one task per
    # client (4 each); each of 3 rounds, 3 tasks: "auto" batches within a silo, to the
    # cluster's 2 worker threads (the pinned client alone; the other three in two batches).
    placed = _placements(flow_run_id, expected=4 + 3 * 3 + 4)
    pinned = {name: workers for name, workers in placed.items() if name.endswith(PINNED)}
    assert sorted(pinned) == sorted(
        [f"stats-{PINNED}", *(f"train-r{r:02d}-{PINNED}" for r in (1, 2, 3)), f"final-{PINNED}"]
    )
    assert all(workers == [silo_worker] for workers in pinned.values()), pinned
    # The other clients may run anywhere; that the plain worker ran some of them shows that
    # the pinned client's five tasks on the silo worker are not Dask's chance.
    assert plain_worker in {w for workers in placed.values() for w in workers}


def test_a_silo_without_a_worker_stops_the_run_with_one_line(
    prefect_api, mlflow_uri, tmp_path, cluster
):
    address = cluster[0]
    config = load_config(
        None,
        _files(tmp_path)
        + [
            'runner.kind="dask"',
            f"runner.address='{address}'",
            'runner.silos={"clinic-0"="silo-y"}',
        ],
    )
    with pytest.raises(ValueError) as caught:
        federated_training(config)
    assert str(caught.value) == (
        f"runner.silos: no Dask worker of {address} has the resource 'silo-y' (client "
        f"'clinic-0'); start one: dask worker {address} --resources \"silo-y=1\""
    )


def test_silos_naming_no_client_stop_the_run_with_one_line(tmp_path):
    config = load_config(
        None, [*_files(tmp_path), 'runner.kind="dask"', 'runner.silos={"clinic-9"="silo-9"}']
    )
    with pytest.raises(ValueError) as caught:
        check_placement(config, registry(config.data, config.experiment.seed))
    assert str(caught.value) == (
        "runner.silos: no client 'clinic-9' (the clients: 'clinic-0', 'clinic-1', 'clinic-2' "
        "and 1 more)"
    )


def test_secure_aggregation_on_dask_is_refused_with_one_line():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ['runner.kind="dask"', "privacy.secure_aggregation=true"])
    assert str(caught.value) == (
        'privacy.secure_aggregation: not available with runner.kind = "dask" yet (a client\'s '
        "secrets must stay in one worker process between the protocol's steps); use "
        'runner.kind = "thread"'
    )
