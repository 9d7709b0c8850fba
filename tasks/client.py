"""Client-side tasks. Each gets a *reference* to its client's data and loads it itself; only
parameters, counts and scalar metrics come back.

A client's *expected* failures (:data:`EXPECTED`: bad data, an injected crash) end its task run
in a :func:`client_failed` state, returned rather than raised: Prefect then logs no traceback,
and the state's message is the one-line reason. Anything else is a bug and is raised as usual.
A batch of clients (:func:`train_clients`) is the exception: a client's failure, whatever it
is, is that client's outcome, and the batch's task run completes.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from fedtune.fl import client
from fedtune.fl import faults as fl_faults
from fedtune.fl.config import ClientConfig, FaultsConfig, FLConfig
from fedtune.fl.data import ClientDataError, ClientRef
from fedtune.fl.exchange import Broadcast, InProcess, TimedOut, reason
from fedtune.fl.params import ClientUpdate, FeatureStats, ModelParams
from fedtune.fl.statistics import StatsReport
from fedtune.tasks import TASK_OPTIONS
from prefect import get_run_logger, task
from prefect.exceptions import MissingContextError
from prefect.runtime import task_run
from prefect.states import Failed, State

EXPECTED: tuple[type[Exception], ...] = (ClientDataError, fl_faults.InjectedFault)
"""A client's failures that are not bugs: they get one line, never a traceback."""

CLIENT_FAILED = "ClientFailed"
"""The name of the (``FAILED``) state of a task run that ended in an expected failure."""

P = ParamSpec("P")
R = TypeVar("R")


def client_failed(exc: Exception) -> State:
    """The final state of a task run that failed with ``exc``: ``FAILED``, the one-line reason
    as its message, ``exc`` as its result (so ``retry_condition_fn`` and
    ``future.result(raise_on_failure=False)`` see the exception)."""
    return Failed(name=CLIENT_FAILED, message=reason(exc), data=exc)


def settles_expected_failures(fn: Callable[P, R]) -> Callable[P, R | State]:
    """Wrap a client task's function: an :data:`EXPECTED` exception is returned as
    :func:`client_failed`, which Prefect retries like a raised one (``retry_condition_fn``),
    but records without a traceback. Goes under ``@task``; the signature is kept."""

    @functools.wraps(fn)
    def settled(*args: P.args, **kwargs: P.kwargs) -> R | State:
        try:
            return fn(*args, **kwargs)
        except EXPECTED as exc:
            return client_failed(exc)

    return settled


class ExpectedFailureLog(logging.Filter):
    """For the ``prefect.task_runs`` logger: Prefect logs a failed task run at ERROR, up to twice
    ("Task run failed with state ...", "Finished in state ..."), the first with a spurious
    ``exc_info`` (``NoneType: None``). For a :func:`client_failed` run the flow already says why
    in one WARNING line: with ``show=False`` drop these records, else keep them without the
    ``exc_info``. Other records, those of bugs included, pass unchanged."""

    _STATE = re.compile(rf"\bstate:? {CLIENT_FAILED}\(")

    def __init__(self, show: bool = False):
        super().__init__()
        self.show = show

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not self._STATE.search(record.getMessage()):
            return True
        record.exc_info = None
        record.exc_text = None
        return self.show


def log_placement(refs: list[ClientRef]) -> None:
    """On a Dask worker, one line in the task run's log: which worker runs these clients
    (``site-3 on Dask worker tcp://10.0.0.7:40211 (silo-3=1)``), what shows that a silo's
    client ran on its own worker (``runner.silos``). Nothing elsewhere (threads)."""
    if "distributed" not in sys.modules:  # a Dask worker has it loaded; threads need not
        return
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not on a Dask worker
        return
    resources = ", ".join(f"{k}={v:g}" for k, v in sorted(worker.state.total_resources.items()))
    _logger().info(
        "%s on Dask worker %s%s",
        ", ".join(ref.client_id for ref in refs),
        worker.address,
        f" ({resources})" if resources else "",
    )


@task(name="client-statistics", task_run_name="stats-{ref.client_id}", **TASK_OPTIONS)
@settles_expected_failures
def client_statistics(ref: ClientRef, chunk_size: int) -> StatsReport:
    log_placement([ref])
    return client.feature_moments(ref, chunk_size)


def _transient(task, task_run, state) -> bool:
    """Retry crashes and timeouts, not data errors: a bad file stays bad. ``state`` holds the
    exception, raised or returned (:func:`client_failed`)."""
    try:
        state.result()
    except ClientDataError:
        return False
    except Exception:  # noqa: BLE001 -- anything else may be transient
        return True
    return False


@task(
    name="train-client",
    task_run_name="train-r{round_num:02d}-{ref.client_id}",
    retry_condition_fn=_transient,
    **TASK_OPTIONS,
)
@settles_expected_failures
def train_client(
    ref: ClientRef,
    global_params: ModelParams,
    stats: FeatureStats,
    cfg: ClientConfig,
    round_num: int,
    faults: FaultsConfig | None = None,
) -> ClientUpdate:
    log_placement([ref])
    return local_update(ref, global_params, stats, cfg, round_num, faults)


def local_update(
    ref: ClientRef,
    global_params: ModelParams,
    stats: FeatureStats,
    cfg: ClientConfig,
    round_num: int,
    faults: FaultsConfig | None,
) -> ClientUpdate:
    """A client's training, with the injected ``faults`` (if any) of this round and attempt."""
    attempt = 1 if faults is None else task_run.get_run_count()
    return fl_faults.train(faults, ref, global_params, stats, cfg, round_num, attempt)


def batch_run_name(parameters: dict[str, Any]) -> str:
    """``train-r07-site-3..site-9``: the round, then the first and last client of the batch
    (``train-r07-site-3`` for a batch of one)."""
    refs = parameters["refs"]
    first, last = refs[0].client_id, refs[-1].client_id
    clients = first if len(refs) == 1 else f"{first}..{last}"
    return f"train-r{parameters['round_num']:02d}-{clients}"


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The task run's logger; this module's outside a run (the task's ``.fn`` called alone)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


Outcome = ClientUpdate | tuple[str, str]
"""One client's outcome in a batch: its update, or ``(client_id, reason)``."""


@task(name="train-clients", task_run_name=batch_run_name, **TASK_OPTIONS)
def train_clients(
    refs: list[ClientRef], broadcast: Broadcast, config: FLConfig, round_num: int
) -> list[Outcome]:
    """A batch of clients, one after another, each through the in-process exchange's
    per-client code (:meth:`fl.exchange.InProcess.update`: its retries, its round deadline on
    the client's own time, injected slowness counted, not slept). A client's failure is its
    outcome, never the batch's; a failure that is not :data:`EXPECTED` (a bug) is also logged
    with its traceback. One log line gives every client's outcome and seconds."""
    log_placement(refs)
    exchange, logger = InProcess(config), _logger()
    outcomes: list[Outcome] = []
    lines = []
    for ref in refs:
        started = time.perf_counter()
        try:
            outcomes.append(exchange.update(ref, broadcast, round_num))
            what = "ok"
        except Exception as exc:  # noqa: BLE001 -- a failed client fails only itself
            if not isinstance(exc, EXPECTED + (TimedOut,)):
                logger.error("client %s failed", ref.client_id, exc_info=exc)
            outcomes.append((ref.client_id, reason(exc)))
            what = f"failed ({outcomes[-1][1]})"
        lines.append(f"{ref.client_id} {what} in {time.perf_counter() - started:.4f} s")
    logger.info("round %d: %s", round_num, "; ".join(lines))
    return outcomes


@task(name="final-report", task_run_name="final-{ref.client_id}", **TASK_OPTIONS)
@settles_expected_failures
def final_report(
    ref: ClientRef,
    params: ModelParams,
    stats: FeatureStats,
    cfg: ClientConfig,
    champion: ModelParams | None,
    rounds: int,
) -> client.FinalReport:
    log_placement([ref])
    return client.final_report(ref, params, stats, cfg, champion, rounds)
