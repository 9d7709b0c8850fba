"""Secure aggregation's client steps as Prefect tasks: thin wrappers over
:mod:`fl.secagg.parties`, one per exchange with the server.

A client's secrets live in this module's key store, in the process its tasks run in; they never
appear in task parameters or results. (With Prefect's thread runner every simulated client
shares this process; a task runner that moves a client's steps between processes turns it into a
dropout, which the protocol tolerates up to its threshold.) The store also holds each run's
directory of identity keys and public parameters (:func:`enroll`): the clients' side of the PKI
assumption of :mod:`fl.secagg.identity`, which the flow's server code never writes to.
"""

from __future__ import annotations

from typing import Any

from fedtune.fl.config import ClientConfig, FaultsConfig, FLConfig
from fedtune.fl.data import ClientRef
from fedtune.fl.exchange import Broadcast
from fedtune.fl.params import MaskedUpdate
from fedtune.fl.secagg import parties
from fedtune.fl.secagg.bonawitz import AdvertisedKeys, EncryptedShare, UnmaskingResponse
from fedtune.fl.secagg.identity import PublicParameters
from fedtune.fl.secagg.primitives import Codec, Segments
from fedtune.fl.secagg.run_keys import PublicKey, Quorum, Unmasking
from fedtune.fl.secagg.statistics import StatisticsRequest
from fedtune.tasks import TASK_OPTIONS
from fedtune.tasks.client import log_placement, settles_expected_failures
from prefect import Task, task
from prefect.runtime import task_run

KEYS = parties.KeyStore()
"""The secrets of the clients whose tasks run in this process, and the runs' directories."""


def enroll(session: str, config: FLConfig) -> None:
    """Open run ``session`` on the clients' side, with the configuration's public parameters."""
    KEYS.enroll(session, PublicParameters.of(config))


@task(name="secagg-setup", task_run_name="secagg-setup-{ref.client_id}", **TASK_OPTIONS)
def make_keys(ref: ClientRef, session: str, run_keys: bool) -> PublicKey | None:
    return parties.make_keys(KEYS, ref, session, run_keys)


# -- the feature statistics (fl.secagg.statistics): round 0, its task runs named "stats-..." ---


@task(name="secagg-stats-schema", task_run_name="stats-schema-{ref.client_id}", **TASK_OPTIONS)
@settles_expected_failures  # bad data: the client is set aside with the reason, no traceback
def statistics_schema(ref: ClientRef, session: str, chunk_size: int) -> list[str]:
    log_placement([ref])
    return parties.statistics_schema(KEYS, ref, session, chunk_size)


@task(name="secagg-stats-masked", task_run_name="stats-masked-{ref.client_id}", **TASK_OPTIONS)
@settles_expected_failures
def statistics_run_masked(
    ref: ClientRef,
    session: str,
    roster: list[PublicKey],
    quorum: Quorum,
    codec: Codec,
    request: StatisticsRequest,
    chunk_size: int,
    round_num: int,
) -> MaskedUpdate:
    return parties.statistics_run_masked(
        KEYS, ref, session, roster, quorum, codec, request, chunk_size, round_num
    )


@task(name="secagg-stats-masked", task_run_name="stats-masked-{ref.client_id}", **TASK_OPTIONS)
@settles_expected_failures
def statistics_round_masked(
    ref: ClientRef,
    inbox: list[EncryptedShare],
    session: str,
    roster: list[AdvertisedKeys],
    run_session: str,
    request: StatisticsRequest,
    chunk_size: int,
    round_num: int,
) -> MaskedUpdate:
    return parties.statistics_round_masked(
        KEYS, ref, inbox, session, roster, run_session, request, chunk_size, round_num
    )


# -- keys once per run (fl.secagg.run_keys) ----------------------------------------------------


@task(
    name="train-client-masked",
    task_run_name="train-r{round_num:02d}-{ref.client_id}",
    **TASK_OPTIONS,
)
@settles_expected_failures  # bad data, injected crashes: no traceback
def train_run_masked(
    ref: ClientRef,
    session: str,
    roster: list[PublicKey],
    quorum: Quorum,
    codec: Segments,
    broadcast: Broadcast,
    cfg: ClientConfig,
    round_num: int,
    faults: FaultsConfig | None = None,
) -> MaskedUpdate:
    attempt = task_run.get_run_count()
    return parties.train_run_masked(
        KEYS, ref, session, roster, quorum, codec, broadcast, cfg, round_num, faults, attempt
    )


@task(
    name="secagg-consistency",
    task_run_name="secagg-consistency-r{round_num:02d}-{ref.client_id}",
    **TASK_OPTIONS,
)
def run_consistency(ref: ClientRef, session: str, survivors: list[int], round_num: int) -> bytes:
    return parties.run_consistency(KEYS, ref, session, survivors, round_num)


@task(
    name="secagg-unmask",
    task_run_name="secagg-unmask-r{round_num:02d}-{ref.client_id}",
    **TASK_OPTIONS,
)
def run_unmasking(
    ref: ClientRef,
    inbox: dict[int, bytes],
    session: str,
    survivors: list[int],
    signatures: dict[int, bytes],
    round_num: int,
) -> Unmasking:
    return parties.run_unmasking(KEYS, ref, inbox, session, survivors, signatures, round_num)


# -- fresh keys every round (fl.secagg.bonawitz) ------------------------------------------------


@task(
    name="secagg-keys", task_run_name="secagg-keys-r{round_num:02d}-{ref.client_id}", **TASK_OPTIONS
)
def advertise_keys(
    ref: ClientRef,
    session: str,
    run_session: str,
    threshold: int,
    codec: Segments,
    round_num: int,
) -> AdvertisedKeys:
    return parties.advertise_keys(KEYS, ref, session, run_session, threshold, codec, round_num)


@task(
    name="secagg-shares",
    task_run_name="secagg-shares-r{round_num:02d}-{ref.client_id}",
    **TASK_OPTIONS,
)
def share_keys(
    ref: ClientRef, session: str, roster: list[AdvertisedKeys], round_num: int
) -> list[EncryptedShare]:
    return parties.share_keys(KEYS, ref, session, roster, round_num)


@task(
    name="train-client-masked",
    task_run_name="train-r{round_num:02d}-{ref.client_id}",
    **TASK_OPTIONS,
)
@settles_expected_failures  # bad data, injected crashes: no traceback
def train_masked(
    ref: ClientRef,
    inbox: list[EncryptedShare],
    session: str,
    roster: list[AdvertisedKeys],
    broadcast: Broadcast,
    cfg: ClientConfig,
    round_num: int,
    faults: FaultsConfig | None = None,
) -> MaskedUpdate:
    attempt = task_run.get_run_count()
    return parties.train_masked(
        KEYS, ref, inbox, session, roster, broadcast, cfg, round_num, faults, attempt
    )


@task(
    name="secagg-consistency",
    task_run_name="secagg-consistency-r{round_num:02d}-{ref.client_id}",
    **TASK_OPTIONS,
)
def consistency_check(
    ref: ClientRef,
    inbox: list[EncryptedShare],
    session: str,
    roster: list[AdvertisedKeys],
    survivors: list[int],
    round_num: int,
) -> bytes:
    return parties.consistency_check(KEYS, ref, inbox, session, roster, survivors, round_num)


@task(
    name="secagg-unmask",
    task_run_name="secagg-unmask-r{round_num:02d}-{ref.client_id}",
    **TASK_OPTIONS,
)
def unmasking_shares(
    ref: ClientRef,
    inbox: list[EncryptedShare],
    session: str,
    roster: list[AdvertisedKeys],
    survivors: list[int],
    signatures: dict[int, bytes],
    round_num: int,
) -> UnmaskingResponse:
    return parties.unmasking_shares(
        KEYS, ref, inbox, session, roster, survivors, signatures, round_num
    )


def _statistics_round(step: Task[..., Any], what: str) -> Task[..., Any]:
    """A protocol step as the statistics round runs it: the same task, its runs named
    ``stats-{what}-{client}`` (the round is not a training round)."""
    return step.with_options(
        name=f"secagg-stats-{what}", task_run_name=f"stats-{what}-{{ref.client_id}}"
    )


STEPS: dict[str, Task[..., Any]] = {
    "setup": make_keys,
    "run-train": train_run_masked,
    "run-consistency": run_consistency,
    "run-unmask": run_unmasking,
    "round-keys": advertise_keys,
    "round-shares": share_keys,
    "round-train": train_masked,
    "round-consistency": consistency_check,
    "round-unmask": unmasking_shares,
    "stats-schema": statistics_schema,
    "stats-run-masked": statistics_run_masked,
    "stats-run-consistency": _statistics_round(run_consistency, "consistency"),
    "stats-run-unmask": _statistics_round(run_unmasking, "unmask"),
    "stats-round-keys": _statistics_round(advertise_keys, "keys"),
    "stats-round-shares": _statistics_round(share_keys, "shares"),
    "stats-round-masked": statistics_round_masked,
    "stats-round-consistency": _statistics_round(consistency_check, "consistency"),
    "stats-round-unmask": _statistics_round(unmasking_shares, "unmask"),
}
"""The task of every client step of :data:`fl.secagg.parties.STEPS`."""


def expire(session: str) -> None:
    KEYS.expire(session)
