"""Client-side tasks. Each gets a *reference* to its client's data and loads it itself; only
parameters, counts and scalar metrics come back."""

from __future__ import annotations

from prefect import task
from prefect.runtime import task_run

from fl import client
from fl import faults as fl_faults
from fl.config import ClientConfig, FaultsConfig
from fl.data import ClientDataError, ClientRef
from fl.params import ClientUpdate, FeatureStats, ModelParams
from fl.statistics import StatsReport
from tasks import TASK_OPTIONS


@task(name="client-statistics", task_run_name="stats-{ref.client_id}", **TASK_OPTIONS)
def client_statistics(ref: ClientRef, chunk_size: int) -> StatsReport:
    return client.feature_moments(ref, chunk_size)


def _transient(task, task_run, state) -> bool:
    """Retry crashes and timeouts, not data errors: a bad file stays bad."""
    try:
        state.result()
    except ClientDataError:
        return False
    except Exception:  # noqa: BLE001 -- anything else may be transient
        return True
    return False


@task(
    name="train-client",
    task_run_name="train-r{round_num:02d}-{ref.client_id}",
    retry_condition_fn=_transient,
    **TASK_OPTIONS,
)
def train_client(
    ref: ClientRef,
    global_params: ModelParams,
    stats: FeatureStats,
    cfg: ClientConfig,
    round_num: int,
    faults: FaultsConfig | None = None,
) -> ClientUpdate:
    return local_update(ref, global_params, stats, cfg, round_num, faults)


def local_update(
    ref: ClientRef,
    global_params: ModelParams,
    stats: FeatureStats,
    cfg: ClientConfig,
    round_num: int,
    faults: FaultsConfig | None,
) -> ClientUpdate:
    """A client's training, with the injected ``faults`` (if any) of this round and attempt."""
    attempt = 1 if faults is None else task_run.get_run_count()
    return fl_faults.train(faults, ref, global_params, stats, cfg, round_num, attempt)


@task(name="final-report", task_run_name="final-{ref.client_id}", **TASK_OPTIONS)
def final_report(
    ref: ClientRef,
    params: ModelParams,
    stats: FeatureStats,
    cfg: ClientConfig,
    champion: ModelParams | None,
    rounds: int,
) -> client.FinalReport:
    return client.final_report(ref, params, stats, cfg, champion, rounds)
