"""The quickstart path, as a user runs it: ``fedtune run`` in a fresh directory, no servers."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest

pytestmark = pytest.mark.integration


def test_fedtune_run_needs_no_server_and_prints_no_errors(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "MLFLOW_"))  # exactly what a new user has
    }
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    # A user's own modules named like fedtune's folders: fedtune installs as `fedtune.*` only,
    # so these are never imported (they would fail the run if they were).
    for name in ("tasks", "flows", "fl", "deployments"):
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('the user's own {name}.py')\n")
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("fedtune")), "run"]
        + ["--set", "rounds.num_rounds=3", "-o", "s.json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "ERROR" not in out, out
    round_lines = [line for line in out.splitlines() if "round " in line and "fed_mse" in line]
    assert len(round_lines) == 3, out
    assert "clients 10 ok, 0 failed" in round_lines[0]
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in proc.stdout
    # fedtune started the temporary server itself, first thing (Prefect did not start another),
    # and it is gone once the command has returned; the run's records are in its database.
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("fedtune: checking the default configuration"), out
    assert lines[1].startswith("fedtune: starting Prefect (a temporary local server at "), out
    assert "Starting temporary server" not in out
    server = lines[1].split(" at ", 1)[1].split(";", 1)[0]
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{server}/api/health", timeout=2)
    with sqlite3.connect(tmp_path / "prefect-home" / "prefect.db") as db:
        [(flow_runs,)] = db.execute("SELECT count(*) FROM flow_run WHERE state_type = 'COMPLETED'")
    assert flow_runs == 1

    summary = json.loads((tmp_path / "s.json").read_text())
    assert {"run_id", "model_uri", "coef", "intercept", "history"} <= set(summary)
    assert len(summary["history"]) == 3
    # A new store's first experiment is 1; the link opens the run in the model-training view.
    run_page = f"http://127.0.0.1:5000/#/experiments/1/runs/{summary['run_id']}"
    assert f"open: {run_page}?workflowType=machine_learning" in proc.stdout
    assert (tmp_path / "mlflow.db").exists()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        model = mlflow.sklearn.load_model(summary["model_uri"])
    finally:
        mlflow.set_tracking_uri(None)
    assert model.predict(pd.DataFrame({"x0": [0.0, 1.0]})).shape == (2,)
