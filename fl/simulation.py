"""The round engine with every client in this process: the plain-Python reference.

The Prefect flow runs the same engine (:mod:`fl.engine`) over Prefect tasks; for the same
configuration (and, under DP, the same injected noise generator) both give the same model bit
for bit. It is also the quickest way to try a configuration in a notebook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fedtune.fl.config import FLConfig
from fedtune.fl.engine import Outcome, Run
from fedtune.fl.exchange import Exchange, InProcess
from fedtune.fl.params import FeatureStats, ModelParams


@dataclass
class SimulationResult:
    params: ModelParams
    stats: FeatureStats
    feature_names: list[str]
    history: list[dict[str, Any]] = field(default_factory=list)
    initial: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False
    excluded: list[tuple[str, str]] = field(default_factory=list)
    outcome: Outcome | None = None


def in_process_exchange(config: FLConfig) -> Exchange:
    """Every client in this process; under secure aggregation, the real protocol in-process."""
    if config.privacy.secure_aggregation:
        from fedtune.fl.secagg.exchange import SecureExchange
        from fedtune.fl.secagg.parties import InProcessParties

        return SecureExchange(InProcess(config), InProcessParties(config), config)
    return InProcess(config)


def simulate(config: FLConfig, rng: np.random.Generator | None = None) -> SimulationResult:
    """Train ``config`` with every client in this process. ``rng`` is the DP noise source
    (secret by default; pass a seeded one only to reproduce a run in a test)."""
    exchange = in_process_exchange(config)
    try:
        run = Run.setup(config, exchange, rng=rng)
        state = run.start()
        for _ in run.rounds(state):
            pass
        outcome = run.finish(state)
    finally:
        exchange.close()
    return SimulationResult(
        state.params,
        run.stats,
        run.names,
        state.history,
        state.initial,
        state.stopped_early,
        run.excluded,
        outcome,
    )
