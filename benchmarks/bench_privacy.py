"""Privacy benchmarks; prints one JSON object per scenario.

    python benchmarks/bench_privacy.py [--scenario dp|dp-engine|secagg|all] [--dp-runs N]

dp        configs/dp.toml (1000 clients x 100 rows, Poisson q = 0.1, 20 rounds, target
          epsilon 1.0 at delta 1e-5, DP feature statistics included) through the flow, next to
          the same run without DP: final epsilon and the ratio of central-eval MSEs.
dp-engine the same comparison through the round engine in-process (fl.simulation.simulate,
          no Prefect or MLflow), so that several DP runs (--dp-runs, default 5; each has its
          own secret noise and sample) can be set against one non-DP run: every ratio, their
          median and their maximum.
secagg  100 clients, all every round, --rounds rounds (default 10): the median seconds per
        round with secure aggregation, keys once per run ("run", the default committee of 40
        share holders; "run_committee_all", every client a share holder) and fresh every round
        ("round"), over the median of the same runs without it (the runs alternate, --repeats
        times each); "ratio_with_setup" spreads the one-off key setup over the rounds, and
        "ratio_of_totals" compares the runs' total round time, setup included (with keys once
        per run, the first round also derives each pair's long-term key).
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
    from fedtune.flows.training import federated_training
    from prefect.exceptions import PrefectHTTPStatusError

    for attempt in range(5):
        start = time.perf_counter()
        try:
            result = federated_training(config)
        except PrefectHTTPStatusError as exc:
            # The temporary server can refuse a new flow run (503) while it is still writing
            # the thousands of task runs of the previous one; nothing has started yet.
            if exc.response.status_code != 503 or attempt == 4:
                raise
            time.sleep(15)
            continue
        return result, time.perf_counter() - start


def _config(path, overrides, work: Path):
    from fedtune.fl.config import load_config

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


def dp_engine(runs: int) -> dict:
    from fedtune.fl.config import load_config
    from fedtune.fl.simulation import simulate

    config = load_config(ROOT / "configs" / "dp.toml")
    plain = simulate(config.model_copy(update={"privacy": type(config.privacy)()}))
    plain_mse = plain.history[-1]["central_mse"]
    ratios, epsilons = [], []
    for _ in range(runs):
        private = simulate(config)
        ratios.append(private.history[-1]["central_mse"] / plain_mse)
        epsilons.append(private.history[-1]["dp_epsilon"])
    ordered = sorted(ratios)
    return {
        "scenario": "dp-engine",
        "clients": config.data.num_clients,
        "sampling_rate": config.rounds.fraction,
        "rounds": config.rounds.num_rounds,
        "dp_delta": config.privacy.delta,
        "dp_epsilon_max": max(epsilons),
        "statistics_noise_multiplier": config.privacy.statistics_noise_multiplier,
        "statistics_clip_norm": config.privacy.statistics_clip_norm,
        "central_mse_no_dp": plain_mse,
        "mse_ratios": [round(r, 4) for r in ratios],
        "mse_ratio_median": ordered[len(ordered) // 2],
        "mse_ratio_max": ordered[-1],
    }


def secagg(work: Path, rounds: int, repeats: int) -> dict:
    """Plain and secure runs alternate (``repeats`` times each), so that a change in the
    host's speed or the Prefect server's load hits both alike; round times are medians."""
    import statistics

    from mlflow import MlflowClient

    base = [
        "data.num_clients=100",
        f"rounds.num_rounds={rounds}",
        "experiment.log_round_models=false",
    ]
    variants = {
        "plain": base,
        "run": [*base, "privacy.secure_aggregation=true", "privacy.secagg_keys='run'"],
        "run_committee_all": [
            *base,
            "privacy.secure_aggregation=true",
            "privacy.secagg_keys='run'",
            "privacy.secagg_committee='all'",
        ],
        "round": [*base, "privacy.secure_aggregation=true", "privacy.secagg_keys='round'"],
    }
    rounds_s: dict[str, list[float]] = {name: [] for name in variants}
    setup_s: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, overrides in variants.items():
            config = _config(None, overrides, work)
            result, _ = _run(config)
            rounds_s[name] += [h["round_seconds"] for h in result.history]
            metrics = MlflowClient(config.experiment.tracking_uri).get_run(result.run_id).data
            setup_s[name].append(metrics.metrics.get("secagg_setup_seconds", 0.0))
    plain = statistics.median(rounds_s["plain"])
    out: dict = {
        "scenario": "secagg",
        "clients": 100,
        "rounds": rounds,
        "repeats": repeats,
        "median_seconds_per_round_plain": round(plain, 3),
        "total_round_seconds_plain": round(sum(rounds_s["plain"]), 2),
    }
    for keys in ("run", "run_committee_all", "round"):
        per_round = statistics.median(rounds_s[keys])
        setup = statistics.median(setup_s[keys])
        out[f"keys_{keys}"] = {
            "setup_seconds": round(setup, 3),
            "median_seconds_per_round": round(per_round, 3),
            "ratio": round(per_round / plain, 2),
            "ratio_with_setup": round((per_round + setup / rounds) / plain, 2),
            "ratio_of_totals": round(
                (sum(rounds_s[keys]) + sum(setup_s[keys])) / sum(rounds_s["plain"]), 2
            ),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", choices=["dp", "dp-engine", "secagg", "all"], default="all")
    parser.add_argument("--dp-runs", type=int, default=5, help="DP runs of dp-engine")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of the secagg scenario")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each secagg variant")
    args = parser.parse_args()
    if args.scenario in ("dp-engine", "all"):
        print(json.dumps(dp_engine(args.dp_runs)), flush=True)
        if args.scenario == "dp-engine":
            return
    from prefect.testing.utilities import prefect_test_harness

    logging.getLogger("prefect.task_runs").setLevel(logging.WARNING)
    logging.getLogger("prefect.flow_runs").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="fedtune-bench-privacy-"))
    os.chdir(work)
    with prefect_test_harness(server_startup_timeout=60):
        if args.scenario in ("dp", "all"):
            print(json.dumps(dp(work)), flush=True)
        if args.scenario in ("secagg", "all"):
            print(json.dumps(secagg(work, args.rounds, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
