"""Serve fedtune's deployments from one process, for machines without a work pool or worker.

The deployments are the ones in ``deployments/prefect.yaml`` (same names, schedules and
parameters), so the two ways of running them cannot disagree. This process registers them with
the Prefect API, then runs their flow runs, scheduled or triggered, as subprocesses until it is
stopped; stopping it pauses their schedules. From the repository root::

    python -m fedtune.deployments.serve                 # both deployments
    python -m fedtune.deployments.serve --deployment train
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from prefect.schedules import Cron, Schedule

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
TRACKING_URI = f"sqlite:///{REPO / 'mlflow.db'}"
"""Where served runs track unless ``MLFLOW_TRACKING_URI`` says otherwise: the store the
work-pool deployments use (``prefect.yaml``), ``fedtune run`` and ``mlflow ui`` from the
repository root."""


def project_deployments(prefect_file: Path = PREFECT_FILE) -> list[dict[str, Any]]:
    """The ``deployments`` entries of a ``prefect.yaml``, with its YAML anchors resolved."""
    return yaml.safe_load(prefect_file.read_text())["deployments"]


def _schedules(entry: dict[str, Any]) -> list[Schedule]:
    schedules = []
    for spec in entry.get("schedules") or []:
        # Anything else (interval, rrule, per-schedule parameters) would be dropped silently.
        if "cron" not in spec or set(spec) - {"cron", "timezone"}:
            raise ValueError(
                f"deployment {entry['name']!r}: serve takes schedules of cron and timezone "
                f"only, got {spec}"
            )
        schedules.append(Cron(spec["cron"], timezone=spec.get("timezone")))
    return schedules


def build_deployments(
    names: Iterable[str] | None = None, prefect_file: Path = PREFECT_FILE
) -> list[RunnerDeployment]:
    """Deployments of ``federated_training`` for the entries of ``prefect_file`` (all of them,
    or those named), without their work pool: the serving process runs them itself.

    The entrypoint is recorded relative to the working directory, which must stay the one the
    runs start in; :func:`serve` uses the repository root.
    """
    from fedtune.flows.training import federated_training

    entries = project_deployments(prefect_file)
    known = [entry["name"] for entry in entries]
    wanted = list(names or known)
    if unknown := sorted(set(wanted) - set(known)):
        raise ValueError(f"no deployment {unknown[0]!r} in {prefect_file} (have: {known})")
    return [
        federated_training.to_deployment(
            name=entry["name"],
            description=entry.get("description"),
            tags=entry.get("tags"),
            schedules=_schedules(entry),
            parameters=entry.get("parameters"),
        )
        for entry in entries
        if entry["name"] in wanted
    ]


class NoPrefectServer(RuntimeError):
    """No ``PREFECT_API_URL``: the deployments would live in a temporary server of this
    process, out of reach of the UI and of ``prefect deployment run``."""


class DeployedToWorkPool(RuntimeError):
    """A deployment to serve already exists in a work pool (``prefect deploy``)."""


def refuse_work_pool_deployments(deployments: Iterable[RunnerDeployment]) -> None:
    """Raise :class:`DeployedToWorkPool` naming every one of ``deployments`` that exists in a
    work pool, so that one look at the message says all there is to delete.

    Serving updates a deployment in place, and Prefect 3.9 leaves an update's unset fields as
    they were: the work pool stays, the pull steps go, and every run of the deployment then
    crashes ("No such file or directory: .../None"). Deleting it first avoids that.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    pooled: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        for deployment in deployments:
            name = f"{deployment.flow_name}/{deployment.name}"
            try:
                existing = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            if existing.work_pool_name:
                pooled[name] = existing.work_pool_name
    if pooled:
        raise DeployedToWorkPool(_work_pool_refusal(pooled))


def _work_pool_refusal(pooled: dict[str, str]) -> str:
    """One line naming each deployment in a work pool (``{name: pool}``) and the commands that
    free them all."""
    where = " and ".join(
        f"{name} is deployed to work pool {pool!r}" for name, pool in pooled.items()
    )
    delete = " && ".join(f"prefect deployment delete {name}" for name in pooled)
    them = "it" if len(pooled) == 1 else "them"
    return f"{where}; serve {them} after `{delete}`, or run {them} with a worker"


def serve(names: Iterable[str] | None = None, limit: int | None = None) -> None:
    """Register the deployments and run their flow runs until interrupted.

    Runs start in the repository root with ``MLFLOW_TRACKING_URI`` defaulting to
    :data:`TRACKING_URI`, as they do under a worker (``prefect.yaml``'s pull step and job
    variables), so a deployment behaves the same whichever way it is run.
    """
    import prefect
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise NoPrefectServer(
            "PREFECT_API_URL is not set: start a Prefect server and point at it with "
            "`prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`"
        )
    os.chdir(REPO)
    os.environ.setdefault("MLFLOW_TRACKING_URI", TRACKING_URI)
    deployments = build_deployments(names)
    refuse_work_pool_deployments(deployments)
    prefect.serve(*deployments, limit=limit)


def main(argv: list[str] | None = None, prog: str = "python -m fedtune.deployments.serve") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve the deployments of deployments/prefect.yaml from this process.",
    )
    parser.add_argument(
        "--deployment",
        "-d",
        dest="deployments",
        action="append",
        metavar="NAME",
        help="serve only this deployment (repeatable; default: all)",
    )
    parser.add_argument(
        "--limit", type=int, metavar="N", help="run at most N flow runs at the same time"
    )
    args = parser.parse_args(argv)
    try:
        serve(args.deployments, args.limit)
    except (ValueError, DeployedToWorkPool, NoPrefectServer) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
