"""Client tasks of secure aggregation, one per exchange with the server.

Two protocols (``privacy.secagg_keys``): ``"run"`` (:mod:`fl.secagg_run`) makes each client's key
pair once per run, then masks and unmasks in two exchanges per round; ``"round"``
(:mod:`fl.secagg`, Bonawitz et al., 2017) makes fresh keys and shares every round, in four.

A client's secrets live only on the client: in a key store in the client's own process,
created when it makes its keys and dropped once the run (``"run"``) or the round (``"round"``)
is over.
They never appear in task parameters or results. (With Prefect's thread runner every simulated
client shares this process; a task runner that moves a client's steps between processes turns
into a dropout, which the protocol tolerates up to its threshold.)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from prefect import task

from fl.config import ClientConfig, FaultsConfig
from fl.data import ClientRef
from fl.params import FeatureStats, MaskedUpdate, ModelParams
from fl.privacy import client_contribution
from fl.secagg import (
    AdvertisedKeys,
    EncryptedShare,
    FixedPoint,
    SecAggClient,
    UnmaskingResponse,
)
from fl.secagg_run import PublicKey, Quorum, RunKeysClient, Unmasking
from tasks import TASK_OPTIONS
from tasks.client import local_update

_KEYSTORE: dict[tuple[str, str], SecAggClient | RunKeysClient] = {}
_LOCK = threading.Lock()


def _party(session: str, ref: ClientRef) -> SecAggClient | RunKeysClient:
    with _LOCK:
        party = _KEYSTORE.get((session, ref.client_id))
    if party is None:
        raise RuntimeError(
            f"client {ref.client_id!r}: no secure-aggregation keys (it took no part in the key "
            "setup, or they expired)"
        )
    return party


def _train_and_mask(
    ref: ClientRef,
    global_params: ModelParams,
    stats: FeatureStats,
    cfg: ClientConfig,
    clip_norm: float,
    round_num: int,
    faults: FaultsConfig | None,
    mask: Callable[[np.ndarray], Any],
) -> MaskedUpdate:
    """Train, clip the update (the DP-FedAvg contribution) and mask it; the scalars travel
    alongside, as in a plain update."""
    update = local_update(ref, global_params, stats, cfg, round_num, faults)
    contribution = client_contribution(global_params, update.params, clip_norm)
    return MaskedUpdate(
        update.client_id, mask(contribution), update.num_examples, update.metrics, update.evaluation
    )


@task(
    name="secagg-keys", task_run_name="secagg-keys-r{round_num:02d}-{ref.client_id}", **TASK_OPTIONS
)
def advertise_keys(
    ref: ClientRef, session: str, threshold: int, codec: FixedPoint, round_num: int
) -> AdvertisedKeys:
    party = SecAggClient(ref.index, threshold, codec)  # fresh secrets from the OS, every round
    with _LOCK:
        _KEYSTORE[(session, ref.client_id)] = party
    return party.advertise_keys()


@task(
    name="secagg-shares",
    task_run_name="secagg-shares-r{round_num:02d}-{ref.client_id}",
    **TASK_OPTIONS,
)
def share_keys(
    ref: ClientRef, session: str, roster: list[AdvertisedKeys], round_num: int
) -> list[EncryptedShare]:
    return _party(session, ref).share_keys(roster)


@task(
    name="train-client-masked",
    task_run_name="train-r{round_num:02d}-{ref.client_id}",
    **TASK_OPTIONS,
)
def train_masked(
    ref: ClientRef,
    session: str,
    roster: list[AdvertisedKeys],
    inbox: list[EncryptedShare],
    global_params: ModelParams,
    stats: FeatureStats,
    cfg: ClientConfig,
    clip_norm: float,
    round_num: int,
    faults: FaultsConfig | None = None,
) -> MaskedUpdate:
    party = _party(session, ref)
    return _train_and_mask(
        ref, global_params, stats, cfg, clip_norm, round_num, faults,
        lambda x: party.masked_input(x, roster, inbox),
    )  # fmt: skip


@task(
    name="secagg-unmask",
    task_run_name="secagg-unmask-r{round_num:02d}-{ref.client_id}",
    **TASK_OPTIONS,
)
def unmasking_shares(
    ref: ClientRef,
    session: str,
    roster: list[AdvertisedKeys],
    inbox: list[EncryptedShare],
    survivors: list[int],
    round_num: int,
) -> UnmaskingResponse:
    try:
        return _party(session, ref).unmasking_shares(roster, inbox, survivors)
    finally:
        with _LOCK:
            _KEYSTORE.pop((session, ref.client_id), None)


# --- keys once per run (fl.secagg_run) -------------------------------------------------------


@task(name="secagg-setup", task_run_name="secagg-setup-{ref.client_id}", **TASK_OPTIONS)
def make_run_keys(ref: ClientRef, session: str) -> PublicKey:
    party = RunKeysClient(ref.index)  # fresh secrets from the OS, once per run
    with _LOCK:
        _KEYSTORE[(session, ref.client_id)] = party
    return party.public_key()


@task(
    name="train-client-masked",
    task_run_name="train-r{round_num:02d}-{ref.client_id}",
    **TASK_OPTIONS,
)
def train_run_masked(
    ref: ClientRef,
    session: str,
    roster: list[PublicKey],
    quorum: Quorum,
    codec: FixedPoint,
    global_params: ModelParams,
    stats: FeatureStats,
    cfg: ClientConfig,
    clip_norm: float,
    round_num: int,
    faults: FaultsConfig | None = None,
) -> MaskedUpdate:
    party = _party(session, ref)
    return _train_and_mask(
        ref, global_params, stats, cfg, clip_norm, round_num, faults,
        lambda x: party.masked_input(x, round_num, roster, quorum, codec),
    )  # fmt: skip


@task(
    name="secagg-unmask",
    task_run_name="secagg-unmask-r{round_num:02d}-{ref.client_id}",
    **TASK_OPTIONS,
)
def run_unmasking(
    ref: ClientRef,
    session: str,
    survivors: list[int],
    dropped: list[int],
    inbox: dict[int, bytes],
    round_num: int,
) -> Unmasking:
    return _party(session, ref).unmasking(round_num, survivors, dropped, inbox)


def expire(session: str) -> None:
    """Drop whatever keys a session left behind: a client discards its secrets once the run
    (or, for per-round keys, the round) is over, whether it answered or not."""
    with _LOCK:
        for key in [k for k in _KEYSTORE if k[0] == session]:
            del _KEYSTORE[key]
