"""A new user's ``fedtune run`` on the seed, timestamped, against a bare Prefect flow; prints JSON.

    python benchmarks/bench_timeline.py [--repeat N] [--prefect-home DIR] [--lines]

Each run is a fresh process in a fresh temporary directory, with the environment less every
``PREFECT_*`` and ``MLFLOW_*`` variable, so that it starts Prefect's temporary local server and
creates ``mlflow.db`` itself, as a new user's first run does. Each gets a new, empty
``PREFECT_HOME`` (its server migrates a new database, about 20 s here) unless ``--prefect-home``
names one to share: give it an existing directory to time the runs after a user's first.

- ``fedtune``: ``fedtune run`` (configs/seed.toml's example: 10 clients x 100 rows, 20 rounds).
- ``bare``: a Prefect flow of 10 no-op tasks (no caching, no result persistence, as fedtune's
  tasks) in a process that imports nothing but Prefect, with the settings ``fedtune run`` gives
  a temporary server. Its exit is the floor under any Prefect flow on a temporary server.

Every stdout and stderr line is timestamped as it arrives, in seconds since the process was
started; the events are read off these lines (``EVENTS``), except ``prefect_api_ready``: once
the temporary server's address is printed (by Prefect for the bare flow; by ``fedtune run``,
which starts the same server itself on its first line), the benchmark asks the server's health
endpoint every 50 ms, and the first answer is that event. What some lines mark:

- ``prepared``: ``waiting for Prefect's temporary server…``: fedtune has checked the
  configuration, imported the flow and created the MLflow store, and the server is not up yet
  (absent when the server was up first).
- ``round_1`` and ``last_round``: the round lines, which the flow prints once the round's model
  has been scored, i.e. during the next round's exchange (the last one: in the final report).

Lines that only bound an event from above:

- ``mlflow_store_ready``: ``reading N clients' feature statistics…``, the flow's first line
  after its ``start-mlflow-run`` task (run created) returned.
- ``final_model_logged``: Prefect's ``Finished in state Completed()``, after the final model,
  the run's artifacts, ``end-mlflow-run`` and the Prefect artifacts.

``own_cost`` is fedtune's exit minus the bare flow's, per repeat (their order alternates across
repeats, against drift in the machine's load); it is negative when the work fedtune does while
its server starts saves more than the rest of its run costs. ``own_cost_after_api_ready`` is the
same difference counted from each one's server answering, i.e. without that saving. With
``--repeat`` above 1 the JSON adds the medians of every event and difference. ``--lines`` adds
every timestamped line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

# The settings `fedtune run` gives a temporary server (flows/cli.py, _quiet_temporary_server):
# the bare flow gets them too, so that the difference is fedtune's own.
SERVER_SETTINGS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_LOGGING_LEVEL": "CRITICAL",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}

BARE_FLOW = """
import time
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

print("bare: prefect imported", flush=True)


@task(cache_policy=NO_CACHE, persist_result=False)
def noop(i: int) -> int:
    return i


@flow(persist_result=False)
def bare() -> list[int]:
    return noop.map(list(range(10))).result()


bare()
print("bare: flow returned", flush=True)
"""

# Prefect's own line, and fedtune's (it starts the same server itself, on its first line).
SERVER_LINE = re.compile(
    r"(?:Starting temporary server on|temporary local server at) (http://[^\s;)]+)"
)

# (event, pattern of the first line that marks it); `None` as the pattern: not on every run.
EVENTS = {
    "fedtune": [
        ("prefect_server_starting", SERVER_LINE.pattern),
        ("prepared", r"fedtune: waiting for Prefect's temporary server"),
        ("flow_run_begins", r"Beginning flow run"),
        ("mlflow_store_creating", r"Creating initial MLflow database tables"),
        ("mlflow_store_ready", r"reading \d+ clients' feature statistics"),
        ("round_1", r"round 1/\d+ "),
        ("last_round", r"round (\d+)/\1 "),
        ("final_model_logged", r"Finished in state Completed"),
        ("summary_printed", r"^final model: "),
    ],
    "bare": [
        ("prefect_imported", r"^bare: prefect imported"),
        ("prefect_server_starting", SERVER_LINE.pattern),
        ("flow_run_begins", r"Beginning flow run"),
        ("flow_done", r"^bare: flow returned"),
    ],
}

ROUND_LINE = re.compile(r"round (\d+)/(\d+) ")


def _environment(home: Path) -> dict[str, str]:
    """A new user's environment: none of our PREFECT_/MLFLOW_ settings, a given PREFECT_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["PREFECT_HOME"] = str(home)
    return env


def _fedtune_command() -> list[str]:
    script = Path(sys.executable).with_name("fedtune")
    if script.exists():
        return [str(script), "run"]
    found = shutil.which("fedtune")
    return [found, "run"] if found else [sys.executable, "-m", "fedtune.flows.cli", "run"]


class _Timeline:
    """The lines of one process, each with its arrival time, and the server's first answer."""

    def __init__(self, start: float):
        self.start = start
        self.lines: list[tuple[float, str, str]] = []
        self.api_ready: float | None = None
        self.lock = threading.Lock()

    def now(self) -> float:
        return time.perf_counter() - self.start

    def read(self, stream, name: str) -> None:
        for raw in stream:
            t = self.now()
            line = raw.rstrip("\n")
            with self.lock:
                self.lines.append((t, name, line))
            match = SERVER_LINE.search(line)
            if match and self.api_ready is None:
                url = match[1].rstrip("/") + "/api/health"
                threading.Thread(target=self._poll, args=(url,), daemon=True).start()

    def _poll(self, url: str, limit: float = 300.0) -> None:
        deadline = time.perf_counter() + limit
        while time.perf_counter() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=1.0) as response:
                    if response.status == 200:
                        self.api_ready = self.now()
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)


def run_timed(kind: str, command: list[str], cwd: Path, env: dict[str, str]) -> dict:
    """Run ``command``; its events (seconds since start), exit code, and timestamped lines."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    timeline = _Timeline(start)
    readers = [
        threading.Thread(target=timeline.read, args=(proc.stdout, "out")),
        threading.Thread(target=timeline.read, args=(proc.stderr, "err")),
    ]
    for reader in readers:
        reader.start()
    code = proc.wait()
    exit_s = timeline.now()
    for reader in readers:
        reader.join()
    lines = sorted(timeline.lines)
    events = {}
    for event, pattern in EVENTS[kind]:
        regex = re.compile(pattern)
        events[event] = next((t for t, _, line in lines if regex.search(line)), None)
        if event == "prefect_server_starting":
            events["prefect_api_ready"] = timeline.api_ready
    events["exit"] = exit_s
    result = {
        "exit_code": code,
        "events": {k: None if v is None else round(v, 3) for k, v in events.items()},
        "lines": [f"{t:8.3f} {stream} {line}" for t, stream, line in lines],
    }
    if kind == "fedtune":
        result["round_gap_s"] = _round_gaps(lines)
    return result


def _round_gaps(lines: list[tuple[float, str, str]]) -> dict | None:
    """Median and largest seconds between consecutive round lines."""
    times = [t for t, _, line in lines if ROUND_LINE.search(line)]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    if not gaps:
        return None
    return {"median": round(statistics.median(gaps), 3), "max": round(max(gaps), 3)}


def _intervals(events: dict[str, float | None], pairs: list[tuple[str, str, str]]) -> dict:
    out = {}
    for name, a, b in pairs:
        if events.get(a) is not None and events.get(b) is not None:
            out[name] = round(events[b] - events[a], 3)
    return out


FEDTUNE_INTERVALS = [
    ("process_start_to_server_start", "process_start", "prefect_server_starting"),
    ("server_start_to_api_ready", "prefect_server_starting", "prefect_api_ready"),
    ("api_ready_to_flow_run", "prefect_api_ready", "flow_run_begins"),
    ("flow_run_to_mlflow_store_ready", "flow_run_begins", "mlflow_store_ready"),
    ("mlflow_store_ready_to_round_1", "mlflow_store_ready", "round_1"),
    ("round_1_to_last_round", "round_1", "last_round"),
    ("last_round_to_final_model_logged", "last_round", "final_model_logged"),
    ("final_model_logged_to_exit", "final_model_logged", "exit"),
]
BARE_INTERVALS = [
    ("prefect_import", "process_start", "prefect_imported"),
    ("prefect_import_to_server_start", "prefect_imported", "prefect_server_starting"),
    ("server_start_to_api_ready", "prefect_server_starting", "prefect_api_ready"),
    ("api_ready_to_flow_run", "prefect_api_ready", "flow_run_begins"),
    ("flow_run_to_flow_done", "flow_run_begins", "flow_done"),
    ("flow_done_to_exit", "flow_done", "exit"),
]


def one_repeat(index: int, prefect_home: Path | None, keep_lines: bool) -> dict:
    """Both runs once, each in its own temporary directory; the order alternates by ``index``."""
    runs = {}
    order = ["fedtune", "bare"] if index % 2 == 0 else ["bare", "fedtune"]
    for kind in order:
        with tempfile.TemporaryDirectory(prefix=f"bench-timeline-{kind}-") as tmp:
            cwd = Path(tmp)
            env = _environment(prefect_home or cwd / "prefect-home")
            if kind == "fedtune":
                command = _fedtune_command()
            else:
                env.update(SERVER_SETTINGS)
                command = [sys.executable, "-c", BARE_FLOW]
            runs[kind] = run_timed(kind, command, cwd, env)
        events = {"process_start": 0.0, **runs[kind]["events"]}
        pairs = FEDTUNE_INTERVALS if kind == "fedtune" else BARE_INTERVALS
        runs[kind]["intervals"] = _intervals(events, pairs)
        if runs[kind]["exit_code"] != 0 and not keep_lines:
            print("\n".join(runs[kind]["lines"][-30:]), file=sys.stderr)
        if not keep_lines:
            del runs[kind]["lines"]
    fed, bare = runs["fedtune"]["events"], runs["bare"]["events"]
    runs["order"] = order
    runs["own_cost_s"] = round(fed["exit"] - bare["exit"], 3)
    if fed["prefect_api_ready"] is not None and bare["prefect_api_ready"] is not None:
        runs["api_ready_difference_s"] = round(
            fed["prefect_api_ready"] - bare["prefect_api_ready"], 3
        )
        after_fed = fed["exit"] - fed["prefect_api_ready"]
        after_bare = bare["exit"] - bare["prefect_api_ready"]
        runs["own_cost_after_api_ready_s"] = round(after_fed - after_bare, 3)
    return runs


def _median_of(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def medians(repeats: list[dict]) -> dict:
    """The median over repeats of every event, interval and difference."""
    out: dict = {}
    for kind in ("fedtune", "bare"):
        out[kind] = {}
        for part in ("events", "intervals"):
            keys = dict.fromkeys(k for r in repeats for k in r[kind][part])
            out[kind][part] = {k: _median_of([r[kind][part].get(k) for r in repeats]) for k in keys}
    for key in ("own_cost_s", "api_ready_difference_s", "own_cost_after_api_ready_s"):
        out[key] = _median_of([r.get(key) for r in repeats])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; medians if > 1")
    parser.add_argument(
        "--prefect-home",
        type=Path,
        help="one PREFECT_HOME for every run (default: a new one per run, as a new user)",
    )
    parser.add_argument("--lines", action="store_true", help="include every timestamped line")
    args = parser.parse_args()
    home = None if args.prefect_home is None else args.prefect_home.resolve()
    repeats = []
    for i in range(args.repeat):
        repeats.append(one_repeat(i, home, args.lines))
        print(f"repeat {i + 1}: own cost {repeats[-1]['own_cost_s']} s", file=sys.stderr)
    report = {
        "command": " ".join(
            Path(c).name if i == 0 else c for i, c in enumerate(_fedtune_command())
        ),
        "prefect_home": "shared" if home else "new per run",
        "cpus": os.cpu_count(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "repeats": repeats,
    }
    if args.repeat > 1:
        report["median"] = medians(repeats)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
