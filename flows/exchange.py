"""Exchanges over Prefect tasks: how the engine's messages travel in a flow.

:class:`PrefectExchange` maps one task per client for each step (statistics, a round's training,
the final report); secure aggregation runs its protocol over the same kind of mapped tasks
(:class:`PrefectParties`). Either gives the in-process exchange's results bit for bit.
"""

from __future__ import annotations

from typing import Any

from prefect import unmapped
from prefect.utilities.annotations import quote

from fl.client import FinalReport
from fl.config import FLConfig
from fl.data import ClientRef
from fl.exchange import Broadcast, Exchange, Failures, Returned
from fl.params import FeatureStats, ModelParams
from fl.statistics import StatsReport
from flows.outcomes import collect
from tasks import secure_aggregation as secagg_tasks
from tasks.client import client_statistics, final_report, train_client


class PrefectExchange:
    """One Prefect task per client and step, run by the flow's task runner. Task inputs are
    quoted: Prefect need not look inside references and parameter vectors."""

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
        return 0.0

    def train(self, sampled: list[ClientRef], broadcast: Broadcast, round_num: int) -> Returned:
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
    from fl.secagg.exchange import SecureExchange

    return SecureExchange(plain, PrefectParties(config), config)
