"""Shared fixtures: one temporary Prefect API per session, and per-test MLflow SQLite stores
copied from a template that was migrated once."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np
import pandas as pd
import pytest

# The temporary server's telemetry has no network here, and its shutdown noise is not ours.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")


@pytest.fixture(autouse=True)
def _fast_tier_stays_pure(request):
    """A test that needs Prefect or MLflow is plumbing: it must be marked ``integration``, so
    that ``pytest -m "not integration"`` stays the fast tier over the pure core."""
    plumbing = {"prefect_api", "prefect_api_url", "mlflow_uri", "mlflow_template"} & set(
        request.fixturenames
    )
    if plumbing and request.node.get_closest_marker("integration") is None:
        pytest.fail(f"uses {sorted(plumbing)} but is not marked integration")


SESSION_API = "FEDTUNE_TESTS_PREFECT_API"
"""The session's Prefect API, started by the controlling pytest process for all of its workers."""


def pytest_configure(config):
    """In the controlling process (not in an xdist worker), unless only the fast tier runs:
    start one temporary Prefect server for the session, before the workers start (they inherit
    its address) and without waiting for it, so that it boots while the first tests run. The
    workers share it instead of starting one each."""
    if hasattr(config, "workerinput") or "not integration" in (config.option.markexpr or ""):
        return
    from fedtune.flows.prefect_server import TemporaryServer

    home = tempfile.mkdtemp(prefix="fedtune-tests-prefect-")
    server = TemporaryServer({"PREFECT_HOME": home}).start()
    config.add_cleanup(lambda: shutil.rmtree(home, ignore_errors=True))
    config.add_cleanup(server.stop)  # after the workers have ended (LIFO)
    os.environ[SESSION_API] = server.api_url


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API (a temporary local server), shared by the whole session."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = os.environ.get(SESSION_API)
    if url is None:  # the session deselected the integration tier; start one here, then
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=60):
            yield
        return
    _wait_healthy(url)
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


def _wait_healthy(url: str, timeout: float = 120.0) -> None:
    from fedtune.flows.prefect_server import answers

    deadline = time.monotonic() + timeout
    while not answers(url):
        if time.monotonic() > deadline:
            pytest.fail(f"the session's Prefect server at {url} did not answer in {timeout:g} s")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def prefect_api_url(prefect_api) -> str:
    """The shared temporary API's URL, for a ``fedtune`` subprocess to use
    (``PREFECT_API_URL``) instead of starting a temporary server of its own."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def cli_env(tmp_path, api_url: str | None = None) -> dict[str, str]:
    """A new user's environment for a ``fedtune`` subprocess (no PREFECT_/MLFLOW_ settings of
    ours; fedtune is installed, as for a user); with ``api_url``, the shared Prefect API."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    return env


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory):
    """A migrated, empty MLflow SQLite store; creating one costs seconds, copying it nothing."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_uri(mlflow_template, tmp_path, monkeypatch):
    """A fresh MLflow store for one test; artifacts land under the test's tmp_path."""
    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_template, db)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def write_client_files(directory, sizes, seed=0, kind="csv", offsets=(1000.0, 0.001, 50.0)):
    """Client files with raw features of very different magnitudes and a linear target."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    scales = np.array([250.0, 0.002, 9.0])
    coef = np.array([0.004, 800.0, -0.3])
    for i, n in enumerate(sizes):
        X = np.asarray(offsets) + scales * rng.standard_normal((n, 3))
        y = X @ coef + 3.0 + 0.5 * rng.standard_normal(n)
        frame = pd.DataFrame(X, columns=["income", "ratio", "age"]).assign(target=y)
        if kind == "csv":
            frame.to_csv(directory / f"clinic-{i}.csv", index=False)
        else:
            frame.to_parquet(directory / f"clinic-{i}.parquet", index=False)
    return directory
