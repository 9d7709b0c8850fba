"""Secure aggregation as the server runs it: after each round the server holds the *sum* of
the surviving clients' clipped updates and nothing about any one of them.

``privacy.secagg_keys = "run"`` (default, :class:`RunKeys`): one key-setup exchange with every
client when the run starts, then two exchanges per round (masked updates, unmasking).
``"round"`` (:class:`RoundKeys`, Bonawitz et al., 2017): four exchanges every round (keys,
shares, masked updates, unmasking), which recovers from dropouts at any step.
"""

from __future__ import annotations

import time
import uuid
from typing import Protocol

import numpy as np
from prefect import unmapped
from prefect.utilities.annotations import quote

from fl.config import FaultsConfig, FLConfig
from fl.data import ClientRef
from fl.params import FeatureStats, MaskedUpdate, ModelParams
from fl.secagg import FixedPoint, SecAggAbort, SecAggServer
from fl.secagg_run import Quorum, RunKeysServer
from flows.outcomes import collect
from tasks.secure_aggregation import (
    advertise_keys,
    expire,
    make_run_keys,
    run_unmasking,
    share_keys,
    train_masked,
    train_run_masked,
    unmasking_shares,
)

RoundResult = tuple[np.ndarray, list[MaskedUpdate], list[tuple[str, str]]]
"""The sum of the survivors' contributions, their (masked) updates, and ``(client_id, reason)``
for every sampled client left out."""


class SecureAggregation(Protocol):
    def round(
        self,
        sampled: list[ClientRef],
        params: ModelParams,
        stats: FeatureStats,
        clip_norm: float,
        round_num: int,
        until: float | None = None,
    ) -> RoundResult:
        """One round's secure sum. Clients whose masked update has not arrived by
        ``time.perf_counter()`` ``until`` drop out. Raises :class:`SecAggAbort` when too few
        clients remain to unmask: the round then fails closed and the global model stays as it
        was."""

    def close(self) -> None:
        """Discard every client secret the protocol left behind."""


def open_secure_aggregation(refs: list[ClientRef], config: FLConfig, logger) -> SecureAggregation:
    """The protocol ``config.privacy.secagg_keys`` names, ready for its first round."""
    if config.privacy.secagg_keys == "round":
        return RoundKeys(config, logger)
    return RunKeys(refs, config, logger)


def _quorum(config: FLConfig, n: int, round_num: int, committee: int | None = None) -> Quorum:
    quorum = Quorum.of(n, config.privacy.secagg_threshold, committee)
    if n < quorum.survivors:
        raise SecAggAbort(
            f"round {round_num}: {n} client(s) can take part; secure aggregation needs at "
            f"least {quorum.survivors}"
        )
    return quorum


class RunKeys:
    """Keys once per run (:mod:`fl.secagg_run`)."""

    def __init__(self, refs: list[ClientRef], config: FLConfig, logger):
        self.config = config
        self.logger = logger
        self.faults = config.injected_faults  # a client that fails drops out
        self.session = uuid.uuid4().hex
        failures: list[tuple[str, str]] = []
        self.keys = _outcomes(
            make_run_keys.map([quote(ref) for ref in refs], self.session), refs, failures
        )
        for cid, why in failures:
            logger.warning("client %s: secure-aggregation key setup failed: %s", cid, why)

    def round(self, sampled, params, stats, clip_norm, round_num, until=None) -> RoundResult:
        failures = [
            (ref.client_id, "took no part in the secure-aggregation key setup")
            for ref in sampled
            if ref.index not in self.keys
        ]
        cohort = [ref for ref in sampled if ref.index in self.keys]
        quorum = _quorum(self.config, len(cohort), round_num, self.config.privacy.committee_size)
        codec = FixedPoint(bound=max(clip_norm, 1.0))
        ids = [ref.index for ref in cohort]
        by_index = {ref.index: ref for ref in cohort}
        server = RunKeysServer(round_num, ids, quorum, codec, params.num_features + 2)
        masked = _outcomes(
            train_run_masked.map(
                [quote(ref) for ref in cohort],
                self.session,
                unmapped(quote([self.keys[i] for i in ids])),
                unmapped(quote(quorum)),
                unmapped(quote(codec)),
                unmapped(quote(params)),
                unmapped(quote(stats)),
                unmapped(quote(self.config.client)),
                clip_norm,
                round_num,
                unmapped(quote(self.faults)),
            ),
            cohort,
            failures,
            until,
        )
        survivors, dropped, inboxes = server.collect_masked_inputs(
            {i: m.masked for i, m in masked.items()}
        )
        # The share holders the sum needs (everyone, if somebody dropped); more if some fail.
        asked: set[int] = set()
        responses: dict = {}
        while ask := server.to_ask(asked, responses.keys()):
            asked.update(ask)
            refs = [by_index[i] for i in ask]
            responses |= _unmasking(
                run_unmasking.map(
                    [quote(ref) for ref in refs],
                    self.session,
                    unmapped(quote(survivors)),
                    unmapped(quote(dropped)),
                    [quote(inboxes[i]) for i in ask],
                    round_num,
                ),
                refs,
                self.logger,
                round_num,
            )
        total = server.unmask(list(responses.values()))
        return total, [masked[i] for i in survivors], failures

    def close(self) -> None:
        expire(self.session)


class RoundKeys:
    """Fresh keys every round (:mod:`fl.secagg`, Bonawitz et al., 2017)."""

    def __init__(self, config: FLConfig, logger):
        self.config = config
        self.logger = logger
        self.faults = config.injected_faults  # a client that fails drops out

    def round(self, sampled, params, stats, clip_norm, round_num, until=None) -> RoundResult:
        return secure_round(
            sampled,
            params,
            stats,
            self.config,
            clip_norm,
            round_num,
            self.logger,
            self.faults,
            until,
        )

    def close(self) -> None:
        pass  # each round discards its own keys


def _outcomes(
    futures, refs: list[ClientRef], failures: list[tuple[str, str]], until: float | None = None
) -> dict:
    """``{client index: result}`` of the clients that answered (by ``time.perf_counter()``
    ``until``, if given); the rest join ``failures``."""
    timeout = None if until is None else until - time.perf_counter()
    answered, failed = collect(futures, refs, timeout)
    failures += failed
    return answered


def _unmasking(futures, refs: list[ClientRef], logger, round_num: int) -> dict:
    """Answers to an unmasking request. A survivor that does not answer is not left out of the
    round (its masked update is in the sum, if the sum can be unmasked): it is only logged."""
    silent: list[tuple[str, str]] = []
    answered = _outcomes(futures, refs, silent)
    for cid, why in silent:
        logger.warning(
            "round %d: client %s did not answer the unmasking request: %s", round_num, cid, why
        )
    return answered


def secure_round(
    sampled: list[ClientRef],
    params: ModelParams,
    stats: FeatureStats,
    config: FLConfig,
    clip_norm: float,
    round_num: int,
    logger,
    faults: FaultsConfig | None = None,
    until: float | None = None,
) -> RoundResult:
    """One round of Bonawitz et al.'s protocol with fresh keys (see
    :meth:`SecureAggregation.round`)."""
    n = len(sampled)
    threshold = _quorum(config, n, round_num).survivors
    codec = FixedPoint(bound=max(clip_norm, 1.0))
    codec.check_capacity(n)
    server = SecAggServer(threshold, codec, dimension=params.num_features + 2)
    session = uuid.uuid4().hex
    by_index = {ref.index: ref for ref in sampled}
    failures: list[tuple[str, str]] = []
    r = round_num
    try:
        keys = _outcomes(
            advertise_keys.map(
                [quote(ref) for ref in sampled], session, threshold, unmapped(quote(codec)), r
            ),
            sampled,
            failures,
        )
        roster = server.collect_keys(list(keys.values()))
        cohort = [by_index[i] for i in keys]
        shares = _outcomes(
            share_keys.map([quote(ref) for ref in cohort], session, unmapped(quote(roster)), r),
            cohort,
            failures,
        )
        inboxes = server.route_shares(list(shares.values()))
        cohort = [by_index[i] for i in inboxes]
        masked = _outcomes(
            train_masked.map(
                [quote(ref) for ref in cohort],
                session,
                unmapped(quote(roster)),
                [quote(inboxes[ref.index]) for ref in cohort],
                unmapped(quote(params)),
                unmapped(quote(stats)),
                unmapped(quote(config.client)),
                clip_norm,
                r,
                unmapped(quote(faults)),
            ),
            cohort,
            failures,
            until,
        )
        survivors = server.collect_masked_inputs({i: m.masked for i, m in masked.items()})
        cohort = [by_index[i] for i in survivors]
        responses = _unmasking(
            unmasking_shares.map(
                [quote(ref) for ref in cohort],
                session,
                unmapped(quote(roster)),
                [quote(inboxes[ref.index]) for ref in cohort],
                unmapped(quote(survivors)),
                r,
            ),
            cohort,
            logger,
            r,
        )
        total = server.unmask(list(responses.values()))
    finally:
        expire(session)
    return total, [masked[i] for i in survivors], failures
