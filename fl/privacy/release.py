"""What a DP run releases: the release policy.

Readers of what a run releases (the MLflow run's metrics, params, tags and artifacts, its
logged and registered models, the Prefect artifacts) get only what the privacy guarantee
covers:

* the DP models (every round's and the final one) with their DP feature statistics;
* ε per round and the plan (z, q, δ, z_s, the clip norm: ``dp_*``);
* the server's own scores of those models on its held-out set (``central_*``): functions of
  DP outputs and of data no client holds;
* the configuration, decisions taken on those (early stop, promotion on ``central_mse``).

Withheld under DP, because they are exact functions of client data the accountant does not
cover: per-round ``train_loss``, ``fed_*`` and ``initial_fed_*`` scores, ``clients_ok``,
``clients_failed``, ``clients_timed_out``, ``failed_clients`` and every other client id, the
excluded clients and their reasons, personalization metrics, the pooled-data baseline, round
timings. The console and Prefect's logs (operator-side, like the ``--output`` file) still name
clients and show those scores: they are for the operator, who runs the server anyway.

Without DP everything is released as before.
"""

from __future__ import annotations

from typing import Any

RELEASED_PREFIXES = ("dp_", "central_")
"""History and metric keys a DP run releases (besides ``round``)."""

WITHHELD = "withheld under DP"


def released_metrics(metrics: dict[str, Any], dp: bool) -> dict[str, Any]:
    """``metrics`` as a DP run may release them (all of them without DP)."""
    if not dp:
        return dict(metrics)
    return {k: v for k, v in metrics.items() if k == "round" or k.startswith(RELEASED_PREFIXES)}


def released_history(history: list[dict[str, Any]], dp: bool) -> list[dict[str, Any]]:
    return [released_metrics(entry, dp) for entry in history]


def released_summary(summary: dict[str, Any], dp: bool) -> dict[str, Any]:
    """The run summary as a DP run may release it: no client ids, no un-noised scores, no
    pooled-data baseline."""
    if not dp:
        return dict(summary)
    out = dict(summary)
    out["final_metrics"] = released_metrics(summary.get("final_metrics") or {}, dp)
    out["baseline_mse"] = None
    out["excluded_clients"] = WITHHELD  # even whether anyone was excluded depends on data
    return out
