"""FedProx (``client.proximal_mu``): the local objective is f_k(w) + mu/2 ||w - w_g||^2, exactly.

Expected values come from numpy (normal equations) or from an ``SGDRegressor`` driven by hand,
never from :mod:`fl.client` itself. Each client's rows are served by a stand-in for
:func:`fl.data.open_client`, so the tests know every row.
"""

from __future__ import annotations

import fedtune.fl.client  # noqa: F401 (used as fl.client)
import numpy as np
import pytest
from fedtune import fl
from fedtune.fl.config import ClientConfig, ConfigError, DataConfig, load_config
from fedtune.fl.data import ClientRef
from fedtune.fl.params import FeatureStats, ModelParams
from fedtune.fl.simulation import simulate
from pydantic import ValidationError
from sklearn.linear_model import SGDRegressor

REF = ClientRef(client_id="clinic-7", index=0, data=DataConfig(), seed=3)
IDENTITY = FeatureStats(
    count=1, mean=np.zeros(3), scale=np.ones(3), target_mean=0.0, target_scale=1.0
)
GLOBAL = ModelParams(np.array([2.0, -0.5, -1.0]), 0.2)


class _Rows:
    """A client whose train and test splits are the given arrays, ``repeat`` times over (the
    same mean objective; one ``partial_fit`` call then makes ``repeat`` passes, in order)."""

    def __init__(self, X, y, repeat=1):
        self.X, self.y = np.tile(X, (repeat, 1)), np.tile(y, repeat)

    def chunks(self, split, chunk_size):
        for start in range(0, self.y.shape[0], chunk_size):
            yield self.X[start : start + chunk_size], self.y[start : start + chunk_size]

    def pass_chunks(self, chunk_size):
        for split in ("test", "train"):
            for X, y in self.chunks(split, chunk_size):
                yield split, X, y


def _rows(n=40, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 3)) + np.array([0.5, -0.3, 0.2])
    y = X @ np.array([1.0, -2.0, 0.5]) + 0.7 + 0.3 * rng.standard_normal(n)
    return X, y


@pytest.fixture
def rows(monkeypatch):
    X, y = _rows()
    monkeypatch.setattr(fl.client, "open_client", lambda ref: _Rows(X, y))
    return X, y


def _closed_form(X, y, a, mu, w_g):
    """argmin (1/n) sum 1/2 (y - Xw - b)^2 + a/2 ||w||^2 + mu/2 ||w - w_g||^2, b unpenalised:
    b = mean(y) - mean(X) w, and (Xc'Xc/n + (a+mu) I) w = Xc'yc/n + mu w_g."""
    Xc, yc = X - X.mean(axis=0), y - y.mean()
    n, p = X.shape
    w = np.linalg.solve(Xc.T @ Xc / n + (a + mu) * np.eye(p), Xc.T @ yc / n + mu * w_g)
    return w, float(y.mean() - X.mean(axis=0) @ w)


# -- (a) mu = 0 is the old local training, bit for bit ---------------------------------------


def test_mu_zero_is_bit_identical_to_plain_warm_started_sgd(monkeypatch):
    X, y = _rows(n=50, seed=1)
    monkeypatch.setattr(fl.client, "open_client", lambda ref: _Rows(X, y))
    stats = FeatureStats(50, np.array([0.4, -0.2, 0.1]), np.array([1.1, 0.9, 1.3]), 0.5, 2.0)
    cfg = ClientConfig(local_epochs=3, chunk_size=16, proximal_mu=0.0)
    upd = fl.client.train(REF, GLOBAL, stats, cfg, round_num=4)

    # The old way, by hand: warm-start from the global model, partial_fit every chunk.
    est = SGDRegressor(
        penalty="l2",
        alpha=1e-4,
        learning_rate="invscaling",
        eta0=0.01,
        power_t=0.25,
        shuffle=True,
        random_state=fl.client.client_random_state(REF.seed, 4, REF.client_id),
    )
    est.coef_, est.intercept_, est.n_features_in_ = GLOBAL.coef.copy(), np.array([0.2]), 3
    sse = 0.0
    for epoch in range(3):
        for start in range(0, 50, 16):
            Xs = (X[start : start + 16] - stats.mean) / stats.scale
            ys = (y[start : start + 16] - 0.5) / 2.0
            if epoch == 2:
                sse += float(np.sum((est.predict(Xs) - ys) ** 2))
            est.partial_fit(Xs, ys)
    assert np.array_equal(upd.params.coef, est.coef_)
    assert upd.params.intercept == est.intercept_[0]
    assert upd.metrics["train_loss"] == sse / 50 * 4.0
    assert upd.num_examples == 50


# -- (b) mu -> infinity returns the global coefficients --------------------------------------


@pytest.mark.parametrize(
    ("loss", "penalty"),
    [("squared_error", "l2"), ("huber", None), ("epsilon_insensitive", "l2")],
)
def test_huge_mu_returns_the_global_coefficients(rows, loss, penalty):
    cfg = ClientConfig(loss=loss, penalty=penalty, local_epochs=5, chunk_size=16)
    pinned = fl.client.train(REF, GLOBAL, IDENTITY, cfg.model_copy(update={"proximal_mu": 1e9}), 1)
    free = fl.client.train(REF, GLOBAL, IDENTITY, cfg, 1)
    np.testing.assert_allclose(pinned.params.coef, GLOBAL.coef, rtol=0, atol=1e-6)
    assert np.abs(free.params.coef - GLOBAL.coef).max() > 0.01  # the data pulls elsewhere


# -- (c) against the closed form of the proximal objective -----------------------------------


@pytest.mark.parametrize("mu", [0.5, 20.0])
def test_fedprox_matches_the_closed_form_and_is_not_an_l2_pull_to_zero(monkeypatch, mu):
    # 40 rows, 400,000 SGD steps at a small constant rate: the cyclic-order bias is O(eta).
    X, y = _rows()
    monkeypatch.setattr(fl.client, "open_client", lambda ref: _Rows(X, y, repeat=50))
    a = 0.01
    cfg = ClientConfig(
        alpha=a,
        learning_rate="constant",
        eta0=5e-5,
        shuffle=False,
        local_epochs=200,
        chunk_size=2000,
    )
    prox = fl.client.train(REF, GLOBAL, IDENTITY, cfg.model_copy(update={"proximal_mu": mu}), 1)
    w, b = _closed_form(X, y, a, mu, GLOBAL.coef)
    np.testing.assert_allclose(prox.params.coef, w, rtol=0, atol=1e-3)
    assert prox.params.intercept == pytest.approx(b, abs=1e-3)

    # An L2 pull toward zero of the same strength (alpha = a + mu, no proximal term) lands
    # elsewhere, by far more than the tolerance; the harness does find that one too.
    ridge = fl.client.train(REF, GLOBAL, IDENTITY, cfg.model_copy(update={"alpha": a + mu}), 1)
    w0, _ = _closed_form(X, y, a + mu, 0.0, GLOBAL.coef)
    np.testing.assert_allclose(ridge.params.coef, w0, rtol=0, atol=1e-3)
    assert np.abs(w - w0).max() > 0.1
    assert np.abs(prox.params.coef - ridge.params.coef).max() > 0.1


@pytest.mark.parametrize("mu", [0.5, 20.0])
def test_train_loss_is_the_loss_of_the_model_not_of_the_correction(rows, mu):
    X, y = rows
    frozen = ClientConfig(learning_rate="constant", eta0=1e-12, chunk_size=16, proximal_mu=mu)
    upd = fl.client.train(REF, GLOBAL, IDENTITY, frozen, 1)
    np.testing.assert_allclose(upd.params.coef, GLOBAL.coef, rtol=0, atol=1e-9)
    mse = float(np.mean((y - X @ GLOBAL.coef - GLOBAL.intercept) ** 2))
    assert upd.metrics["train_loss"] == pytest.approx(mse, rel=1e-8)


# -- (d) a heterogeneous federation -----------------------------------------------------------


def test_fedprox_converges_on_dirichlet_clients():
    base = [
        "data.partition='dirichlet'",
        "data.alpha=0.1",
        "data.num_clients=20",
        "client.local_epochs=5",
        "rounds.num_rounds=10",
    ]
    fedavg = simulate(load_config(None, base)).history
    fedprox = simulate(load_config(None, [*base, "client.proximal_mu=0.1"])).history
    assert len(fedprox) == 10
    last = fedprox[-1]["central_mse"]
    assert last < 2 * 0.1**2  # the noise floor is data.noise^2 = 0.01
    assert last < 0.5 * fedprox[0]["central_mse"]
    assert last <= 2 * fedavg[-1]["central_mse"]


# -- (e) only l2 or no penalty -----------------------------------------------------------------


@pytest.mark.parametrize("penalty", ["l1", "elasticnet"])
def test_proximal_mu_refuses_l1_penalties(penalty):
    with pytest.raises(ValidationError, match="client.proximal_mu: .*client.penalty"):
        ClientConfig(penalty=penalty, proximal_mu=0.1)
    with pytest.raises(ConfigError, match=f"^client.proximal_mu: .*client.penalty.*{penalty}"):
        load_config(None, [f"client.penalty='{penalty}'", "client.proximal_mu=0.1"])
    ClientConfig(penalty=penalty)  # fine without FedProx
    ClientConfig(penalty=None, proximal_mu=0.1)
    unchecked = ClientConfig(proximal_mu=0.1).model_copy(update={"penalty": penalty})
    with pytest.raises(ValueError, match="client.proximal_mu"):
        fl.client.proximal_problem(unchecked, GLOBAL, None)
