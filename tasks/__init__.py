"""Prefect tasks: thin wrappers over ``fl`` (client and server work) and the MLflow tracking
module."""

from prefect.cache_policies import NO_CACHE

# Every task input is either a reference or a small parameter vector, and every result is
# consumed in-process: caching would only cost argument hashing, persistence only disk writes.
TASK_OPTIONS = {"cache_policy": NO_CACHE, "persist_result": False}
