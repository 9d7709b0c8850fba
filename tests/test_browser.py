"""What a reader finds in the MLflow UI after a fedtune run: the run's page, opened in headless
Chromium from the link ``fedtune run`` prints, shows the per-round metric chart and the final
model, in MLflow's model-training view; and the run itself reads well there (a short parameter
list, the checkpoint out of the tags, round models in round order).

The browser is Debian's ``chromium`` (``.ci/run`` installs it); without any Chromium on PATH
the browser test is skipped, saying so."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fedtune.fl.config import load_config
from fedtune.flows.training import TrainingResult, federated_training
from fedtune.tasks.tracking import ui_url
from mlflow import MlflowClient

pytestmark = pytest.mark.integration

ROUNDS = 4
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHART_CARD = 'data-testid="experiment-view-compare-runs-card"'
CHART_HEIGHT = 2400
"""Charts are drawn once scrolled into view, three to a row in alphabetical order: a window this
tall draws about twenty, ``fed_mse`` among them."""


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    pytest.skip(f"no Chromium on PATH ({', '.join(BROWSERS)}): `apt-get install chromium`")


@dataclass
class Store:
    work: Path
    uri: str


@pytest.fixture(scope="module")
def store(mlflow_template, tmp_path_factory) -> Store:
    work = tmp_path_factory.mktemp("mlflow-ui")
    shutil.copy(mlflow_template, work / "mlflow.db")
    return Store(work, f"sqlite:///{work / 'mlflow.db'}")


class Server:
    """``mlflow server`` on a free port of 127.0.0.1, started at once and waited for when
    first used, so that it boots while the flow runs."""

    def __init__(self, store: Store):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log = store.work / "mlflow-server.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store.uri]
                + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                cwd=store.work,
                # Without the GenAI job runners (judges, trace roll-ups): eight more processes
                # importing MLflow, which nothing on a training run's page uses.
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.ready = False

    def wait(self, timeout: float = 180.0) -> str:
        deadline = time.monotonic() + timeout
        while not self.ready:
            assert self.proc.poll() is None, f"mlflow server exited: {self._tail()}"
            assert time.monotonic() < deadline, f"mlflow server not up: {self._tail()}"
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    self.ready = response.status == 200
            except OSError:
                time.sleep(0.3)
        return self.url

    def _tail(self) -> str:
        return "\n".join(self.log.read_text().splitlines()[-15:])

    def stop(self) -> None:
        """SIGTERM to the server's process group, then SIGKILL to whatever of it is left."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture(scope="module")
def server(chromium, store):
    server = Server(store)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def run(prefect_api, store) -> TrainingResult:
    """A short run of the seed example, with its round models."""
    overrides = [
        f"experiment.tracking_uri='{store.uri}'",
        f"rounds.num_rounds={ROUNDS}",
        "data.num_clients=4",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(store.work)
        return federated_training(load_config(None, overrides))


def _dump_dom(chromium: str, pages: dict[str, tuple[str, int]], profile: Path) -> dict[str, str]:
    """The DOM of each page (``{key: (url, window height)}``) once its scripts have run, from
    one headless Chromium per page, side by side. Virtual time stands still while a request is
    pending, so a page has its data and has drawn its charts however busy the machine is."""
    procs = {
        key: subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
            + [f"--user-data-dir={profile / key}", f"--window-size=1600,{height}"]
            + ["--run-all-compositor-stages-before-draw", "--virtual-time-budget=30000"]
            + ["--dump-dom", url],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for key, (url, height) in pages.items()
    }
    return {key: proc.communicate(timeout=240)[0] for key, proc in procs.items()}


def _logged_models(page: str, experiment_id: str) -> tuple[str, list[tuple[str, str]]]:
    """The run page's "Logged models (N)" heading and its table's (model id, name) links."""
    start = page.find(">Logged models (")
    assert start >= 0, f"no logged models on the run page: {_text(page)[:2000]}"
    section = page[start : page.find(">About this run<", start)]
    heading = section[1 : section.index("<")]
    links = re.findall(
        rf'<a [^>]*href="#/experiments/{experiment_id}/models/([^"?]+)[^"]*"[^>]*>([^<]+)</a>',
        section,
    )
    return heading, links


def _chart(page: str, metric: str) -> tuple[list[str], np.ndarray]:
    """The x tick labels and the line's (x, y) points of the chart card titled ``metric``."""
    cards = {_title(c): c for c in page.split(CHART_CARD)[1:]}
    assert metric in cards, f"no {metric} chart among {sorted(cards, key=str)}"
    drawn = re.search(r'<path [^>]*class="js-line"[^>]*>', cards[metric])
    assert drawn, f"the {metric} chart was not drawn (below the window's {CHART_HEIGHT} px?)"
    ticks = re.findall(r'<g class="xtick"><text [^>]*>([^<]*)</text>', cards[metric])
    path = re.search(r'\bd="M([^"]+)"', drawn.group(0)).group(1)
    points = np.array([[float(v) for v in p.split(",")] for p in path.split("L")])
    return ticks, points


def _text(page: str) -> str:
    """A page's visible words, for failure messages."""
    body = re.sub(r"<(script|style)\b.*?</\1>", "", page, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


def _title(card: str) -> str | None:
    match = re.search(r'<h4 [^>]*title="([^"]*)"', card)
    return match.group(1) if match else None


def test_the_run_page_shows_the_metric_chart_and_the_final_model(
    chromium, server, run, store, tmp_path
):
    client = MlflowClient(store.uri)
    experiment_id = client.get_run(run.run_id).info.experiment_id
    base = server.wait()
    # What `fedtune run` prints, on this test's server instead of `mlflow ui`'s port 5000.
    overview = ui_url(base, experiment_id, run.run_id)
    charts = overview.replace("?", "/model-metrics?")
    pages = _dump_dom(
        chromium, {"overview": (overview, 1200), "charts": (charts, CHART_HEIGHT)}, tmp_path
    )

    heading, models = _logged_models(pages["overview"], experiment_id)
    final_id = run.model_uri.removeprefix("models:/")
    assert (heading, models) == ("Logged models (1)", [(final_id, "final")])
    assert ">Model registry<" in pages["overview"]  # the model-training view's sidebar
    assert ">Agent versions<" not in pages["overview"]  # not the GenAI one

    ticks, points = _chart(pages["charts"], "fed_mse")
    assert len(points) == ROUNDS  # one point per round
    assert {"1", str(ROUNDS)} <= set(ticks)  # on the step axis
    np.testing.assert_allclose(np.diff(points[:, 0]), np.diff(points[:, 0])[0], atol=0.1)
    # The points' heights are the rounds' fed_mse on a linear axis (pixels grow downwards).
    fed_mse = np.array([h["fed_mse"] for h in run.history])
    slope, offset = np.polyfit(fed_mse, points[:, 1], 1)
    assert slope < 0
    np.testing.assert_allclose(slope * fed_mse + offset, points[:, 1], atol=0.5)


def test_the_run_reads_as_a_model_training_run(run, store, tmp_path):
    client = MlflowClient(store.uri)
    mlflow_run = client.get_run(run.run_id)
    experiment = client.get_experiment(mlflow_run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    # The keys runs are compared by, then those this run set away from their defaults.
    compared = {
        "data.source": "synthetic",
        "rounds.num_rounds": str(ROUNDS),
        "client.local_epochs": "1",
        "server.strategy": "fedavg",
        "privacy.noise_multiplier": "None",
        "privacy.target_epsilon": "None",
        "privacy.secure_aggregation": "False",
        "experiment.seed": "0",
    }
    changed = {"experiment.tracking_uri": store.uri, "data.num_clients": "4"}
    assert mlflow_run.data.params == {**compared, **changed}
    config = json.loads(
        Path(client.download_artifacts(run.run_id, "config.json", tmp_path)).read_text()
    )
    assert config["data"]["num_clients"] == 4 and config["client"]["eta0"] == 0.01  # all of it

    # The checkpoint is an artifact; its tag only says which round's is in force.
    path = f"checkpoints/round-{ROUNDS:03d}.json"
    assert json.loads(mlflow_run.data.tags["fedtune.checkpoint"]) == {"round": ROUNDS, "path": path}
    checkpoint = json.loads(Path(client.download_artifacts(run.run_id, path, tmp_path)).read_text())
    assert checkpoint["round"] == ROUNDS and len(checkpoint["params"]) == 2  # x0 and intercept

    # The run's page lists its one output, the final model; the experiment's Models tab lists
    # every model newest first (its default sort), so the rounds come in order.
    assert [(o.model_id, o.step) for o in mlflow_run.outputs.model_outputs] == [
        (run.model_uri.removeprefix("models:/"), ROUNDS)
    ]
    newest_first = client.search_logged_models(
        [experiment.experiment_id],
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
    )
    assert [m.name for m in newest_first] == ["final"] + [
        f"round-{r:03d}" for r in range(ROUNDS, 0, -1)
    ]


def test_ui_links_open_the_model_training_view():
    view = "?workflowType=machine_learning"
    assert ui_url("sqlite:///mlflow.db", "3") == f"http://127.0.0.1:5000/#/experiments/3{view}"
    assert ui_url("https://mlflow.example.org/", "3", "abc") == (
        f"https://mlflow.example.org/#/experiments/3/runs/abc{view}"
    )
    assert ui_url("databricks", "3") is None
