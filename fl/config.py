"""The one configuration model (`FLConfig`), loaded from TOML plus ``section.key=value`` overrides.

Invalid configuration raises :class:`ConfigError` with a one-line message naming the key, before
anything starts.
"""

from __future__ import annotations

import difflib
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
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ExperimentConfig(_Section):
    """The MLflow experiment and run, the seed, and the model's lifecycle: registering, fine-tuning
    from a previous model, promoting a champion (see docs/operations.md)."""

    name: str = "fedtune"
    """MLflow experiment (created if missing)."""
    run_name: str | None = None
    """MLflow run name (MLflow picks one if unset)."""
    seed: int = Field(0, ge=0)
    """Seeds sampling, partitioning, local splits and client shuffling."""
    register_as: str | None = None
    """Register the final model under this Model Registry name; it becomes the ``champion`` alias
    when it beats the current champion by ``promote_margin``."""
    init_model: str | None = None
    """Fine-tune from this model: an MLflow model URI (``models:/NAME@champion``,
    ``models:/m-...``, ``runs:/RUN_ID/...``) or a previous fedtune run id. Its coefficients
    start training and its feature statistics are kept; a model with a different number of
    features is refused."""
    promote_margin: float = Field(0.0, ge=0, lt=1)
    """The challenger replaces the champion when its federated MSE is lower by at least this
    fraction of the champion's."""
    tracking_uri: str | None = None
    """MLflow tracking URI; else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``."""
    log_round_models: bool = True
    """Log each round's global model as an MLflow logged model."""


class DataConfig(_Section):
    """Where the clients' data comes from. ``synthetic`` and ``diabetes`` are simulated sources,
    split into ``num_clients`` clients; ``files`` reads one file per client. ``path`` is required
    with ``files``; ``true_coef`` needs ``num_features`` values; ``num_features`` applies to the
    synthetic source only.

    Files are read in chunks of ``client.chunk_size`` rows (``partial_fit`` per chunk), so a
    client's file need not fit in memory. A bad file gives one line naming the client, the file
    and the row or column (missing target, non-numeric value, NaN/inf, empty, unreadable or
    truncated file, constant target, duplicate client id), and that client is left out (see
    docs/operations.md)."""

    source: Literal["synthetic", "diabetes", "files"] = "synthetic"
    """``synthetic``, ``diabetes`` (scikit-learn's bundled data, raw units) or ``files``."""
    path: str | None = None
    """``files``: directory with one ``.csv`` or ``.parquet`` file per client; the file stem is
    the client id."""
    target: str = "y"
    """``files``: the target column; every other column is a numeric feature."""
    num_clients: int = Field(10, ge=1)
    """Simulated sources: number of clients."""
    samples_per_client: int = Field(100, ge=2)
    """``synthetic``: rows per client (on average, with ``dirichlet``)."""
    num_features: int = Field(1, ge=1)
    """``synthetic``: features, each ``N(0, 1)``."""
    true_coef: tuple[float, ...] | None = None
    """``synthetic``: the true weights, e.g. ``[2.0, -1.0]``; unset: 2.0 for every feature."""
    true_intercept: float = 1.0
    """``synthetic``: the true intercept."""
    noise: float = Field(0.1, ge=0)
    """``synthetic``: std of the Gaussian noise."""
    central_test_size: int = Field(1000, ge=0)
    """``synthetic``: rows of the server's held-out set, used for central evaluation."""
    holdout_fraction: float = Field(0.2, ge=0, lt=1)
    """``diabetes``: fraction of the data held out centrally, for central evaluation."""
    partition: Literal["iid", "dirichlet", "label-skew"] = "iid"
    """Simulated sources: ``iid``, ``dirichlet`` (quantity skew) or ``label-skew`` (target
    skew)."""
    alpha: float = Field(0.5, gt=0)
    """``dirichlet``: concentration; smaller is more skewed."""
    strictness: float = Field(0.8, ge=0, le=1)
    """``label-skew``: 0 is IID, 1 gives each client a contiguous range of the sorted target."""
    test_fraction: float = Field(0.2, ge=0, lt=1)
    """Fraction of each client's rows kept as its local test split (seeded)."""

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
    """How many rounds, which clients take part, when to stop early, and what a round needs.
    Set either ``clients_per_round`` or ``fraction``, not both; with a simulated source
    ``clients_per_round`` is at most ``data.num_clients``. Failures: docs/operations.md."""

    num_rounds: int = Field(20, ge=1)
    """Rounds to run (at most)."""
    clients_per_round: int | None = Field(None, ge=1)
    """Clients sampled per round (seeded, without replacement); unset: all (or ``fraction``)."""
    fraction: float | None = Field(None, gt=0, le=1)
    """Alternatively, the fraction of clients per round (at least one). Under DP, the rate q of
    Poisson sampling (see docs/privacy.md)."""
    tolerance: float = Field(0.0, ge=0)
    """Early stopping: minimum relative improvement of federated eval MSE."""
    patience: int | None = Field(None, ge=1)
    """Early stopping: rounds without ``tolerance`` improvement before stopping; unset never
    stops."""
    min_clients: int = Field(1, ge=1)
    """A round with fewer usable updates fails: a warning, ``round_failed = 1`` in its metrics,
    the global model stays as it was, and training goes on. If no round succeeds, the run fails
    (exit 1) with the first reason. Applies with and without secure aggregation; under DP it
    must stay 1, because a DP round's number of clients is private (an empty Poisson sample
    still adds noise)."""
    round_timeout_s: float | None = Field(None, gt=0)
    """A client that has not returned this long after its round started is left out
    (``clients_timed_out``). The flow keeps this deadline, not Prefect's ``timeout_seconds``;
    under secure aggregation it applies to the masked updates (see docs/operations.md)."""
    clients_per_task: int | Literal["auto"] = "auto"
    """How many clients one Prefect training task runs, one after another (task runs named
    ``train-r07-site-3..site-9``). An integer (at least 1) forces it; ``"auto"`` runs as many
    training tasks per round as the task runner runs at once (``runner.n_workers`` threads,
    one by default; a ``LocalCluster``'s workers; on a cluster at ``runner.address``, its
    workers' threads as its scheduler counts them each round, 16 if it cannot): one
    task per client while the round has no more clients than that, else the clients spread
    evenly over that many batches. Why: Prefect's own cost per task (4-8 ms, more under load)
    outweighs a small client's work (1-2 ms), and tasks beyond what runs at once only wait.
    In a batch each client keeps its own outcome (update, or failure and why; its seconds in
    the task's log), its ``client.retries`` (inside the task, not Prefect's) and
    ``round_timeout_s`` on its own time (injected slowness counted, not slept), so batched and
    per-client runs give the same model; a batch still running after ``round_timeout_s`` times
    its size leaves its clients out as timed out. Not under secure aggregation, whose steps
    stay one task per client."""

    @field_validator("clients_per_task", mode="before")
    @classmethod
    def _per_task(cls, value: Any) -> Any:
        if value != "auto" and (type(value) is not int or value < 1):
            raise ValueError('must be an integer >= 1 or "auto"')
        return value

    @model_validator(mode="after")
    def _check(self) -> RoundsConfig:
        if self.clients_per_round is not None and self.fraction is not None:
            raise ValueError("rounds.fraction: set either clients_per_round or fraction, not both")
        return self


class ClientConfig(_Section):
    """The local ``SGDRegressor`` each client trains, and the retries of a client's task."""

    loss: Literal["squared_error", "huber", "epsilon_insensitive"] = "squared_error"
    """The ``SGDRegressor`` loss."""
    penalty: Literal["l2", "l1", "elasticnet"] | None = "l2"
    """The regularisation term, or none."""
    alpha: float = Field(1e-4, ge=0)
    """Regularisation strength."""
    learning_rate: Literal["constant", "optimal", "invscaling", "adaptive"] = "invscaling"
    """The learning-rate schedule."""
    eta0: float = Field(0.01, gt=0)
    """Initial learning rate."""
    power_t: float = 0.25
    """``invscaling`` exponent."""
    local_epochs: int = Field(1, ge=1)
    """Passes over the local data per round."""
    chunk_size: int = Field(1024, ge=1)
    """Rows per ``partial_fit`` call (and per file read)."""
    shuffle: bool = True
    """Shuffle within each chunk, every epoch."""
    retries: int = Field(0, ge=0)
    """Prefect retries of a failed client task (data errors are not retried)."""
    retry_delay_s: float = Field(0.0, ge=0)
    """Seconds between those retries."""
    personalize_epochs: int = Field(0, ge=0)
    """After the last round every client fine-tunes the final model locally for this many
    epochs and reports its test MSE before and after (0: no personalization report)."""
    proximal_mu: float = Field(0.0, ge=0)
    """FedProx (Li et al., 2020): each client minimises its loss plus
    ``proximal_mu / 2 * ||w - w_global||^2``, which keeps local models near the global one on
    heterogeneous data. 0 is plain local training. Needs ``penalty`` l2 or none."""

    @model_validator(mode="after")
    def _check(self) -> ClientConfig:
        if self.proximal_mu and self.penalty not in ("l2", None):
            raise ValueError(
                f"client.proximal_mu: needs client.penalty l2 or none, not {self.penalty}"
            )
        return self


class ServerConfig(_Section):
    """How the server screens client updates and aggregates them."""

    strategy: Literal[
        "fedavg",
        "fedavgm",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "median",
        "trimmed-mean",
        "krum",
        "multi-krum",
    ] = "fedavg"
    """Aggregation strategy. Sum-based (run under secure aggregation and DP): ``fedavg``
    (McMahan et al., 2017), ``fedavgm`` (server momentum; Hsu et al., 2019), ``fedadam``,
    ``fedyogi``, ``fedadagrad`` (server optimizers; Reddi et al., 2021). Robust, needing every
    individual update: ``median`` (coordinate-wise; Yin et al., 2018), ``trimmed-mean``,
    ``krum`` and ``multi-krum`` (Blanchard et al., 2017). Which to pick:
    docs/benchmarks.md."""
    weighting: Literal["num_examples", "uniform"] | None = None
    """How the strategy weighs each client's update: by its training examples
    (``"num_examples"``, FedAvg's choice, the default without DP; under secure aggregation the
    counts are summed masked) or equally (``"uniform"``, the default and the only choice under
    DP, where an example count would be private and unbounded)."""
    max_update_norm: float | None = Field(None, gt=0)
    """Reject a client's update whose L2 distance from the global model (standardised units)
    exceeds this. Non-finite updates are always rejected."""
    learning_rate: float | None = Field(None, gt=0)
    """Server learning rate of ``fedavgm``, ``fedadam``, ``fedyogi`` and ``fedadagrad`` (eta in
    Reddi et al.); default ``1 - momentum`` for ``fedavgm`` (a steady update then moves the
    model as far as FedAvg's), 0.1 for the adaptive ones, whose step is about eta per
    coordinate and round in standardised units: tune it (docs/benchmarks.md)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """``fedavgm``'s server momentum (beta)."""
    beta1: float = Field(0.9, ge=0, lt=1)
    """First-moment decay of ``fedadam`` and ``fedyogi`` (and ``fedadagrad``'s momentum)."""
    beta2: float = Field(0.99, ge=0, lt=1)
    """Second-moment decay of ``fedadam`` and ``fedyogi``."""
    tau: float = Field(1e-3, gt=0)
    """Adaptivity (epsilon) of the server optimizers: the smallest denominator, and the
    initial second moment is ``tau ** 2``."""
    trim_fraction: float = Field(0.1, ge=0, lt=0.5)
    """``trimmed-mean``: the fraction of values dropped at *each* end of every coordinate."""
    byzantine_clients: int = Field(0, ge=0)
    """``krum`` and ``multi-krum``: f, the number of Byzantine clients to tolerate (a round
    needs more than 2f + 2 updates). ``multi-krum`` averages the n - f best-scored updates."""


class PrivacyConfig(_Section):
    """Client-level DP-FedAvg and secure aggregation (see docs/privacy.md). DP is on when
    ``noise_multiplier`` or ``target_epsilon`` is set. A privacy plan that cannot work (e.g.
    adaptive clipping with too little noise left for the update sum) is refused before any
    round, naming the key. Secure aggregation refuses order-statistic strategies."""

    noise_multiplier: float | None = Field(None, ge=0)
    """z: Gaussian noise std relative to the clip norm. Setting it (or ``target_epsilon``) turns
    on DP-FedAvg."""
    target_epsilon: float | None = Field(None, gt=0)
    """The ε budget: training stops before a round that would exceed it. Without
    ``noise_multiplier``, z is calibrated so that the planned rounds spend at most this."""
    delta: float = Field(1e-5, gt=0, lt=1)
    """δ at which ε is reported (keep it below 1 / number of clients)."""
    clipping_norm: float = Field(1.0, gt=0)
    """C: L2 bound on one client's update, in standardised units (the starting C with adaptive
    clipping)."""
    statistics_clip_norm: float = Field(10.0, gt=0)
    """C_s: under DP, the L2 bound on one client's vector of column means and standard
    deviations (features and target), in data units. A client's vector beyond it is scaled
    down, which shrinks the statistics; set a bound you know publicly (see docs/privacy.md)."""
    statistics_noise_multiplier: float = Field(20.0, gt=0)
    """z_s: under DP, the Gaussian noise on the feature statistics, relative to
    ``statistics_clip_norm``. Part of the reported ε (20 costs ε ≈ 0.16 alone at δ = 1e-5)."""
    adaptive_clipping: bool = False
    """Move C towards the ``target_unclipped_quantile`` of update norms (Andrew et al., 2021)."""
    target_unclipped_quantile: float = Field(0.5, gt=0, lt=1)
    """γ: the fraction of updates that should fit under C."""
    clip_learning_rate: float = Field(0.2, ge=0)
    """η_C: step of the geometric update of C."""
    secure_aggregation: bool = False
    """Clients send masked updates; the server recovers only their sum."""
    secagg_threshold: float = Field(0.6, gt=0.5, le=1)
    """Fraction of a round's clients (more than half) that must survive for their sum to be
    revealed, and of the share holders whose shares rebuild a self mask."""
    secagg_committee: int | Literal["all"] = 40
    """With ``secagg_keys = "run"``: how many of a round's clients (at least 2) hold shares of
    each self mask (a committee drawn afresh every round; all of them in a smaller round), or
    ``"all"`` of them."""
    secagg_keys: Literal["run", "round"] = "run"
    """``"run"``: each client's key pair is made once per run, then three exchanges per round;
    ``"round"``: Bonawitz et al.'s protocol with fresh keys every round, five exchanges per
    round, which also recovers from dropouts at every step."""

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
    """Each client update crashes with this probability (a fresh draw per round and retry)."""
    always_fail: tuple[str, ...] = ()
    """Client ids whose every update fails."""
    nan_clients: tuple[str, ...] = ()
    """Client ids that send NaN coefficients (rejected by the server, never averaged in)."""
    slow_clients: tuple[str, ...] = ()
    """Client ids whose updates take ``slowdown_s`` longer."""
    slowdown_s: float = Field(0.0, ge=0)
    """Extra seconds each update of a ``slow_clients`` client takes."""
    byzantine_fraction: float = Field(0.0, ge=0, lt=1)
    """About this fraction of the clients are Byzantine (each client's role is a seeded draw
    from the seed and its id alone, so it is the same in every exchange and round): every
    update they send is corrupted as ``byzantine_kind`` says."""
    byzantine_kind: Literal["sign-flip", "scale", "gaussian"] = "sign-flip"
    """With Δ the honest update (trained model minus the global one): ``sign-flip`` sends the
    global model minus Δ; ``scale`` the global model plus ``byzantine_scale`` · Δ; ``gaussian``
    the global model plus N(0, ``byzantine_scale``^2) noise in every coordinate."""
    byzantine_scale: float = -20.0
    """The factor of ``scale`` attacks, the standard deviation of ``gaussian`` ones (its
    absolute value)."""


class RunnerConfig(_Section):
    """Where the flow's Prefect tasks run (see docs/operations.md). ``thread``: a thread pool in
    the flow's process, right for small clients. ``dask``: prefect-dask's ``DaskTaskRunner``
    (``pip install "fedtune[dask]"``) on a ``distributed`` cluster, an existing scheduler
    (``address``) or a ``LocalCluster`` of ``n_workers`` processes started for the run, for
    clients big enough to fill a core each; the server's own tasks (MLflow logging) stay in the
    flow's process. Under ``dask`` a client named in ``silos`` runs only on workers that hold
    its silo's resource (started with ``--resources "silo-3=1"``): its data is read there.
    Secure aggregation runs on ``thread`` only, for now."""

    kind: Literal["thread", "dask"] = "thread"
    """``thread`` or ``dask``."""
    address: str | None = None
    """``dask``: the scheduler of a running cluster, e.g. ``tcp://10.0.0.5:8786``; unset: a
    ``LocalCluster`` for the run."""
    n_workers: int | None = Field(None, ge=1)
    """``thread``: threads (unset: Prefect's ``PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS``,
    else 1). ``dask`` without ``address``: the ``LocalCluster``'s worker processes, one thread
    each (unset: one per core)."""
    silos: dict[str, str] = {}
    """``dask``: client id -> the Dask worker resource of its silo, e.g.
    ``{"site-3" = "silo-3"}``: that client's tasks run only on workers started with
    ``--resources "silo-3=1"``, and the run stops with one line if no worker has it. Clients
    not named run on any worker."""

    @model_validator(mode="after")
    def _check(self) -> RunnerConfig:
        if self.address is not None and self.n_workers is not None:
            raise ValueError(
                "runner.n_workers: sizes the LocalCluster of a run without runner.address; "
                "set one of them"
            )
        if self.kind != "dask":
            for key in ("address", "silos"):
                if getattr(self, key):
                    raise ValueError(f'runner.{key}: needs runner.kind = "dask"')
        for client_id, resource in self.silos.items():
            if not _RESOURCE.fullmatch(resource):
                raise ValueError(
                    f"runner.silos: {client_id!r} -> {resource!r} is not a Dask resource name "
                    "(letters, digits, '-', '_', '.')"
                )
        return self

    def check_privacy(self, privacy: PrivacyConfig) -> None:
        """Secure aggregation keeps a client's secrets in the process that runs its tasks, from
        one step of the protocol to the next; Dask ships each task's function to a worker by
        value, with a fresh copy of that store every time, so the protocol could not finish."""
        if privacy.secure_aggregation and self.kind == "dask":
            raise ValueError(
                'privacy.secure_aggregation: not available with runner.kind = "dask" yet (a '
                "client's secrets must stay in one worker process between the protocol's "
                'steps); use runner.kind = "thread"'
            )


_RESOURCE = re.compile(r"[A-Za-z0-9_.-]+")


class FLConfig(_Section):
    """The whole configuration: one section per TOML table."""

    experiment: ExperimentConfig = ExperimentConfig()
    data: DataConfig = DataConfig()
    rounds: RoundsConfig = RoundsConfig()
    client: ClientConfig = ClientConfig()
    server: ServerConfig = ServerConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    faults: FaultsConfig = FaultsConfig()
    runner: RunnerConfig = RunnerConfig()

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
        if self.privacy.dp and self.rounds.min_clients != 1:
            raise ValueError(
                "rounds.min_clients: must be 1 under DP (a round's number of clients is private; "
                f"an empty round adds noise only) (got {self.rounds.min_clients})"
            )
        self._check_dp_decisions()
        self.runner.check_privacy(self.privacy)
        from fedtune.fl.strategies import check_strategy

        check_strategy(self)
        return self

    def _check_dp_decisions(self) -> None:
        """Under DP, early stopping and promotion decide on the server's own held-out set (a
        simulated source's central test set), never on the clients' un-noised scores: what
        they decide is released. A files source has no such set, so both are refused."""
        if not self.privacy.dp or self.data.source != "files":
            return
        for key, value in (
            ("rounds.patience", self.rounds.patience),
            ("experiment.register_as", self.experiment.register_as),
        ):
            if value is not None:
                raise ValueError(
                    f"{key}: under DP it needs a test set the server holds (simulated sources "
                    "have one; a files source does not), since the clients' own scores are not "
                    "noised; unset it"
                )

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


def _did_you_mean(loc: tuple[Any, ...]) -> str:
    """`` (did you mean rounds.num_rounds?)`` for an unknown key at ``loc``: the closest key of
    its section, else the same key in another section, else the closest section or key."""
    sections = {name: f.annotation.model_fields for name, f in FLConfig.model_fields.items()}
    everywhere = [f"{s}.{k}" for s, keys in sections.items() for k in keys]
    *path, key = (str(p) for p in loc)
    if len(path) > 1:
        return ""
    elsewhere = [full for full in everywhere if full.endswith(f".{key}")]
    if path:
        close = difflib.get_close_matches(key, list(sections.get(path[0], ())), n=1)
        candidates = [f"{path[0]}.{c}" for c in close] + elsewhere
    else:
        candidates = elsewhere + difflib.get_close_matches(key, list(sections), n=1)
    candidates += difflib.get_close_matches(".".join([*path, key]), everywhere, n=1, cutoff=0.8)
    return f" (did you mean {candidates[0]}?)" if candidates else ""


def describe_validation_error(err: ValidationError) -> str:
    """One line naming the first bad key and what is wrong with it; an unknown key comes with
    the closest valid one."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key" + _did_you_mean(first["loc"])
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
