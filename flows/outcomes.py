"""Collecting what the clients of one exchange sent back: the answers, and a one-line reason
for every client that failed or missed the deadline."""

from __future__ import annotations

from typing import Any

from fedtune.fl.data import ClientRef
from fedtune.fl.exchange import reason
from prefect.futures import PrefectFuture, wait


def collect(
    futures: list[PrefectFuture], refs: list[ClientRef], timeout: float | None = None
) -> tuple[dict[int, Any], list[tuple[str, str]]]:
    """``{client index: result}`` of the clients that answered, in ``refs`` order, and
    ``(client_id, reason)`` for the others. Tasks still running after ``timeout`` seconds are
    left out (and keep running: a thread cannot be interrupted, so the deadline is enforced
    here, not by the task). A failed task holds its exception, raised or returned
    (:func:`tasks.client.client_failed`); failing that, its state's message is the reason."""
    answered: dict[int, Any] = {}
    failures: list[tuple[str, str]] = []
    # Which tasks finished in time is decided here, from the futures themselves: a future's
    # `state` reads the API, which records task runs asynchronously and lags under load.
    done = set(futures) if timeout is None else wait(futures, timeout=max(0.0, timeout)).done
    for ref, future in zip(refs, futures, strict=True):
        if future not in done:
            failures.append((ref.client_id, f"timed out after {timeout:.3g} s"))
            continue
        outcome = future.result(raise_on_failure=False)
        if isinstance(outcome, BaseException):
            failures.append((ref.client_id, reason(outcome)))
        elif not future.state.is_completed():
            state = future.state
            failures.append((ref.client_id, state.message or f"task run ended {state.name}"))
        else:
            answered[ref.index] = outcome
    return answered, failures
