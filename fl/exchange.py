"""How a round's messages travel between the server and the clients.

An :class:`Exchange` takes the clients of one step and what the server sends them, and returns
what came back plus a one-line reason for every client that did not answer. The engine
(:mod:`fl.engine`) is written against this protocol only, so the same round runs in-process
(:class:`InProcess`, here), over Prefect tasks (``flows/exchange.py``) or under secure
aggregation, and for the same configuration and injected randomness every exchange gives the
same model, bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from fedtune.fl import client, faults
from fedtune.fl.client import FinalReport
from fedtune.fl.config import FLConfig
from fedtune.fl.data import ClientDataError, ClientRef
from fedtune.fl.evaluation import EvalSums
from fedtune.fl.params import ClientUpdate, FeatureStats, MaskedUpdate, ModelParams
from fedtune.fl.statistics import StatsReport
from fedtune.fl.strategies.aggregation import Contribution

Failures = list[tuple[str, str]]
"""``(client_id, reason)`` for every client left out of a step; the reason is one line."""


@dataclass(frozen=True)
class Broadcast:
    """What the server sends the clients of a round."""

    params: ModelParams
    stats: FeatureStats
    contribution: Contribution | None = None
    """Under secure aggregation: what each client adds to the masked sum."""


@dataclass
class Returned:
    """What came back from a round's clients.

    In the clear, ``updates`` holds every answer. Under secure aggregation ``updates`` holds
    the survivors' masked updates (one per client in the sum, nothing readable), ``total`` the
    sum of their contributions, and ``evaluation`` and ``train_loss`` what their summed scalars
    give (:mod:`fl.secagg.scalars`): no client's count, loss or score reaches the server.
    """

    updates: list[ClientUpdate | MaskedUpdate] = field(default_factory=list)
    failures: Failures = field(default_factory=list)
    total: np.ndarray | None = None
    silent: Failures = field(default_factory=list)
    """Survivors that did not sign the survivor set or answer the unmasking request: their
    update is in the sum (if it could be unmasked), so they are reported, not left out."""
    evaluation: EvalSums | None = None
    """Under secure aggregation: the summed evaluation sums of the model the clients received
    (else the engine merges the updates' own)."""
    train_loss: float | None = None
    """Under secure aggregation: the example-weighted mean training loss, from summed losses
    and counts (else the engine forms it from the updates)."""


class Exchange(Protocol):
    """How the server reaches the clients."""

    def open(self, refs: list[ClientRef]) -> float:
        """Ready the exchange for the run's registered clients, before any other step (key
        setup under secure aggregation); returns the seconds it took."""
        ...

    def statistics(self, refs: list[ClientRef]) -> tuple[list[StatsReport], Failures]:
        """Every client's feature moments (no rows), in the clear. Under secure aggregation
        the exchange has ``summed_statistics`` instead (:mod:`fl.secagg.statistics`): the
        server learns only the sum of the moments."""
        ...

    def train(self, sampled: list[ClientRef], broadcast: Broadcast, round_num: int) -> Returned:
        """One round: every sampled client scores the broadcast model on its test split, then
        trains from it. Clients later than ``rounds.round_timeout_s`` are left out. Raises
        :class:`fl.secagg.primitives.SecAggAbort` when a secure round must fail closed."""
        ...

    def final(
        self,
        refs: list[ClientRef],
        params: ModelParams,
        stats: FeatureStats,
        champion: ModelParams | None,
        rounds: int,
    ) -> list[FinalReport]:
        """Every client's scores of the final model (and the champion's)."""
        ...

    def close(self) -> None:
        """Discard whatever secrets the exchange left behind."""
        ...


def reason(exc: BaseException) -> str:
    """The one-line reason a client failed: a data error already names client, file and row."""
    if isinstance(exc, ClientDataError | TimedOut):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class _VirtualDelay:
    """Injected slowness counted, not slept: in-process clients run one after another, so a
    simulated straggler's delay is added to its own time instead."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self, seconds: float) -> None:
        self.seconds += seconds


class InProcess:
    """The plain-Python exchange: every client runs in this process, one after another.

    It keeps the Prefect exchange's rules: a client is retried ``client.retries`` times unless
    its data is bad; a client whose own time (measured, plus injected slowness) exceeds
    ``rounds.round_timeout_s`` is left out, as if it had run in parallel with the others.
    """

    def __init__(self, config: FLConfig):
        self.config = config
        self.faults = config.injected_faults

    def statistics(self, refs: list[ClientRef]) -> tuple[list[StatsReport], Failures]:
        reports, failures = [], []
        for ref in refs:
            try:
                reports.append(client.feature_moments(ref, self.config.client.chunk_size))
            except ClientDataError as exc:
                failures.append((ref.client_id, reason(exc)))
        return reports, failures

    def open(self, refs: list[ClientRef]) -> float:
        return 0.0

    def train(self, sampled: list[ClientRef], broadcast: Broadcast, round_num: int) -> Returned:
        if broadcast.contribution is not None:
            raise ValueError(
                "privacy.secure_aggregation: the in-process exchange sums in the clear; "
                "use fl.secagg's in-process protocol exchange"
            )
        returned = Returned()
        for ref in sampled:
            try:
                returned.updates.append(self.update(ref, broadcast, round_num))
            except Exception as exc:  # noqa: BLE001 -- a failed client fails only itself
                returned.failures.append((ref.client_id, reason(exc)))
        return returned

    def update(self, ref: ClientRef, broadcast: Broadcast, round_num: int) -> ClientUpdate:
        """One client's update, with retries and the round deadline applied as Prefect's task
        retries and the flow's deadline apply them."""
        cfg, delay = self.config.client, _VirtualDelay()
        started = time.perf_counter()
        for attempt in range(1, cfg.retries + 2):
            try:
                update = faults.train(
                    self.faults, ref, broadcast.params, broadcast.stats, cfg, round_num, attempt,
                    sleep=delay,
                )  # fmt: skip
                break
            except ClientDataError:
                raise  # a bad file stays bad: never retried
            except Exception:
                if attempt > cfg.retries:
                    raise
                delay(cfg.retry_delay_s)
        timeout = self.config.rounds.round_timeout_s
        if timeout is not None and time.perf_counter() - started + delay.seconds > timeout:
            raise TimedOut(timeout)
        return update

    def final(self, refs, params, stats, champion, rounds) -> list[FinalReport]:
        cfg = self.config.client
        return [client.final_report(ref, params, stats, cfg, champion, rounds) for ref in refs]

    def close(self) -> None:
        pass


class TimedOut(RuntimeError):
    """A client answered after the round's deadline."""

    def __init__(self, timeout: float):
        super().__init__(f"timed out after {timeout:.3g} s")
