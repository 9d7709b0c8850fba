"""The Prefect deployments: deployments/prefect.yaml deployed with the Prefect CLI to a real
Prefect server and run by a real process worker, and the serve entry, each started for this
module as its own process, tracking to real SQLite MLflow stores.

Flow runs execute this checkout's code, as they do on a user's machine: the deployments' pull
step points the worker at the repository root.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import yaml
from fedtune.deployments.parameters import deployment_parameters
from fedtune.deployments.serve import PREFECT_FILE, REPO, project_deployments
from fedtune.fl.config import load_config
from fedtune.flows.prefect_server import free_port
from mlflow import MlflowClient

pytestmark = pytest.mark.integration

if TYPE_CHECKING:
    from mlflow.entities import Run
    from prefect.client.orchestration import SyncPrefectClient

PREFECT = str(Path(sys.executable).with_name("prefect"))
POOL = "fedtune-process"
FLOW = "federated-training"
BERLIN = ZoneInfo("Europe/Berlin")
CONFIG_FILES = {"nightly-finetune": "configs/nightly.toml", "train": "configs/train.toml"}
RUN_TIMEOUT = 180.0


def _deployment(name: str) -> dict[str, Any]:
    return next(d for d in project_deployments() if d["name"] == name)


def _two_am_berlin(day: date) -> datetime:
    """02:00 Berlin wall-clock time on ``day`` in UTC, by zoneinfo: a time that does not exist
    (the spring-forward night) moves forward an hour, one that happens twice is the first."""
    return datetime(day.year, day.month, day.day, 2, tzinfo=BERLIN).astimezone(UTC)


# --- prefect.yaml as a file: no server ---------------------------------------------------------


def test_prefect_yaml_holds_both_deployments_as_prefect_reads_them():
    from prefect.cli.deploy._models import PrefectYamlModel

    raw = yaml.safe_load(PREFECT_FILE.read_text())
    # `prefect deploy` skips a file that fails this model with a warning, then deploys nothing.
    project = PrefectYamlModel.model_validate(raw)
    assert [d.name for d in project.deployments] == ["nightly-finetune", "train"]
    for d in project.deployments:
        assert d.entrypoint == "flows/training.py:federated_training"
        assert (REPO / d.entrypoint.partition(":")[0]).is_file()
        assert d.work_pool.name == POOL
        assert d.work_pool.job_variables == {
            "env": {"MLFLOW_TRACKING_URI": "sqlite:///{{ checkout.stdout }}/mlflow.db"}
        }
    assert project.pull == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ checkout.stdout }}"}}
    ]
    assert _deployment("train").get("schedules") is None


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_deployment_parameters_are_their_config_file(name):
    expected = deployment_parameters(REPO / CONFIG_FILES[name])
    assert _deployment(name)["parameters"] == expected, (
        f"deployments/prefect.yaml's {name} parameters differ from {CONFIG_FILES[name]}; "
        f"paste the output of `python -m fedtune.deployments.parameters {CONFIG_FILES[name]}`"
    )


def test_nightly_schedule_is_two_oclock_berlin_every_day_across_dst():
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.server.schemas.schedules import CronSchedule as ServerCronSchedule

    [spec] = _deployment("nightly-finetune")["schedules"]
    # What `prefect deploy` sends for the entry, then what the server's scheduler computes.
    schedule = _schedule_config_to_deployment_schedule(spec)["schedule"]
    assert isinstance(schedule, CronSchedule)
    assert schedule.timezone == "Europe/Berlin"
    scheduler = ServerCronSchedule(**schedule.model_dump())
    # 2026-03-29 has no 02:00 in Berlin and 2026-10-25 has two.
    runs = asyncio.run(scheduler.get_dates(n=250, start=datetime(2026, 3, 1, 12, tzinfo=BERLIN)))
    expected = [_two_am_berlin(date(2026, 3, 2) + timedelta(days=i)) for i in range(250)]
    assert [r.astimezone(UTC) for r in runs] == expected
    local = {r.astimezone(BERLIN).date(): r.astimezone(BERLIN) for r in runs}
    assert (local[date(2026, 3, 28)].hour, local[date(2026, 3, 29)].hour) == (2, 3)
    assert [local[date(2026, 10, d)].utcoffset() for d in (24, 26)] == [
        timedelta(hours=2),
        timedelta(hours=1),
    ]


def test_serve_refuses_a_schedule_it_would_drop():
    from fedtune.deployments.serve import _schedules

    entry = {"name": "hourly", "schedules": [{"interval": 3600}]}
    with pytest.raises(ValueError, match="'hourly': serve takes schedules of cron and timezone"):
        _schedules(entry)
    [nightly] = _schedules(_deployment("nightly-finetune"))
    assert (nightly.cron, nightly.timezone) == ("0 2 * * *", "Europe/Berlin")


# --- a real Prefect server, process worker and serve process ------------------------------------


@dataclass
class Prefect:
    """A Prefect server of this module's own, and the environment that points a process at it."""

    api_url: str
    env: dict[str, str]
    home: Path
    """PREFECT_HOME, which also holds the logs of the processes started against the server."""

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [PREFECT, *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=180
        )
        if check and result.returncode != 0:
            pytest.fail(f"prefect {' '.join(args)}: exit {result.returncode}\n{_tail(result)}")
        return result

    def client(self) -> SyncPrefectClient:
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)

    def wait_final(self, flow_run_ids: list[str], timeout: float = RUN_TIMEOUT) -> list[Any]:
        """The flow runs, once every one is in a final state."""
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while True:
                runs = [client.read_flow_run(i) for i in flow_run_ids]
                if all(r.state and r.state.is_final() for r in runs):
                    return runs
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"flow runs not finished after {timeout:.0f} s: {runs}\n{self.log_tails()}"
                    )
                time.sleep(0.5)

    def log_tails(self) -> str:
        return "\n".join(
            f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            for log in sorted(self.home.glob("*.log"))
        )


def _tail(result: subprocess.CompletedProcess[str], lines: int = 40) -> str:
    return "\n".join((result.stdout + result.stderr).splitlines()[-lines:])


@contextmanager
def _process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """Run ``args`` in a session of its own until the block ends, however it ends.

    Stopping signals the whole process group, so what the process started (the server's
    services, the flow runs a worker or runner spawned) goes with it.
    """
    with log.open("w") as out:
        proc = subprocess.Popen(
            args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield proc
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    try:  # members of the group that outlived its leader
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _poll(
    check: Callable[[], Any],
    what: str,
    prefect: Prefect,
    timeout: float = 60.0,
    proc: subprocess.Popen | None = None,
) -> Any:
    """``check()``'s first truthy result, polled until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if value := check():
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.returncode}\n{prefect.log_tails()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout:.0f} s\n{prefect.log_tails()}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory) -> Iterator[Prefect]:
    home = tmp_path_factory.mktemp("prefect-home")
    port = str(free_port())
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        # A worker polls every 10 s by default; a test need not wait that long for each run.
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
    }
    # Where runs track is the deployments' business (job variables) or the test's.
    env.pop("MLFLOW_TRACKING_URI", None)
    prefect = Prefect(api_url, env, home)
    args = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", port]
    with _process(args, env, home / "server.log") as proc:

        def healthy() -> bool:
            try:
                return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _poll(healthy, "Prefect server health", prefect, timeout=90, proc=proc)
        yield prefect


@pytest.fixture(scope="module")
def deployed(prefect_server: Prefect) -> Prefect:
    """The README's commands: create the work pool, deploy everything in prefect.yaml."""
    prefect_server.cli("work-pool", "create", POOL, "--type", "process")
    prefect_server.cli(
        "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--all"
    )
    return prefect_server


@pytest.fixture(scope="module")
def worker(deployed: Prefect) -> Iterator[Prefect]:
    args = [PREFECT, "worker", "start", "--pool", POOL]
    with _process(args, deployed.env, deployed.home / "worker.log") as proc:
        with deployed.client() as client:
            _poll(
                lambda: client.read_workers_for_work_pool(POOL),
                "worker registered with the pool",
                deployed,
                proc=proc,
            )
        yield deployed


@dataclass
class Store:
    uri: str
    client: MlflowClient
    experiment_id: str


@pytest.fixture
def mlflow_store(mlflow_template, tmp_path) -> Store:
    """An MLflow store of the test's own, holding the train config's experiment.

    Flow runs start in the repository root, where an experiment created by the flow would
    keep its artifacts; this one keeps them under the test's tmp_path.
    """
    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_template, db)
    uri = f"sqlite:///{db}"
    client = MlflowClient(uri)
    name = load_config(REPO / CONFIG_FILES["train"]).experiment.name
    experiment_id = client.create_experiment(name, artifact_location=str(tmp_path / "artifacts"))
    return Store(uri, client, experiment_id)


def _run_config(rounds: int) -> dict[str, Any]:
    """The train deployment's config with fewer rounds. A run's ``config`` replaces the
    deployment's whole (Prefect merges parameters by top-level name only)."""
    return deployment_parameters(REPO / CONFIG_FILES["train"], [f"rounds.num_rounds={rounds}"])


def _assert_tracked_run(store: Store, rounds: int) -> Run:
    """The one MLflow run in ``store``, checked to be a finished ``rounds``-round train run."""
    [run] = store.client.search_runs([store.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["rounds.num_rounds"] == str(rounds)
    for key in ("train_loss", "fed_mse", "central_mse"):
        history = {m.step: m.value for m in store.client.get_metric_history(run.info.run_id, key)}
        assert sorted(history) == list(range(1, rounds + 1)), key
        if key == "fed_mse":
            assert history[rounds] < history[1]
    return run


def test_deploy_points_runs_at_this_checkout(deployed):
    with deployed.client() as client:
        for name in CONFIG_FILES:
            d = client.read_deployment_by_name(f"{FLOW}/{name}")
            assert d.work_pool_name == POOL
            assert d.pull_steps == [
                {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
            ]
            assert d.job_variables == {
                "env": {"MLFLOW_TRACKING_URI": f"sqlite:///{REPO / 'mlflow.db'}"}
            }
            assert d.parameters == _deployment(name)["parameters"]


def test_server_schedules_the_nightly_runs_at_two_berlin_time(deployed):
    from prefect.client.schemas.filters import DeploymentFilter
    from prefect.client.schemas.sorting import FlowRunSort

    now = datetime.now(UTC)
    with deployed.client() as client:
        nightly = client.read_deployment_by_name(f"{FLOW}/nightly-finetune")

        def scheduled() -> list[Any]:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id={"any_": [nightly.id]}),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC,
            )
            return runs if len(runs) >= 3 else []

        # The scheduler service looks at new deployments every few seconds.
        runs = _poll(scheduled, "scheduled nightly runs", deployed)
    starts = [r.expected_start_time.astimezone(UTC) for r in runs]
    first = starts[0].astimezone(BERLIN).date()
    assert starts == [_two_am_berlin(first + timedelta(days=i)) for i in range(len(starts))]
    assert now < starts[0] <= now + timedelta(hours=25)
    for run in runs:
        assert run.state.is_scheduled()
        assert run.work_pool_name == POOL
        assert run.parameters == _deployment("nightly-finetune")["parameters"]


def _run_and_watch(worker: Prefect, deployment: str, config: dict, mlflow_uri: str) -> None:
    """The README's trigger, with a run-level MLflow store in place of the checkout's; returns
    once the run has completed."""
    result = worker.cli(
        "deployment",
        "run",
        f"{FLOW}/{deployment}",
        "--param",
        f"config={json.dumps(config)}",
        "--job-variable",
        f"env={json.dumps({'MLFLOW_TRACKING_URI': mlflow_uri})}",
        "--watch",
        "--watch-interval",
        "1",
        "--watch-timeout",
        str(int(RUN_TIMEOUT)),
        check=False,
    )
    assert result.returncode == 0, f"{_tail(result)}\n{worker.log_tails()}"


@pytest.mark.parametrize(
    "config, detail",
    [
        (
            {"rounds": {"num_rounds": 3, "epochs": 2}},
            "field 'config.rounds'. Failure reason: Additional properties are not allowed "
            "('epochs' was unexpected)",
        ),
        (
            {"rounds": {"num_rounds": "three"}},
            "field 'config.rounds.num_rounds'. Failure reason: 'three' is not of type 'integer'",
        ),
    ],
    ids=["unknown-key", "wrong-type"],
)
def test_the_server_refuses_a_run_whose_config_breaks_the_schema(deployed, config, detail):
    from prefect.client.schemas.filters import DeploymentFilter
    from prefect.exceptions import PrefectHTTPStatusError

    with deployed.client() as client:
        train = client.read_deployment_by_name(f"{FLOW}/train")
        runs_of_train = DeploymentFilter(id={"any_": [train.id]})
        before = client.count_flow_runs(deployment_filter=runs_of_train)
        with pytest.raises(PrefectHTTPStatusError) as refused:
            client.create_flow_run_from_deployment(train.id, parameters={"config": config})
        assert client.count_flow_runs(deployment_filter=runs_of_train) == before
    assert refused.value.response.status_code == 409
    assert detail in refused.value.response.json()["detail"]


def test_a_config_the_flow_rejects_fails_the_run_before_any_round(worker, mlflow_store):
    """What the server's JSON-schema check cannot see (a rule across keys), or skips (runs
    created without schema enforcement), the flow's pydantic model rejects: the run fails
    with pydantic's message before the first task, so before any round or MLflow run."""
    job_variables = {"env": {"MLFLOW_TRACKING_URI": mlflow_store.uri}}
    cases = {
        "rounds.clients_per_round: 50 is more than data.num_clients (10)": {
            "parameters": {"config": {"rounds": {"num_rounds": 3, "clients_per_round": 50}}},
        },
        "config.rounds.epochs: Extra inputs are not permitted": {
            "parameters": {"config": {"rounds": {"num_rounds": 3, "epochs": 2}}},
            "enforce_parameter_schema": False,
        },
    }
    with worker.client() as client:
        train = client.read_deployment_by_name(f"{FLOW}/train")
        # The REST route, as the client's create_flow_run_from_deployment cannot switch schema
        # enforcement off; through the client, which retries while the server's SQLite is busy.
        ids = [
            client.request(
                "POST",
                "/deployments/{id}/create_flow_run",
                path_params={"id": train.id},
                json={**body, "job_variables": job_variables},
            ).json()["id"]
            for body in cases.values()
        ]

    runs = worker.wait_final(ids)
    for message, run in zip(cases, runs, strict=True):
        assert run.state.is_failed()
        assert run.state.message.startswith("Validation of flow parameters failed")
        assert message in run.state.message
    with worker.client() as client:
        from prefect.client.schemas.filters import FlowRunFilter

        assert client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": ids})) == []
    assert mlflow_store.client.search_runs([mlflow_store.experiment_id]) == []


def test_nightly_finetune_promotes_then_finetunes_from_its_champion(worker, mlflow_store, tmp_path):
    # Two triggered nightly runs (3 rounds each) against one store: the first has no champion
    # and trains from scratch; the second starts from that champion.
    nightly = load_config(REPO / CONFIG_FILES["nightly-finetune"])
    name = nightly.experiment.register_as
    experiment_id = mlflow_store.client.create_experiment(
        nightly.experiment.name, artifact_location=str(tmp_path / "nightly-artifacts")
    )
    config = deployment_parameters(
        REPO / CONFIG_FILES["nightly-finetune"], ["rounds.num_rounds=3", "rounds.patience=99"]
    )["config"]

    def trigger() -> Run:
        before = {r.info.run_id for r in mlflow_store.client.search_runs([experiment_id])}
        _run_and_watch(worker, "nightly-finetune", config, mlflow_store.uri)
        [run] = [
            r
            for r in mlflow_store.client.search_runs([experiment_id])
            if r.info.run_id not in before
        ]
        return run

    def fed_mse(run: Run, step: int, key: str = "fed_mse") -> float:
        history = mlflow_store.client.get_metric_history(run.info.run_id, key)
        return next(m.value for m in history if m.step == step)

    first = trigger()  # the README's trigger: run by the process worker, tracked to MLflow
    with worker.client() as client:
        flow_run = client.read_flow_run(first.data.tags["prefect.flow_run_id"])
        deployment = client.read_deployment(flow_run.deployment_id)
    assert deployment.name == "nightly-finetune"
    assert flow_run.state.is_completed() and flow_run.work_pool_name == POOL
    assert first.data.params["experiment.name"] == "fedtune-nightly"
    assert first.data.tags["fedtune.promotion"] == "promoted"
    champion = mlflow_store.client.get_model_version_by_alias(name, "champion")
    assert champion.run_id == first.info.run_id
    champion_score = fed_mse(first, 3)

    second = trigger()
    assert fed_mse(second, 0, "initial_fed_mse") == pytest.approx(champion_score, rel=1e-9)
    challenger = fed_mse(second, 3)
    assert challenger <= champion_score
    promoted = challenger <= champion_score * (1 - nightly.experiment.promote_margin)
    assert second.data.tags["fedtune.promotion"] == ("promoted" if promoted else "kept-champion")
    now = mlflow_store.client.get_model_version_by_alias(name, "champion")
    assert now.run_id == (second.info.run_id if promoted else first.info.run_id)


def test_serve_runs_the_same_deployments_without_a_worker(deployed, mlflow_store):
    """Kept last: serving replaces the module's work-pool deployments."""
    env = {**deployed.env, "MLFLOW_TRACKING_URI": mlflow_store.uri}
    serve = [sys.executable, "-m", "fedtune.deployments.serve"]
    refused = subprocess.run(serve, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    # One line names every deployment to delete, not only the first one found.
    [line] = [x for x in refused.stderr.splitlines() if "work pool" in x]
    for name in CONFIG_FILES:
        assert f"{FLOW}/{name} is deployed to work pool '{POOL}'" in line
        assert f"prefect deployment delete {FLOW}/{name}" in line

    with deployed.client() as client:  # what `prefect deployment delete` does, without its CLI
        for name in CONFIG_FILES:
            client.delete_deployment(client.read_deployment_by_name(f"{FLOW}/{name}").id)
    with _process(serve, env, deployed.home / "serve.log") as proc, deployed.client() as client:
        from prefect.exceptions import ObjectNotFound

        def registered():
            try:
                return [client.read_deployment_by_name(f"{FLOW}/{name}") for name in CONFIG_FILES]
            except ObjectNotFound:
                return None

        nightly, train = _poll(registered, "served deployments registered", deployed, proc=proc)
        assert nightly.work_pool_name is None and train.work_pool_name is None
        [schedule] = nightly.schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone) == (
            "0 2 * * *",
            "Europe/Berlin",
        )
        assert train.schedules == []
        for d in (nightly, train):
            assert d.parameters == _deployment(d.name)["parameters"]

        flow_run = client.create_flow_run_from_deployment(train.id, parameters=_run_config(2))
        [flow_run] = deployed.wait_final([str(flow_run.id)])
        assert flow_run.state.is_completed(), flow_run.state
    run = _assert_tracked_run(mlflow_store, rounds=2)
    assert run.data.tags["prefect.flow_run_id"] == str(flow_run.id)
