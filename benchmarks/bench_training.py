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

many-small also runs the flow with one task per client (``rounds.clients_per_task=1``) after
the default (``"auto"``: batches of clients), and prints both, their ratios (whole runs, and
rounds alone) and the tasks per round (``batching``); a 2-round warm-up flow comes first. If
``flwr`` is importable (it is not a fedtune dependency: ``pip install "flwr[simulation]"``), it
times Flower's simulation of the same workload too (``flower``: Ray backend, FedAvg by
examples, each ClientApp training with ``fl.client.train``; Ray's start-up included, reported
apart); else ``flower`` says it is not installed.
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
    from fedtune.fl.simulation import simulate
    from fedtune.tasks import tracking

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


def _round_seconds(result) -> float:
    return sum(h["round_seconds"] for h in result.history) / len(result.history)


def _per_client_tasks(config, auto, auto_wall: float, updates: int) -> dict:
    """The flow again with one Prefect task per client, against the default batching (whole
    runs, and the rounds alone: the statistics and final-report tasks stay one per client)."""
    from fedtune.flows.exchange import client_batches
    from fedtune.flows.runner import parallel_tasks
    from fedtune.flows.training import federated_training

    per_client = config.model_copy(
        update={"rounds": config.rounds.model_copy(update={"clients_per_task": 1})}
    )
    start = time.perf_counter()
    result = federated_training(per_client)
    wall = time.perf_counter() - start
    n = config.rounds.clients_per_round or config.data.num_clients
    return {
        "clients_per_task": config.rounds.clients_per_task,
        "tasks_per_round": len(
            client_batches(
                list(range(n)), config.rounds.clients_per_task, parallel_tasks(config.runner)
            )
        ),
        "ms_per_client_update": round(1000 * auto_wall / updates, 3),
        "seconds_per_round": round(_round_seconds(auto), 4),
        "per_client_tasks_wall_seconds": round(wall, 3),
        "per_client_tasks_ms_per_client_update": round(
            1000 * wall / sum(h["clients_ok"] for h in result.history), 3
        ),
        "per_client_tasks_seconds_per_round": round(_round_seconds(result), 4),
        "speedup_vs_per_client_tasks": round(wall / auto_wall, 2),
        "round_speedup_vs_per_client_tasks": round(
            _round_seconds(result) / _round_seconds(auto), 2
        ),
    }


def _flower(config, plain) -> dict:
    """Flower's simulation of the same rounds: every client trains with ``fl.client.train`` in
    a ``ClientApp`` (Ray actors), the ``ServerApp`` runs FedAvg weighted by examples. No
    per-round central evaluation or tracking (fedtune's flow has both)."""
    try:
        import flwr
    except ImportError:
        return {"installed": False, "note": "flwr is not installed: pip install 'flwr[simulation]'"}
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    import logging

    import numpy as np
    from fedtune.fl import client as fl_client
    from fedtune.fl.data import registry
    from fedtune.fl.params import ModelParams
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.WARNING)
    refs, stats, cfg = registry(config.data, config.experiment.seed), plain.stats, config.client
    n, rounds = len(refs), config.rounds.num_rounds
    client_app, server_app, final = ClientApp(), ServerApp(), {}

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        coef, intercept = msg.content["arrays"].to_numpy_ndarrays()
        update = fl_client.train(
            refs[int(context.node_config["partition-id"])],
            ModelParams(coef, float(intercept[0])),
            stats,
            cfg,
            int(msg.content["config"]["server-round"]),
        )
        arrays = ArrayRecord([update.params.coef, np.array([update.params.intercept])])
        metrics = MetricRecord({"num-examples": update.num_examples})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n
        )
        zeros = ModelParams.zeros(len(plain.feature_names))
        initial = ArrayRecord([zeros.coef, np.array([zeros.intercept])])
        started = time.perf_counter()
        result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds)
        final["rounds_seconds"] = time.perf_counter() - started
        final["arrays"] = result.arrays.to_numpy_ndarrays()

    start = time.perf_counter()
    run_simulation(
        server_app,
        client_app,
        num_supernodes=n,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    wall = time.perf_counter() - start
    coef, intercept = final["arrays"]
    raw = ModelParams(coef, float(intercept[0])).to_raw(stats)
    return {
        "installed": True,
        "version": flwr.__version__,
        "wall_seconds": round(wall, 3),
        "rounds_seconds": round(final["rounds_seconds"], 3),
        "ms_per_client_update": round(1000 * final["rounds_seconds"] / (n * rounds), 3),
        "max_abs_coef_diff_vs_plain_loop": max(
            abs(a - b) for a, b in zip(raw.coef, plain.params.to_raw(plain.stats).coef, strict=True)
        ),
    }


def run(name: str) -> dict:
    import logging

    from fedtune.fl.config import load_config
    from fedtune.fl.simulation import simulate
    from fedtune.flows.training import federated_training

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
    if name == "many-small":
        # Two flows are compared: the one-off costs of a process's first flow (the first logged
        # model takes seconds) are paid by a 2-round warm-up, not by whichever runs first.
        warm = config.rounds.model_copy(update={"num_rounds": 2})
        federated_training(config.model_copy(update={"rounds": warm}))

    start = time.perf_counter()
    result = federated_training(config)
    wall = time.perf_counter() - start

    start = time.perf_counter()
    plain = simulate(config)
    plain_wall = time.perf_counter() - start

    updates = sum(h["clients_ok"] for h in result.history)
    mlflow_s = _mlflow_seconds(config, result)
    extra = {}
    if name == "many-small":
        extra["batching"] = _per_client_tasks(config, result, wall, updates)
        extra["flower"] = _flower(config, plain)
    shutil.rmtree(work, ignore_errors=True)
    return {
        "scenario": name,
        "clients": config.data.num_clients,
        "rounds": result.rounds_completed,
        "client_updates": updates,
        "wall_seconds": round(wall, 3),
        "seconds_per_round": round(_round_seconds(result), 4),
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
        **extra,
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
