"""FedAvg: McMahan, Moore, Ramage, Hampson and Agüera y Arcas, 2017, "Communication-Efficient
Learning of Deep Networks from Decentralized Data" (AISTATS). The next global model is the
example-weighted mean of the clients' models, written as the global model plus the weighted mean
of their updates, so that it also applies to a sum formed under secure aggregation."""

from __future__ import annotations

from typing import Any

import numpy as np
from fedtune.fl.params import ModelParams
from fedtune.fl.strategies.aggregation import SumStrategy


class FedAvg(SumStrategy):
    """Weighted averaging of client models.

    Parameters
    ----------
    weighting : "num_examples" weighs each client by its training examples (the paper's
        choice); "uniform" gives every client the same weight.
    """

    def server_step(
        self, global_params: ModelParams, mean_delta: np.ndarray, state: Any
    ) -> tuple[ModelParams, Any]:
        return ModelParams.from_vector(global_params.to_vector() + mean_delta), state
