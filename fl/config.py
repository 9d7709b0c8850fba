"""The one configuration model (`FLConfig`), loaded from TOML plus ``section.key=value`` overrides.

Invalid configuration raises :class:`ConfigError` with a one-line message naming the key, before
anything starts.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExperimentConfig(_Section):
    name: str = "fedtune"
    """MLflow experiment name."""
    run_name: str | None = None
    seed: int = Field(0, ge=0)
    register_as: str | None = None
    """If set, the final model is registered under this Model Registry name, and becomes its
    ``champion`` when it beats the current one by ``promote_margin``."""
    init_model: str | None = None
    """Fine-tune from this model: an MLflow model URI (``models:/NAME@champion``,
    ``models:/m-...``, ``runs:/RUN_ID/...``) or a previous fedtune run id. Its coefficients
    start training and its feature statistics are kept."""
    promote_margin: float = Field(0.0, ge=0, lt=1)
    """The challenger replaces the champion when its federated MSE is lower by at least this
    fraction of the champion's."""
    tracking_uri: str | None = None
    """MLflow tracking URI; default: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``."""
    log_round_models: bool = True


class DataConfig(_Section):
    source: Literal["synthetic", "diabetes", "files"] = "synthetic"
    path: str | None = None
    """Directory with one CSV/Parquet file per client (``files`` source)."""
    target: str = "y"
    """Target column (``files`` source)."""
    num_clients: int = Field(10, ge=1)
    samples_per_client: int = Field(100, ge=2)
    num_features: int = Field(1, ge=1)
    true_coef: tuple[float, ...] | None = None
    """Synthetic weights; default 2.0 for every feature."""
    true_intercept: float = 1.0
    noise: float = Field(0.1, ge=0)
    central_test_size: int = Field(1000, ge=0)
    """Rows of the synthetic held-out set used for central evaluation."""
    holdout_fraction: float = Field(0.2, ge=0, lt=1)
    """Fraction of the diabetes data held out for central evaluation."""
    partition: Literal["iid", "dirichlet", "label-skew"] = "iid"
    alpha: float = Field(0.5, gt=0)
    """Dirichlet concentration (smaller: more quantity skew)."""
    strictness: float = Field(0.8, ge=0, le=1)
    """Label skew: 0 is IID, 1 gives each client a contiguous range of the sorted target."""
    test_fraction: float = Field(0.2, ge=0, lt=1)
    """Fraction of each client's rows kept as its local test split."""

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.source == "files":
            if not self.path:
                raise ValueError("data.path: required when data.source = 'files'")
            if not Path(self.path).is_dir():
                raise ValueError(f"data.path: directory not found: {self.path}")
        if self.true_coef is not None and len(self.true_coef) != self.num_features:
            raise ValueError(
                f"data.true_coef: has {len(self.true_coef)} values, "
                f"data.num_features is {self.num_features}"
            )
        return self


class RoundsConfig(_Section):
    num_rounds: int = Field(20, ge=1)
    clients_per_round: int | None = Field(None, ge=1)
    """Clients sampled per round; default: all (or ``fraction``)."""
    fraction: float | None = Field(None, gt=0, le=1)
    tolerance: float = Field(0.0, ge=0)
    """Early stopping: minimum relative improvement of federated eval MSE."""
    patience: int | None = Field(None, ge=1)
    """Early stopping: rounds without ``tolerance`` improvement before stopping; None disables."""
    min_clients: int = Field(1, ge=1)
    """A round needs at least this many usable updates; otherwise it fails and the global
    model stays as it was (without DP)."""
    round_timeout_s: float | None = Field(None, gt=0)
    """Clients that have not returned this long after the round started are left out of it."""

    @model_validator(mode="after")
    def _check(self) -> RoundsConfig:
        if self.clients_per_round is not None and self.fraction is not None:
            raise ValueError("rounds.fraction: set either clients_per_round or fraction, not both")
        return self


class ClientConfig(_Section):
    loss: Literal["squared_error", "huber", "epsilon_insensitive"] = "squared_error"
    penalty: Literal["l2", "l1", "elasticnet"] | None = "l2"
    alpha: float = Field(1e-4, ge=0)
    learning_rate: Literal["constant", "optimal", "invscaling", "adaptive"] = "invscaling"
    eta0: float = Field(0.01, gt=0)
    power_t: float = 0.25
    local_epochs: int = Field(1, ge=1)
    chunk_size: int = Field(1024, ge=1)
    """Rows per ``partial_fit`` call; files are read in chunks of this size."""
    shuffle: bool = True
    retries: int = Field(0, ge=0)
    """Prefect retries of a failed client task (data errors are not retried)."""
    retry_delay_s: float = Field(0.0, ge=0)
    personalize_epochs: int = Field(0, ge=0)
    """After the last round every client fine-tunes the final model locally for this many
    epochs and reports its test MSE before and after (0: no personalization report)."""


class ServerConfig(_Section):
    strategy: Literal["fedavg"] = "fedavg"
    weighting: Literal["num_examples", "uniform"] = "num_examples"
    max_update_norm: float | None = Field(None, gt=0)
    """Reject a client's update whose L2 distance from the global model (standardised units)
    exceeds this. Non-finite updates are always rejected."""


class PrivacyConfig(_Section):
    """Client-level DP-FedAvg and secure aggregation (see README, "Privacy")."""

    noise_multiplier: float | None = Field(None, ge=0)
    """z: Gaussian noise std relative to the clip norm. Setting it (or target_epsilon) turns DP
    on."""
    target_epsilon: float | None = Field(None, gt=0)
    """The privacy budget: training stops before a round that would exceed it. Without
    noise_multiplier, z is calibrated so that the planned rounds spend at most this."""
    delta: float = Field(1e-5, gt=0, lt=1)
    clipping_norm: float = Field(1.0, gt=0)
    """C: L2 bound on one client's update (the initial C with adaptive clipping)."""
    adaptive_clipping: bool = False
    target_unclipped_quantile: float = Field(0.5, gt=0, lt=1)
    clip_learning_rate: float = Field(0.2, ge=0)
    secure_aggregation: bool = False
    secagg_threshold: float = Field(0.6, gt=0.5, le=1)
    """Fraction of a round's clients that must survive for its sum to be revealed, and of the
    share holders whose shares rebuild a self mask."""
    secagg_committee: int | Literal["all"] = 40
    """With ``secagg_keys = "run"``: how many of a round's clients hold shares of each self mask
    (a committee drawn afresh every round), or "all" of them."""
    secagg_keys: Literal["run", "round"] = "run"
    """"run": each client's key pair is made once per run, then two exchanges per round;
    "round": Bonawitz et al.'s protocol with fresh keys every round, four exchanges per round,
    which also recovers a round in which clients drop at both steps."""

    @property
    def dp(self) -> bool:
        return self.noise_multiplier is not None or self.target_epsilon is not None

    @field_validator("secagg_committee", mode="before")
    @classmethod
    def _committee(cls, value: Any) -> Any:
        if value != "all" and (type(value) is not int or value < 2):
            raise ValueError('must be an integer >= 2 or "all"')
        return value

    @property
    def committee_size(self) -> int | None:
        """``secagg_committee`` as a number, None for every client of the round."""
        return None if self.secagg_committee == "all" else self.secagg_committee


class FaultsConfig(_Section):
    """Injected faults, for simulations and tests of failure handling (seeded)."""

    crash_probability: float = Field(0.0, ge=0, lt=1)
    """Each client update crashes with this probability (per round and attempt)."""
    always_fail: tuple[str, ...] = ()
    """Client ids whose every update fails."""
    nan_clients: tuple[str, ...] = ()
    """Client ids that send NaN coefficients (the server must never average them in)."""
    slow_clients: tuple[str, ...] = ()
    slowdown_s: float = Field(0.0, ge=0)
    """Extra seconds each update of a ``slow_clients`` client takes."""


class FLConfig(_Section):
    experiment: ExperimentConfig = ExperimentConfig()
    data: DataConfig = DataConfig()
    rounds: RoundsConfig = RoundsConfig()
    client: ClientConfig = ClientConfig()
    server: ServerConfig = ServerConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    faults: FaultsConfig = FaultsConfig()

    @model_validator(mode="after")
    def _check(self) -> FLConfig:
        k = self.rounds.clients_per_round
        if k is not None and self.data.source != "files" and k > self.data.num_clients:
            raise ValueError(
                f"rounds.clients_per_round: {k} is more than data.num_clients "
                f"({self.data.num_clients})"
            )
        if self.data.source == "diabetes" and self.data.num_features != 1:
            raise ValueError("data.num_features: applies to the synthetic source only")
        if self.privacy.secure_aggregation:
            from fl.secagg import check_secure_aggregation

            check_secure_aggregation(self.server.strategy)
        return self

    @property
    def injected_faults(self) -> FaultsConfig | None:
        """The ``[faults]`` section if it injects anything, else None."""
        return self.faults if self.faults != FaultsConfig() else None

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}`` for every key, as logged to MLflow."""
        return {
            f"{section}.{key}": value
            for section, values in self.model_dump().items()
            for key, value in values.items()
        }


class ConfigError(ValueError):
    """A configuration problem, with a one-line message that names the key."""


_NAMED_KEY = re.compile(r"^[a-z_]+\.[a-z_]+: ")


def describe_validation_error(err: ValidationError) -> str:
    """One line naming the first bad key and what is wrong with it."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    if _NAMED_KEY.match(msg):
        return msg  # cross-field validators already name the key they reject
    value = first.get("input")
    shown = "" if first["type"] in ("extra_forbidden", "missing") else f" (got {value!r})"
    return f"{loc}: {msg}{shown}" if loc else msg


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is read as TOML, falling back to a plain string."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FLConfig:
    """Read a TOML file (optional) and apply ``section.key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    for item in overrides or []:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {k} is not a section")
        node[keys[-1]] = value
    return validate_config(raw)


def validate_config(raw: dict[str, Any] | FLConfig) -> FLConfig:
    if isinstance(raw, FLConfig):
        return raw
    try:
        return FLConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None
