"""Batches of clients per Prefect task (``rounds.clients_per_task``): the batching rule, the
batch task on its own (no Prefect), and one flow run against the in-process engine."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from fedtune.fl.config import ConfigError, load_config
from fedtune.fl.data import ClientRef, registry
from fedtune.fl.engine import Run
from fedtune.fl.exchange import Broadcast, InProcess
from fedtune.fl.params import ClientUpdate, ModelParams
from fedtune.fl.rounds import sample_round
from fedtune.flows.exchange import AUTO_TASKS, client_batches
from fedtune.tasks.client import batch_run_name, train_clients


def _refs(n: int) -> list[ClientRef]:
    return registry(load_config(None, [f"data.num_clients={n}"]).data, 0)


# -- the batching rule ---------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "tasks"), [(1, 1), (2, 4), (15, 16), (16, 16), (10, 10)])
def test_auto_keeps_one_task_per_client_while_the_runner_runs_them_all_at_once(n, tasks):
    refs = _refs(n)
    assert client_batches(refs, "auto", tasks) == [[ref] for ref in refs]


@pytest.mark.parametrize(
    ("n", "tasks"), [(10, 1), (10, 2), (10, 3), (17, 16), (33, 16), (100, 2), (1000, 16)]
)
def test_auto_spreads_a_larger_round_evenly_over_the_parallel_tasks(n, tasks):
    refs = _refs(n)
    batches = client_batches(refs, "auto", tasks)
    assert len(batches) == tasks
    sizes = [len(b) for b in batches]
    assert max(sizes) == -(-n // tasks) and max(sizes) - min(sizes) <= 1  # ceil(n / tasks)
    assert [ref for b in batches for ref in b] == refs  # sampled order, nobody twice


def test_auto_runs_as_many_tasks_as_the_runner_runs_at_once(monkeypatch):
    from fedtune.flows.runner import parallel_tasks

    def runner(*overrides):
        return load_config(None, list(overrides)).runner

    monkeypatch.delenv("PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS", raising=False)
    assert parallel_tasks(runner()) == 1  # the default thread runner: one thread
    assert parallel_tasks(runner("runner.n_workers=3")) == 3
    dask = 'runner.kind="dask"'
    assert parallel_tasks(runner(dask, "runner.n_workers=2")) == 2
    assert parallel_tasks(runner(dask)) == os.cpu_count()  # a LocalCluster: one per core
    assert parallel_tasks(runner(dask, 'runner.address="tcp://h:8786"')) == AUTO_TASKS
    assert client_batches(_refs(10), "auto", 1) == [_refs(10)]  # the seed: one task a round


def test_an_integer_forces_the_batch_size():
    refs = _refs(10)
    assert [len(b) for b in client_batches(refs, 3)] == [3, 3, 3, 1]
    assert [len(b) for b in client_batches(refs, 1)] == [1] * 10
    assert client_batches(refs, 50) == [refs]
    assert [ref for b in client_batches(refs, 3) for ref in b] == refs


def test_the_key_defaults_to_auto_and_refuses_what_is_not_a_positive_integer():
    assert load_config(None, []).rounds.clients_per_task == "auto"
    assert load_config(None, ["rounds.clients_per_task=4"]).rounds.clients_per_task == 4
    for bad in ("0", "-2", "true", "2.0", "'many'"):
        with pytest.raises(ConfigError, match=r"^rounds\.clients_per_task: "):
            load_config(None, [f"rounds.clients_per_task={bad}"])


def test_a_batch_run_is_named_by_round_and_its_first_and_last_client():
    refs = _refs(10)
    assert batch_run_name({"refs": refs[3:10], "round_num": 7}) == "train-r07-site-3..site-9"
    assert batch_run_name({"refs": refs[9:], "round_num": 12}) == "train-r12-site-9"


# -- the batch task, called directly -------------------------------------------------------------


def _setup(overrides: list[str]):
    config = load_config(None, ["data.num_clients=6", *overrides])
    run = Run.setup(config, InProcess(config))
    broadcast = Broadcast(ModelParams.zeros(len(run.names)), run.stats)
    return config, run.refs, broadcast


def test_a_batch_gives_each_client_its_in_process_outcome_and_a_failure_fails_only_itself():
    config, refs, broadcast = _setup(
        ["faults.crash_probability=0.3", "faults.always_fail=['site-2']", "client.retries=1"]
    )
    for round_num in (1, 2, 3):
        outcomes = train_clients.fn(refs, broadcast, config, round_num)
        assert len(outcomes) == len(refs)
        for ref, outcome in zip(refs, outcomes, strict=True):
            try:
                expected = InProcess(config).update(ref, broadcast, round_num)
            except Exception as exc:  # noqa: BLE001
                assert outcome[0] == ref.client_id
                assert type(exc).__name__ in outcome[1]
                continue
            assert isinstance(outcome, ClientUpdate) and outcome.client_id == ref.client_id
            np.testing.assert_array_equal(outcome.params.to_vector(), expected.params.to_vector())
            assert outcome.evaluation == expected.evaluation
        failed = [o for o in outcomes if isinstance(o, tuple)]
        assert ("site-2", "InjectedFault: client 'site-2': configured to always fail") in failed
        assert len(failed) < len(refs)  # the batch-mates' updates are there


def test_a_bug_in_one_client_leaves_its_batch_mates(monkeypatch):
    config, refs, broadcast = _setup([])
    real = InProcess.update

    def buggy(self, ref, broadcast, round_num):
        if ref.client_id == "site-1":
            raise KeyError("oops")
        return real(self, ref, broadcast, round_num)

    monkeypatch.setattr(InProcess, "update", buggy)
    outcomes = train_clients.fn(refs, broadcast, config, 1)
    assert outcomes[1] == ("site-1", "KeyError: 'oops'")
    assert all(isinstance(o, ClientUpdate) for i, o in enumerate(outcomes) if i != 1)


def test_a_slow_client_times_out_alone_and_its_slowness_is_not_slept():
    config, refs, broadcast = _setup(
        ["faults.slow_clients=['site-4']", "faults.slowdown_s=30", "rounds.round_timeout_s=1"]
    )
    started = time.perf_counter()
    outcomes = train_clients.fn(refs, broadcast, config, 1)
    assert time.perf_counter() - started < 5
    assert outcomes[4] == ("site-4", "timed out after 1 s")
    assert sum(isinstance(o, ClientUpdate) for o in outcomes) == len(refs) - 1


# -- the flow ------------------------------------------------------------------------------------


@pytest.mark.integration
def test_batched_flow_equals_per_client_flow_and_the_engine(prefect_api, mlflow_uri):
    from fedtune.fl.simulation import simulate
    from fedtune.flows.training import federated_training
    from mlflow import MlflowClient

    from tests.test_flow import _task_runs

    base = [
        "data.num_clients=10",
        "rounds.num_rounds=3",
        "faults.crash_probability=0.3",
        "faults.always_fail=['site-5']",
        "experiment.log_round_models=false",
    ]
    batched = load_config(None, [*base, "rounds.clients_per_task=3"])
    per_client = load_config(None, [*base, "rounds.clients_per_task=1"])
    result = federated_training(batched)
    single = federated_training(per_client)
    plain = simulate(batched)

    raw = plain.params.to_raw(plain.stats)
    for run in (result, single):
        np.testing.assert_allclose(run.coef, raw.coef, rtol=0, atol=1e-12)
        assert abs(run.intercept - raw.intercept) <= 1e-12
        for a, b in zip(run.history, plain.history, strict=True):
            assert (a["clients_ok"], a["failed_clients"]) == (b["clients_ok"], b["failed_clients"])
    # A crash and the always-failing client fail alone: their batch-mates' updates are in.
    failed = [h["clients_failed"] for h in plain.history]
    assert all(f >= 1 for f in failed) and sum(failed) > 3
    assert all("site-5: InjectedFault" in h["failed_clients"] for h in result.history)
    assert [h["clients_ok"] + f for h, f in zip(result.history, failed, strict=True)] == [10] * 3

    refs = registry(batched.data, batched.experiment.seed)
    expected = set()
    for r in range(1, 4):
        sampled = [refs[i] for i in sample_round(batched.rounds, 0, None, len(refs), r)]
        for batch in client_batches(sampled, 3):
            expected.add(batch_run_name({"refs": batch, "round_num": r}))
    assert "train-r02-site-3..site-5" in expected and "train-r02-site-9" in expected
    flow_run_id = MlflowClient(mlflow_uri).get_run(result.run_id).data.tags["prefect.flow_run_id"]
    runs, _ = _task_runs(flow_run_id, expected)
    trained = {r.name for r in runs if r.name.startswith("train-")}
    assert trained == expected
    assert all(r.state.is_completed() for r in runs if r.name in expected)
