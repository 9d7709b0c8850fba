"""What a user sees: a first line at once, messages that say what happened, one-line errors for
everything expected, and an ``--output`` JSON with everything the final block prints."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fedtune.fl.config import ConfigError, load_config
from fedtune.fl.data import ClientDataError, registry
from fedtune.flows.cli import format_model, left_out_lines, main

from tests.conftest import cli_env, write_client_files

# -- pure: messages --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("rounds.num_round=3", "rounds.num_round: unknown key (did you mean rounds.num_rounds?)"),
        ("data.num_client=3", "data.num_client: unknown key (did you mean data.num_clients?)"),
        (
            "rounds.noise_multiplier=1.0",
            "rounds.noise_multiplier: unknown key (did you mean privacy.noise_multiplier?)",
        ),
        ("num_rounds=3", "num_rounds: unknown key (did you mean rounds.num_rounds?)"),
        ("privcy.delta=0.1", "privcy: unknown key (did you mean privacy?)"),
        ("rounds.zzzz=1", "rounds.zzzz: unknown key"),
    ],
)
def test_an_unknown_key_suggests_the_closest_valid_one(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message


@pytest.mark.parametrize(
    "names, coef, intercept, line",
    [
        (["x0", "x1"], [1.57854, -0.853752], 0.92, "y = 1.58·x0 − 0.854·x1 + 0.920"),
        (["x0"], [1.29899], 0.989927, "y = 1.30·x0 + 0.990"),
        (["age"], [-2.0], -100.0, "y = −2.00·age − 100"),
    ],
)
def test_the_final_model_prints_three_significant_digits_and_true_signs(
    names, coef, intercept, line
):
    assert format_model(names, coef, intercept) == line


def test_an_empty_directory_names_the_key_not_a_client(tmp_path, capsys):
    config = load_config(None, ["data.source=files", f"data.path='{tmp_path}'"])
    with pytest.raises(ClientDataError) as err:
        registry(config.data, 0)
    assert str(err.value) == f"data.path {tmp_path}: no .csv or .parquet client files"

    assert main(["config", "--set", "data.source=files", "--set", f"data.path='{tmp_path}'"]) == 2
    err = capsys.readouterr().err
    assert err == f"fedtune: config error: data.path {tmp_path}: no .csv or .parquet client files\n"


def test_left_out_clients_are_named_with_their_reason_or_counted():
    excluded = {"clinic-1": "client 'clinic-1' (d/clinic-1.csv): column 'a' row 7: NaN"}
    history = [{"clients_failed": 0}, {"clients_failed": 2}]
    assert left_out_lines(excluded, history) == [
        "left out: clinic-1 (column 'a' row 7: NaN)",
        "left out of single rounds: 2 client update(s); see failed_clients in the MLflow run's "
        "rounds.csv",
    ]
    many = {f"c{i}": "duplicate client id" for i in range(9)}
    assert left_out_lines(many, []) == [
        "9 clients left out of the run; see excluded_clients in the MLflow run's summary.json"
    ]


def test_early_stop_names_the_rounds_the_metric_and_the_model_kept():
    from fedtune.flows.reporting import early_stop_message

    config = load_config(None, ["rounds.patience=2", "rounds.tolerance=0.05"])
    history = [
        {"round": 1, "fed_mse": 0.5},
        {"round": 2, "fed_mse": 0.4},
        {"round": 3, "fed_mse": 0.39},
        {"round": 4, "fed_mse": 0.41},
    ]
    assert early_stop_message(config, history, 5) == (
        "early stop: rounds 3–4 did not improve fed_mse by 5%; keeping round 4's model "
        "(fed_mse 0.41; round 3 scored 0.39); round 5's updates discarded"
    )
    # Under DP the stop is decided on central_mse after the round, whose model is kept (the
    # clients' un-noised fed_mse is neither used nor there for the stopped round).
    dp = load_config(None, ["rounds.patience=1", "privacy.noise_multiplier=1.0"])
    central = [{"round": 1, "central_mse": 0.5}, {"round": 2, "central_mse": 0.52}]
    assert early_stop_message(dp, central, 2) == (
        "early stop: round 2 did not improve central_mse; keeping round 2's model "
        "(central_mse 0.52)"
    )


# -- pure: one-line errors before anything starts ------------------------------------------------


def _one_line_failure(capsys) -> str:
    out, err = capsys.readouterr()
    assert out.startswith("fedtune: checking "), out  # the first line came before the check
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_missing_mlflow_directory_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/nowhere/mlflow.db")
    assert main(["run", "--set", "rounds.num_rounds=1"]) == 2
    err = _one_line_failure(capsys)
    assert err.startswith("fedtune: MLflow store: sqlite:///") and "does not exist" in err


def test_a_locked_mlflow_store_is_one_line(tmp_path, monkeypatch, capsys):
    db = tmp_path / "mlflow.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    try:
        assert main(["run", "--set", "rounds.num_rounds=1"]) == 1
    finally:
        holder.close()
    err = _one_line_failure(capsys)
    assert "is locked by another process" in err


# -- the command line as a user runs it ------------------------------------------------------


def _env(tmp_path, api_url, mlflow_template) -> dict[str, str]:
    """The shared Prefect API, and an MLflow store copied from the migrated template."""
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    return cli_env(tmp_path, api_url) | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}


def _fedtune(tmp_path, env, *args) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``fedtune run ARGS``; also how long its first line took."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedtune.flows.cli", "run", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = proc.stdout.readline()
    first_line_s = time.monotonic() - started
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, first + out, err), first_line_s


def _run_ok(tmp_path, api_url, mlflow_template, sets):
    """``fedtune run --set ... -o s.json`` on the shared API: it succeeds with no traceback and
    no ERROR line; returns the process and its whole output."""
    args = [a for s in sets for a in ("--set", s)]
    env = _env(tmp_path, api_url, mlflow_template)
    proc, _ = _fedtune(tmp_path, env, *args, "-o", "s.json")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "ERROR" not in out, out
    return proc, out


@pytest.mark.integration
def test_an_unreachable_prefect_api_is_one_line_after_a_prompt_first_line(tmp_path):
    env = cli_env(tmp_path, "http://127.0.0.1:9/api")  # nothing listens on port 9
    proc, first_line_s = _fedtune(tmp_path, env)
    assert proc.stdout.startswith("fedtune: checking "), proc.stdout
    assert first_line_s < 2.0
    assert proc.returncode == 1
    assert proc.stderr == (
        "fedtune: Prefect API: http://127.0.0.1:9/api is unreachable (connection refused); "
        "start that server, or unset PREFECT_API_URL (environment or Prefect profile) for a "
        "temporary local one\n"
    )


@pytest.mark.integration
def test_a_dp_run_says_its_plan_and_what_it_spent_and_writes_both(
    tmp_path, prefect_api_url, mlflow_template
):
    sets = [
        "privacy.noise_multiplier=1.0",
        "data.num_clients=10",
        "rounds.fraction=0.5",
        "rounds.num_rounds=2",
    ]
    proc, out = _run_ok(tmp_path, prefect_api_url, mlflow_template, sets)
    assert "reading 10 clients' feature statistics…" in out
    planned = re.search(
        r"privacy: DP-FedAvg z=1, q=0.5, δ=1e-05, statistics z_s=20, ε=([\d.]+) over 2 rounds",
        out,
    )
    assert planned and "(planned)" in out, out
    spent = re.search(
        r"^privacy: \(ε, δ\) = \(([\d.]+), 1e-05\) spent over 2 rounds \(z=1, q=0.5\)$",
        proc.stdout,
        re.M,
    )
    assert spent and spent[1] == planned[1], proc.stdout  # both planned rounds ran
    assert re.search(r"^final model: y = −?[\d.]+·x0 [+−] [\d.]+$", proc.stdout, re.M)
    assert re.search(r"round 1/2  clients \d+ ok, 0 failed .* ε [\d.]+", out)

    summary = json.loads((tmp_path / "s.json").read_text())
    assert f"{summary['dp_epsilon']:.3g}" == spent[1]
    assert summary["dp_delta"] == 1e-05
    assert (summary["dp_noise_multiplier"], summary["dp_sampling_rate"]) == (1.0, 0.5)
    assert summary["secure_aggregation"] is False
    assert summary["excluded_clients"] == {}
    assert summary["init_model"] is None and summary["promotion"] is None


@pytest.mark.integration
def test_early_stop_and_a_left_out_client_are_said_and_written(
    tmp_path, prefect_api_url, mlflow_template
):
    clients = write_client_files(tmp_path / "clients", [60, 50, 70])
    bad = clients / "clinic-1.csv"
    bad.write_text(bad.read_text().replace("\n", "\nnot-a-number,1,2,3\n", 1))
    sets = [
        "data.source=files",
        f"data.path={clients}",
        "data.target=target",
        "rounds.patience=1",
        "rounds.tolerance=0.5",
    ]
    proc, out = _run_ok(tmp_path, prefect_api_url, mlflow_template, sets)
    # An expected failure: no traceback, no ERROR (checked above), one warning naming client,
    # file and row.
    named = [line for line in out.splitlines() if "clinic-1" in line and str(bad) in line]
    assert len(named) == 1 and "WARNING" in named[0] and "row 0" in named[0], out
    assert "clients 2 ok, 0 failed" in out  # the other two trained
    stop = re.search(
        r"early stop: round (\d+) did not improve fed_mse by 50%; keeping round \1's model "
        r"\(fed_mse [\d.]+\); round (\d+)'s updates discarded",
        out,
    )
    assert stop and int(stop[2]) == int(stop[1]) + 1, out
    assert f"rounds: {stop[1]} of 20 (early stop)" in proc.stdout
    assert "left out: clinic-1 (column 'income' row 0: non-numeric value 'not-a-number')" in (
        proc.stdout
    )
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["stopped_early"] and summary["rounds_completed"] == int(stop[1])
    assert set(summary["excluded_clients"]) == {"clinic-1"}
    assert str(bad) in summary["excluded_clients"]["clinic-1"]


def test_the_output_fields_are_documented():
    """Every field ``--output`` writes has a row in README's table."""
    from fedtune.flows.training import TrainingResult

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("`--output` JSON") :]
    for field in TrainingResult.model_fields:
        assert f"| `{field}` |" in section, field
