"""What a client does with its own data: report feature moments, train locally from the global
model, and evaluate a model on its local test split. Each returns only numbers."""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass

import numpy as np
from fedtune.fl.config import ClientConfig
from fedtune.fl.data import ClientDataError, ClientRef, open_client
from fedtune.fl.evaluation import EvalSums
from fedtune.fl.params import ClientUpdate, FeatureStats, ModelParams
from fedtune.fl.statistics import Moments, StatsReport
from sklearn.linear_model import SGDRegressor

_STREAM_CLIENT = 21


def make_estimator(
    cfg: ClientConfig, random_state: np.random.RandomState | None = None
) -> SGDRegressor:
    """The local learner, configured from ``[client]``."""
    return SGDRegressor(
        loss=cfg.loss,
        penalty=cfg.penalty,
        alpha=cfg.alpha,
        learning_rate=cfg.learning_rate,
        eta0=cfg.eta0,
        power_t=cfg.power_t,
        shuffle=cfg.shuffle,
        random_state=random_state,
    )


def client_random_state(seed: int, round_num: int, client_id: str) -> np.random.RandomState:
    """The random state of one client's local training in one round: a function of the
    client's own id, so it does not change when other clients come or go.

    An instance, not an int: ``partial_fit`` re-seeds from an int on every call, which would
    shuffle every local epoch in the same order (and costs a fresh ``RandomState`` each time).
    """
    seq = np.random.SeedSequence([seed, _STREAM_CLIENT, round_num, zlib.crc32(client_id.encode())])
    return np.random.RandomState(int(seq.generate_state(1)[0]))


def proximal_problem(
    cfg: ClientConfig, global_params: ModelParams, random_state: np.random.RandomState | None
) -> tuple[SGDRegressor, np.ndarray, float]:
    """FedProx (Li et al., 2020) as a plain ``SGDRegressor`` problem: the warm-started
    estimator, the offset ``c`` and the feature scale ``s``. Train it on ``(X / s, y - X @ c)``;
    the client's model is then ``w = c + coef_ / s`` with the estimator's intercept.

    sklearn's ``SGDRegressor`` minimises ``(1/n) sum L(y_i - x_i.w - b) + a/2 ||w||^2`` (``a`` =
    ``alpha`` with ``penalty="l2"``, 0 with none; the intercept is not penalised). FedProx adds
    ``mu/2 ||w - w_g||^2``. Completing the square,
    ``a/2 ||w||^2 + mu/2 ||w - w_g||^2 = (a+mu)/2 ||w - c||^2 + const`` with
    ``c = mu w_g / (a+mu)``. Put ``w = c + d/s`` for any ``s > 0``: the objective in ``d`` is
    ``(1/n) sum L((y_i - x_i.c) - (x_i/s).d - b) + (a+mu)/s^2 / 2 ||d||^2``, which is
    ``SGDRegressor``'s own with targets ``y - X c``, features ``X / s``, ``penalty="l2"`` and
    ``alpha = (a+mu)/s^2``. That is exact, not an approximation, for every loss offered
    (squared_error, huber, epsilon_insensitive): each depends on the residual ``y - f`` only,
    and the residual of ``d`` on the shifted problem *is* the residual of ``w`` on the client's
    rows. The proximal term acts on the coefficients only: the intercept stays unpenalised, as
    in sklearn (warm-started at ``b_g``, like ``d`` at ``s (w_g - c)``, i.e. at ``w = w_g``).

    ``s = max(1, sqrt(a+mu))``. While ``a+mu <= 1``, ``s = 1``: train ``d = w - c`` with
    ``alpha = a+mu``. Beyond, sklearn's weight decay ``d <- max(0, 1 - eta (a+mu)) d``
    (applied before each gradient step) would overshoot and clamp; with ``s`` the decay is
    ``1 - eta`` and the coefficient steps shrink by ``1/(a+mu)``, a preconditioner matching the
    proximal curvature. As ``mu -> inf``, ``c -> w_g`` and ``d/s -> 0``: the global coefficients.
    (``learning_rate="optimal"`` derives its steps from this ``alpha``.)
    """
    a = {"l2": cfg.alpha, None: 0.0}.get(cfg.penalty)
    if a is None:
        raise ValueError(f"client.proximal_mu: needs client.penalty l2 or none, not {cfg.penalty}")
    total = a + cfg.proximal_mu
    centre = cfg.proximal_mu / total * global_params.coef
    scale = math.sqrt(max(1.0, total))
    local = cfg.model_copy(update={"penalty": "l2", "alpha": total / scale**2})
    start = ModelParams(scale * (global_params.coef - centre), global_params.intercept)
    return start.warm_start(make_estimator(local, random_state)), centre, scale


def feature_moments(ref: ClientRef, chunk_size: int) -> StatsReport:
    """Feature names and per-column moments of the client's training split."""
    data = open_client(ref)
    moments = Moments.of(data.chunks("train", chunk_size))
    if moments.m2[-1] <= 1e-12 * max(1.0, moments.mean[-1] ** 2) * moments.count:
        raise ClientDataError(
            ref.client_id,
            data.where,
            f"the target is constant ({moments.mean[-1]:.6g})",
            "the target is constant",
        )
    return StatsReport(ref.client_id, data.feature_names(), moments)


def train(
    ref: ClientRef,
    global_params: ModelParams,
    stats: FeatureStats,
    cfg: ClientConfig,
    round_num: int,
) -> ClientUpdate:
    """Score the received global model on the local test split, then warm-start an
    ``SGDRegressor`` from it and ``partial_fit`` over the client's training chunks for
    ``cfg.local_epochs`` epochs.

    Scoring the model a client receives, in the same exchange that trains it, is how federated
    evaluation rides along with training: one model broadcast per round instead of two.

    ``train_loss`` is the progressive (predict-then-fit) MSE over the last epoch, in raw target
    units: it costs no extra pass over the data.

    With ``cfg.proximal_mu`` the local objective is FedProx's: see :func:`proximal_problem`.
    """
    start = time.perf_counter()
    data = open_client(ref)
    received_model = global_params.to_raw(stats)
    received: list[EvalSums] = []
    rs = client_random_state(ref.seed, round_num, ref.client_id)
    if cfg.proximal_mu:
        est, centre, scale = proximal_problem(cfg, global_params, rs)
    else:
        est = global_params.warm_start(make_estimator(cfg, rs))
    sse, n = 0.0, 0
    for epoch in range(cfg.local_epochs):
        last = epoch == cfg.local_epochs - 1
        # The first epoch's pass also scores the received model on the test rows: one read
        # of the data serves both (the scores are of the received model, whatever training
        # does meanwhile).
        if epoch == 0:
            chunks = data.pass_chunks(cfg.chunk_size)
        else:
            chunks = (("train", X, y) for X, y in data.chunks("train", cfg.chunk_size))
        for split, X, y in chunks:
            if split == "test":
                received.append(EvalSums.of(y, received_model.predict(X)))
                continue
            Xs, ys = stats.standardise(X, y)
            if cfg.proximal_mu:  # same residuals, so train_loss is still the loss of w
                Xs, ys = Xs / scale, ys - Xs @ centre
            if last:
                sse += float(np.sum((est.predict(Xs) - ys) ** 2))
                n += ys.shape[0]
            est.partial_fit(Xs, ys)
    params = ModelParams.from_estimator(est)
    if cfg.proximal_mu:
        params = ModelParams(centre + params.coef / scale, params.intercept)
    return ClientUpdate(
        client_id=ref.client_id,
        params=params,
        num_examples=n,
        metrics={
            "train_loss": sse / n * stats.target_scale**2,
            "seconds": time.perf_counter() - start,
        },
        evaluation=EvalSums.merge_all(received),
    )


def evaluate(ref: ClientRef, params: ModelParams, stats: FeatureStats, chunk_size: int) -> EvalSums:
    """Sums for MSE/MAE/R² of the (standardised-space) model on the local test split."""
    return evaluate_raw(ref, params.to_raw(stats), chunk_size)


def evaluate_raw(ref: ClientRef, raw: ModelParams, chunk_size: int) -> EvalSums:
    """The same for a model in raw units (e.g. a champion with statistics of its own)."""
    data = open_client(ref)
    return EvalSums.merge_all(
        EvalSums.of(y, raw.predict(X)) for X, y in data.chunks("test", chunk_size)
    )


@dataclass(frozen=True)
class FinalReport:
    """A client's last message: the final model's test sums, the champion's on the same rows
    (when there is one), and the sums after local fine-tuning (when asked)."""

    client_id: str
    evaluation: EvalSums
    champion: EvalSums | None = None
    personalized: EvalSums | None = None


def final_report(
    ref: ClientRef,
    params: ModelParams,
    stats: FeatureStats,
    cfg: ClientConfig,
    champion: ModelParams | None = None,
    rounds: int = 0,
) -> FinalReport:
    """Score the final model (and the champion, in raw units) on the local test split; with
    ``cfg.personalize_epochs``, fine-tune the final model on the local training split and
    score that too. Only sums leave the client; the personalized model stays."""
    evaluation = evaluate(ref, params, stats, cfg.chunk_size)
    champion_sums = None if champion is None else evaluate_raw(ref, champion, cfg.chunk_size)
    personalized = None
    if cfg.personalize_epochs:
        local = cfg.model_copy(update={"local_epochs": cfg.personalize_epochs})
        tuned = train(ref, params, stats, local, rounds + 1)
        personalized = evaluate(ref, tuned.params, stats, cfg.chunk_size)
    return FinalReport(ref.client_id, evaluation, champion_sums, personalized)
