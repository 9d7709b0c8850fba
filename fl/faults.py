"""Injected faults for simulations: crashing, failing, slow and Byzantine clients, seeded so that
a run with faults is reproducible (and a retry is a fresh draw).

:func:`train` is what both the in-process exchange and the Prefect tasks run, so the faults act
the same in the plain loop and in the flow."""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import replace

import numpy as np
from fedtune.fl import client
from fedtune.fl.config import ClientConfig, FaultsConfig
from fedtune.fl.data import ClientRef
from fedtune.fl.params import ClientUpdate, FeatureStats, ModelParams

_STREAM_FAULTS = 51
_STREAM_BYZANTINE = 52
_STREAM_BYZANTINE_NOISE = 53


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


def is_byzantine(faults: FaultsConfig, seed: int, client_id: str) -> bool:
    """Whether ``client_id`` is Byzantine in runs seeded ``seed``: a uniform draw seeded by
    ``(seed, client id)`` alone falls below ``byzantine_fraction``.

    So about that fraction of the clients are Byzantine (a binomial count, not an exact one),
    and a client's role never depends on which other clients exist, answer or are sampled: it
    is the same in every exchange, round and retry, and needs no registry.
    """
    if not faults.byzantine_fraction:
        return False
    key = [seed, _STREAM_BYZANTINE, zlib.crc32(client_id.encode())]
    return bool(
        np.random.default_rng(np.random.SeedSequence(key)).random() < faults.byzantine_fraction
    )


def attack(
    faults: FaultsConfig,
    seed: int,
    round_num: int,
    global_params: ModelParams,
    update: ClientUpdate,
) -> ClientUpdate:
    """The update a Byzantine client sends instead of its honest ``update`` (which it returns
    unchanged if the client is honest). With ``delta`` the honest update minus the global model:
    ``sign-flip`` sends global - delta; ``scale`` sends global + ``byzantine_scale`` * delta;
    ``gaussian`` sends global + N(0, ``byzantine_scale``^2) noise in every coordinate, seeded by
    (seed, round, client). Example count and metrics stay the honest ones."""
    if not is_byzantine(faults, seed, update.client_id):
        return update
    base = global_params.to_vector()
    delta = update.params.to_vector() - base
    if faults.byzantine_kind == "sign-flip":
        sent = base - delta
    elif faults.byzantine_kind == "scale":
        sent = base + faults.byzantine_scale * delta
    else:
        key = [seed, _STREAM_BYZANTINE_NOISE, round_num, zlib.crc32(update.client_id.encode())]
        noise = np.random.default_rng(np.random.SeedSequence(key)).normal(size=base.shape)
        sent = base + abs(faults.byzantine_scale) * noise
    return replace(update, params=ModelParams.from_vector(sent))


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
    """:func:`fl.client.train`, failing, slowed (through ``sleep``), turned Byzantine or
    corrupted as ``faults`` (if any) says for this client, round and attempt."""
    if faults is None:
        return client.train(ref, global_params, stats, cfg, round_num)
    inject(faults, ref.seed, round_num, ref.client_id, attempt, sleep)
    honest = client.train(ref, global_params, stats, cfg, round_num)
    return corrupt(faults, attack(faults, ref.seed, round_num, global_params, honest))
