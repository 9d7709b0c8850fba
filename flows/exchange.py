"""Exchanges over Prefect tasks: how the engine's messages travel in a flow.

:class:`PrefectExchange` maps one task per client for each step (statistics, a round's training,
the final report), or, for a round with many clients, one task per batch of clients
(``rounds.clients_per_task``, :func:`client_batches`); secure aggregation runs its protocol over
the same kind of mapped tasks (:class:`PrefectParties`), one per client. Either gives the
in-process exchange's results bit for bit.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any, Literal

from fedtune.fl.client import FinalReport
from fedtune.fl.config import FLConfig
from fedtune.fl.data import ClientRef
from fedtune.fl.exchange import Broadcast, Exchange, Failures, Returned
from fedtune.fl.params import ClientUpdate, FeatureStats, ModelParams
from fedtune.fl.statistics import StatsReport
from fedtune.flows.outcomes import collect
from fedtune.flows.runner import check_placement, parallel_tasks
from fedtune.tasks import secure_aggregation as secagg_tasks
from fedtune.tasks.client import (
    Outcome,
    client_statistics,
    final_report,
    train_client,
    train_clients,
)
from prefect import unmapped
from prefect.utilities.annotations import quote

AUTO_TASKS = 16
"""``clients_per_task = "auto"`` on a cluster at ``runner.address``: training tasks per round."""


def client_batches(
    sampled: list[ClientRef], clients_per_task: int | Literal["auto"], tasks: int = AUTO_TASKS
) -> list[list[ClientRef]]:
    """The round's clients in batches, one task each, in sampled order. An integer gives
    batches of that size (the last one smaller); ``"auto"`` gives ``min(n, tasks)`` batches,
    spread evenly (sizes differ by one at most): one client per task while the round has no
    more clients than the runner runs tasks at once (``tasks``), else one batch per task slot,
    since more tasks than slots only add Prefect's cost per task."""
    n = len(sampled)
    if clients_per_task != "auto":
        return [sampled[i : i + clients_per_task] for i in range(0, n, clients_per_task)]
    count = min(n, tasks)
    if count == 0:
        return []
    bounds = [n * i // count for i in range(count + 1)]
    return [sampled[a:b] for a, b in pairwise(bounds)]


def placed_batches(
    sampled: list[ClientRef],
    clients_per_task: int | Literal["auto"],
    silos: dict[str, str],
    tasks: int = AUTO_TASKS,
) -> list[list[ClientRef]]:
    """:func:`client_batches` within each silo (``runner.silos``; the clients no silo pins form
    one group): a batch runs where all of its clients may run."""
    groups: dict[str | None, list[ClientRef]] = {}
    for ref in sampled:
        groups.setdefault(silos.get(ref.client_id), []).append(ref)
    return [
        batch
        for group in groups.values()
        for batch in client_batches(group, clients_per_task, tasks)
    ]


class PrefectExchange:
    """One Prefect task per client and step, run by the flow's task runner, or one task per
    batch of a round's clients (:func:`placed_batches`). Task inputs are quoted: Prefect need
    not look inside references and parameter vectors. Where a task runs is the task runner's
    business (:mod:`flows.runner`: a silo's client on its own Dask workers)."""

    def __init__(self, config: FLConfig):
        self.config = config
        self.trainer = train_client.with_options(
            retries=config.client.retries, retry_delay_seconds=config.client.retry_delay_s
        )

    def statistics(self, refs: list[ClientRef]) -> tuple[list[StatsReport], Failures]:
        chunk = self.config.client.chunk_size
        answered, failures = collect(
            client_statistics.map([quote(ref) for ref in refs], unmapped(chunk)), refs
        )
        return list(answered.values()), failures

    def open(self, refs: list[ClientRef]) -> float:
        # The run's first client tasks come next (under secure aggregation, its key setup).
        check_placement(self.config, refs)
        return 0.0

    def train(self, sampled: list[ClientRef], broadcast: Broadcast, round_num: int) -> Returned:
        batches = placed_batches(
            sampled,
            self.config.rounds.clients_per_task,
            self.config.runner.silos,
            parallel_tasks(self.config.runner),
        )
        if len(batches) < len(sampled):
            return self._train_batches(sampled, batches, broadcast, round_num)
        futures = self.trainer.map(
            [quote(ref) for ref in sampled],
            unmapped(quote(broadcast.params)),
            unmapped(quote(broadcast.stats)),
            unmapped(quote(self.config.client)),
            round_num,
            unmapped(quote(self.config.injected_faults)),
        )
        answered, failures = collect(futures, sampled, self.config.rounds.round_timeout_s)
        return Returned(list(answered.values()), failures)

    def _train_batches(
        self,
        sampled: list[ClientRef],
        batches: list[list[ClientRef]],
        broadcast: Broadcast,
        round_num: int,
    ) -> Returned:
        """One :func:`tasks.client.train_clients` task per batch. The round deadline applies
        to each client inside its task (its own time, as if it ran alone); here a batch gets
        the deadline once per client it holds, in series, after which its clients that have
        not answered are left out as timed out (a thread cannot be interrupted). Outcomes
        come back in sampled order, whatever the batches' order."""
        futures = train_clients.map(
            [quote(batch) for batch in batches],
            unmapped(quote(Broadcast(broadcast.params, broadcast.stats))),
            unmapped(quote(self.config)),
            round_num,
        )
        timeout = self.config.rounds.round_timeout_s
        if timeout is not None:
            timeout *= max(len(batch) for batch in batches)
        firsts = [batch[0] for batch in batches]
        answered, failed = collect(futures, firsts, timeout)
        why = dict(failed)
        by_client: dict[str, Outcome] = {}
        for batch in batches:
            outcomes = answered.get(batch[0].index)
            if outcomes is None:
                outcomes = [(ref.client_id, why[batch[0].client_id]) for ref in batch]
            for ref, outcome in zip(batch, outcomes, strict=True):
                by_client[ref.client_id] = outcome
        returned = Returned()
        for ref in sampled:
            outcome = by_client[ref.client_id]
            if isinstance(outcome, ClientUpdate):
                returned.updates.append(outcome)
            else:
                returned.failures.append(outcome)
        return returned

    def final(
        self,
        refs: list[ClientRef],
        params: ModelParams,
        stats: FeatureStats,
        champion: ModelParams | None,
        rounds: int,
    ) -> list[FinalReport]:
        return final_report.map(
            [quote(ref) for ref in refs],
            unmapped(quote(params)),
            unmapped(quote(stats)),
            unmapped(quote(self.config.client)),
            unmapped(quote(champion)),
            rounds,
        ).result()

    def close(self) -> None:
        pass


class PrefectParties:
    """Secure aggregation's client steps as mapped Prefect tasks
    (:class:`fl.secagg.parties.Parties`): the clients' secrets stay in the task layer's key
    store, wherever the task runs."""

    def __init__(self, config: FLConfig):
        self.config = config

    def enroll(self, session: str) -> None:
        secagg_tasks.enroll(session, self.config)

    def call(
        self,
        step: str,
        refs: list[ClientRef],
        shared: tuple[Any, ...],
        each: list[Any] | None = None,
        timeout: float | None = None,
    ) -> tuple[dict[int, Any], Failures]:
        task = secagg_tasks.STEPS[step]
        mapped = [[quote(ref) for ref in refs]]
        if each is not None:
            mapped.append([quote(x) for x in each])
        futures = task.map(*mapped, *(unmapped(quote(x)) for x in shared))
        return collect(futures, refs, timeout)

    def expire(self, session: str) -> None:
        secagg_tasks.expire(session)


def open_exchange(config: FLConfig) -> Exchange:
    """The flow's exchange: plain, or secure aggregation over the same tasks."""
    plain = PrefectExchange(config)
    if not config.privacy.secure_aggregation:
        return plain
    from fedtune.fl.secagg.exchange import SecureExchange

    return SecureExchange(plain, PrefectParties(config), config)
