"""Collecting what the clients of one exchange sent back: the answers, and a one-line reason
for every client that failed or missed the deadline."""

from __future__ import annotations

from typing import Any

from prefect.futures import PrefectFuture, wait

from fl.data import ClientDataError, ClientRef


def collect(
    futures: list[PrefectFuture], refs: list[ClientRef], timeout: float | None = None
) -> tuple[dict[int, Any], list[tuple[str, str]]]:
    """``{client index: result}`` of the clients that answered, in ``refs`` order, and
    ``(client_id, reason)`` for the others. Tasks still running after ``timeout`` seconds are
    left out (and keep running: a thread cannot be interrupted, so the deadline is enforced
    here, not by the task)."""
    answered: dict[int, Any] = {}
    failures: list[tuple[str, str]] = []
    if timeout is not None:
        wait(futures, timeout=max(0.0, timeout))
    for ref, future in zip(refs, futures, strict=True):
        if timeout is not None and not future.state.is_final():
            failures.append((ref.client_id, f"timed out after {timeout:.3g} s"))
            continue
        outcome = future.result(raise_on_failure=False)
        if isinstance(outcome, ClientDataError):
            failures.append((ref.client_id, str(outcome)))  # already names client and file
        elif isinstance(outcome, BaseException):
            failures.append((ref.client_id, f"{type(outcome).__name__}: {outcome}"))
        else:
            answered[ref.index] = outcome
    return answered, failures
