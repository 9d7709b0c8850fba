"""The clients' side of secure aggregation: one function per protocol step, and the key store
where a client's secrets live.

Each step takes the :class:`KeyStore` of the place the client runs, the client's reference,
its own item of the step (an inbox of shares, if any), then what the server sends every client.
The server drives the steps through a :class:`Parties` (:mod:`fl.secagg.exchange`): in-process
(:class:`InProcessParties`, here) or as Prefect tasks (``flows/exchange.py``), which wrap these
same functions, so both run the same protocol code.

A client's secrets are made from the OS CSPRNG when it makes its keys, stay in its key store,
and are dropped once the run (``"run"`` keys) or the round (``"round"`` keys) is over. They never
appear in a step's arguments or results. With the default thread runner every simulated client
shares one process (and one store); real separation needs clients on their own workers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from fedtune.fl import faults as fl_faults
from fedtune.fl.config import ClientConfig, FaultsConfig, FLConfig
from fedtune.fl.data import ClientRef
from fedtune.fl.exchange import Broadcast, Failures, TimedOut, reason
from fedtune.fl.params import MaskedUpdate
from fedtune.fl.secagg.bonawitz import (
    AdvertisedKeys,
    EncryptedShare,
    SecAggClient,
    UnmaskingResponse,
)
from fedtune.fl.secagg.primitives import FixedPoint
from fedtune.fl.secagg.run_keys import PublicKey, Quorum, RunKeysClient, Unmasking

Sleep = Callable[[float], None]


class KeyStore:
    """The protocol parties (and so the secrets) of the clients that run in this place."""

    def __init__(self) -> None:
        self._parties: dict[tuple[str, str], SecAggClient | RunKeysClient] = {}
        self._lock = threading.Lock()

    def put(self, session: str, ref: ClientRef, party: SecAggClient | RunKeysClient) -> None:
        with self._lock:
            self._parties[(session, ref.client_id)] = party

    def get(self, session: str, ref: ClientRef) -> Any:
        with self._lock:
            party = self._parties.get((session, ref.client_id))
        if party is None:
            raise RuntimeError(
                f"client {ref.client_id!r}: no secure-aggregation keys (it took no part in the "
                "key setup, or they expired)"
            )
        return party

    def drop(self, session: str, ref: ClientRef) -> None:
        with self._lock:
            self._parties.pop((session, ref.client_id), None)

    def expire(self, session: str) -> None:
        """Drop whatever keys a session left behind: a client discards its secrets once the run
        (or, for per-round keys, the round) is over, whether it answered or not."""
        with self._lock:
            for key in [k for k in self._parties if k[0] == session]:
                del self._parties[key]


def _train_and_mask(
    ref: ClientRef,
    broadcast: Broadcast,
    cfg: ClientConfig,
    round_num: int,
    faults: FaultsConfig | None,
    attempt: int,
    sleep: Sleep,
    mask: Callable[[Any], Any],
) -> MaskedUpdate:
    """Train, form the strategy's contribution and mask it; the scalars travel alongside, as in
    a plain update."""
    update = fl_faults.train(
        faults, ref, broadcast.params, broadcast.stats, cfg, round_num, attempt, sleep
    )
    x = broadcast.contribution.vector(broadcast.params, update)
    return MaskedUpdate(
        update.client_id, mask(x), update.num_examples, update.metrics, update.evaluation
    )


# -- keys once per run (fl.secagg.run_keys) ----------------------------------------------------


def make_run_keys(store: KeyStore, ref: ClientRef, session: str) -> PublicKey:
    party = RunKeysClient(ref.index)  # fresh secrets from the OS, once per run
    store.put(session, ref, party)
    return party.public_key()


def train_run_masked(
    store: KeyStore,
    ref: ClientRef,
    session: str,
    roster: list[PublicKey],
    quorum: Quorum,
    codec: FixedPoint,
    broadcast: Broadcast,
    cfg: ClientConfig,
    round_num: int,
    faults: FaultsConfig | None = None,
    attempt: int = 1,
    sleep: Sleep = time.sleep,
) -> MaskedUpdate:
    party: RunKeysClient = store.get(session, ref)
    return _train_and_mask(
        ref, broadcast, cfg, round_num, faults, attempt, sleep,
        lambda x: party.masked_input(x, round_num, roster, quorum, codec),
    )  # fmt: skip


def run_unmasking(
    store: KeyStore,
    ref: ClientRef,
    inbox: dict[int, bytes],
    session: str,
    survivors: list[int],
    dropped: list[int],
    round_num: int,
) -> Unmasking:
    party: RunKeysClient = store.get(session, ref)
    return party.unmasking(round_num, survivors, dropped, inbox)


# -- fresh keys every round (fl.secagg.bonawitz) ------------------------------------------------


def advertise_keys(
    store: KeyStore, ref: ClientRef, session: str, threshold: int, codec: FixedPoint, round_num: int
) -> AdvertisedKeys:
    party = SecAggClient(ref.index, threshold, codec)  # fresh secrets from the OS, every round
    store.put(session, ref, party)
    return party.advertise_keys()


def share_keys(
    store: KeyStore, ref: ClientRef, session: str, roster: list[AdvertisedKeys], round_num: int
) -> list[EncryptedShare]:
    party: SecAggClient = store.get(session, ref)
    return party.share_keys(roster)


def train_masked(
    store: KeyStore,
    ref: ClientRef,
    inbox: list[EncryptedShare],
    session: str,
    roster: list[AdvertisedKeys],
    broadcast: Broadcast,
    cfg: ClientConfig,
    round_num: int,
    faults: FaultsConfig | None = None,
    attempt: int = 1,
    sleep: Sleep = time.sleep,
) -> MaskedUpdate:
    party: SecAggClient = store.get(session, ref)
    return _train_and_mask(
        ref, broadcast, cfg, round_num, faults, attempt, sleep,
        lambda x: party.masked_input(x, roster, inbox),
    )  # fmt: skip


def unmasking_shares(
    store: KeyStore,
    ref: ClientRef,
    inbox: list[EncryptedShare],
    session: str,
    roster: list[AdvertisedKeys],
    survivors: list[int],
    round_num: int,
) -> UnmaskingResponse:
    try:
        party: SecAggClient = store.get(session, ref)
        return party.unmasking_shares(roster, inbox, survivors)
    finally:
        store.drop(session, ref)


STEPS: dict[str, Callable[..., Any]] = {
    "run-setup": make_run_keys,
    "run-train": train_run_masked,
    "run-unmask": run_unmasking,
    "round-keys": advertise_keys,
    "round-shares": share_keys,
    "round-train": train_masked,
    "round-unmask": unmasking_shares,
}
"""Every client step, by the name the server calls it with."""

TRAINING_STEPS = frozenset({"run-train", "round-train"})
"""Steps in which the client trains: injected faults and the round deadline apply."""


class Parties(Protocol):
    """How the secure-aggregation server reaches the clients for one protocol step."""

    def call(
        self,
        step: str,
        refs: list[ClientRef],
        shared: tuple[Any, ...],
        each: list[Any] | None = None,
        timeout: float | None = None,
    ) -> tuple[dict[int, Any], Failures]:
        """Run ``STEPS[step](store, ref, [each[i]], *shared)`` for every client; return
        ``{client index: answer}`` and ``(client_id, reason)`` for those that failed or, with
        ``timeout``, answered later than ``timeout`` seconds."""
        ...

    def expire(self, session: str) -> None: ...


class InProcessParties:
    """Every client's steps in this process, one after another, with its secrets in this
    object's key store. Injected slowness is counted, not slept (as in
    :class:`fl.exchange.InProcess`)."""

    def __init__(self, config: FLConfig):
        self.config = config
        self.store = KeyStore()

    def call(self, step, refs, shared, each=None, timeout=None):
        answered: dict[int, Any] = {}
        failures: Failures = []
        for i, ref in enumerate(refs):
            mine = () if each is None else (each[i],)
            try:
                answered[ref.index] = self._one(step, ref, mine, shared, timeout)
            except Exception as exc:  # noqa: BLE001 -- a failed client drops out
                failures.append((ref.client_id, reason(exc)))
        return answered, failures

    def _one(self, step, ref, mine, shared, timeout):
        if step not in TRAINING_STEPS:
            return STEPS[step](self.store, ref, *mine, *shared)
        delayed = [0.0]
        started = time.perf_counter()
        answer = STEPS[step](self.store, ref, *mine, *shared, 1, delayed.append)
        if timeout is not None and time.perf_counter() - started + sum(delayed) > timeout:
            raise TimedOut(timeout)
        return answer

    def expire(self, session: str) -> None:
        self.store.expire(session)
