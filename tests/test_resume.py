"""Resume after a crash: a `fedtune run` killed with SIGKILL mid-run, then `--resume`d,
ends exactly where an uninterrupted run ends, with every round's metrics logged once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fedtune.fl.config import load_config
from fedtune.fl.simulation import simulate
from mlflow import MlflowClient

from tests.conftest import cli_env

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 40  # enough that the poller below sees a checkpoint well before the last round
OVERRIDES = [f"rounds.num_rounds={ROUNDS}", "data.num_clients=20", "rounds.clients_per_round=8"]


def _fedtune(tmp_path: Path, api_url: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fedtune.flows.cli", "run", *args],
        cwd=tmp_path,
        env=cli_env(tmp_path, api_url),  # the shared Prefect API: SIGKILL kills only the run
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _checkpointed_round(client: MlflowClient) -> tuple[str, int] | None:
    try:
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    except Exception:  # noqa: BLE001 -- the store may not exist yet
        return None
    for run in runs:
        raw = run.data.tags.get("fedtune.checkpoint")
        if raw:
            return run.info.run_id, json.loads(raw)["round"]
    return None


def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, prefect_api_url):
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    proc = _fedtune(tmp_path, prefect_api_url, *sets)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            seen = _checkpointed_round(client) if (tmp_path / "mlflow.db").exists() else None
            if seen and seen[1] >= 4:
                break
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.2)
        else:
            raise AssertionError("no round was checkpointed in time")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it had already exited (the assertion above says why)
            pass
        proc.wait()
    run_id, killed_after = seen
    assert killed_after < ROUNDS

    resumed = _fedtune(tmp_path, prefect_api_url, "--resume", run_id, "--output", "s.json")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-3000:]
    assert f"resuming run {run_id} after round" in out

    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["run_id"] == run_id and summary["rounds_completed"] == ROUNDS
    plain = simulate(load_config(None, OVERRIDES))
    np.testing.assert_allclose(
        summary["coef"], plain.params.to_raw(plain.stats).coef, rtol=0, atol=1e-12
    )
    assert abs(summary["intercept"] - plain.params.to_raw(plain.stats).intercept) <= 1e-12

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "fed_mse", "central_mse", "clients_ok"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(1, ROUNDS + 1)), (key, steps)
    for key in ("initial_fed_mse", "baseline_mse"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [0], key
