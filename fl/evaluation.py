"""Regression metrics from sums, so that clients' results combine into exact example-weighted
MSE, RMSE, MAE and R², and the pooled-data baseline."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EvalSums:
    """Count, squared and absolute error sums, and target sums of one or more test sets."""

    n: int = 0
    sse: float = 0.0
    sae: float = 0.0
    sum_y: float = 0.0
    sum_y2: float = 0.0

    @classmethod
    def of(cls, y: np.ndarray, pred: np.ndarray) -> EvalSums:
        err = pred - y
        return cls(
            n=int(y.shape[0]),
            sse=float(err @ err),
            sae=float(np.abs(err).sum()),
            sum_y=float(y.sum()),
            sum_y2=float(y @ y),
        )

    @classmethod
    def merge_all(cls, parts: Iterable[EvalSums]) -> EvalSums:
        total = cls()
        for p in parts:
            total = total + p
        return total

    def __add__(self, other: EvalSums) -> EvalSums:
        return EvalSums(
            self.n + other.n,
            self.sse + other.sse,
            self.sae + other.sae,
            self.sum_y + other.sum_y,
            self.sum_y2 + other.sum_y2,
        )

    def metrics(self) -> dict[str, float]:
        """``mse``, ``rmse``, ``mae`` and ``r2`` (NaN where there are no rows)."""
        if self.n == 0:
            return {k: float("nan") for k in ("mse", "rmse", "mae", "r2")}
        mse = self.sse / self.n
        sst = self.sum_y2 - self.sum_y**2 / self.n
        return {
            "mse": mse,
            "rmse": float(np.sqrt(mse)),
            "mae": self.sae / self.n,
            "r2": 1.0 - self.sse / sst if sst > 0 else float("nan"),
        }


def ols_baseline(
    X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, y_test: np.ndarray
) -> float:
    """Test MSE of ordinary least squares (with intercept) fit on pooled training rows."""
    A = np.column_stack([X_train, np.ones(X_train.shape[0])])
    w, *_ = np.linalg.lstsq(A, y_train, rcond=None)
    pred = X_test @ w[:-1] + w[-1]
    return float(np.mean((pred - y_test) ** 2))


def train_loss(updates: list) -> float:
    """Example-weighted mean of the clients' training losses."""
    n = sum(u.num_examples for u in updates)
    if n == 0:
        return float("nan")
    return sum(u.metrics["train_loss"] * u.num_examples for u in updates) / n


def received_evaluation(updates: list) -> EvalSums:
    """The federated evaluation that rode along with a round: the model the clients received,
    scored on their local test splits."""
    return EvalSums.merge_all(u.evaluation for u in updates if u.evaluation is not None)


def named(prefix: str, sums: EvalSums | None) -> dict[str, float]:
    """``{prefix}_mse``, ``_rmse``, ``_mae`` and ``_r2`` (nothing when ``sums`` is None)."""
    return {} if sums is None else {f"{prefix}_{k}": v for k, v in sums.metrics().items()}


def central_evaluate(params, stats, data, seed: int) -> EvalSums | None:
    """Evaluate a standardised-space model on the source's held-out set, if it has one."""
    from fedtune.fl.data import central_test_set

    held_out = central_test_set(data, seed)
    if held_out is None:
        return None
    X, y = held_out
    return EvalSums.of(y, params.to_raw(stats).predict(X))


def pooled_baseline(data, seed: int) -> float | None:
    """Central-test MSE of OLS on the union of the clients' training rows (simulated sources
    only: real silos cannot be pooled, which is the point)."""
    from fedtune.fl.data import central_test_set, pooled_train

    held_out = central_test_set(data, seed)
    if held_out is None:
        return None
    return ols_baseline(*pooled_train(data, seed), *held_out)


def personalization_metrics(reports: list) -> dict[str, float]:
    """Per-client and example-weighted test MSE of the final model before and after each
    client's local fine-tune (:class:`fl.client.FinalReport`); ``personalized_gain`` is the
    relative drop of the weighted MSE."""
    tuned = [r for r in reports if r.personalized is not None]
    metrics: dict[str, float] = {}
    for rep in tuned:
        metrics[f"personalized/{rep.client_id}/mse_before"] = rep.evaluation.metrics()["mse"]
        metrics[f"personalized/{rep.client_id}/mse_after"] = rep.personalized.metrics()["mse"]
    before = EvalSums.merge_all(r.evaluation for r in tuned)
    after = EvalSums.merge_all(r.personalized for r in tuned)
    if before.n:
        b, a = before.metrics()["mse"], after.metrics()["mse"]
        metrics.update(
            personalized_mse_before=b, personalized_mse_after=a, personalized_gain=(b - a) / b
        )
    return metrics
