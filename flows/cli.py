"""The ``fedtune`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def _quiet_temporary_server() -> None:
    """Without ``PREFECT_API_URL``, Prefect starts a temporary local server for the run. Its
    telemetry (no network here) and the services it cancels at shutdown log errors that say
    nothing about the run; keep them out of the user's terminal."""
    if not os.environ.get("PREFECT_API_URL"):
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


def _audit(run_id: str, uri: str) -> int:
    import numpy as np

    from fl.audit import client_losses, membership_audit
    from fl.params import ModelParams
    from tasks.tracking import load_run, log_audit

    try:
        config, summary = load_run(uri, run_id)
        raw = ModelParams(np.asarray(summary["coef"], dtype=np.float64), summary["intercept"])
        members, others = client_losses(config, raw, summary["rounds_completed"])
    except Exception as exc:  # noqa: BLE001 -- any failure to load is reported in one line
        return _fail("audit failed", f"run {run_id}: {exc}", 1)
    result = membership_audit(
        members, others, summary.get("dp_epsilon"), summary.get("dp_delta"), seed=0
    ).to_dict()
    log_audit(uri, run_id, result)
    print(
        f"membership audit of run {run_id}: advantage {result['advantage']:.4f}  "
        f"AUC {result['auc']:.4f} (95% CI {result['auc_ci_low']:.4f}-{result['auc_ci_high']:.4f})"
        f"  members {result['members']}  held-out {result['non_members']}"
    )
    if result["dp_advantage_bound"] is not None:
        print(
            f"(epsilon, delta) = ({result['dp_epsilon']:.4g}, {summary.get('dp_delta')}) "
            f"bounds any attack's advantage by {result['dp_advantage_bound']:.4f}"
        )
    else:
        print("the run was not differentially private: no bound applies")
    return 0


def _audit_command(args: argparse.Namespace) -> int:
    from tasks.tracking import DEFAULT_TRACKING_URI

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    return _audit(args.run, uri)


def _resumed_config(args: argparse.Namespace):
    from fl.config import ConfigError
    from tasks.tracking import DEFAULT_TRACKING_URI, load_run_config

    if args.config or args.overrides:
        raise ConfigError("--resume: the run keeps its own configuration; drop --config/--set")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    try:
        return load_run_config(uri, args.resume)
    except Exception as exc:  # noqa: BLE001 -- one line naming the run
        raise ConfigError(f"--resume {args.resume}: {exc}") from None


def _checked_config(args: argparse.Namespace):
    """The effective configuration, checked against its data source; ``None`` once a config
    error has been reported."""
    from fl.config import ConfigError, load_config
    from fl.data import ClientDataError, registry
    from fl.privacy.plan import plan_privacy
    from fl.rounds import clients_per_round
    from fl.strategies import make_strategy

    try:
        if getattr(args, "resume", None):
            config = _resumed_config(args)
        else:
            config = load_config(args.config, args.overrides)
        num_clients = len(registry(config.data, config.experiment.seed))
        clients_per_round(config.rounds, num_clients)
        make_strategy(config, plan_privacy(config, num_clients))
    except (ConfigError, ClientDataError, ValueError) as exc:
        _fail("config error", str(exc), 2)
        return None
    return config


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
    from tasks.client import ExpectedFailureLog

    task_runs = logging.getLogger("prefect.task_runs")
    if not verbose:
        task_runs.setLevel(logging.WARNING)
    for old in [f for f in task_runs.filters if isinstance(f, ExpectedFailureLog)]:
        task_runs.removeFilter(old)  # main() may run more than once in a process
    task_runs.addFilter(ExpectedFailureLog(show=verbose))


def _print_summary(args: argparse.Namespace, config, result) -> None:
    from tasks.tracking import tracking_uri

    terms = " + ".join(
        f"{c:.6g}*{n}" for c, n in zip(result.coef, result.feature_names, strict=True)
    )
    uri = tracking_uri(config)
    print(f"final model: y = {terms} + {result.intercept:.6g}")
    last = result.history[-1]
    line = f"rounds: {result.rounds_completed}  fed_mse: {last['fed_mse']:.6g}"
    if "central_mse" in last:
        line += f"  central_mse: {last['central_mse']:.6g}"
    if result.baseline_mse is not None:
        line += f"  pooled-OLS baseline_mse: {result.baseline_mse:.6g}"
    print(line)
    print(f"MLflow run: {result.run_id}  (experiment {config.experiment.name!r})")
    print(f"model: {result.model_uri}")
    if result.registered_version:
        print(f"registered: {config.experiment.register_as} v{result.registered_version}")
    if args.output:
        Path(args.output).write_text(result.model_dump_json(indent=2))
        print(f"summary: {args.output}")
    print(f"view: mlflow ui --backend-store-uri {uri}")


def _run_command(args: argparse.Namespace) -> int:
    config = _checked_config(args)
    if config is None:
        return 2
    _quiet_temporary_server()
    from fl.data import ClientDataError
    from flows.training import RoundFailed, federated_training

    _quiet_task_logs(args.verbose)
    try:
        result = federated_training(config, resume_run_id=args.resume)
    except (ClientDataError, RoundFailed) as exc:
        return _fail("training failed", str(exc), 1)
    _print_summary(args, config, result)
    return 0


_COMMANDS = {"audit": _audit_command, "config": _config_command, "run": _run_command}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        # The command line is the entry point of every layer; only `serve` reaches the
        # deployments layer, and only when asked for.
        from deployments.serve import main as serve

        return serve(argv[1:], prog="fedtune serve")
    args = _parser().parse_args(argv)
    return _COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
