"""One round of secure aggregation, as the server runs it: four exchanges with the sampled
clients (keys, shares, masked updates, unmasking), after which the server holds the *sum* of
their clipped updates and nothing about any one of them (Bonawitz et al., 2017)."""

from __future__ import annotations

import math
import uuid

import numpy as np
from prefect import unmapped
from prefect.utilities.annotations import quote

from fl.config import FLConfig
from fl.data import ClientRef
from fl.params import FeatureStats, MaskedUpdate, ModelParams
from fl.secagg import FixedPoint, SecAggAbort, SecAggServer
from flows.outcomes import collect
from tasks.secure_aggregation import (
    advertise_keys,
    expire,
    share_keys,
    train_masked,
    unmasking_shares,
)


def _outcomes(futures, refs: list[ClientRef], failures: list[tuple[str, str]]) -> dict:
    """``{client index: result}`` of the clients that answered; the rest join ``failures``."""
    answered, failed = collect(futures, refs)
    failures += failed
    return answered


def secure_round(
    sampled: list[ClientRef],
    params: ModelParams,
    stats: FeatureStats,
    config: FLConfig,
    clip_norm: float,
    round_num: int,
) -> tuple[np.ndarray, list[MaskedUpdate], list[tuple[str, str]]]:
    """The sum of the surviving clients' contributions, their (masked) updates, and the
    failures. Raises :class:`SecAggAbort` when too few clients remain to unmask: the round
    then fails closed and the global model stays as it was."""
    n = len(sampled)
    threshold = max(2, math.ceil(config.privacy.secagg_threshold * n))
    if n < threshold:
        raise SecAggAbort(
            f"round {round_num}: {n} client(s) sampled; secure aggregation needs at least "
            f"{threshold}"
        )
    codec = FixedPoint(bound=max(clip_norm, 1.0))
    codec.check_capacity(n)
    server = SecAggServer(threshold, codec, dimension=params.num_features + 2)
    session = uuid.uuid4().hex
    by_index = {ref.index: ref for ref in sampled}
    failures: list[tuple[str, str]] = []
    r = round_num
    try:
        keys = _outcomes(
            advertise_keys.map(sampled, session, threshold, unmapped(codec), r), sampled, failures
        )
        roster = server.collect_keys(list(keys.values()))
        cohort = [by_index[i] for i in keys]
        shares = _outcomes(share_keys.map(cohort, session, unmapped(roster), r), cohort, failures)
        inboxes = server.route_shares(list(shares.values()))
        cohort = [by_index[i] for i in inboxes]
        masked = _outcomes(
            train_masked.map(
                cohort,
                session,
                unmapped(quote(roster)),
                [quote(inboxes[ref.index]) for ref in cohort],
                unmapped(quote(params)),
                unmapped(quote(stats)),
                unmapped(quote(config.client)),
                clip_norm,
                r,
            ),
            cohort,
            failures,
        )
        survivors = server.collect_masked_inputs({i: m.masked for i, m in masked.items()})
        cohort = [by_index[i] for i in survivors]
        responses = _outcomes(
            unmasking_shares.map(
                cohort,
                session,
                unmapped(quote(roster)),
                [quote(inboxes[ref.index]) for ref in cohort],
                unmapped(survivors),
                r,
            ),
            cohort,
            failures,
        )
        total = server.unmask(list(responses.values()))
    finally:
        expire(session)
    return total, [masked[i] for i in survivors], failures
