"""The round engine: one federated round, the same wherever its messages travel.

A :class:`Run` is set up once (the exchange opened, key setup included, then client statistics,
exclusions, feature statistics, privacy plan, strategy) and then plays rounds on a
:class:`RunState`:

    sample -> exchange with the clients -> screen -> score the previous model -> aggregate
    -> account for privacy -> evaluate centrally -> record (and checkpoint)

How the messages travel is the :class:`fl.exchange.Exchange` it is given: in-process
(:func:`fl.simulation.simulate`), Prefect tasks (``flows/training.py``) or secure aggregation.
There is no other round loop.

Federated evaluation rides along with training: the clients of round ``r + 1`` score ``w_r``
on their local test splits before training from it (one broadcast per round, not two), and
every client scores the final model once at the end (:meth:`Run.finish`). Early stopping looks
at that score, so a stop found in round ``r + 1`` keeps ``w_r`` and discards that round's
updates.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from fedtune.fl.client import FinalReport
from fedtune.fl.config import FLConfig
from fedtune.fl.data import ClientRef, central_test_set, duplicate_clients, registry
from fedtune.fl.evaluation import (
    EvalSums,
    central_evaluate,
    named,
    personalization_metrics,
    received_evaluation,
    train_loss,
)
from fedtune.fl.exchange import Broadcast, Exchange, Failures, Returned
from fedtune.fl.lifecycle import InitModel, Promotion, decide_promotion
from fedtune.fl.params import FeatureStats, ModelParams, screen_updates
from fedtune.fl.privacy import mechanisms
from fedtune.fl.privacy.accounting import Accountant
from fedtune.fl.privacy.plan import PrivacyPlan, budget_exhausted, plan_privacy, privacy_accountant
from fedtune.fl.privacy.statistics import dp_statistics, noised_statistics
from fedtune.fl.rounds import EarlyStopping, clients_per_round, sample_round
from fedtune.fl.secagg.primitives import SecAggAbort
from fedtune.fl.statistics import combine_reports, consistent_reports, pooled_from_sums
from fedtune.fl.strategies import Strategy, make_strategy


def wire_bytes(message: Any) -> int:
    """The size of one message as it travels between the server and a client (pickled, as
    Prefect serialises task parameters and results)."""
    return len(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


class RoundFailed(RuntimeError):
    """The run could not produce a model: no usable client, or no round succeeded."""


def _feature_statistics(
    config: FLConfig,
    exchange: Exchange,
    refs: list[ClientRef],
    noise: np.random.Generator | None,
) -> tuple[list[str], FeatureStats, set[str], Failures]:
    """The run's feature names and statistics (DP ones when ``noise`` is given), the ids of
    the clients that can take part and ``(client_id, reason)`` for those set aside. In the
    clear every client sends its moments; under secure aggregation the server learns only
    their sum (:meth:`fl.secagg.exchange.SecureExchange.summed_statistics`)."""
    p = config.privacy
    clip = None if noise is None else p.statistics_clip_norm
    duplicates = duplicate_clients(config.data)
    if not p.secure_aggregation:
        reports, failed = exchange.statistics(refs)
        reports, mismatched = consistent_reports(reports)
        excluded = duplicates + failed + mismatched
        _require_usable(reports, excluded)
        names, stats = combine_reports(reports)
        if noise is not None:
            z = p.statistics_noise_multiplier
            stats = dp_statistics(reports, len(refs), clip, z, noise)
        return names, stats, {r.client_id for r in reports}, excluded
    if not hasattr(exchange, "summed_statistics"):
        raise ValueError(
            "privacy.secure_aggregation: this exchange sends the feature moments in the clear; "
            "use fl.secagg's exchange"
        )
    try:
        summed = exchange.summed_statistics(refs, clip)
    except SecAggAbort as exc:
        # Fail closed: no statistics, so no run.
        raise RoundFailed(f"the feature statistics' secure round failed closed: {exc}") from None
    excluded = duplicates + summed.excluded
    _require_usable(summed.included, excluded)
    if noise is None:
        stats = pooled_from_sums(summed.total)
    else:
        z = p.statistics_noise_multiplier
        stats = noised_statistics(summed.total, len(refs), clip, z, noise)
    return summed.names, stats, set(summed.included), excluded


def _require_usable(usable: list, excluded: Failures) -> None:
    if not usable:
        raise RoundFailed("no client has usable data: " + "; ".join(w for _, w in excluded[:3]))


@dataclass
class RunState:
    """Everything a run carries from round to round; :meth:`Run.checkpoint` and
    :meth:`Run.resume` write and read it."""

    params: ModelParams
    strategy_state: Any
    stopper: EarlyStopping
    accountant: Accountant | None
    history: list[dict[str, Any]] = field(default_factory=list)
    """One entry per completed round: its metrics, and its federated score once it is in."""
    initial: dict[str, float] = field(default_factory=dict)
    """``initial_fed_*``: the starting model, scored by round 1's clients."""
    stopped_early: bool = False
    first_failure: str | None = None

    @property
    def next_round(self) -> int:
        return len(self.history) + 1


@dataclass
class RoundRecord:
    """What one round did, for whoever reports it (the flow logs it, the simulation keeps it)."""

    round: int
    failures: Failures = field(default_factory=list)
    silent: Failures = field(default_factory=list)
    """Clients that answered the round but not the unmasking request (not left out)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """The round's history entry (empty when the run stopped before aggregating)."""
    scored: dict[str, Any] | None = None
    """The previous round's history entry, now that this round's clients have scored it."""
    initial: dict[str, float] = field(default_factory=dict)
    failed: str | None = None
    """Why the round produced no new model (too few usable updates)."""
    aborted: str | None = None
    """Why secure aggregation failed closed."""
    stop: str | None = None
    """"budget" or "early": the run ends with this round."""
    checkpoint: dict[str, Any] | None = None
    wire: dict[str, int] = field(default_factory=dict)
    """``bytes_broadcast`` (the model and statistics, once per sampled client) and
    ``bytes_returned`` (the updates that came back), pickled as Prefect moves them."""


@dataclass
class Outcome:
    """What the end of a run adds: the final federated score, the personalization report and
    the promotion decision."""

    final: EvalSums
    scored: dict[str, Any] | None
    personalization: dict[str, float]
    promotion: Promotion | None


class Run:
    """A configured federated run over ``exchange``. Build it with :meth:`setup`."""

    def __init__(
        self,
        config: FLConfig,
        exchange: Exchange,
        refs: list[ClientRef],
        names: list[str],
        stats: FeatureStats,
        strategy: Strategy,
        plan: PrivacyPlan | None = None,
        excluded: Failures | None = None,
        secret: np.random.Generator | None = None,
    ):
        self.config = config
        self.exchange = exchange
        self.refs = refs
        self.names = names
        self.stats = stats
        self.strategy = strategy
        self.plan = plan
        self.excluded = excluded or []
        self.secret = secret
        """Under DP, the secret source of the Poisson sample (and of the noise): never seeded
        from the config, never logged or checkpointed."""
        clients_per_round(config.rounds, len(refs))  # fail now if too few clients are usable
        self.secure = config.privacy.secure_aggregation
        self.setup_seconds = 0.0

    @classmethod
    def setup(
        cls,
        config: FLConfig,
        exchange: Exchange,
        init: tuple[str, InitModel] | None = None,
        rng: np.random.Generator | None = None,
    ) -> Run:
        """Ready the exchange (key setup under secure aggregation), ask every client for its
        feature moments, set aside the clients that cannot take part (with a reason each), form
        the feature statistics (an ``init`` model's, when fine-tuning; DP ones under DP) and
        plan privacy. ``rng`` is the DP randomness (noise and sampling): the OS's CSPRNG unless
        a test injects a generator."""
        refs = registry(config.data, config.experiment.seed)
        # Under DP, N (the denominator, q * N) is the registered count: public, whatever the
        # clients' data turns out to be.
        plan = plan_privacy(config, len(refs))
        if plan is not None and rng is None:
            rng = mechanisms.secret_rng()
        # Keys first: under secure aggregation the statistics are a secure round of their own.
        setup_seconds = exchange.open(refs)
        # A child stream for the statistics' noise: the rounds' noise and sampling draw from
        # ``rng`` as they would without the statistics (a resumed run, which reuses its
        # released statistics, continues the same stream).
        noise = None if plan is None else rng.spawn(1)[0]
        names, stats, usable, excluded = _feature_statistics(config, exchange, refs, noise)
        refs = [ref for ref in refs if ref.client_id in usable]
        if init is not None:
            stats = init[1].stats_for(stats, init[0])
        strategy = make_strategy(config, plan, rng)
        run = cls(config, exchange, refs, names, stats, strategy, plan, excluded, rng)
        run.setup_seconds = setup_seconds
        return run

    # -- state ---------------------------------------------------------------------------------

    def start(self, init: InitModel | None = None) -> RunState:
        """Round 0: zeros, or the ``init`` model in this run's standardised space."""
        params = (
            ModelParams.zeros(len(self.names))
            if init is None
            else init.raw.to_standardised(self.stats)
        )
        rounds = self.config.rounds
        return RunState(
            params,
            self.strategy.init_state(),
            EarlyStopping(rounds.tolerance, rounds.patience),
            privacy_accountant(self.plan),
        )

    def checkpoint(self, state: RunState) -> dict[str, Any]:
        """The run state after its last completed round, as JSON-able values."""
        return {
            "round": len(state.history),
            "params": state.params.to_vector().tolist(),
            "strategy": self.strategy.save_state(state.strategy_state),
            "stopper": state.stopper.to_list(),
            "accountant": None if state.accountant is None else state.accountant.to_dict(),
            "first_failure": state.first_failure,
            # The statistics the models are standardised with, as released with every model:
            # a resumed DP run must go on with these, not release a second noisy version.
            "stats": self.stats.to_dict(),
        }

    def resume(self, checkpoint: dict[str, Any], history: list[dict[str, Any]]) -> RunState:
        """The state :meth:`checkpoint` wrote, with the rounds' ``history`` as recorded."""
        if "stats" in checkpoint:
            self.stats = FeatureStats.from_dict(checkpoint["stats"])
        elif self.plan is not None:
            # Statistics made afresh would be a second, unaccounted release of them.
            raise RoundFailed(
                "--resume: this DP run's checkpoint predates its released statistics; start a "
                "new run"
            )
        state = self.start()
        state.params = ModelParams.from_vector(np.asarray(checkpoint["params"], dtype=np.float64))
        state.strategy_state = self.strategy.load_state(checkpoint["strategy"])
        state.stopper.load(checkpoint["stopper"])
        if checkpoint["accountant"] is not None:
            state.accountant = Accountant.from_dict(checkpoint["accountant"])
        state.history = history[: checkpoint["round"]]
        state.first_failure = checkpoint["first_failure"]
        return state

    # -- rounds --------------------------------------------------------------------------------

    def rounds(self, state: RunState) -> Iterator[RoundRecord]:
        """The remaining rounds, one record each, until the last, a spent privacy budget or an
        early stop."""
        for r in range(state.next_round, self.config.rounds.num_rounds + 1):
            record = self.round(state, r)
            yield record
            if record.stop:
                return

    def sample(self, round_num: int) -> list[ClientRef]:
        q = None if self.plan is None else self.plan.sampling_rate
        cfg, seed = self.config.rounds, self.config.experiment.seed
        picked = sample_round(cfg, seed, q, len(self.refs), round_num, self.secret)
        return [self.refs[i] for i in picked]

    def round(self, state: RunState, r: int) -> RoundRecord:
        """Round ``r``: train ``w_r`` from ``state.params`` and record it in ``state``."""
        record = RoundRecord(r)
        if budget_exhausted(state.accountant, self.config.privacy.target_epsilon):
            record.stop = "budget"
            return record
        started = time.perf_counter()
        returned = self._exchange(state, r, record)
        updates, failures = returned.updates, returned.failures
        if returned.total is None:
            updates, rejected = screen_updates(
                updates, state.params, self.config.server.max_update_norm
            )
            failures = failures + rejected
        record.failures, record.silent = failures, returned.silent
        record.failed = self._too_few(updates, failures, r)
        state.first_failure = state.first_failure or record.failed
        if self._score_previous(state, r, updates, record, returned.evaluation):
            return record
        entry: dict[str, Any] = {"round": r}
        self._aggregate(state, updates, returned.total, entry, record.failed)
        entry.update(self._round_metrics(state, updates, failures, started, returned.train_loss))
        entry.update(record.wire)
        state.history.append(entry)
        record.metrics = entry
        if self.plan is not None and "central_mse" in entry:
            # Under DP the stop is decided on the server's held-out set (the clients' scores
            # are not noised) and keeps this round's model.
            if state.stopper.update(entry["central_mse"]):
                state.stopped_early = True
                record.stop = "early"
        record.checkpoint = self.checkpoint(state)
        return record

    def _exchange(self, state: RunState, r: int, record: RoundRecord) -> Returned:
        sampled = self.sample(r)
        contribution = self.strategy.contribution(state.strategy_state) if self.secure else None
        broadcast = Broadcast(state.params, self.stats, contribution)
        record.wire["bytes_broadcast"] = wire_bytes(broadcast) * len(sampled)
        try:
            returned = self.exchange.train(sampled, broadcast, r)
            record.wire["bytes_returned"] = sum(wire_bytes(u) for u in returned.updates)
            return returned
        except SecAggAbort as exc:
            # Fail closed: nothing is aggregated from these clients.
            record.aborted = str(exc)
            return Returned([], [(ref.client_id, str(exc)) for ref in sampled])

    def _too_few(self, updates: list, failures: Failures, r: int) -> str | None:
        """Why round ``r`` cannot aggregate, or None: fewer updates than ``rounds.min_clients``
        or than the strategy itself needs (Krum: more than 2f + 2). Under DP every round
        aggregates (an empty Poisson sample adds noise only): the number of clients is private."""
        if self.plan is not None:
            return None
        need = self.config.rounds.min_clients
        problem = (
            f"{len(updates)} usable update(s), rounds.min_clients is {need}"
            if len(updates) < need
            else self.strategy.too_few(len(updates))
        )
        if problem is None:
            return None
        reasons = "; ".join(f"{cid}: {why}" for cid, why in failures[:3])
        return f"round {r}: {problem} ({reasons})" if reasons else f"round {r}: {problem}"

    def _score_previous(
        self,
        state: RunState,
        r: int,
        updates: list,
        record: RoundRecord,
        summed: EvalSums | None = None,
    ) -> bool:
        """Credit the previous model with the score this round's clients gave it (``summed``,
        under secure aggregation); True when that score stops the run early (the previous model
        is kept)."""
        scores = received_evaluation(updates) if summed is None else summed
        fed = named("fed", scores) if updates else {}
        if r == 1:
            state.initial = record.initial = {f"initial_{k}": v for k, v in fed.items()}
            return False
        if not fed:
            return False
        state.history[-1].update(fed)
        record.scored = state.history[-1]
        if self.plan is None and state.stopper.update(fed["fed_mse"]):
            state.stopped_early = True
            record.stop = "early"
            return True
        return False

    def _aggregate(
        self,
        state: RunState,
        updates: list,
        total: np.ndarray | None,
        entry: dict[str, Any],
        failed: str | None,
    ) -> None:
        if failed:
            entry["round_failed"] = 1
        elif total is not None:
            state.params, state.strategy_state = self.strategy.aggregate_sum(
                state.params, total, len(updates), state.strategy_state
            )
        else:
            state.params, state.strategy_state = self.strategy.aggregate(
                state.params, updates, state.strategy_state
            )
        if state.accountant is not None:
            entry["dp_epsilon"] = state.accountant.step().epsilon
        if self.plan is not None:
            entry["dp_clip_norm"] = self.strategy.clip_norm(state.strategy_state)

    def _round_metrics(
        self,
        state: RunState,
        updates: list,
        failures: Failures,
        started: float,
        loss: float | None = None,
    ) -> dict[str, Any]:
        central = central_evaluate(
            state.params, self.stats, self.config.data, self.config.experiment.seed
        )
        return {
            "train_loss": train_loss(updates) if loss is None else loss,
            **named("central", central),
            "clients_ok": len(updates),
            "clients_failed": len(failures),
            "clients_timed_out": sum("timed out" in why for _, why in failures),
            "round_seconds": time.perf_counter() - started,
            "failed_clients": "; ".join(f"{cid}: {why}" for cid, why in failures),
        }

    # -- the end -------------------------------------------------------------------------------

    def finish(self, state: RunState, champion: ModelParams | None = None) -> Outcome:
        """Every client scores the final model (and the ``champion``, in raw units, on the same
        rows); the last round's score, personalization and the promotion decision follow."""
        history = state.history
        if history and all(h.get("round_failed") for h in history) and state.first_failure:
            raise RoundFailed(f"no round succeeded; {state.first_failure}")
        reports = self.exchange.final(self.refs, state.params, self.stats, champion, len(history))
        final = EvalSums.merge_all(rep.evaluation for rep in reports)
        scored = None
        if history and not state.stopped_early:
            history[-1].update(named("fed", final))
            scored = history[-1]
        personalization = (
            personalization_metrics(reports) if self.config.client.personalize_epochs else {}
        )
        promotion = self._promotion(state.params, final, reports, champion)
        return Outcome(final, scored, personalization, promotion)

    def _promotion(
        self,
        params: ModelParams,
        final: EvalSums,
        reports: list[FinalReport],
        champion: ModelParams | None,
    ) -> Promotion | None:
        if not self.config.experiment.register_as:
            return None
        margin = self.config.experiment.promote_margin
        if self.plan is not None:
            return self._dp_promotion(params, champion, margin)
        champion_mse = None
        if champion is not None:
            champion_mse = EvalSums.merge_all(r.champion for r in reports).metrics()["mse"]
        return decide_promotion(final.metrics()["mse"], champion_mse, margin)

    def _dp_promotion(
        self, params: ModelParams, champion: ModelParams | None, margin: float
    ) -> Promotion:
        """Under DP both models are scored on the server's held-out set (FLConfig refuses
        promotion under DP for sources without one), not on the clients' un-noised scores."""
        X, y = central_test_set(self.config.data, self.config.experiment.seed)
        mse = EvalSums.of(y, params.to_raw(self.stats).predict(X)).metrics()["mse"]
        champion_mse = None
        if champion is not None:
            champion_mse = EvalSums.of(y, champion.predict(X)).metrics()["mse"]
        return replace(decide_promotion(mse, champion_mse, margin), scored_on="central")
