"""Privacy benchmarks; prints one JSON object per scenario.

    python benchmarks/bench_privacy.py [--scenario dp|secagg|all]

dp      configs/dp.toml (1000 clients x 100 rows, Poisson q = 0.1, 20 rounds, target
        epsilon 1.0 at delta 1e-5) through the flow, next to the same run without DP:
        final epsilon and the ratio of central-eval MSEs.
secagg  100 clients, all every round, --rounds rounds (default 10): seconds per round with
        secure aggregation, keys once per run ("run") and fresh every round ("round"), over the
        same run without it; "ratio_with_setup" spreads the one-off key setup over the rounds.
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


def secagg(work: Path, rounds: int) -> dict:
    from mlflow import MlflowClient

    base = [
        "data.num_clients=100",
        f"rounds.num_rounds={rounds}",
        "experiment.log_round_models=false",
    ]
    plain, _ = _run(_config(None, base, work))
    out = {"scenario": "secagg", "clients": 100, "rounds": rounds}

    def per_round(result):
        return sum(h["round_seconds"] for h in result.history) / len(result.history)

    out["seconds_per_round_plain"] = round(per_round(plain), 3)
    for keys in ("run", "round"):
        config = _config(
            None,
            [*base, "privacy.secure_aggregation=true", f"privacy.secagg_keys='{keys}'"],
            work,
        )
        secure, _ = _run(config)
        metrics = MlflowClient(config.experiment.tracking_uri).get_run(secure.run_id).data.metrics
        setup = metrics["secagg_setup_seconds"]
        out[f"keys_{keys}"] = {
            "setup_seconds": round(setup, 3),
            "seconds_per_round": round(per_round(secure), 3),
            "ratio": round(per_round(secure) / per_round(plain), 2),
            "ratio_with_setup": round((per_round(secure) + setup / rounds) / per_round(plain), 2),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", choices=["dp", "secagg", "all"], default="all")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of the secagg scenario")
    args = parser.parse_args()
    from prefect.testing.utilities import prefect_test_harness

    logging.getLogger("prefect.task_runs").setLevel(logging.WARNING)
    logging.getLogger("prefect.flow_runs").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="fedtune-bench-privacy-"))
    os.chdir(work)
    with prefect_test_harness(server_startup_timeout=60):
        if args.scenario in ("dp", "all"):
            print(json.dumps(dp(work)), flush=True)
        if args.scenario in ("secagg", "all"):
            print(json.dumps(secagg(work, args.rounds)), flush=True)


if __name__ == "__main__":
    main()
