"""The membership-inference audit: its statistics against hand computations and scipy, a leaky
model that fails it, and `fedtune audit` on real runs (a DP run that passes, a leaky run that
passes without a claim and fails a claimed epsilon)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from fedtune.fl.audit import (
    advantage_interval,
    attack_counts,
    auc,
    choose_threshold,
    client_losses,
    clopper_pearson,
    dp_advantage_bound,
    membership_audit,
    replacement_bound,
    split_clients,
)
from fedtune.fl.config import load_config
from fedtune.fl.data import open_client, registry
from fedtune.fl.params import ModelParams
from fedtune.fl.simulation import simulate
from fedtune.flows.cli import main
from fedtune.flows.training import federated_training
from mlflow import MlflowClient
from scipy.stats import binomtest

LEAKY_FEATURES = 800
LEAKY = [
    # Pure-noise targets, far more features than rows (40 clients x 5 rows), no penalty, local
    # training to interpolation, and a server step that adds the clients' (nearly orthogonal)
    # updates instead of averaging them: the model memorises its members' rows.
    f"data.num_features={LEAKY_FEATURES}",
    f"data.true_coef={[0.0] * LEAKY_FEATURES}",
    "data.samples_per_client=5",
    "data.num_clients=40",
    "data.noise=1.0",
    "data.test_fraction=0",
    "rounds.num_rounds=2",
    "client.local_epochs=8",
    "client.eta0=0.0018",
    "client.learning_rate='constant'",
    "client.alpha=0",
    "server.strategy='fedavgm'",
    "server.momentum=0",
    "server.learning_rate=40",
]


# -- the statistics, by hand and by scipy -------------------------------------------------------


def test_clopper_pearson_matches_the_closed_forms_and_scipy():
    # k = 0 and k = n have closed forms: the one-sided tail alpha/2 at p^n or (1-p)^n.
    assert clopper_pearson(0, 10) == (0.0, pytest.approx(1 - 0.025 ** (1 / 10)))
    assert clopper_pearson(10, 10) == (pytest.approx(0.025 ** (1 / 10)), 1.0)
    for k, n, confidence in [(3, 10, 0.95), (17, 20, 0.975), (1, 7, 0.9), (50, 100, 0.95)]:
        ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
        assert clopper_pearson(k, n, confidence) == pytest.approx((ci.low, ci.high), abs=1e-9)
    with pytest.raises(ValueError, match="k=5, n=4"):
        clopper_pearson(5, 4)


def test_the_advantage_interval_is_bonferroni_over_two_exact_intervals():
    # 10 of 10 members and 0 of 10 non-members guessed "member": each rate's 97.5% interval is
    # one-sided tail 0.0125, so TPR >= 0.0125^(1/10) and FPR <= 1 - 0.0125^(1/10).
    edge = 0.0125 ** (1 / 10)
    assert advantage_interval(10, 10, 0, 10) == pytest.approx((edge - (1 - edge), 1.0))
    tpr = binomtest(14, 20).proportion_ci(confidence_level=0.975, method="exact")
    fpr = binomtest(4, 25).proportion_ci(confidence_level=0.975, method="exact")
    assert advantage_interval(14, 20, 4, 25) == pytest.approx(
        (tpr.low - fpr.high, tpr.high - fpr.low), abs=1e-9
    )


def test_thresholds_are_chosen_by_hand_computed_advantage():
    members, others = np.array([1.0, 2.0, 3.0]), np.array([2.5, 4.0, 5.0])
    # Candidates: 1 (nobody), 1.5, 2.25, 2.75, 3.5, 4.5. "loss < 2.25" takes 2 of 3 members and
    # no non-member (2/3); "loss < 3.5" all members and one non-member (also 2/3): the first.
    assert choose_threshold(members, others) == (2.25, pytest.approx(2 / 3))
    assert attack_counts(members, others, 2.75) == (2, 1)
    # Nothing separates identical losses: the best guess is "nobody", advantage 0.
    assert choose_threshold(np.ones(3), np.ones(4)) == (1.0, 0.0)
    assert auc(members, others) == pytest.approx(8 / 9)  # 1 < all, 2 < all, 3 < 4 and 5
    assert auc(np.ones(2), np.ones(2)) == 0.5


def test_the_split_is_disjoint_covering_and_seeded():
    split = split_clients(9, 12, selection_fraction=0.5, seed=4)
    assert sorted([*split.select_members, *split.score_members]) == list(range(9))
    assert sorted([*split.select_non_members, *split.score_non_members]) == list(range(12))
    assert (len(split.select_members), len(split.select_non_members)) == (4, 6)
    again = split_clients(9, 12, selection_fraction=0.5, seed=4)
    assert list(again.score_members) == list(split.score_members)
    assert list(split_clients(9, 12, seed=5).score_members) != list(split.score_members)
    with pytest.raises(ValueError, match="at least 2 members and 2 held-out clients"):
        split_clients(1, 10)


def test_the_model_is_chosen_on_the_selection_split_and_scored_on_the_other():
    split = split_clients(4, 4, seed=0)
    sel_m, score_m = split.select_members, split.score_members
    sel_n, score_n = split.select_non_members, split.score_non_members
    # Model "a" separates the selection split perfectly and is reversed on the scoring split;
    # model "b" separates only half on selection but everything on scoring. An audit that
    # picked the best model by its scoring-split advantage would report b's 1.0.
    members, others = np.zeros((4, 2)), np.zeros((4, 2))
    members[sel_m, 0], others[sel_n, 0] = [1.0, 2.0], [3.0, 4.0]
    members[score_m, 0], others[score_n, 0] = [5.0, 6.0], [1.5, 2.5]
    members[sel_m, 1], others[sel_n, 1] = [1.0, 3.5], [3.0, 4.0]
    members[score_m, 1], others[score_n, 1] = [0.1, 0.2], [9.0, 9.5]
    result = membership_audit(["a", "b"], members, others, split, dp_epsilon=1.0, dp_delta=0.0)
    a, b = result.models
    assert (a.selection_advantage, b.selection_advantage) == (1.0, 0.5)
    assert b.advantage == 1.0
    # a's threshold is the midpoint 2.5 of the selection split: scored, it takes no member and
    # one non-member (1.5), so TPR - FPR = 0 - 1/2.
    assert (result.model, result.threshold, result.advantage) == ("a", 2.5, -0.5)
    low, high = advantage_interval(0, 2, 1, 2)
    assert (result.ci_low, result.ci_high) == (pytest.approx(low), pytest.approx(high))
    assert result.passed and result.bound == pytest.approx(math.tanh(1.0))


def test_dp_bounds_are_the_hypothesis_testing_limits():
    assert dp_advantage_bound(0.0, 0.0) == 0.0
    assert dp_advantage_bound(1.0, 0.0) == pytest.approx((math.e - 1) / (math.e + 1))
    assert dp_advantage_bound(math.inf, 0.0) == 1.0
    assert dp_advantage_bound(1.0, 1e-5) > dp_advantage_bound(1.0, 0.0)
    # Replacing a client is two add/remove steps: (2 eps, (1 + e^eps) delta).
    assert replacement_bound(1.0, 0.0) == pytest.approx((math.e**2 - 1) / (math.e**2 + 1))
    eps, delta = 0.5, 1e-3
    by_hand = (math.exp(1.0) - 1 + 2 * (1 + math.exp(eps)) * delta) / (math.exp(1.0) + 1)
    assert replacement_bound(eps, delta) == pytest.approx(by_hand)
    assert replacement_bound(eps, delta) <= 2 * dp_advantage_bound(eps, delta)


# -- membership and losses ----------------------------------------------------------------------


def test_members_are_every_registered_client_not_a_replayed_sample():
    # Under DP at q = 0.1 most clients never train in one round; the audit still counts every
    # registered client as a member (the population DP's neighbouring relation is about).
    config = load_config(
        None,
        ["data.num_clients=30", "rounds.fraction=0.1", "privacy.noise_multiplier=1.0"],
    )
    zero, one = ModelParams.zeros(1), ModelParams(np.zeros(1), 1.0)
    members, others = client_losses(config, [zero, one])
    assert members.shape == (30, 2) and others.shape == (30, 2)
    first = registry(config.data, config.experiment.seed)[0]
    y = np.concatenate([y for _, y in open_client(first).chunks("train", 7)])
    assert members[0] == pytest.approx([np.mean(y**2), np.mean((y - 1) ** 2)])


def test_diabetes_held_out_clients_have_a_members_size():
    # 442 rows, 88 held out; 354 over 10 clients is 35-36 each, of which 80% (28) train: the
    # 88 held-out rows make 88 // 28 = 3 held-out clients, not 10 small ones.
    config = load_config(None, ["data.source='diabetes'"])
    members, others = client_losses(config, [ModelParams.zeros(10)])
    assert members.shape == (10, 1) and others.shape == (3, 1)


def test_a_memorising_model_fails_a_tiny_claimed_epsilon():
    config = load_config(None, LEAKY)
    result = simulate(config)
    final = result.params.to_raw(result.stats)
    truth = ModelParams(np.zeros(LEAKY_FEATURES), 1.0)  # the data's own model: saw no client
    members, others = client_losses(config, [truth, final])
    split = split_clients(len(members), len(others))
    audit = membership_audit(["truth", "final"], members, others, split, 0.1, 0.0)
    assert audit.model == "final" and not audit.passed
    assert audit.ci_low > audit.bound == pytest.approx(math.tanh(0.1))
    honest = membership_audit(["truth"], members[:, :1], others[:, :1], split, 0.0, 0.0)
    assert honest.bound == 0.0 and honest.passed  # nothing to find: the lower bound stays <= 0


# -- `fedtune audit` on real runs ---------------------------------------------------------------


@pytest.mark.integration
def test_fedtune_audit_passes_a_dp_run_attacking_every_round_model(
    prefect_api, mlflow_uri, tmp_path, capsys
):
    config = load_config(
        None,
        [
            "data.num_clients=40",
            "rounds.fraction=0.5",
            "rounds.num_rounds=3",
            "privacy.noise_multiplier=3.0",  # epsilon about 1.3: a bound below 1 to pass
        ],
    )
    result = federated_training(config)
    assert main(["audit", "--run", result.run_id]) == 0
    out = capsys.readouterr().out
    for name in ["round-001", "round-002", "round-003", "final"]:
        assert f"  {name} " in out
    assert "pass: the lower bound" in out
    client = MlflowClient(mlflow_uri)
    metrics = client.get_run(result.run_id).data.metrics
    eps = metrics["audit_dp_epsilon"]
    assert metrics["audit_passed"] == 1.0 and metrics["audit_ci_low"] <= metrics["audit_bound"]
    assert metrics["audit_bound"] < 0.95
    assert metrics["audit_dp_advantage_bound"] == pytest.approx(
        (math.exp(eps) - 1 + 2e-5) / (math.exp(eps) + 1)
    )
    assert metrics["audit_bound"] == pytest.approx(
        min(1.0, (math.exp(2 * eps) - 1 + 2 * (1 + math.exp(eps)) * 1e-5) / (math.exp(2 * eps) + 1))
    )
    # Every registered client is a member, whoever the secret sampling picked.
    assert metrics["audit_members"] == 40 and metrics["audit_scored_members"] == 20
    path = client.download_artifacts(result.run_id, "audit.json", dst_path=str(tmp_path))
    audit = json.loads(Path(path).read_text())
    assert [m["model"] for m in audit["models"]] == ["round-001", "round-002", "round-003", "final"]


@pytest.mark.integration
def test_fedtune_audit_fails_a_leaky_run_against_a_claimed_epsilon(prefect_api, mlflow_uri, capsys):
    from fedtune.tasks.tracking import load_released_models

    result = federated_training(load_config(None, LEAKY))
    released = load_released_models(mlflow_uri, result.run_id)
    assert [name for name, _ in released] == ["round-001", "round-002", "final"]
    # The loader returns the released models themselves: the last round's is the final one,
    # as summary.json records it, and the first round's is another.
    (_, first), (_, last), (_, final) = released
    assert np.allclose(final.coef, result.coef) and final.intercept == pytest.approx(
        result.intercept
    )
    assert np.allclose(last.coef, final.coef) and not np.allclose(first.coef, final.coef)

    assert main(["audit", "--run", result.run_id]) == 0
    assert "not differentially private: no bound applies" in capsys.readouterr().out
    assert main(["audit", "--run", result.run_id, "--epsilon", "0.1"]) == 3
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith(
        f"fedtune: audit: run {result.run_id} leaks more than (ε, δ) = (0.1, 0) allows: the "
        "attack's advantage is at least"
    )
    assert "\n" not in err
    assert "Traceback" not in captured.out + captured.err
    metrics = MlflowClient(mlflow_uri).get_run(result.run_id).data.metrics
    assert metrics["audit_passed"] == 0.0 and metrics["audit_ci_low"] > metrics["audit_bound"]


@pytest.mark.integration
def test_fedtune_audit_errors_are_one_line(mlflow_uri, capsys):
    assert main(["audit", "--run", "no-such-run"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedtune: audit failed: run no-such-run") and "\n" not in err
    assert main(["audit", "--run", "no-such-run", "--delta", "1e-5"]) == 2
    assert capsys.readouterr().err.strip() == "fedtune: config error: --delta: needs --epsilon"
