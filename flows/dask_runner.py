"""prefect-dask's ``DaskTaskRunner`` with silo placement: a client's tasks run only on the Dask
workers of its silo.

Imported only for ``runner.kind = "dask"``: prefect-dask is an optional dependency
(``pip install "fedtune[dask]"``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from typing import Any
from urllib.parse import urlsplit

import dask
import distributed
from fedtune.flows.runner import client_refs
from prefect.context import FlowRunContext
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.annotations import quote
from prefect_dask import DaskTaskRunner

WORKER_ENVIRON = {"MALLOC_MMAP_THRESHOLD_": 33554432, "MALLOC_TRIM_THRESHOLD_": 67108864}
"""glibc's allocator settings for the worker processes (set before each starts): a client reads
its file a chunk at a time, allocating and freeing arrays of a few MiB per chunk. Dask's own
``MALLOC_TRIM_THRESHOLD_`` (64 KiB) pins glibc's mmap threshold at its 128 KiB floor, so each
chunk's arrays are mapped and unmapped again, a page fault per page: measured, a third of a
one-million-row client's time went to the kernel, and two workers ran a round barely faster
than one process. These keep such arrays on the heap (up to 32 MiB each) and hand memory back
to the system above 64 MiB free. ``deployments/dask-worker.yaml`` says the same for workers
started by hand."""


def local_cluster(**kwargs: Any) -> distributed.LocalCluster:
    """A ``LocalCluster`` whose worker processes start with :data:`WORKER_ENVIRON`."""
    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **WORKER_ENVIRON}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        return distributed.LocalCluster(**kwargs)


class SiloDaskTaskRunner(DaskTaskRunner):
    """prefect-dask's ``DaskTaskRunner`` that pins a client's tasks to its silo.

    A task whose ``ref`` (or batch ``refs``) is a client of ``silos`` is submitted under
    ``dask.annotate(resources={silo: 1})``: Dask's scheduler then gives it only to a worker
    that holds that resource, never to another. This covers every client task the flow
    submits without the call sites knowing. Before the first task every silo must have a
    worker, else one line says how to start one.

    Task runs on the workers report to the flow's Prefect API: when ``PREFECT_API_URL`` is
    unset (Prefect's temporary local server), that server's address goes along with each task;
    the workers would otherwise each start a temporary server of their own.
    """

    def __init__(self, silos: dict[str, str], **kwargs: Any):
        super().__init__(**kwargs)
        self.silos = dict(silos)
        self._checked = False
        self._api_url: str | None = None

    def __enter__(self) -> SiloDaskTaskRunner:
        """With a ``LocalCluster`` of its own, the scheduler and nannies live in this process:
        their logger says only errors (not each worker's start and stop), as Prefect's console
        handler would print every record of it."""
        distributed = logging.getLogger("distributed")
        self._distributed_level = distributed.level
        if self.address is None:
            distributed.setLevel(max(logging.ERROR, distributed.getEffectiveLevel()))
        return super().__enter__()

    def __exit__(self, *exc_info: Any) -> None:
        try:
            super().__exit__(*exc_info)
        finally:
            logging.getLogger("distributed").setLevel(self._distributed_level)

    def duplicate(self) -> SiloDaskTaskRunner:
        return type(self)(
            self.silos,
            address=self.address,
            cluster_class=self.cluster_class,
            cluster_kwargs=self.cluster_kwargs,
            client_kwargs=self.client_kwargs,
        )

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        silo = self._silo_of(parameters)
        if not self._checked:
            self._api_url = _api_url_for(self.address)
            self._check_workers()
            self._checked = True
        with contextlib.ExitStack() as stack:
            if silo is not None:
                stack.enter_context(dask.annotate(resources={silo: 1}))
            if self._api_url is not None:
                stack.enter_context(temporary_settings({PREFECT_API_URL: self._api_url}))
            return super().submit(task, _unquoted(parameters), wait_for, dependencies)

    def _silo_of(self, parameters: dict[str, Any]) -> str | None:
        """The silo of the task's client(s); a batch of clients never spans two silos."""
        silos = {self.silos.get(ref.client_id) for ref in client_refs(parameters)}
        if len(silos) > 1:
            raise RuntimeError(f"a batch of clients spans silos {sorted(map(str, silos))}")
        return silos.pop() if silos else None

    def _check_workers(self) -> None:
        """Every silo has a worker, or one line."""
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        holders: dict[str, list[str]] = {silo: [] for silo in self.silos.values()}
        for address, worker in workers.items():
            for silo, found in holders.items():
                if (worker.get("resources") or {}).get(silo):
                    found.append(address)
        scheduler = self.address or self.client.scheduler.address
        for client_id, silo in self.silos.items():
            if not holders[silo]:
                raise ValueError(
                    f"runner.silos: no Dask worker of {scheduler} has the resource {silo!r} "
                    f"(client {client_id!r}); start one: dask worker {scheduler} --resources "
                    f'"{silo}=1"'
                )


def _unquoted(parameters: dict[str, Any]) -> dict[str, Any]:
    """``quote(x)`` parameters as ``x``. Dask takes a quote, a named tuple, for a plain tuple
    on its way to the worker, where the task would get ``(x,)``; the quote's purpose (Prefect
    need not search the value for futures) is lost there anyway, as Dask pickles it whole."""
    return {k: v.unwrap() if isinstance(v, quote) else v for k, v in parameters.items()}


def _api_url_for(scheduler: str | None) -> str | None:
    """The Prefect API address for the workers' task runs when the flow runs against Prefect's
    temporary local server (``PREFECT_API_URL`` unset); None otherwise. That server listens on
    this machine only, so a scheduler elsewhere is refused with one line."""
    if PREFECT_API_URL.value():
        return None
    if scheduler is not None and not _is_local(scheduler):
        raise ValueError(
            f"runner.address: the workers of {scheduler} report to the Prefect API, and "
            "PREFECT_API_URL is unset (a temporary server on this machine only): set it to a "
            "Prefect server they can reach"
        )
    context = FlowRunContext.get()
    if context is None or context.client is None:
        return None
    return str(context.client.api_url).rstrip("/")


def _is_local(address: str) -> bool:
    host = urlsplit(address if "://" in address else f"tcp://{address}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
