"""Model parameters and the federated feature statistics they are expressed in.

Training happens in *standardised* space: features and target are centred and scaled with the
federated statistics (:mod:`fl.statistics`), which keeps one learning rate sensible for features
of any magnitude. :func:`to_pipeline` and :meth:`ModelParams.to_raw` fold the standardisation
back in, so users only ever see models and coefficients in raw units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from fedtune.fl.evaluation import EvalSums
from sklearn.linear_model import SGDRegressor
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler


@dataclass(frozen=True)
class ModelParams:
    """A linear model ``y = X @ coef + intercept`` (coef 1-D float64)."""

    coef: np.ndarray
    intercept: float

    @classmethod
    def zeros(cls, num_features: int) -> ModelParams:
        return cls(np.zeros(num_features), 0.0)

    @classmethod
    def from_vector(cls, vector: np.ndarray) -> ModelParams:
        """Inverse of :meth:`to_vector`: the last element is the intercept."""
        vector = np.asarray(vector, dtype=np.float64)
        return cls(vector[:-1].copy(), float(vector[-1]))

    @classmethod
    def from_estimator(cls, est: SGDRegressor) -> ModelParams:
        return cls(np.asarray(est.coef_, dtype=np.float64).copy(), float(est.intercept_[0]))

    @property
    def num_features(self) -> int:
        return self.coef.shape[0]

    def to_vector(self) -> np.ndarray:
        """Flat ``[coef..., intercept]`` view used by aggregation, clipping and masking."""
        return np.append(self.coef, self.intercept)

    def warm_start(self, est: SGDRegressor) -> SGDRegressor:
        """Set ``est`` up so that its next ``partial_fit`` continues from these parameters."""
        est.coef_ = self.coef.copy()
        est.intercept_ = np.array([self.intercept])
        est.n_features_in_ = self.num_features
        return est

    def predict(self, X: np.ndarray) -> np.ndarray:
        return X @ self.coef + self.intercept

    def to_raw(self, stats: FeatureStats) -> ModelParams:
        """The same model in raw feature and target units."""
        coef = self.coef * stats.target_scale / stats.scale
        intercept = (
            self.intercept * stats.target_scale + stats.target_mean - float(coef @ stats.mean)
        )
        return ModelParams(coef, float(intercept))

    def to_standardised(self, stats: FeatureStats) -> ModelParams:
        """Inverse of :meth:`to_raw`."""
        coef = self.coef * stats.scale / stats.target_scale
        intercept = (
            self.intercept - stats.target_mean + float(self.coef @ stats.mean)
        ) / stats.target_scale
        return ModelParams(coef, float(intercept))

    def to_dict(self) -> dict[str, object]:
        return {"coef": self.coef.tolist(), "intercept": self.intercept}


@dataclass(frozen=True)
class FeatureStats:
    """Global feature and target mean/scale, formed from clients' moments (no rows)."""

    count: int
    mean: np.ndarray
    scale: np.ndarray
    target_mean: float
    target_scale: float

    @property
    def var(self) -> np.ndarray:
        return self.scale**2

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": int(self.count),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "target_mean": float(self.target_mean),
            "target_scale": float(self.target_scale),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureStats:
        return cls(
            count=int(data["count"]),
            mean=np.asarray(data["mean"], dtype=np.float64),
            scale=np.asarray(data["scale"], dtype=np.float64),
            target_mean=float(data["target_mean"]),
            target_scale=float(data["target_scale"]),
        )

    def standardise(self, X: np.ndarray, y: np.ndarray | None = None):
        Xs = (X - self.mean) / self.scale
        if y is None:
            return Xs
        return Xs, (y - self.target_mean) / self.target_scale

    def scaler(self) -> StandardScaler:
        """A fitted ``StandardScaler`` carrying these statistics."""
        scaler = StandardScaler()
        scaler.mean_ = self.mean.copy()
        scaler.var_ = self.var.copy()
        scaler.scale_ = self.scale.copy()
        scaler.n_features_in_ = self.mean.shape[0]
        scaler.n_samples_seen_ = self.count
        return scaler


def to_pipeline(params: ModelParams, stats: FeatureStats, estimator: SGDRegressor) -> Pipeline:
    """``Pipeline(StandardScaler, SGDRegressor)`` predicting raw targets from raw features.

    The regressor's coefficients act on standardised features; the target scaling is folded
    into them, so ``pipeline.predict`` returns raw units.
    """
    reg = SGDRegressor(**estimator.get_params())
    reg.coef_ = params.coef * stats.target_scale
    reg.intercept_ = np.array([params.intercept * stats.target_scale + stats.target_mean])
    reg.n_features_in_ = params.num_features
    reg.t_ = 1.0
    reg.n_iter_ = 0
    return Pipeline([("scaler", stats.scaler()), ("regressor", reg)])


@dataclass(frozen=True)
class ClientUpdate:
    """Everything that crosses from a client back to the server after local training:
    parameters, the example count used as the aggregation weight, scalar metrics, and the
    error sums of the global model it received, scored on its local test split."""

    client_id: str
    params: ModelParams
    num_examples: int
    metrics: dict[str, float]
    evaluation: EvalSums | None = None


@dataclass(frozen=True)
class MaskedUpdate:
    """What crosses back under secure aggregation: the client's contribution
    (:class:`fl.strategies.aggregation.Contribution`: weighted update, weight, unclipped flag),
    example count, training loss and evaluation sums (:mod:`fl.secagg.scalars`), encoded and
    masked as one vector, so the server learns them only as part of the sum."""

    client_id: str
    masked: Any
    """The masked vector (``privacy.secagg_keys = "round"``), or a
    :class:`fl.secagg.run_keys.MaskedInput` that carries it with the client's encrypted shares."""


def screen_updates(
    updates: list[ClientUpdate], global_params: ModelParams, max_norm: float | None = None
) -> tuple[list[ClientUpdate], list[tuple[str, str]]]:
    """Split updates into those safe to aggregate and ``(client_id, reason)`` rejections:
    non-finite parameters, no training examples, or (with ``max_norm``) an update whose L2
    distance from the global model exceeds it. A rejected update is never averaged in."""
    kept: list[ClientUpdate] = []
    rejected: list[tuple[str, str]] = []
    base = global_params.to_vector()
    for u in updates:
        vector = u.params.to_vector()
        if not np.all(np.isfinite(vector)):
            rejected.append((u.client_id, "non-finite parameters"))
        elif u.num_examples <= 0:
            rejected.append((u.client_id, "no training examples"))
        elif max_norm is not None and (norm := float(np.linalg.norm(vector - base))) > max_norm:
            rejected.append(
                (u.client_id, f"update norm {norm:.4g} exceeds server.max_update_norm {max_norm}")
            )
        else:
            kept.append(u)
    return kept, rejected
