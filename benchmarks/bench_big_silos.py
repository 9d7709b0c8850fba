"""Big silos on Dask: the flow on a LocalCluster of 2 workers against a sequential plain loop;
prints one JSON object.

    python benchmarks/bench_big_silos.py [--rows 1000000] [--clients 4] [--features 10]
        [--rounds 5] [--chunk-size 65536] [--workers 2] [--cache DIR]

The data: ``--clients`` Parquet files of ``--rows`` rows and ``--features`` features each
(y = 2·x + 1 + 0.1·ε, float64), in row groups of ``--chunk-size`` rows, generated once into
``--cache`` (default: ``fedtune-big-silos-ROWSxFEATURES`` in the system's temporary directory)
and reused. Every client reads its file in chunks of ``client.chunk_size = --chunk-size`` rows
(``partial_fit`` per chunk); ``--rounds`` rounds of 1 local epoch, every client every round.

Both measured in one run, on the same files and configuration:

- ``sequential_seconds``: the plain loop over ``fl``'s functions (:func:`fl.simulation.simulate`:
  the round engine with every client in this process, one after another; no Prefect, no
  MLflow);
- ``dask_seconds``: the flow (Prefect tasks, MLflow tracking) with ``runner.kind = "dask"`` on a
  ``LocalCluster`` of ``--workers`` single-threaded worker processes, started as
  ``runner.n_workers`` starts one (:func:`flows.dask_runner.local_cluster`; workers started by
  hand take ``deployments/dask-worker.yaml``) and warmed up (its workers' imports done)
  beforehand, as a standing cluster at ``runner.address`` is;
  ``cold_dask_seconds`` adds the cluster's start and warm-up, what ``runner.n_workers`` pays
  in every run.

``round_seconds`` has each round's seconds for both, and for rounds of plain Dask tasks on the
same cluster before the flow (every client's ``fl.client.train``, no Prefect, no MLflow): the
workers' share of a round without the orchestration.

Then ``ratio`` (``dask_seconds / sequential_seconds``, target ≤ 0.6), every worker's peak RSS
(``VmHWM`` of its process, target ≤ 1 GiB), and the largest coefficient difference between
the two models. Prefect's temporary server starts before and outside every measurement, and
so does what ``fedtune run`` does while it starts (:func:`tasks.tracking.prepare_logging`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")

TARGET_RATIO = 0.6
TARGET_RSS_MIB = 1024


def write_silos(directory: Path, clients: int, rows: int, features: int, group: int) -> Path:
    """``site-0.parquet`` ... once (a ``.complete`` marker says the set is whole), written a
    row group at a time so that generating them needs little memory either."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    if (directory / ".complete").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    names = [f"x{j}" for j in range(features)] + ["y"]
    schema = pa.schema([(name, pa.float64()) for name in names])
    for i in range(clients):
        rng = np.random.default_rng(1000 + i)
        with pq.ParquetWriter(directory / f"site-{i}.parquet", schema) as writer:
            for start in range(0, rows, group):
                n = min(group, rows - start)
                X = rng.standard_normal((n, features))
                y = X @ np.full(features, 2.0) + 1.0 + 0.1 * rng.standard_normal(n)
                columns = [*X.T, y]
                writer.write_table(pa.Table.from_arrays(columns, schema=schema))
    (directory / ".complete").write_text(f"{clients} x {rows} x {features}\n")
    return directory


def _rounds(history: list[dict]) -> list[float]:
    """Each round's seconds (``round_seconds``: sampling to the aggregate's evaluation); the
    rest of a run is its statistics pass, final scores and logging."""
    return [round(h["round_seconds"], 2) for h in history if "round_seconds" in h]


def _peak_rss_mib() -> float:
    """This process's peak resident set: ``VmHWM``, the high-water mark of its own memory.
    (``ru_maxrss`` would not do for a worker: Linux carries it over from the parent at fork,
    so a worker spawned by this process would report this process's peak.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _warm_up() -> None:
    """A worker's imports, done before the measurement (a standing cluster's are)."""
    import fedtune.flows.training  # noqa: F401
    import fedtune.tasks.client  # noqa: F401
    import prefect.task_engine  # noqa: F401


def _train_one(ref, params, stats, client_config, round_num: int) -> None:
    from fedtune.fl import client

    client.train(ref, params, stats, client_config, round_num)


def _plain_dask_rounds(client, config, params, stats) -> list[float]:
    """Seconds of each of ``rounds.num_rounds`` rounds of plain Dask tasks on the same cluster:
    every client's :func:`fl.client.train` (one task each, no Prefect, no MLflow), from the
    same model: the workers' share of a flow round, without the orchestration."""
    from fedtune.fl.data import registry

    refs = registry(config.data, config.experiment.seed)
    seconds = []
    for r in range(1, config.rounds.num_rounds + 1):
        start = time.perf_counter()
        futures = [
            client.submit(_train_one, ref, params, stats, config.client, r, pure=False)
            for ref in refs
        ]
        client.gather(futures)
        seconds.append(round(time.perf_counter() - start, 2))
    return seconds


def _dask_run(config, workers: int, plain=None) -> dict:
    from distributed import Client
    from fedtune.flows.dask_runner import local_cluster
    from fedtune.flows.training import federated_training

    started = time.perf_counter()
    with local_cluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        with Client(cluster, set_as_default=False) as client:
            client.wait_for_workers(workers)
            client.run(_warm_up)
            ready = time.perf_counter() - started
            tasks = [] if plain is None else _plain_dask_rounds(client, config, *plain)
            dask_config = config.model_copy(
                update={
                    "runner": config.runner.model_copy(
                        update={"kind": "dask", "address": cluster.scheduler_address}
                    )
                }
            )
            start = time.perf_counter()
            result = federated_training(dask_config)
            seconds = time.perf_counter() - start
            rss = client.run(_peak_rss_mib)
    return {"seconds": seconds, "ready": ready, "result": result, "rss": rss, "tasks": tasks}


def run(args: argparse.Namespace) -> dict:
    import logging

    import numpy as np
    from fedtune.fl.config import load_config
    from fedtune.fl.simulation import simulate

    logging.getLogger("prefect.task_runs").setLevel(logging.WARNING)
    logging.getLogger("prefect.flow_runs").setLevel(logging.WARNING)
    logging.getLogger("distributed").setLevel(logging.ERROR)
    cache = args.cache or Path(tempfile.gettempdir()) / (
        f"fedtune-big-silos-{args.clients}x{args.rows}x{args.features}-g{args.chunk_size}"
    )
    start = time.perf_counter()
    data = write_silos(Path(cache), args.clients, args.rows, args.features, args.chunk_size)
    generated = time.perf_counter() - start
    work = Path(tempfile.mkdtemp(prefix="fedtune-bench-big-silos-"))
    os.chdir(work)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    config = load_config(
        None,
        [
            "data.source=files",
            f"data.path='{data}'",
            "data.target=y",
            f"rounds.num_rounds={args.rounds}",
            "client.local_epochs=1",
            f"client.chunk_size={args.chunk_size}",
            f"experiment.tracking_uri='{uri}'",
        ],
    )
    from fedtune.tasks.tracking import prepare_logging

    # What `fedtune run` does while Prefect's server starts: the store's migrations, and the
    # imports and warm-up of model logging (skops' first import alone takes seconds of CPU in
    # a process that has Prefect, MLflow and Dask loaded).
    prepare_logging(uri)

    start = time.perf_counter()
    plain = simulate(config)
    sequential = time.perf_counter() - start
    dask = _dask_run(config, args.workers, (plain.params, plain.stats))

    result = dask["result"]
    raw = plain.params.to_raw(plain.stats)
    rss = {address: round(mib, 1) for address, mib in dask["rss"].items()}
    ratio = dask["seconds"] / sequential
    return {
        "clients": args.clients,
        "rows_per_client": args.rows,
        "features": args.features,
        "rounds": result.rounds_completed,
        "local_epochs": 1,
        "chunk_size": args.chunk_size,
        "workers": args.workers,
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "data_generation_seconds": round(generated, 2),
        "sequential_seconds": round(sequential, 2),
        "dask_seconds": round(dask["seconds"], 2),
        "cluster_start_and_warm_up_seconds": round(dask["ready"], 2),
        "cold_dask_seconds": round(dask["seconds"] + dask["ready"], 2),
        "ratio": round(ratio, 3),
        "round_seconds": {
            "sequential": _rounds(plain.history),
            "dask": _rounds(result.history),
            "plain_dask_tasks": dask["tasks"],
        },
        "cold_ratio": round((dask["seconds"] + dask["ready"]) / sequential, 3),
        "worker_peak_rss_mib": rss,
        "flow_process_peak_rss_mib": round(_peak_rss_mib(), 1),
        "max_abs_coef_diff_vs_sequential": float(
            np.max(np.abs(np.subtract(result.coef, raw.coef)))
        ),
        "target_ratio_met": ratio <= TARGET_RATIO,
        "target_rss_met": max(dask["rss"].values()) <= TARGET_RSS_MIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--features", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=65_536)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args()
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
