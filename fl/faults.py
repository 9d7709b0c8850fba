"""Injected faults for simulations: crashing, failing and slow clients, seeded so that a run
with faults is reproducible (and a retry is a fresh draw)."""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from fl import client
from fl.config import ClientConfig, FaultsConfig
from fl.data import ClientRef
from fl.params import ClientUpdate, FeatureStats, ModelParams

_STREAM_FAULTS = 51


class InjectedFault(RuntimeError):
    """A simulated client failure (transient: worth a retry)."""


def inject(
    faults: FaultsConfig,
    seed: int,
    round_num: int,
    client_id: str,
    attempt: int = 1,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Raise or delay (with ``sleep``) as ``faults`` says for this client, round and attempt."""
    if client_id in faults.always_fail:
        raise InjectedFault(f"client {client_id!r}: configured to always fail")
    if faults.crash_probability:
        key = [seed, _STREAM_FAULTS, round_num, zlib.crc32(client_id.encode()), attempt]
        if np.random.default_rng(np.random.SeedSequence(key)).random() < faults.crash_probability:
            raise InjectedFault(f"client {client_id!r}: simulated crash (round {round_num})")
    if faults.slowdown_s and client_id in faults.slow_clients:
        sleep(faults.slowdown_s)


def corrupt(faults: FaultsConfig, update: ClientUpdate) -> ClientUpdate:
    """The update a ``nan_clients`` client sends: its coefficients replaced by NaN."""
    if update.client_id not in faults.nan_clients:
        return update
    nan = ModelParams(np.full_like(update.params.coef, np.nan), float("nan"))
    return replace(update, params=nan)


def train(
    faults: FaultsConfig | None,
    ref: ClientRef,
    global_params: ModelParams,
    stats: FeatureStats,
    cfg: ClientConfig,
    round_num: int,
    attempt: int = 1,
    sleep: Callable[[float], None] = time.sleep,
) -> ClientUpdate:
    """:func:`fl.client.train`, failing, slowed (through ``sleep``) or corrupted as ``faults``
    (if any) says for this client, round and attempt."""
    if faults is None:
        return client.train(ref, global_params, stats, cfg, round_num)
    inject(faults, ref.seed, round_num, ref.client_id, attempt, sleep)
    return corrupt(faults, client.train(ref, global_params, stats, cfg, round_num))
