"""End-to-end training benchmark; prints one JSON object per scenario.

    python benchmarks/bench_training.py [--scenario seed|many-small|all]

Scenarios:
  seed        configs/seed.toml (10 clients x 100 rows, 20 rounds)
  many-small  100 clients x 100 rows, all every round, 20 rounds, 5 local epochs,
              constant learning rate 0.05

For each: wall seconds of the flow (Prefect's temporary server already up), seconds per round,
milliseconds per client update (flow wall time over rounds x clients: local training, the
per-round federated evaluation and all MLflow logging included), MLflow logging seconds
(the same logging calls timed on their own), and the same training as a plain Python loop
over ``fl`` (no orchestration, no tracking) for comparison, measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = {
    "seed": [],
    "many-small": [
        "data.num_clients=100",
        "data.samples_per_client=100",
        "rounds.num_rounds=20",
        "client.local_epochs=5",
        "client.learning_rate='constant'",
        "client.eta0=0.05",
    ],
}


def _mlflow_seconds(config, result) -> float:
    """Time the flow's MLflow calls (run, per-round metrics and models, final model) alone."""
    from fl.simulation import simulate
    from tasks import tracking

    sim = simulate(config)
    start = time.perf_counter()
    run_id = tracking.start_run.fn(config, {})
    for h in result.history:
        metrics = {k: v for k, v in h.items() if k != "round"}
        tracking.log_round.fn(
            config,
            run_id,
            h["round"],
            {h["round"]: metrics},
            sim.params,
            sim.stats,
            sim.feature_names,
        )
    tracking.log_final.fn(
        config, run_id, sim.params, sim.stats, sim.feature_names, result.history, None, {}
    )
    tracking.end_run.fn(config, run_id)
    return time.perf_counter() - start


def run(name: str) -> dict:
    import logging

    from fl.config import load_config
    from fl.simulation import simulate
    from flows.training import federated_training

    logging.getLogger("prefect.task_runs").setLevel(logging.WARNING)
    logging.getLogger("prefect.flow_runs").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix=f"fedtune-bench-{name}-"))
    os.chdir(work)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    config = load_config(
        ROOT / "configs" / "seed.toml", [*SCENARIOS[name], f"experiment.tracking_uri='{uri}'"]
    )
    from mlflow import MlflowClient

    MlflowClient(uri).search_experiments()  # migrations, outside the measurement

    start = time.perf_counter()
    result = federated_training(config)
    wall = time.perf_counter() - start

    start = time.perf_counter()
    plain = simulate(config)
    plain_wall = time.perf_counter() - start

    updates = sum(h["clients_ok"] for h in result.history)
    mlflow_s = _mlflow_seconds(config, result)
    shutil.rmtree(work, ignore_errors=True)
    return {
        "scenario": name,
        "clients": config.data.num_clients,
        "rounds": result.rounds_completed,
        "client_updates": updates,
        "wall_seconds": round(wall, 3),
        "seconds_per_round": round(
            sum(h["round_seconds"] for h in result.history) / len(result.history), 4
        ),
        "ms_per_client_update": round(1000 * wall / updates, 3),
        "mlflow_logging_seconds": round(mlflow_s, 3),
        "plain_loop_ms_per_client_update": round(1000 * plain_wall / updates, 3),
        "overhead_ratio_vs_plain_loop": round(wall / plain_wall, 2),
        "final_central_mse": result.history[-1].get("central_mse"),
        "baseline_mse": result.baseline_mse,
        "max_abs_coef_diff_vs_plain_loop": max(
            abs(a - b)
            for a, b in zip(result.coef, plain.params.to_raw(plain.stats).coef, strict=True)
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    args = parser.parse_args()
    from prefect.testing.utilities import prefect_test_harness

    start = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=60):
        startup = time.perf_counter() - start
        for name in SCENARIOS if args.scenario == "all" else [args.scenario]:
            print(
                json.dumps({**run(name), "prefect_server_startup_seconds": round(startup, 2)}),
                flush=True,
            )


if __name__ == "__main__":
    main()
