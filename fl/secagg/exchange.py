"""Secure aggregation as an exchange: after each round the server holds the *sum* of the
surviving clients' contributions (:class:`fl.strategies.aggregation.Contribution`), example
counts, training losses and evaluation sums (:mod:`fl.secagg.scalars`), and nothing about any
one of them.

The server's side of both protocols, one method per exchange with the clients, written against
:class:`fl.secagg.parties.Parties`, so it runs the same in-process and over Prefect tasks. When
the run opens, the clients' side is enrolled and every client makes its identity key
(:mod:`fl.secagg.identity`). ``privacy.secagg_keys = "run"`` (default,
:mod:`fl.secagg.run_keys`): the same setup exchange makes each client's key pair, then three
exchanges per round (masked updates, consistency check, unmasking). ``"round"``
(:mod:`fl.secagg.bonawitz`): five exchanges every round (keys, shares, masked updates,
consistency check, unmasking), which recovers from dropouts at any step.

Secure aggregation is independent of DP: without DP the sum is FedAvg's (example counts summed
masked, inside the vector); with DP the contributions are clipped and the server adds the noise
to the recovered sum.

The feature statistics are a secure round too (:meth:`SecureExchange.summed_statistics`,
:mod:`fl.secagg.statistics`): round 0, after the keys are set up and before any training round,
over the same protocol code with step names of its own (``stats-...``).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from fedtune.fl.config import FLConfig
from fedtune.fl.data import ClientRef
from fedtune.fl.exchange import Broadcast, Exchange, Failures, Returned
from fedtune.fl.secagg import scalars
from fedtune.fl.secagg.bonawitz import SecAggServer
from fedtune.fl.secagg.identity import PublicParameters
from fedtune.fl.secagg.parties import Parties
from fedtune.fl.secagg.primitives import Codec, SecAggAbort, Segments
from fedtune.fl.secagg.run_keys import Quorum, RunKeysServer
from fedtune.fl.secagg.statistics import STATISTICS_ROUND, StatisticsRequest
from fedtune.fl.statistics import SummedStatistics, consistent_schemas


@dataclass
class _Sum:
    """What one secure round gives the server: the decoded sum, the survivors (the clients in
    it), their masked answers, and the survivors that did not sign or unmask."""

    total: Any
    survivors: list[int]
    masked: dict[int, Any]
    silent: Failures


class SecureExchange:
    """Final scores travel over ``plain``; the feature statistics (:meth:`summed_statistics`)
    and every round's updates travel masked, over ``parties``."""

    def __init__(self, plain: Exchange, parties: Parties, config: FLConfig):
        self.plain = plain
        self.parties = parties
        self.config = config
        self.session = uuid.uuid4().hex
        self.keys: dict[int, Any] = {}

    def statistics(self, refs):
        raise RuntimeError(
            "privacy.secure_aggregation: the feature moments would travel in the clear; the "
            "statistics are a secure round of their own (summed_statistics)"
        )

    def final(self, refs, params, stats, champion, rounds):
        return self.plain.final(refs, params, stats, champion, rounds)

    def open(self, refs: list[ClientRef]) -> float:
        """Enrol the run on the clients' side; every client publishes its identity key and,
        with keys once per run, makes its key pair. Comes before the statistics round."""
        started = time.perf_counter()
        self.plain.open(refs)  # whatever the plain exchange checks before any client task
        self.parameters = PublicParameters.of(self.config)
        self.parties.enroll(self.session)
        run_keys = self.config.privacy.secagg_keys == "run"
        self.keys, _ = self.parties.call("setup", refs, (self.session, run_keys))
        return time.perf_counter() - started

    def summed_statistics(self, refs: list[ClientRef], clip_norm: float | None) -> SummedStatistics:
        """The feature statistics as a secure round (:mod:`fl.secagg.statistics`): every client
        sends its feature names in the clear, then the clients that share the majority's
        features mask their moments (under DP, ``clip_norm``: their clipped ``[means | stds]``)
        and the server learns their sum. Raises :class:`SecAggAbort` when the round fails
        closed."""
        failures = self._outside_the_setup(refs)
        refs = [ref for ref in refs if ref.index in self.keys]
        by_index = {ref.index: ref for ref in refs}
        chunk = self.config.client.chunk_size
        schemas = self._call("stats-schema", refs, (self.session, chunk), failures)
        kept, mismatched = consistent_schemas(
            [(by_index[i].client_id, names) for i, names in schemas.items()]
        )
        failures += mismatched
        cohort = [ref for ref in refs if ref.client_id in kept]
        if not cohort:
            return SummedStatistics([], None, [], failures)
        request = StatisticsRequest(tuple(schemas[cohort[0].index]), clip_norm)
        codec, r = request.codec(), STATISTICS_ROUND
        if self.config.privacy.secagg_keys == "run":
            step = ("stats-", "stats-run-masked", (request, chunk, r))
            summed = self._run_keys_sum(cohort, failures, r, codec, step)
        else:
            step = ("stats-", "stats-round-masked", (self.session, request, chunk, r))
            summed = self._fresh_keys_sum(cohort, failures, r, codec, step)
        included = [by_index[i].client_id for i in summed.survivors]
        return SummedStatistics(list(request.features), summed.total, included, failures)

    def train(self, sampled: list[ClientRef], broadcast: Broadcast, round_num: int) -> Returned:
        timeout = self.config.rounds.round_timeout_s
        until = None if timeout is None else time.perf_counter() + timeout
        failures = self._outside_the_setup(sampled)
        cohort = [ref for ref in sampled if ref.index in self.keys]
        codec = self._codec(broadcast, len(cohort))
        r = round_num
        tail = (broadcast, self.config.client, r, self.config.injected_faults)
        if self.config.privacy.secagg_keys == "run":
            step = ("", "run-train", tail)  # a client that fails drops out
            summed = self._run_keys_sum(cohort, failures, r, codec, step, until)
        else:
            step = ("", "round-train", tail)
            summed = self._fresh_keys_sum(cohort, failures, r, codec, step, until)
        updates = [summed.masked[i] for i in summed.survivors]
        return _returned(broadcast, summed.total, updates, failures, summed.silent)

    def close(self) -> None:
        self.parties.expire(self.session)

    # -- the two protocols ----------------------------------------------------------------------

    def _outside_the_setup(self, refs: list[ClientRef]) -> Failures:
        return [
            (ref.client_id, "took no part in the secure-aggregation setup")
            for ref in refs
            if ref.index not in self.keys
        ]

    def _quorum(self, n: int, round_num: int, committee: int | None = None) -> Quorum:
        floor = self.parameters.min_cohort
        quorum = Quorum.of(n, self.config.privacy.secagg_threshold, committee, floor)
        if n < quorum.survivors:
            raise SecAggAbort(
                f"round {round_num}: {n} client(s) can take part; secure aggregation needs at "
                f"least {quorum.survivors}"
            )
        return quorum

    def _codec(self, broadcast: Broadcast, n: int) -> Segments:
        size = broadcast.params.num_features + 3
        codec = scalars.round_codec(broadcast.contribution, size, n)
        codec.check_capacity(n)
        return codec

    def _call(self, step, refs, shared, failures: Failures, each=None, until=None) -> dict:
        timeout = None if until is None else until - time.perf_counter()
        answered, failed = self.parties.call(step, refs, shared, each, timeout)
        failures += [f for f in failed if f[0] not in {cid for cid, _ in failures}]
        return answered

    def _run_keys_sum(
        self,
        cohort: list[ClientRef],
        failures: Failures,
        r: int,
        codec: Codec,
        step: tuple[str, str, tuple],
        until: float | None = None,
    ) -> _Sum:
        """One round with keys once per run. ``step``: the prefix of the round's step names,
        the masked step and what it takes after ``(session, roster, quorum, codec)``."""
        prefix, masking, tail = step
        quorum = self._quorum(len(cohort), r, self.config.privacy.committee_size)
        ids = [ref.index for ref in cohort]
        by_index = {ref.index: ref for ref in cohort}
        server = RunKeysServer(r, ids, quorum, codec, codec.size)
        roster = [self.keys[i] for i in ids]
        shared = (self.session, roster, quorum, codec, *tail)
        masked = self._call(masking, cohort, shared, failures, until=until)
        survivors, _, inboxes = server.collect_masked_inputs(
            {i: m.masked for i, m in masked.items()}
        )
        silent: Failures = []  # in the sum, but did not sign or unmask
        survivor_refs = [by_index[i] for i in survivors]
        check = (self.session, survivors, r)
        signed = self._call(f"{prefix}run-consistency", survivor_refs, check, silent)
        signatures = server.collect_signatures(signed)
        # The share holders the sum needs (everyone, if somebody dropped); more if some fail.
        asked: set[int] = set()
        responses: dict = {}
        while ask := server.to_ask(asked, responses.keys()):
            asked.update(ask)
            refs = [by_index[i] for i in ask]
            inbox = [inboxes[i] for i in ask]
            unmask = (self.session, survivors, signatures, r)
            responses |= self._call(f"{prefix}run-unmask", refs, unmask, silent, inbox)
        total = server.unmask(list(responses.values()))
        return _Sum(total, survivors, masked, silent)

    def _fresh_keys_sum(
        self,
        cohort: list[ClientRef],
        failures: Failures,
        r: int,
        codec: Codec,
        step: tuple[str, str, tuple],
        until: float | None = None,
    ) -> _Sum:
        """One round with fresh keys, in a key session of its own. ``step``: the prefix of the
        round's step names, the masked step and what it takes after ``(session, roster)``."""
        session = uuid.uuid4().hex
        try:
            return self._fresh_keys_session(cohort, failures, r, codec, step, until, session)
        finally:
            self.parties.expire(session)

    def _fresh_keys_session(
        self,
        cohort: list[ClientRef],
        failures: Failures,
        r: int,
        codec: Codec,
        step: tuple[str, str, tuple],
        until: float | None,
        session: str,
    ) -> _Sum:
        prefix, masking, tail = step
        threshold = self._quorum(len(cohort), r).survivors
        server = SecAggServer(threshold, codec, dimension=codec.size)
        by_index = {ref.index: ref for ref in cohort}
        advertise = (session, self.session, threshold, codec, r)
        keys = self._call(f"{prefix}round-keys", cohort, advertise, failures)
        roster = server.collect_keys(list(keys.values()))
        cohort = [by_index[i] for i in keys]
        shares = self._call(f"{prefix}round-shares", cohort, (session, roster, r), failures)
        inboxes = server.route_shares(list(shares.values()))
        cohort = [by_index[i] for i in inboxes]
        each = [inboxes[ref.index] for ref in cohort]
        masked = self._call(masking, cohort, (session, roster, *tail), failures, each, until)
        survivors = server.collect_masked_inputs({i: m.masked for i, m in masked.items()})
        silent: Failures = []  # in the sum, but did not sign or unmask
        cohort = [by_index[i] for i in survivors]
        each = [inboxes[i] for i in survivors]
        check = (session, roster, survivors, r)
        signed = self._call(f"{prefix}round-consistency", cohort, check, silent, each)
        signatures = server.collect_signatures(signed)
        cohort = [by_index[i] for i in signatures]  # U4: the signers unmask
        each = [inboxes[i] for i in signatures]
        unmask = (session, roster, survivors, signatures, r)
        responses = self._call(f"{prefix}round-unmask", cohort, unmask, silent, each)
        total = server.unmask(list(responses.values()))
        return _Sum(total, survivors, masked, silent)


def _returned(
    broadcast: Broadcast, total: np.ndarray, updates: list, failures: Failures, silent: Failures
) -> Returned:
    """The round's outcome from the unmasked sum: the contributions' sum for the strategy, the
    summed scalars for the round's metrics."""
    size = broadcast.params.num_features + 3
    sums = scalars.RoundScalars.from_sum(total[size:], broadcast.stats)
    return Returned(
        updates,
        failures,
        total[:size],
        silent,
        evaluation=sums.evaluation,
        train_loss=sums.train_loss,
    )
