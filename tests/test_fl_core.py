"""Unit tests for the pure federated-learning core (no Prefect, no MLflow)."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
from fedtune.fl import client, partition
from fedtune.fl.config import ClientConfig, DataConfig, FLConfig
from fedtune.fl.data import (
    ClientDataError,
    ClientRef,
    duplicate_clients,
    open_client,
    pooled_train,
    registry,
)
from fedtune.fl.evaluation import EvalSums, ols_baseline, pooled_baseline
from fedtune.fl.params import ClientUpdate, FeatureStats, ModelParams, screen_updates, to_pipeline
from fedtune.fl.statistics import Moments, StatsReport, combine, combine_reports, consistent_reports
from fedtune.fl.strategies import FedAvg

from tests.conftest import write_client_files


def _update(cid, coef, intercept, n):
    return ClientUpdate(cid, ModelParams(np.array(coef, float), intercept), n, {})


def test_fedavg_is_the_example_weighted_mean_by_hand():
    updates = [_update("a", [1.0, 2.0], 0.5, 10), _update("b", [4.0, -1.0], 1.5, 30)]
    params, _ = FedAvg().aggregate(ModelParams.zeros(2), updates, None)
    # (10*1 + 30*4)/40 = 3.25 ; (10*2 + 30*-1)/40 = -0.25 ; (10*.5 + 30*1.5)/40 = 1.25
    np.testing.assert_allclose(params.coef, [3.25, -0.25], rtol=0, atol=1e-15)
    assert params.intercept == pytest.approx(1.25, abs=1e-15)
    uniform, _ = FedAvg("uniform").aggregate(ModelParams.zeros(2), updates, None)
    np.testing.assert_allclose(uniform.coef, [2.5, 0.5])
    # From any global model: the mean of the models, not of anything relative to the global.
    moved, _ = FedAvg().aggregate(ModelParams(np.array([-7.0, 9.0]), 3.0), updates, None)
    np.testing.assert_allclose(moved.coef, [3.25, -0.25], rtol=0, atol=1e-14)
    assert moved.intercept == pytest.approx(1.25, abs=1e-14)


def test_fedavg_refuses_an_empty_round():
    with pytest.raises(ValueError, match="no client updates"):
        FedAvg().aggregate(ModelParams.zeros(1), [], None)


def test_federated_mean_std_equal_pooled_to_1e9(tmp_path):
    directory = write_client_files(tmp_path / "clients", [37, 120, 5, 64])
    data = DataConfig(source="files", path=str(directory), target="target", test_fraction=0.25)
    refs = registry(data, seed=3)
    reports = [client.feature_moments(ref, chunk_size=16) for ref in refs]
    names, stats = combine_reports(reports)
    rows = [np.column_stack(next(iter([_all(ref)]))) for ref in refs]
    pooled = np.concatenate(rows)
    assert names == ["income", "ratio", "age"]
    np.testing.assert_allclose(stats.mean, pooled[:, :-1].mean(axis=0), rtol=1e-9, atol=0)
    np.testing.assert_allclose(stats.scale, pooled[:, :-1].std(axis=0), rtol=1e-9, atol=0)
    assert stats.target_mean == pytest.approx(pooled[:, -1].mean(), rel=1e-9)
    assert stats.target_scale == pytest.approx(pooled[:, -1].std(), rel=1e-9)
    assert stats.count == pooled.shape[0]


def _all(ref):
    chunks = list(open_client(ref).chunks("train", 1000))
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


def test_moments_merge_is_exact_for_large_offsets():
    rng = np.random.default_rng(0)
    X = 1e6 + rng.standard_normal((500, 2))
    y = rng.standard_normal(500)
    parts = [Moments.of([(X[i : i + 70], y[i : i + 70])]) for i in range(0, 500, 70)]
    stats = combine(parts)
    np.testing.assert_allclose(stats.scale, X.std(axis=0), rtol=1e-9)


def test_local_split_does_not_depend_on_chunk_size(tmp_path):
    directory = write_client_files(tmp_path / "c", [200], kind="parquet")
    ref = registry(DataConfig(source="files", path=str(directory), target="target"), 0)[0]
    a_train = np.concatenate([y for _, y in open_client(ref).chunks("train", 7)])
    b_train = np.concatenate([y for _, y in open_client(ref).chunks("train", 1000)])
    b_test = np.concatenate([y for _, y in open_client(ref).chunks("test", 1000)])
    np.testing.assert_array_equal(a_train, b_train)
    assert len(b_train) + len(b_test) == 200
    assert 20 <= len(b_test) <= 60  # ~20% held out


def test_partitioners_cover_every_row_once():
    rng = np.random.default_rng(1)
    y = rng.standard_normal(1000)
    for method in ["iid", "dirichlet", "label-skew"]:
        shards = partition.partition(y, 7, method, np.random.default_rng(2), alpha=0.3)
        joined = np.sort(np.concatenate(shards))
        np.testing.assert_array_equal(joined, np.arange(1000))
        assert min(len(s) for s in shards) >= 2


def test_dirichlet_small_alpha_skews_quantity():
    sizes = [len(s) for s in partition.dirichlet(10_000, 10, 0.1, np.random.default_rng(0))]
    even = [len(s) for s in partition.iid(10_000, 10, np.random.default_rng(0))]
    assert max(sizes) / min(sizes) > 10 * max(even) / min(even)


def test_label_skew_strictness_orders_targets():
    y = np.random.default_rng(0).standard_normal(1000)
    strict = partition.label_skew(y, 5, 1.0, np.random.default_rng(0))
    assert all(y[a].max() <= y[b].min() for a, b in zip(strict, strict[1:], strict=False))
    loose = partition.label_skew(y, 5, 0.0, np.random.default_rng(0))
    means = [y[s].mean() for s in loose]
    assert max(means) - min(means) < 0.5


def test_raw_and_standardised_params_round_trip_and_pipeline_predicts_raw():
    stats = FeatureStats(
        count=10,
        mean=np.array([100.0, -3.0]),
        scale=np.array([20.0, 0.5]),
        target_mean=7.0,
        target_scale=3.0,
    )
    std = ModelParams(np.array([0.4, -1.2]), 0.3)
    raw = std.to_raw(stats)
    back = raw.to_standardised(stats)
    np.testing.assert_allclose(back.coef, std.coef)
    assert back.intercept == pytest.approx(std.intercept)
    X = np.array([[110.0, -2.5], [90.0, -3.3]])
    Xs = (X - stats.mean) / stats.scale
    expected = (Xs @ std.coef + std.intercept) * stats.target_scale + stats.target_mean
    np.testing.assert_allclose(raw.predict(X), expected)
    pipe = to_pipeline(std, stats, client.make_estimator(ClientConfig()))
    np.testing.assert_allclose(pipe.predict(X), expected)


def test_client_update_warm_starts_from_the_global_model():
    cfg = FLConfig()
    ref = registry(cfg.data, 0)[0]
    _, stats = combine_reports([client.feature_moments(ref, 64)])
    good = ModelParams(np.array([0.99]), 0.0)  # near the standardised truth
    upd_good = client.train(ref, good, stats, cfg.client, 1)
    upd_zero = client.train(ref, ModelParams.zeros(1), stats, cfg.client, 1)
    assert abs(upd_good.params.coef[0] - 0.99) < abs(upd_zero.params.coef[0] - 0.99) + 0.5
    assert upd_good.metrics["train_loss"] < upd_zero.metrics["train_loss"]
    assert upd_good.num_examples == 80  # 100 rows minus the local test split


def test_what_crosses_back_does_not_grow_with_client_rows():
    """The update and the reference are O(features): no rows ride along."""
    sizes = []
    for rows in (20, 5000):
        cfg = FLConfig(data=DataConfig(samples_per_client=rows, num_clients=2))
        ref = registry(cfg.data, 0)[0]
        _, stats = combine_reports([client.feature_moments(ref, 64)])
        upd = client.train(ref, ModelParams.zeros(1), stats, cfg.client, 1)
        sums = client.evaluate(ref, upd.params, stats, 64)
        report = client.feature_moments(ref, 64)
        sizes.append(tuple(len(pickle.dumps(o)) for o in (ref, upd, sums, report)))
    small, large = sizes
    for a, b in zip(small, large, strict=True):
        assert abs(a - b) <= 8, (small, large)


def test_eval_sums_combine_to_pooled_metrics():
    rng = np.random.default_rng(0)
    y, p = rng.standard_normal(100), rng.standard_normal(100)
    pooled = EvalSums.of(y, p).metrics()
    merged = EvalSums.merge_all([EvalSums.of(y[:30], p[:30]), EvalSums.of(y[30:], p[30:])])
    for k, v in merged.metrics().items():
        assert v == pytest.approx(pooled[k], rel=1e-12)
    assert pooled["r2"] == pytest.approx(1 - np.mean((y - p) ** 2) / np.var(y), rel=1e-12)


def test_pooled_baseline_is_ols_on_the_union_of_training_splits():
    data = DataConfig()
    X, y = pooled_train(data, 0)
    assert X.shape == (800, 1)
    assert pooled_baseline(data, 0) == pytest.approx(0.01, rel=0.2)
    assert ols_baseline(X, y, X, y) <= np.var(y)


def test_bad_client_files_get_one_line_errors_naming_client_and_file(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "nan.csv").write_text("a,b,y\n1,2,3\n4,,6\n")
    (d / "text.csv").write_text("a,b,y\n1,2,3\n4,oops,6\n")
    (d / "notarget.csv").write_text("a,b,c\n1,2,3\n")
    (d / "empty.csv").write_text("")
    data = DataConfig(source="files", path=str(d), target="y", test_fraction=0.0)
    expected = {
        "nan": "column 'b' row 1",
        "text": "column 'b' row 1: non-numeric value 'oops'",
        "notarget": "missing target column 'y'",
        "empty": "empty file",
    }
    for ref in registry(data, 0):
        with pytest.raises(ClientDataError) as err:
            list(open_client(ref).chunks("train", 10))
        msg = str(err.value)
        assert "\n" not in msg
        assert f"client {ref.client_id!r}" in msg and ref.path in msg
        assert expected[ref.client_id] in msg, msg


def test_duplicate_client_ids_are_left_out_and_named(tmp_path):
    d = write_client_files(tmp_path / "dup", [10, 10])
    write_client_files(tmp_path / "dup", [10], kind="parquet")
    data = DataConfig(source="files", path=str(d), target="target")
    assert [r.client_id for r in registry(data, 0)] == ["clinic-1"]
    [(cid, why)] = duplicate_clients(data)
    assert cid == "clinic-0" and "clinic-0.csv, clinic-0.parquet" in why


def test_a_constant_target_is_a_data_error(tmp_path):
    d = tmp_path / "flat"
    d.mkdir()
    (d / "flat.csv").write_text("a,y\n1,5\n2,5\n3,5\n4,5\n")
    [ref] = registry(DataConfig(source="files", path=str(d), target="y", test_fraction=0.0), 0)
    with pytest.raises(
        ClientDataError, match=r"client 'flat' .*flat.csv\): the target is constant"
    ):
        client.feature_moments(ref, 10)


def test_client_ref_holds_no_rows():
    ref = registry(DataConfig(), 0)[0]
    assert isinstance(ref, ClientRef)
    assert set(ref.model_dump()) == {"client_id", "index", "data", "seed", "path"}


def test_screen_updates_never_lets_a_bad_update_through():
    good = _update("good", [1.0], 0.0, 10)
    bad = [
        _update("nan", [float("nan")], 0.0, 10),
        _update("inf", [1.0], float("inf"), 10),
        _update("empty", [1.0], 0.0, 0),
        _update("huge", [1e6], 0.0, 10),
    ]
    kept, rejected = screen_updates([good, *bad], ModelParams.zeros(1), max_norm=100.0)
    assert kept == [good]
    assert [cid for cid, _ in rejected] == ["nan", "inf", "empty", "huge"]
    params, _ = FedAvg().aggregate(ModelParams.zeros(1), kept, {})
    assert np.isfinite(params.to_vector()).all()


def test_clients_outside_the_majority_feature_space_are_set_aside():
    m = Moments(1, np.zeros(2), np.zeros(2))
    reports = [
        StatsReport("a", ["x"], m),
        StatsReport("b", ["x"], m),
        StatsReport("c", ["z"], m),
    ]
    kept, rejected = consistent_reports(reports)
    assert [r.client_id for r in kept] == ["a", "b"]
    assert rejected[0][0] == "c" and "differ" in rejected[0][1]


def test_one_pass_round_equals_scoring_then_training(tmp_path):
    """A files client scores the received model and trains in one read of its file; the
    result is the two-pass one bit for bit: the received model's sums on the test split
    (by hand, from the test rows), then warm-started partial_fit over the train chunks."""
    directory = write_client_files(tmp_path / "c", [700], kind="parquet")
    ref = registry(DataConfig(source="files", path=str(directory), target="target"), 0)[0]
    _, stats = combine_reports([client.feature_moments(ref, 64)])
    global_params = ModelParams(np.array([0.3, -0.2, 0.1]), 0.05)
    cfg = ClientConfig(chunk_size=64, local_epochs=2)
    upd = client.train(ref, global_params, stats, cfg, round_num=3)

    data = open_client(ref)
    X_test = np.concatenate([X for X, _ in data.chunks("test", 64)])
    y_test = np.concatenate([y for _, y in data.chunks("test", 64)])
    residual = y_test - (
        X_test @ global_params.to_raw(stats).coef + global_params.to_raw(stats).intercept
    )
    assert upd.evaluation.n == y_test.shape[0] > 0
    assert upd.evaluation.sse == pytest.approx(float(residual @ residual), rel=1e-12)
    est = global_params.warm_start(
        client.make_estimator(cfg, client.client_random_state(ref.seed, 3, ref.client_id))
    )
    for _ in range(2):
        for X, y in data.chunks("train", 64):
            est.partial_fit(*stats.standardise(X, y))
    np.testing.assert_array_equal(upd.params.coef, est.coef_)
    assert upd.params.intercept == est.intercept_[0]


def test_parquet_columns_of_any_numeric_type_read_as_pandas_reads_them(tmp_path):
    """Integer and float columns come straight from Arrow; a null or a string column is
    named with its row, as the pandas path names it."""
    directory = tmp_path / "p"
    directory.mkdir()
    frame = pd.DataFrame(
        {"a": np.arange(10, dtype=np.int32), "b": np.linspace(0, 1, 10), "target": np.arange(10.0)}
    )
    frame.to_parquet(directory / "site-0.parquet", index=False)
    ref = registry(DataConfig(source="files", path=str(directory), target="target"), 0)[0]
    X = np.concatenate([X for _, X, _ in open_client(ref).pass_chunks(4)])
    assert X.dtype == np.float64 and X.shape == (10, 2)
    np.testing.assert_array_equal(np.sort(X[:, 0]), np.arange(10.0))

    frame["b"] = frame["b"].astype(object)
    frame.loc[6, "b"] = None
    frame.to_parquet(directory / "site-0.parquet", index=False)
    with pytest.raises(ClientDataError, match=r"column 'b' row 6: nan \(NaN or inf\)"):
        list(open_client(ref).pass_chunks(4))
    frame["b"] = [str(v) for v in np.linspace(0, 1, 10)]
    frame.loc[6, "b"] = "n/a"
    frame.to_parquet(directory / "site-0.parquet", index=False)
    with pytest.raises(ClientDataError, match=r"column 'b' row 6: non-numeric value 'n/a'"):
        list(open_client(ref).pass_chunks(4))


def test_a_data_error_has_a_public_form_without_the_datas_values(tmp_path):
    """What a client may tell an untrusted server: the problem and where, no cell value."""
    directory = tmp_path / "p"
    directory.mkdir()
    frame = pd.DataFrame({"a": ["1.5", "2.5", "secret-cell"], "target": [1.0, 2.0, 3.0]})
    frame.to_csv(directory / "site-0.csv", index=False)
    ref = registry(DataConfig(source="files", path=str(directory), target="target"), 0)[0]
    with pytest.raises(ClientDataError) as err:
        list(open_client(ref).pass_chunks(10))
    assert "secret-cell" in str(err.value)
    assert "secret-cell" not in err.value.public
    assert err.value.public.endswith("column 'a' row 2: a non-numeric value")

    frame = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "target": [7.25] * 4})
    frame.to_csv(directory / "site-0.csv", index=False)
    with pytest.raises(ClientDataError) as err:
        client.feature_moments(ref, 10)
    assert "7.25" in str(err.value) and "7.25" not in err.value.public
    assert err.value.public.endswith("the target is constant")
