"""What one Prefect task costs before it does any work; prints one JSON line per variant.

    python benchmarks/bench_prefect_floor.py

An empty task (returns its argument), run 1000 times inside a flow against Prefect's temporary
local server, the way the training flow runs client tasks (no caching, no result persistence,
per-task log lines silenced): mapped through the thread-pool task runner with 1 and 4 threads,
and called directly. The per-task milliseconds are the floor under fedtune's per-client-update
cost, which adds the client's own work (about 1-2 ms for the many-small benchmark).
"""

from __future__ import annotations

import json
import logging
import os
import time

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")

N = 1000


def main() -> None:
    from fedtune.tasks import TASK_OPTIONS
    from prefect import flow, task
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect.testing.utilities import prefect_test_harness

    logging.getLogger("prefect.task_runs").setLevel(logging.WARNING)
    logging.getLogger("prefect.flow_runs").setLevel(logging.WARNING)

    @task(task_run_name="empty-{i}", **TASK_OPTIONS)
    def empty(i: int) -> int:
        return i

    def timed(how: str, workers: int) -> float:
        @flow(persist_result=False, task_runner=ThreadPoolTaskRunner(max_workers=workers))
        def run() -> float:
            start = time.perf_counter()
            if how == "direct":
                [empty(i) for i in range(N)]
            else:
                empty.map(list(range(N))).result()
            return time.perf_counter() - start

        run()  # warm-up: imports, first connections
        return run()

    with prefect_test_harness(server_startup_timeout=60):
        for how, workers in [("map", 1), ("map", 4), ("direct", 1)]:
            seconds = timed(how, workers)
            print(
                json.dumps(
                    {
                        "variant": f"{how}, {workers} thread(s)",
                        "tasks": N,
                        "ms_per_task": round(1000 * seconds / N, 3),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
