"""Privacy benchmarks; prints one JSON object per scenario.

    python benchmarks/bench_privacy.py [--scenario dp|secagg|all]

dp      configs/dp.toml (1000 clients x 100 rows, Poisson q = 0.1, 20 rounds, target
        epsilon 1.0 at delta 1e-5) through the flow, next to the same run without DP:
        final epsilon and the ratio of central-eval MSEs.
secagg  100 clients, all every round, 3 rounds: seconds per round with secure aggregation
        over the same run without it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")

ROOT = Path(__file__).resolve().parents[1]


def _run(config):
    from flows.training import federated_training

    start = time.perf_counter()
    result = federated_training(config)
    return result, time.perf_counter() - start


def _config(path, overrides, work: Path):
    from fl.config import load_config

    uri = f"sqlite:///{work / 'mlflow.db'}"
    return load_config(path, [*overrides, f"experiment.tracking_uri='{uri}'"])


def dp(work: Path) -> dict:
    config = _config(ROOT / "configs" / "dp.toml", [], work)
    private, private_s = _run(config)
    plain_config = config.model_copy(update={"privacy": type(config.privacy)()})
    plain, plain_s = _run(plain_config)
    mse, plain_mse = private.history[-1]["central_mse"], plain.history[-1]["central_mse"]
    return {
        "scenario": "dp",
        "clients": config.data.num_clients,
        "sampling_rate": config.rounds.fraction,
        "rounds": private.rounds_completed,
        "dp_epsilon": private.history[-1]["dp_epsilon"],
        "dp_delta": config.privacy.delta,
        "central_mse_dp": mse,
        "central_mse_no_dp": plain_mse,
        "mse_ratio": mse / plain_mse,
        "wall_seconds_dp": round(private_s, 2),
        "wall_seconds_no_dp": round(plain_s, 2),
    }


def secagg(work: Path) -> dict:
    base = [
        "data.num_clients=100",
        "rounds.num_rounds=3",
        "experiment.log_round_models=false",
    ]
    plain, _ = _run(_config(None, base, work))
    secure, _ = _run(_config(None, [*base, "privacy.secure_aggregation=true"], work))

    def per_round(result):
        return sum(h["round_seconds"] for h in result.history) / len(result.history)

    return {
        "scenario": "secagg",
        "clients": 100,
        "seconds_per_round_plain": round(per_round(plain), 3),
        "seconds_per_round_secagg": round(per_round(secure), 3),
        "ratio": round(per_round(secure) / per_round(plain), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", choices=["dp", "secagg", "all"], default="all")
    args = parser.parse_args()
    from prefect.testing.utilities import prefect_test_harness

    logging.getLogger("prefect.task_runs").setLevel(logging.WARNING)
    logging.getLogger("prefect.flow_runs").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="fedtune-bench-privacy-"))
    os.chdir(work)
    with prefect_test_harness(server_startup_timeout=60):
        for name, fn in {"dp": dp, "secagg": secagg}.items():
            if args.scenario in (name, "all"):
                print(json.dumps(fn(work)), flush=True)


if __name__ == "__main__":
    main()
