"""Configuration: TOML + overrides, and one-line errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from fedtune.fl.config import ConfigError, FLConfig, load_config
from fedtune.flows.cli import main

SEED = Path(__file__).resolve().parents[1] / "configs" / "seed.toml"


def test_seed_config_reproduces_the_seed_example():
    cfg = load_config(SEED)
    assert (cfg.data.source, cfg.data.num_clients, cfg.data.samples_per_client) == (
        "synthetic",
        10,
        100,
    )
    assert cfg.rounds.num_rounds == 20
    assert cfg.rounds.clients_per_round is None  # every client, every round


def test_overrides_are_typed_as_toml_and_fall_back_to_strings():
    cfg = load_config(
        SEED,
        ["rounds.num_rounds=3", "data.source=diabetes", "client.eta0=0.05", "data.true_coef=[2.0]"],
    )
    assert cfg.rounds.num_rounds == 3
    assert cfg.data.source == "diabetes"
    assert cfg.client.eta0 == 0.05


@pytest.mark.parametrize(
    "override, key",
    [
        ("rounds.clients_per_round=11", "rounds.clients_per_round"),
        ("rounds.num_rounds=-1", "rounds.num_rounds"),
        ("client.no_such_key=1", "client.no_such_key"),
        ("data.source=files", "data.path"),
        ("data.partition=sorted", "data.partition"),
        ("client.eta0=fast", "client.eta0"),
        ("privacy.secagg_committee=1", "privacy.secagg_committee: must be an integer >= 2"),
        ("privacy.secagg_committee='most'", "privacy.secagg_committee: must be an integer"),
    ],
)
def test_invalid_config_is_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(SEED, [override])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(key), message


def test_missing_csv_directory_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=r"^data\.path: directory not found: .*nowhere"):
        load_config(None, ["data.source=files", f"data.path='{missing}'"])


def test_cli_rejects_bad_config_before_anything_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["run", "--config", str(SEED), "--set", "rounds.clients_per_round=50"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0
    assert "rounds.clients_per_round" in err
    assert not (tmp_path / "mlflow.db").exists()  # nothing was started


def test_unknown_config_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_flat_config_has_every_documented_key():
    flat = FLConfig().flat()
    for key in [
        "data.source",
        "data.path",
        "data.target",
        "data.num_clients",
        "data.samples_per_client",
        "data.partition",
        "rounds.num_rounds",
        "rounds.clients_per_round",
        "client.local_epochs",
        "client.learning_rate",
        "client.eta0",
        "server.strategy",
        "experiment.seed",
        "experiment.register_as",
    ]:
        assert key in flat


def test_cli_rejects_a_privacy_plan_that_cannot_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(
        ["run", "--set", "privacy.noise_multiplier=1.5", "--set", "privacy.adaptive_clipping=true"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "privacy.noise_multiplier" in err
