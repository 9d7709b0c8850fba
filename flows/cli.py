"""The ``fedtune`` command line."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import re
import sys
import tomllib
import traceback
from pathlib import Path


def say(message: str) -> None:
    """A progress line of ``fedtune run``. Everything fedtune itself says goes to stdout
    (errors alone to stderr), flushed so that it shows before the slow step it announces."""
    print(f"fedtune: {message}", flush=True)


def _prefect_api_url() -> str | None:
    """``PREFECT_API_URL`` from the environment, else from the active Prefect profile (what
    ``prefect config set`` writes), read without importing Prefect."""
    if "PREFECT_API_URL" in os.environ:
        return os.environ["PREFECT_API_URL"] or None
    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml")).expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    return profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL") or None


def _quiet_temporary_server() -> None:
    """Without ``PREFECT_API_URL``, Prefect starts a temporary local server for the run. Its
    telemetry (no network here) and the services it cancels at shutdown log errors that say
    nothing about the run; keep them out of the user's terminal."""
    if not _prefect_api_url():
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
        # The first start in a new PREFECT_HOME migrates its database; on a busy two-core
        # machine that can outlast Prefect's default 20 s wait.
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune",
        description="Federated fine-tuning of scikit-learn models with Prefect and MLflow.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run federated training (defaults: the seed example)")
    run.add_argument("--config", "-c", metavar="FILE.toml", help="configuration file")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config key (repeatable); VALUE is read as TOML, else as a string",
    )
    run.add_argument("--output", "-o", metavar="FILE.json", help="write the run summary as JSON")
    run.add_argument(
        "--resume",
        metavar="RUN_ID",
        help="continue this MLflow run from its last completed round, with its own configuration",
    )
    run.add_argument(
        "--verbose", "-v", action="store_true", help="also show Prefect's per-task log lines"
    )
    audit = sub.add_parser(
        "audit", help="membership-inference audit of a finished run (simulated sources)"
    )
    audit.add_argument("--run", required=True, metavar="RUN_ID", help="the MLflow run id")
    audit.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    audit.add_argument(
        "--epsilon",
        type=float,
        metavar="EPS",
        help="test this claimed epsilon instead of the run's own (a run without DP has none)",
    )
    audit.add_argument(
        "--delta",
        type=float,
        metavar="DELTA",
        help="with --epsilon: the claimed delta (default: the run's, else 0)",
    )
    audit.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="seed of the random split of clients into selection and scoring halves (default 0)",
    )
    show = sub.add_parser("config", help="print the effective configuration as JSON and exit")
    show.add_argument("--config", "-c", metavar="FILE.toml")
    show.add_argument("--set", dest="overrides", action="append", default=[])
    sub.add_parser(
        "serve",
        add_help=False,  # main() hands `fedtune serve ...` to deployments.serve, help included
        help="serve the Prefect deployments of deployments/prefect.yaml from this process",
    )
    return parser


def _fail(kind: str, message: str, code: int) -> int:
    print(f"fedtune: {kind}: {message}", file=sys.stderr)
    return code


AUDIT_FAILED = 3
"""Exit status of an audit whose attack beats the (epsilon, delta) bound."""


def _audit(args: argparse.Namespace, uri: str) -> int:
    from fedtune.fl.audit import client_losses, membership_audit, split_clients
    from fedtune.tasks.tracking import load_released_models, load_run, log_audit

    run_id = args.run
    claim = _claim_problem(args)
    if claim:
        return _fail("config error", claim, 2)
    try:
        config, summary = load_run(uri, run_id)
        released = load_released_models(uri, run_id)
        if not released:
            raise ValueError("it logged no model to attack")
        names, models = zip(*released, strict=True)
        members, others = client_losses(config, models)
        split = split_clients(len(members), len(others), seed=args.seed)
    except Exception as exc:  # noqa: BLE001 -- any failure to load is reported in one line
        return _fail("audit failed", f"run {run_id}: {_first_line(exc)}", 1)
    epsilon, delta = summary.get("dp_epsilon"), summary.get("dp_delta")
    if args.epsilon is not None:
        epsilon, delta = args.epsilon, args.delta if args.delta is not None else delta
    result = membership_audit(names, members, others, split, epsilon, delta)
    log_audit(uri, run_id, result.to_dict())
    for line in _audit_lines(run_id, result, claimed=args.epsilon is not None):
        print(line)
    if not result.passed:
        return _fail(
            "audit",
            f"run {run_id} leaks more than (ε, δ) = ({epsilon:.4g}, {delta or 0:g}) allows: "
            f"the attack's advantage is at least {result.ci_low:.4f} (95% lower bound), above "
            f"the bound {result.bound:.4f}",
            AUDIT_FAILED,
        )
    return 0


def _claim_problem(args: argparse.Namespace) -> str | None:
    if args.epsilon is None:
        return "--delta: needs --epsilon" if args.delta is not None else None
    if not args.epsilon >= 0:
        return f"--epsilon: must be >= 0 (got {args.epsilon})"
    if args.delta is not None and not 0 <= args.delta < 1:
        return f"--delta: must be in [0, 1) (got {args.delta})"
    return None


def _audit_lines(run_id: str, result, claimed: bool) -> list[str]:
    """The report: one line per released model, then the chosen attack and the verdict."""
    lines = [
        f"membership audit of run {run_id}: {len(result.models)} released model(s), "
        f"{result.members} members and {result.non_members} held-out clients; thresholds and "
        f"the model chosen on a selection half, scored on the other ({result.scored_members} "
        f"+ {result.scored_non_members})",
        f"  {'model':<12}{'threshold':>12}{'selection':>11}{'advantage':>11}"
        f"{'95% CI':>18}{'AUC':>8}",
    ]
    lines += [
        f"  {a.model:<12}{a.threshold:>12.4g}{a.selection_advantage:>11.4f}"
        f"{a.advantage:>11.4f}{f'{a.ci_low:.3f} to {a.ci_high:.3f}':>18}{a.auc:>8.4f}"
        for a in result.models
    ]
    lines.append(
        f"chosen on the selection half: {result.model} (loss < {result.threshold:.4g}); "
        f"advantage {result.advantage:.4f} (95% CI {result.ci_low:.4f} to "
        f"{result.ci_high:.4f}), AUC {result.auc:.4f}"
    )
    if result.bound is None:
        lines.append(
            "the run was not differentially private: no bound applies (exit 0); "
            "--epsilon tests a claimed epsilon"
        )
        return lines
    whose = "the claimed" if claimed else "the run's"
    lines.append(
        f"{whose} (ε, δ) = ({result.dp_epsilon:.4g}, {result.dp_delta or 0:g}) bounds any "
        f"attack's advantage by {result.dp_advantage_bound:.4f} between neighbouring "
        f"populations, and this member-vs-held-out game's by {result.bound:.4f}"
    )
    if result.passed:
        lines.append(f"pass: the lower bound {result.ci_low:.4f} is within {result.bound:.4f}")
    return lines


def _audit_command(args: argparse.Namespace) -> int:
    from fedtune.tasks.tracking import DEFAULT_TRACKING_URI

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    return _audit(args, uri)


def _resumed_config(args: argparse.Namespace):
    from fedtune.fl.config import ConfigError
    from fedtune.tasks.tracking import DEFAULT_TRACKING_URI, load_run_config

    if args.config or args.overrides:
        raise ConfigError("--resume: the run keeps its own configuration; drop --config/--set")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    try:
        return load_run_config(uri, args.resume)
    except Exception as exc:  # noqa: BLE001 -- one line naming the run
        raise ConfigError(f"--resume {args.resume}: {exc}") from None


def _checked_config(args: argparse.Namespace, announce=None):
    """The effective configuration, checked against its data source; ``None`` once a config
    error has been reported. ``announce`` is told about a slow step (noise calibration)."""
    from fedtune.fl.config import ConfigError, load_config
    from fedtune.fl.data import ClientDataError

    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        if getattr(args, "resume", None):
            config = _resumed_config(args)
        else:
            config = load_config(args.config, args.overrides)
        _check_against_data(config, announce)
    except (ConfigError, ClientDataError, ValueError) as exc:
        _fail("config error", str(exc), 2)
        return None
    finally:
        # absl's first warning (the RDP accountant's, calibrating) installs a root handler
        # before Prefect configures logging, which would then print Prefect's lines unformatted.
        # Only absl's: importing Prefect (a resumed run's check does) configures handlers of
        # its own, which must stay.
        for handler in [h for h in root.handlers if h not in handlers]:
            if type(handler).__module__.startswith("absl"):
                root.removeHandler(handler)
    return config


def _check_against_data(config, announce) -> None:
    from fedtune.fl.data import registry
    from fedtune.fl.privacy.plan import plan_privacy
    from fedtune.fl.rounds import clients_per_round
    from fedtune.fl.strategies import make_strategy

    num_clients = len(registry(config.data, config.experiment.seed))
    clients_per_round(config.rounds, num_clients)
    p = config.privacy
    if announce is not None and p.target_epsilon is not None and p.noise_multiplier is None:
        announce(
            f"calibrating the noise for ε ≤ {p.target_epsilon:g} at δ = {p.delta:g} over "
            f"{config.rounds.num_rounds} rounds…"
        )
    make_strategy(config, plan_privacy(config, num_clients))


def _config_command(args: argparse.Namespace) -> int:
    config = _checked_config(args)
    if config is None:
        return 2
    print(config.model_dump_json(indent=2))
    return 0


def _quiet_task_logs(verbose: bool) -> None:
    """Prefect's per-task lines only with ``--verbose``. A client's expected failure (bad data,
    an injected crash) is one WARNING line of the flow's; Prefect's ERROR lines about it are
    dropped, or with ``--verbose`` kept without their empty traceback. A bug's are kept."""
    from fedtune.tasks.client import ExpectedFailureLog

    task_runs = logging.getLogger("prefect.task_runs")
    if not verbose:
        task_runs.setLevel(logging.WARNING)
    for old in [f for f in task_runs.filters if isinstance(f, ExpectedFailureLog)]:
        task_runs.removeFilter(old)  # main() may run more than once in a process
    task_runs.addFilter(ExpectedFailureLog(show=verbose))


def format_model(names: list[str], coef: list[float], intercept: float) -> str:
    """``y = 1.58·x0 − 0.854·x1 + 0.920``: three significant digits, true minus signs."""
    terms = [(c, f"·{n}") for c, n in zip(coef, names, strict=True)] + [(intercept, "")]
    text = ""
    for value, name in terms:
        number = f"{abs(value):#.3g}".rstrip(".") + name  # 1.30, not 1.3; 100, not 100.
        if not text:
            text = f"−{number}" if value < 0 else number
        else:
            text += f" − {number}" if value < 0 else f" + {number}"
    return f"y = {text}"


MAX_LEFT_OUT = 5
"""Excluded clients the final block names one by one; more are counted."""


def left_out_lines(excluded: dict[str, str], history: list[dict]) -> list[str]:
    """The final block's lines about clients left out of the run (each with its reason, the
    client's file already named in the warning above) or of single rounds."""
    lines = []
    if len(excluded) > MAX_LEFT_OUT:
        lines.append(
            f"{len(excluded)} clients left out of the run; see excluded_clients in the MLflow "
            "run's summary.json"
        )
    else:
        lines += [f"left out: {cid} ({_reason(cid, why)})" for cid, why in excluded.items()]
    failed = sum(h.get("clients_failed", 0) for h in history)
    if failed:
        lines.append(
            f"left out of single rounds: {failed} client update(s); see failed_clients in the "
            "MLflow run's rounds.csv"
        )
    return lines


def _reason(client_id: str, why: str) -> str:
    """``why`` without its ``client 'ID' (FILE): `` prefix."""
    prefix = f"client {client_id!r} ("
    if why.startswith(prefix) and "): " in why:
        return why.split("): ", 1)[1]
    return why


def _rounds_line(config, summary: dict) -> str:
    done, planned = summary["rounds_completed"], config.rounds.num_rounds
    line = f"rounds: {done}" if done >= planned else f"rounds: {done} of {planned}"
    if summary["stopped_early"]:
        line += " (early stop)"
    elif done < planned and config.privacy.target_epsilon is not None:
        line += " (privacy budget spent)"
    if not summary["history"]:
        return line
    last = summary["history"][-1]
    line += f"  fed_mse: {last.get('fed_mse', float('nan')):.6g}"
    if "central_mse" in last:
        line += f"  central_mse: {last['central_mse']:.6g}"
    if summary["baseline_mse"] is not None:
        line += f"  pooled-OLS baseline_mse: {summary['baseline_mse']:.6g}"
    return line


def _privacy_line(summary: dict) -> str | None:
    secure = summary.get("secure_aggregation")
    if summary.get("dp_epsilon") is None:
        if secure:
            return "privacy: secure aggregation on (the server saw only sums); no DP guarantee"
        return None
    return (
        f"privacy: (ε, δ) = ({summary['dp_epsilon']:.3g}, {summary['dp_delta']:g}) spent over "
        f"{summary['rounds_completed']} rounds (z={summary['dp_noise_multiplier']:.3g}, "
        f"q={summary['dp_sampling_rate']:.3g})" + ("; secure aggregation on" if secure else "")
    )


def _registered_line(config, summary: dict) -> str:
    line = f"registered: {config.experiment.register_as} v{summary['registered_version']}"
    p = summary.get("promotion")
    if not p:
        return line
    decision = "promoted to champion" if summary["promoted"] else "the champion stays"
    challenger, champion = p["fedtune.challenger_mse"], p["fedtune.champion_mse"]
    metric = "central_mse" if p.get("fedtune.promotion.scored_on") == "central" else "fed_mse"
    scores = f"{metric} {float(challenger):.3g}"
    if champion:
        scores += f" vs the champion's {float(champion):.3g}"
    return f"{line}, {decision} ({p['fedtune.promotion.reason']}; {scores})"


def _print_summary(args: argparse.Namespace, config, result) -> None:
    """The final block, from the same fields ``--output`` writes."""
    summary = result.model_dump(mode="json")
    model = format_model(summary["feature_names"], summary["coef"], summary["intercept"])
    print(f"final model: {model}")
    print(_rounds_line(config, summary))
    left_out = left_out_lines(summary.get("excluded_clients", {}), summary["history"])
    for line in [_privacy_line(summary), *left_out]:
        if line:
            print(line)
    print(f"MLflow run: {summary['run_id']}  (experiment {config.experiment.name!r})")
    print(f"model: {summary['model_uri']}")
    if summary["registered_version"]:
        print(_registered_line(config, summary))
    if args.output:
        Path(args.output).write_text(result.model_dump_json(indent=2))
        print(f"summary: {args.output}")
    from fedtune.tasks.tracking import run_url

    uri = _tracking_uri(config)
    if not uri.startswith(("http://", "https://")):
        print(f"view: mlflow ui --backend-store-uri {uri}")
    if url := run_url(uri, summary["run_id"]):
        print(f"open: {url}")


# -- before the run: what it is, and whether its services answer --------------------------------


def _tracking_uri(config) -> str:
    """``tasks.tracking.tracking_uri`` without importing MLflow and Prefect."""
    return (
        config.experiment.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or "sqlite:///mlflow.db"
    )


def _checking_line(args: argparse.Namespace) -> str:
    if args.resume:
        return f"reading the configuration of run {args.resume}…"
    source = args.config or "the default configuration (the seed example)"
    sets = f" with {len(args.overrides)} --set" if args.overrides else ""
    return f"checking {source}{sets} against its data…"


def _unreachable(url: str, timeout: float = 5.0) -> str | None:
    """Why nothing answers at ``url``, or None if something does (any HTTP status)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(url, timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return str(getattr(reason, "strerror", None) or reason).lower()
    return None


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def _mlflow_problem(uri: str) -> tuple[str, str, int] | None:
    """An MLflow store that cannot work, as ``(kind, message, exit code)``; says when it is new
    (its tables take seconds to create)."""
    if uri.startswith(("http://", "https://")):
        why = _unreachable(f"{uri.rstrip('/')}/health")
        return None if why is None else ("MLflow", f"{uri} is unreachable ({why})", 1)
    path = _sqlite_path(uri)
    if path is None:
        return None
    if not path.parent.is_dir():
        return ("MLflow store", f"{uri}: directory {path.parent} does not exist", 2)
    if not path.exists():
        say(f"creating the MLflow store {uri} (setting up its tables takes a few seconds)…")
        return None
    import sqlite3

    try:
        connection = sqlite3.connect(path, timeout=2.0)
        try:
            connection.execute("BEGIN IMMEDIATE")  # what a write needs; released at once
            connection.rollback()
        finally:
            connection.close()
    except sqlite3.Error as exc:
        return _sqlite_failure(uri, exc)
    return None


def _sqlite_failure(uri: str, exc: BaseException) -> tuple[str, str, int]:
    if "locked" in str(exc):
        return ("MLflow store", f"{uri} is locked by another process; retry when it is done", 1)
    return ("MLflow store", f"{uri}: {_first_line(exc)}", 1)


def _prefect_problem(api: str | None) -> tuple[str, str, int] | None:
    if api is None:
        return None
    why = _unreachable(f"{api.rstrip('/')}/health")
    if why is None:
        return None
    return (
        "Prefect API",
        f"{api} is unreachable ({why}); start that server, or unset PREFECT_API_URL "
        "(environment or Prefect profile) for a temporary local one",
        1,
    )


def _first_start() -> bool:
    """Whether a temporary server would set up a new database (its first start in this
    ``PREFECT_HOME``); asked before the server starts, which creates the database."""
    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    return (
        not (home / "prefect.db").exists()
        and not os.environ.get("PREFECT_SERVER_DATABASE_CONNECTION_URL")
        and not os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL")
    )


def _announce_server(server, first: bool) -> None:
    first_note = "; its first start in a new PREFECT_HOME sets up a database, about 20 s"
    where = server.api_url.removesuffix("/api")
    say(f"starting Prefect (a temporary local server at {where}{first_note if first else ''})…")


# -- during the run: expected failures are one line --------------------------------------------

_EXPECTED_NAMES = {
    "RoundFailed",
    "ClientDataError",
    "OperationalError",
    "MlflowException",
    "RestException",
    "ConnectError",
    "ConnectTimeout",
}
_NAMED_KEY = re.compile(r"^[a-z_]+\.[a-z_]+: ")
_FAILED_STATE = re.compile(r"encountered an exception:? (\w+): (.*)", re.DOTALL)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _expected(name: str, text: str) -> bool:
    """Whether an exception (by class name and message) is one the CLI reports in one line."""
    return (
        name in _EXPECTED_NAMES
        or text.startswith("Failed to reach API")
        or (name == "ValueError" and _NAMED_KEY.match(text) is not None)
    )


def _failure(exc: BaseException, config, api: str | None) -> tuple[str, str, int] | None:
    """An expected failure of the run as ``(kind, message, exit code)``, None for a bug."""
    name, module, text = type(exc).__name__, type(exc).__module__, str(exc)
    if not _expected(name, text):
        return None
    if name in ("RoundFailed", "ClientDataError"):
        return ("training failed", text, 1)
    if name == "ValueError":
        return ("config error", _first_line(exc), 2)
    if name == "OperationalError":
        return _sqlite_failure(_tracking_uri(config), exc)
    if module.startswith("mlflow"):
        return ("MLflow", _first_line(exc), 1)
    where = api or "the temporary Prefect server"
    return ("Prefect API", f"lost {where}: {_first_line(exc)}", 1)


class _ExpectedFailureLines(logging.Filter):
    """For Prefect's run loggers: without ``--verbose``, drop the lines (and tracebacks) about a
    failure that the CLI reports in one line; a bug's are kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            return not _expected(type(exc).__name__, str(exc))
        match = _FAILED_STATE.search(record.getMessage())
        return match is None or not _expected(match[1], match[2])


def _quiet_expected_failures(verbose: bool) -> None:
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _ExpectedFailureLines)]:
            logger.removeFilter(old)  # main() may run more than once in a process
        if not verbose:
            logger.addFilter(_ExpectedFailureLines())


def _run_command(args: argparse.Namespace) -> int:
    say(_checking_line(args))  # before anything slow: the first line comes at once
    api = _prefect_api_url()
    server, first = None, _first_start()
    if api is None:
        # Started before anything slow, so that it starts while the configuration is checked,
        # the flow imported and the MLflow store created (flows/prefect_server.py). It stops
        # at exit, after Prefect has sent its last logs and events.
        _quiet_temporary_server()
        server = _start_server()
        _announce_server(server, first)
    try:
        return _checked_run(args, api, server)
    finally:
        if server is not None and not server.used:
            # Nothing ran on it: stop it now, and leave the environment as it was (this
            # process may call main() again).
            server.stop()
            os.environ.pop("PREFECT_API_URL", None)


def _start_server():
    from fedtune.flows.prefect_server import TemporaryServer

    server = TemporaryServer().start()
    # Before Prefect is imported: its settings are read once, at import.
    os.environ["PREFECT_API_URL"] = server.api_url
    return server


def _checked_run(args: argparse.Namespace, api: str | None, server) -> int:
    config = _checked_config(args, announce=say)
    if config is None:
        return 2
    # Prefect first: the MLflow check announces a store it is about to create.
    problem = _prefect_problem(api) or _mlflow_problem(_tracking_uri(config))
    if problem is not None:
        return _fail(*problem)
    if api is not None:
        say(f"using the Prefect API at {api}…")
    from fedtune.flows.training import federated_training
    from fedtune.tasks.tracking import prepare_logging

    prepare_logging(_tracking_uri(config))
    if server is not None and (problem := _server_problem(server)) is not None:
        return _fail(*problem)
    _quiet_task_logs(args.verbose)
    _quiet_expected_failures(args.verbose)
    if server is not None:
        server.used = True  # stopped at exit, after Prefect's last logs and events
    try:
        result = federated_training(config, resume_run_id=args.resume)
    except Exception as exc:
        failure = _failure(exc, config, api)
        if failure is None:
            raise
        if args.verbose:
            traceback.print_exc()
        return _fail(*failure)
    _print_summary(args, config, result)
    return 0


def _server_problem(server) -> tuple[str, str, int] | None:
    from fedtune.flows.prefect_server import ServerFailed

    timeout = float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
    if not server.ready():
        say("waiting for Prefect's temporary server…")
    try:
        server.wait(timeout)
    except ServerFailed as exc:
        return ("Prefect API", str(exc), 1)
    return None


_COMMANDS = {"audit": _audit_command, "config": _config_command, "run": _run_command}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        # The command line is the entry point of every layer; only `serve` reaches the
        # deployments layer, and only when asked for.
        from fedtune.deployments.serve import main as serve

        return serve(argv[1:], prog="fedtune serve")
    args = _parser().parse_args(argv)
    return _COMMANDS[args.command](args)


_exit_code = 1
"""What :func:`entry` exits with: ``main``'s return, else 1 (an uncaught exception)."""


def _exit_now() -> None:
    """The last exit handler of the ``fedtune`` process: the others (Prefect sending its last
    logs and events, then the temporary server stopping) have run; end the process here,
    without tearing down the interpreter, which takes seconds after a run has loaded Prefect,
    MLflow and scikit-learn and releases nothing the operating system does not."""
    logging.shutdown()  # registered before this handler, so it would run after it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_code)


def entry() -> None:
    """The ``fedtune`` command (``main`` is for callers in-process)."""
    global _exit_code
    atexit.register(_exit_now)  # first registered, last run
    try:
        _exit_code = main()
    except SystemExit as exc:  # argparse's errors and --help
        _exit_code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        raise
    except KeyboardInterrupt:
        _exit_code = 130  # what a shell reports for Ctrl-C
        raise
    sys.exit(_exit_code)


if __name__ == "__main__":
    entry()
