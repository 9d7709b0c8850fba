"""Secure aggregation as an exchange: after each round the server holds the *sum* of the
surviving clients' contributions (:class:`fl.strategies.aggregation.Contribution`) and nothing
about any one of them.

The server's side of both protocols, one method per exchange with the clients, written against
:class:`fl.secagg.parties.Parties`, so it runs the same in-process and over Prefect tasks.
``privacy.secagg_keys = "run"`` (default, :mod:`fl.secagg.run_keys`): a key-setup exchange when
the run starts, then two exchanges per round (masked updates, unmasking). ``"round"``
(:mod:`fl.secagg.bonawitz`): four exchanges every round (keys, shares, masked updates,
unmasking), which recovers from dropouts at any step.

Secure aggregation is independent of DP: without DP the sum is FedAvg's (example counts summed
masked, inside the vector); with DP the contributions are clipped and the server adds the noise
to the recovered sum.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fedtune.fl.config import FLConfig
from fedtune.fl.data import ClientRef
from fedtune.fl.exchange import Broadcast, Exchange, Failures, Returned
from fedtune.fl.secagg.bonawitz import SecAggServer
from fedtune.fl.secagg.parties import Parties
from fedtune.fl.secagg.primitives import FixedPoint, SecAggAbort
from fedtune.fl.secagg.run_keys import Quorum, RunKeysServer


class SecureExchange:
    """Statistics and final scores travel over ``plain``; every round's updates travel masked,
    over ``parties``."""

    def __init__(self, plain: Exchange, parties: Parties, config: FLConfig):
        self.plain = plain
        self.parties = parties
        self.config = config
        self.session = uuid.uuid4().hex
        self.keys: dict[int, Any] = {}

    def statistics(self, refs):
        return self.plain.statistics(refs)

    def final(self, refs, params, stats, champion, rounds):
        return self.plain.final(refs, params, stats, champion, rounds)

    def open(self, refs: list[ClientRef]) -> float:
        """With keys once per run, every client makes its key pair now."""
        if self.config.privacy.secagg_keys != "run":
            return 0.0
        started = time.perf_counter()
        self.keys, _ = self.parties.call("run-setup", refs, (self.session,))
        return time.perf_counter() - started

    def train(self, sampled: list[ClientRef], broadcast: Broadcast, round_num: int) -> Returned:
        timeout = self.config.rounds.round_timeout_s
        until = None if timeout is None else time.perf_counter() + timeout
        if self.config.privacy.secagg_keys == "run":
            return self._run_keys_round(sampled, broadcast, round_num, until)
        session = uuid.uuid4().hex
        try:
            return self._fresh_keys_round(sampled, broadcast, round_num, until, session)
        finally:
            self.parties.expire(session)

    def close(self) -> None:
        self.parties.expire(self.session)

    # -- the two protocols ----------------------------------------------------------------------

    def _quorum(self, n: int, round_num: int, committee: int | None = None) -> Quorum:
        quorum = Quorum.of(n, self.config.privacy.secagg_threshold, committee)
        if n < quorum.survivors:
            raise SecAggAbort(
                f"round {round_num}: {n} client(s) can take part; secure aggregation needs at "
                f"least {quorum.survivors}"
            )
        return quorum

    def _codec(self, broadcast: Broadcast, n: int) -> FixedPoint:
        codec = FixedPoint(bound=broadcast.contribution.bound(n))
        codec.check_capacity(n)
        return codec

    def _call(self, step, refs, shared, failures: Failures, each=None, until=None) -> dict:
        timeout = None if until is None else until - time.perf_counter()
        answered, failed = self.parties.call(step, refs, shared, each, timeout)
        failures += failed
        return answered

    def _run_keys_round(
        self, sampled: list[ClientRef], broadcast: Broadcast, r: int, until: float | None
    ) -> Returned:
        failures: Failures = [
            (ref.client_id, "took no part in the secure-aggregation key setup")
            for ref in sampled
            if ref.index not in self.keys
        ]
        cohort = [ref for ref in sampled if ref.index in self.keys]
        quorum = self._quorum(len(cohort), r, self.config.privacy.committee_size)
        codec = self._codec(broadcast, len(cohort))
        ids = [ref.index for ref in cohort]
        by_index = {ref.index: ref for ref in cohort}
        server = RunKeysServer(r, ids, quorum, codec, broadcast.params.num_features + 3)
        roster = [self.keys[i] for i in ids]
        shared = (self.session, roster, quorum, codec, broadcast, self.config.client, r)
        faults = self.config.injected_faults  # a client that fails drops out
        masked = self._call("run-train", cohort, (*shared, faults), failures, until=until)
        survivors, dropped, inboxes = server.collect_masked_inputs(
            {i: m.masked for i, m in masked.items()}
        )
        # The share holders the sum needs (everyone, if somebody dropped); more if some fail.
        asked: set[int] = set()
        responses: dict = {}
        silent: Failures = []
        while ask := server.to_ask(asked, responses.keys()):
            asked.update(ask)
            refs = [by_index[i] for i in ask]
            inbox = [inboxes[i] for i in ask]
            unmask = (self.session, survivors, dropped, r)
            responses |= self._call("run-unmask", refs, unmask, silent, inbox)
        total = server.unmask(list(responses.values()))
        return Returned([masked[i] for i in survivors], failures, total, silent)

    def _fresh_keys_round(
        self,
        sampled: list[ClientRef],
        broadcast: Broadcast,
        r: int,
        until: float | None,
        session: str,
    ) -> Returned:
        n = len(sampled)
        threshold = self._quorum(n, r).survivors
        codec = self._codec(broadcast, n)
        server = SecAggServer(threshold, codec, dimension=broadcast.params.num_features + 3)
        by_index = {ref.index: ref for ref in sampled}
        failures: Failures = []
        keys = self._call("round-keys", sampled, (session, threshold, codec, r), failures)
        roster = server.collect_keys(list(keys.values()))
        cohort = [by_index[i] for i in keys]
        shares = self._call("round-shares", cohort, (session, roster, r), failures)
        inboxes = server.route_shares(list(shares.values()))
        cohort = [by_index[i] for i in inboxes]
        shared = (session, roster, broadcast, self.config.client, r, self.config.injected_faults)
        each = [inboxes[ref.index] for ref in cohort]
        masked = self._call("round-train", cohort, shared, failures, each, until)
        survivors = server.collect_masked_inputs({i: m.masked for i, m in masked.items()})
        cohort = [by_index[i] for i in survivors]
        each = [inboxes[ref.index] for ref in cohort]
        silent: Failures = []
        unmask = (session, roster, survivors, r)
        responses = self._call("round-unmask", cohort, unmask, silent, each)
        total = server.unmask(list(responses.values()))
        return Returned([masked[i] for i in survivors], failures, total, silent)
