"""The clients' side of secure aggregation: one function per protocol step, and the key store
where a client's secrets live.

Each step takes the :class:`KeyStore` of the place the client runs, the client's reference,
its own item of the step (an inbox of shares, if any), then what the server sends every client.
The server drives the steps through a :class:`Parties` (:mod:`fl.secagg.exchange`): in-process
(:class:`InProcessParties`, here) or as Prefect tasks (``flows/exchange.py``), which wrap these
same functions, so both run the same protocol code.

A client's secrets are made from the OS CSPRNG when it makes its keys, stay in its key store,
and are dropped once the run (``"run"`` keys, and every client's identity) or the round
(``"round"`` keys) is over. They never appear in a step's arguments or results. With the
default thread runner every simulated client shares one process (and one store); real
separation needs clients on their own workers.

The key store also holds what the clients know of a run *without the server*
(:mod:`fl.secagg.identity`): the run's directory of identity keys, in which each client
publishes its own at setup, and the public parameters, which the parties layer enrols from the
operator's configuration (:meth:`Parties.enroll`), never from a server's message.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from fedtune.fl import client as fl_client
from fedtune.fl import faults as fl_faults
from fedtune.fl.config import ClientConfig, FaultsConfig, FLConfig
from fedtune.fl.data import ClientDataError, ClientRef
from fedtune.fl.exchange import Broadcast, Failures, TimedOut, reason
from fedtune.fl.params import MaskedUpdate
from fedtune.fl.secagg import scalars
from fedtune.fl.secagg import statistics as secagg_statistics
from fedtune.fl.secagg.bonawitz import (
    AdvertisedKeys,
    EncryptedShare,
    SecAggClient,
    UnmaskingResponse,
)
from fedtune.fl.secagg.identity import Directory, Identity, Membership, PublicParameters
from fedtune.fl.secagg.primitives import Codec, Segments
from fedtune.fl.secagg.run_keys import PublicKey, Quorum, RunKeysClient, Unmasking
from fedtune.fl.secagg.statistics import StatisticsRequest
from fedtune.fl.statistics import StatsReport

Sleep = Callable[[float], None]


class KeyStore:
    """The protocol parties (and so the secrets) of the clients that run in this place, with
    each run's directory and public parameters."""

    def __init__(self) -> None:
        self._parties: dict[tuple[str, str], SecAggClient | RunKeysClient] = {}
        self._members: dict[tuple[str, str], Membership] = {}
        self._reports: dict[tuple[str, str], StatsReport] = {}
        self._runs: dict[str, tuple[Directory, PublicParameters]] = {}
        self._lock = threading.Lock()

    def enroll(self, session: str, parameters: PublicParameters) -> None:
        """Open run ``session``'s directory, with its public parameters."""
        with self._lock:
            known = self._runs.setdefault(session, (Directory(), parameters))
        if known[1] != parameters:
            raise RuntimeError(f"session {session}: enrolled with other parameters")

    def directory(self, session: str) -> Directory:
        """Run ``session``'s directory."""
        with self._lock:
            run = self._runs.get(session)
        if run is None:
            raise RuntimeError(f"session {session}: not enrolled (no directory to publish in)")
        return run[0]

    def join(self, session: str, ref: ClientRef) -> Membership:
        """The client's identity for run ``session``, fresh from the OS, published in the run's
        directory by the client itself."""
        directory = self.directory(session)
        identity = Identity(ref.index)
        directory.publish(ref.index, identity.public)
        member = Membership(identity, directory, self._runs[session][1])
        with self._lock:
            self._members[(session, ref.client_id)] = member
        return member

    def member(self, session: str, ref: ClientRef) -> Membership:
        return self._lookup(self._members, session, ref, "identity in this run", "setup")

    def put(self, session: str, ref: ClientRef, party: SecAggClient | RunKeysClient) -> None:
        with self._lock:
            self._parties[(session, ref.client_id)] = party

    def get(self, session: str, ref: ClientRef) -> Any:
        return self._lookup(self._parties, session, ref, "secure-aggregation keys", "key setup")

    def _lookup(self, table: dict, session: str, ref: ClientRef, what: str, step: str) -> Any:
        with self._lock:
            found = table.get((session, ref.client_id))
        if found is None:
            raise RuntimeError(
                f"client {ref.client_id!r}: no {what} (it took no part in the "
                f"secure-aggregation {step}, or it expired)"
            )
        return found

    def keep_report(self, session: str, ref: ClientRef, report: StatsReport) -> None:
        """Keep the client's feature moments between the statistics round's two steps."""
        with self._lock:
            self._reports[(session, ref.client_id)] = report

    def take_report(self, session: str, ref: ClientRef, chunk_size: int) -> StatsReport:
        """The moments kept for the client (read afresh if this place kept none), forgotten
        here once taken."""
        with self._lock:
            report = self._reports.pop((session, ref.client_id), None)
        return _feature_moments(ref, chunk_size) if report is None else report

    def drop(self, session: str, ref: ClientRef) -> None:
        with self._lock:
            self._parties.pop((session, ref.client_id), None)

    def expire(self, session: str) -> None:
        """Drop whatever keys a session left behind: a client discards its secrets once the run
        (or, for per-round keys, the round) is over, whether it answered or not."""
        with self._lock:
            for store in (self._parties, self._members, self._reports):
                for key in [k for k in store if k[0] == session]:
                    del store[key]
            self._runs.pop(session, None)


def _train_and_mask(
    ref: ClientRef,
    broadcast: Broadcast,
    cfg: ClientConfig,
    round_num: int,
    faults: FaultsConfig | None,
    attempt: int,
    sleep: Sleep,
    codec: Segments,
    mask: Callable[[Any], Any],
) -> MaskedUpdate:
    """Train, then mask the strategy's contribution and the scalars (count, loss, evaluation
    sums) as one vector: nothing that depends on the client's data travels in the clear."""
    with _public_data_errors():
        update = fl_faults.train(
            faults, ref, broadcast.params, broadcast.stats, cfg, round_num, attempt, sleep
        )
    contribution = broadcast.contribution.vector(broadcast.params, update)
    x = scalars.with_scalars(contribution, update, broadcast.stats, codec)
    return MaskedUpdate(update.client_id, mask(x))


# -- setup: every client's identity, and with keys once per run its key pair ------------------


def make_keys(store: KeyStore, ref: ClientRef, session: str, run_keys: bool) -> PublicKey | None:
    member = store.join(session, ref)
    if not run_keys:
        return None
    party = RunKeysClient(member, session)  # fresh secrets from the OS, once per run
    store.put(session, ref, party)
    return party.public_key()


# -- the feature statistics (fl.secagg.statistics) ---------------------------------------------


@contextmanager
def _public_data_errors() -> Iterator[None]:
    """A data error reaches the server as the client's reason: in its public form, which says
    what and where but quotes no value from the data (a cell, a constant target's value, which
    is the client's target mean and whole target column; :class:`fl.data.ClientDataError`)."""
    try:
        yield
    except ClientDataError as exc:
        exc.args = (exc.public,)
        raise


def _feature_moments(ref: ClientRef, chunk_size: int) -> StatsReport:
    """:func:`fl.client.feature_moments`, its data errors in their public form."""
    with _public_data_errors():
        return fl_client.feature_moments(ref, chunk_size)


def statistics_schema(store: KeyStore, ref: ClientRef, session: str, chunk_size: int) -> list[str]:
    """The statistics round's first step: read the moments, keep them, send the feature names
    only (a data error is the client's answer: it is set aside with the reason)."""
    report = _feature_moments(ref, chunk_size)
    store.keep_report(session, ref, report)
    return list(report.feature_names)


def _statistics_vector(
    store: KeyStore,
    ref: ClientRef,
    session: str,
    request: StatisticsRequest,
    chunk_size: int,
    codec: Codec,
    party: SecAggClient | RunKeysClient,
):
    report = store.take_report(session, ref, chunk_size)
    clip_norm = party.member.parameters.statistics_clip_norm  # the operator's, not the server's
    return secagg_statistics.checked_vector(report, request, codec, clip_norm)


def statistics_run_masked(
    store: KeyStore,
    ref: ClientRef,
    session: str,
    roster: list[PublicKey],
    quorum: Quorum,
    codec: Codec,
    request: StatisticsRequest,
    chunk_size: int,
    round_num: int,
) -> MaskedUpdate:
    """The statistics round's masked vector, with keys once per run."""
    party: RunKeysClient = store.get(session, ref)
    x = _statistics_vector(store, ref, session, request, chunk_size, codec, party)
    return MaskedUpdate(ref.client_id, party.masked_input(x, round_num, roster, quorum, codec))


def statistics_round_masked(
    store: KeyStore,
    ref: ClientRef,
    inbox: list[EncryptedShare],
    session: str,
    roster: list[AdvertisedKeys],
    run_session: str,
    request: StatisticsRequest,
    chunk_size: int,
    round_num: int,
) -> MaskedUpdate:
    """The statistics round's masked vector, with fresh keys (``session`` the round's key
    session, ``run_session`` the run's, where the moments were kept)."""
    party: SecAggClient = store.get(session, ref)
    x = _statistics_vector(store, ref, run_session, request, chunk_size, party.codec, party)
    return MaskedUpdate(ref.client_id, party.masked_input(x, roster, inbox))


# -- keys once per run (fl.secagg.run_keys) ----------------------------------------------------


def train_run_masked(
    store: KeyStore,
    ref: ClientRef,
    session: str,
    roster: list[PublicKey],
    quorum: Quorum,
    codec: Segments,
    broadcast: Broadcast,
    cfg: ClientConfig,
    round_num: int,
    faults: FaultsConfig | None = None,
    attempt: int = 1,
    sleep: Sleep = time.sleep,
) -> MaskedUpdate:
    party: RunKeysClient = store.get(session, ref)
    return _train_and_mask(
        ref, broadcast, cfg, round_num, faults, attempt, sleep, codec,
        lambda x: party.masked_input(x, round_num, roster, quorum, codec),
    )  # fmt: skip


def run_consistency(
    store: KeyStore, ref: ClientRef, session: str, survivors: list[int], round_num: int
) -> bytes:
    party: RunKeysClient = store.get(session, ref)
    return party.consistency(round_num, survivors)


def run_unmasking(
    store: KeyStore,
    ref: ClientRef,
    inbox: dict[int, bytes],
    session: str,
    survivors: list[int],
    signatures: dict[int, bytes],
    round_num: int,
) -> Unmasking:
    party: RunKeysClient = store.get(session, ref)
    return party.unmasking(round_num, survivors, signatures, inbox)


# -- fresh keys every round (fl.secagg.bonawitz) ------------------------------------------------


def advertise_keys(
    store: KeyStore,
    ref: ClientRef,
    session: str,
    run_session: str,
    threshold: int,
    codec: Segments,
    round_num: int,
) -> AdvertisedKeys:
    member = store.member(run_session, ref)
    # Fresh secrets from the OS every round; one key session per round and client.
    party = SecAggClient(member, session, round_num, threshold, codec)
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
        ref, broadcast, cfg, round_num, faults, attempt, sleep, party.codec,
        lambda x: party.masked_input(x, roster, inbox),
    )  # fmt: skip


def consistency_check(
    store: KeyStore,
    ref: ClientRef,
    inbox: list[EncryptedShare],
    session: str,
    roster: list[AdvertisedKeys],
    survivors: list[int],
    round_num: int,
) -> bytes:
    party: SecAggClient = store.get(session, ref)
    return party.consistency_check(roster, inbox, survivors)


def unmasking_shares(
    store: KeyStore,
    ref: ClientRef,
    inbox: list[EncryptedShare],
    session: str,
    roster: list[AdvertisedKeys],
    survivors: list[int],
    signatures: dict[int, bytes],
    round_num: int,
) -> UnmaskingResponse:
    try:
        party: SecAggClient = store.get(session, ref)
        return party.unmasking_shares(roster, inbox, survivors, signatures)
    finally:
        store.drop(session, ref)


STEPS: dict[str, Callable[..., Any]] = {
    "setup": make_keys,
    "run-train": train_run_masked,
    "run-consistency": run_consistency,
    "run-unmask": run_unmasking,
    "round-keys": advertise_keys,
    "round-shares": share_keys,
    "round-train": train_masked,
    "round-consistency": consistency_check,
    "round-unmask": unmasking_shares,
    # The statistics round: the same steps (and two of its own), named apart so that a
    # deployment can tell them from a training round's.
    "stats-schema": statistics_schema,
    "stats-run-masked": statistics_run_masked,
    "stats-run-consistency": run_consistency,
    "stats-run-unmask": run_unmasking,
    "stats-round-keys": advertise_keys,
    "stats-round-shares": share_keys,
    "stats-round-masked": statistics_round_masked,
    "stats-round-consistency": consistency_check,
    "stats-round-unmask": unmasking_shares,
}
"""Every client step, by the name the server calls it with."""

TRAINING_STEPS = frozenset({"run-train", "round-train"})
"""Steps in which the client trains: injected faults and the round deadline apply."""


class Parties(Protocol):
    """How the secure-aggregation server reaches the clients for one protocol step, and how
    the clients' side of a deployment learns a run's public parameters."""

    def enroll(self, session: str) -> None:
        """Open run ``session`` on the clients' side: its directory of identity keys, with the
        public parameters of the configuration this object was made with (the operator's, not
        anything the server sends)."""
        ...

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

    def enroll(self, session: str) -> None:
        self.store.enroll(session, PublicParameters.of(self.config))

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
