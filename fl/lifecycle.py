"""Fine-tuning lifecycle: starting from a previous model, and deciding whether a new model
(the challenger) replaces the registered champion."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from fedtune.fl.params import FeatureStats, ModelParams
from sklearn.pipeline import Pipeline


@dataclass(frozen=True)
class InitModel:
    """A previous model, as fine-tuning needs it: raw-unit parameters and the feature
    statistics its scaler carries (kept, so the feature space does not shift)."""

    raw: ModelParams
    mean: np.ndarray
    scale: np.ndarray
    count: int

    @classmethod
    def from_pipeline(cls, pipe: Pipeline) -> InitModel:
        scaler, reg = pipe.steps[0][1], pipe.steps[-1][1]
        coef = np.asarray(reg.coef_, dtype=np.float64) / scaler.scale_
        intercept = float(reg.intercept_[0]) - float(coef @ scaler.mean_)
        return cls(
            ModelParams(coef, intercept),
            np.asarray(scaler.mean_, dtype=np.float64),
            np.asarray(scaler.scale_, dtype=np.float64),
            int(np.max(scaler.n_samples_seen_)),
        )

    def stats_for(self, federated: FeatureStats, source: str) -> FeatureStats:
        """Feature statistics for the fine-tune: this model's, with the federated target
        statistics (an internal reparametrisation that leaves predictions unchanged)."""
        if self.mean.shape[0] != federated.mean.shape[0]:
            raise ValueError(
                f"experiment.init_model: {source} has {self.mean.shape[0]} features, the "
                f"clients have {federated.mean.shape[0]}"
            )
        return FeatureStats(
            count=self.count,
            mean=self.mean,
            scale=self.scale,
            target_mean=federated.target_mean,
            target_scale=federated.target_scale,
        )


@dataclass(frozen=True)
class Promotion:
    promote: bool
    reason: str
    challenger_mse: float
    champion_mse: float | None
    scored_on: str = "federated"
    """Where both MSEs come from: ``"federated"`` (every client scores both models on its test
    split) or, under DP, ``"central"`` (the server's held-out set: the clients' scores are not
    noised, so they may not decide what is released)."""

    def tags(self) -> dict[str, str]:
        return {
            "fedtune.promotion": "promoted" if self.promote else "kept-champion",
            "fedtune.promotion.reason": self.reason,
            "fedtune.promotion.scored_on": self.scored_on,
            "fedtune.challenger_mse": repr(self.challenger_mse),
            "fedtune.champion_mse": "" if self.champion_mse is None else repr(self.champion_mse),
        }


def decide_promotion(challenger_mse: float, champion_mse: float | None, margin: float) -> Promotion:
    """Promote when there is no champion, or the challenger's MSE is lower than the champion's
    by at least ``margin`` (relative). Both are scored on the same federated evaluation."""
    if champion_mse is None:
        return Promotion(True, "no champion yet", challenger_mse, None)
    if challenger_mse <= champion_mse * (1.0 - margin) and challenger_mse < champion_mse:
        return Promotion(
            True,
            f"better by at least {margin:.1%} of the champion's MSE",
            challenger_mse,
            champion_mse,
        )
    return Promotion(
        False, f"not better by {margin:.1%} of the champion's MSE", challenger_mse, champion_mse
    )
