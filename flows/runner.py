"""Where the flow's Prefect tasks run: the task runner that the run's ``[runner]`` section names.

- ``thread``: Prefect's ``ThreadPoolTaskRunner`` in the flow's process, for every task.
- ``dask``: the clients' tasks on prefect-dask's ``DaskTaskRunner``, on an existing
  ``distributed`` scheduler (``runner.address``) or a ``LocalCluster`` started for the run
  (``runner.n_workers``), with *silo placement*: a client named in ``runner.silos`` runs only
  on the workers that hold its silo's resource (:class:`flows.dask_runner.SiloDaskTaskRunner`).
  The server's tasks (MLflow logging, the simulation's pooled baseline) stay on threads in the
  flow's process: a silo's worker never sees the tracking store, and needs no access to it.

A client's task is one with a client reference among its parameters (``ref``, or the batch's
``refs``): the privacy boundary's own mark of client work (:func:`client_refs`).

The flow's decorator takes a runner before any configuration exists, and a deployment passes
the configuration as a parameter of each run; so the flow's runner is
:class:`ConfiguredTaskRunner`, which builds the configured one when the run submits its first
task, from that run's ``config`` parameter. ``federated_training.with_options(task_runner=...)``
still overrides it whole.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from fedtune.fl.config import FLConfig, RunnerConfig, validate_config
from fedtune.fl.data import ClientRef
from prefect.context import FlowRunContext
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.utilities.annotations import BaseAnnotation

if TYPE_CHECKING:
    from fedtune.flows.dask_runner import SiloDaskTaskRunner

SHOWN = 3
"""Client ids a one-line refusal names before it counts the rest."""


def thread_runner(n_workers: int | None = None) -> ThreadPoolTaskRunner:
    """``n_workers`` threads; unset, as many as Prefect's
    ``PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS`` says, else one.

    One is the measured optimum for small clients: their tasks hold the GIL (Prefect's own
    orchestration as much as ``partial_fit``), so more threads only contend. Clients that wait
    on I/O gain from more; clients big enough to fill a core gain from ``kind = "dask"``.
    """
    return ThreadPoolTaskRunner(max_workers=thread_count(n_workers))


def thread_count(n_workers: int | None) -> int:
    """The thread runner's threads: ``n_workers``, else Prefect's setting, else one."""
    if n_workers is not None:
        return n_workers
    from prefect.settings import get_current_settings

    return get_current_settings().tasks.runner.thread_pool_max_workers or 1


def parallel_tasks(runner: RunnerConfig) -> int:
    """How many tasks ``runner`` runs at once: its threads; a ``LocalCluster``'s workers (one
    per core unless ``n_workers``); for a cluster at ``address``, the threads of its workers
    when the run's task runner asks the scheduler (:func:`cluster_threads`), else
    :data:`fedtune.flows.exchange.AUTO_TASKS`."""
    from fedtune.flows.exchange import AUTO_TASKS

    if runner.kind == "thread":
        return thread_count(runner.n_workers)
    if runner.address is None:
        return runner.n_workers or os.cpu_count() or 1
    return cluster_threads() or AUTO_TASKS


def cluster_threads() -> int | None:
    """The threads of the Dask workers that the current flow run's clients' runner reaches
    (they run that many tasks at once; a cluster may grow or shrink later, which the next
    round sees), or None outside such a run."""
    context = FlowRunContext.get()
    runner = None if context is None else context.task_runner
    if not isinstance(runner, ConfiguredTaskRunner) or not runner._started:
        return None
    client = getattr(runner.runners()[1], "client", None)
    if client is None:
        return None
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return sum(int(w.get("nthreads", 1)) for w in workers) or None


def task_runner(config: FLConfig) -> TaskRunner:
    """The task runner ``config.runner`` names (not started)."""
    runner = config.runner
    if runner.kind == "thread":
        return thread_runner(runner.n_workers)
    return dask_runner(runner)


def dask_runner(runner: RunnerConfig) -> SiloDaskTaskRunner:
    """A :class:`SiloDaskTaskRunner` on ``runner.address``, else on a ``LocalCluster`` of
    ``runner.n_workers`` single-threaded processes (the clients' ``partial_fit`` holds the GIL:
    processes, not threads, use the cores). Its workers print warnings only; their task runs'
    own lines go to the Prefect API, as the flow's do."""
    try:
        from fedtune.flows.dask_runner import SiloDaskTaskRunner, local_cluster
    except ImportError:
        raise ValueError(
            'runner.kind: "dask" needs prefect-dask: pip install "fedtune[dask]"'
        ) from None
    if runner.address is not None:
        return SiloDaskTaskRunner(runner.silos, address=runner.address)
    cluster = {
        "n_workers": runner.n_workers,
        "threads_per_worker": 1,
        "processes": True,
        "env": {"PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING"},
    }
    return SiloDaskTaskRunner(runner.silos, cluster_class=local_cluster, cluster_kwargs=cluster)


def check_placement(config: FLConfig, refs: list[ClientRef]) -> None:
    """Before any client task: every client that ``runner.silos`` pins exists (a misspelt id
    would otherwise run anywhere). Raises ``ValueError`` with one line naming the key."""
    ids = {ref.client_id for ref in refs}
    if unknown := sorted(set(config.runner.silos) - ids):
        raise ValueError(
            f"runner.silos: no client {_named(unknown)} (the clients: {_named(sorted(ids))})"
        )


def _named(ids: list[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:SHOWN])
    return shown if len(ids) <= SHOWN else f"{shown} and {len(ids) - SHOWN} more"


def client_refs(parameters: dict[str, Any]) -> list[ClientRef]:
    """The client references among a task's parameters (``ref``, or ``refs`` of a batch),
    quoted or not; none for a server task."""
    found = []
    for name in ("ref", "refs"):
        value = parameters.get(name)
        if isinstance(value, BaseAnnotation):
            value = value.unwrap()
        if isinstance(value, ClientRef):
            found.append(value)
        elif isinstance(value, list):
            found += [v for v in value if isinstance(v, ClientRef)]
    return found


class ConfiguredTaskRunner(TaskRunner):
    """The flow's task runner. On the run's first task it starts the runners that the run's
    ``config`` parameter names (:func:`task_runner` for the clients' tasks, threads for the
    server's), which then run every task of the run and stop with it. Outside a run of a flow
    with a ``config`` parameter: the default configuration's. Creating one costs nothing
    (Prefect makes one per task run on a Dask worker too)."""

    def __init__(self) -> None:
        super().__init__()
        self._runners: tuple[TaskRunner, TaskRunner] | None = None
        self._stack = ExitStack()

    def duplicate(self) -> ConfiguredTaskRunner:
        return type(self)()

    def runners(self) -> tuple[TaskRunner, TaskRunner]:
        """``(server's, clients')``, started on first use; one runner for both with threads."""
        if self._runners is None:
            if not self._started:
                raise RuntimeError("The task runner must be started before submitting work.")
            context = FlowRunContext.get()
            raw = context.parameters.get("config") if context is not None else None
            config = validate_config(raw if raw is not None else FLConfig())
            clients = self._stack.enter_context(task_runner(config))
            server = clients
            if config.runner.kind != "thread":
                server = self._stack.enter_context(thread_runner())
            self._runners = (server, clients)
        return self._runners

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        """Through the clients' runner if ``task`` is a client's, else the server's. (The
        inherited :meth:`map` submits each call of a mapped task here.)"""
        server, clients = self.runners()
        runner = clients if client_refs(parameters) else server
        return runner.submit(task, parameters, wait_for, dependencies)

    def __exit__(self, *exc_info: Any) -> None:
        try:
            self._stack.__exit__(*exc_info)
        finally:
            self._runners = None
            self._stack = ExitStack()
            super().__exit__(*exc_info)
