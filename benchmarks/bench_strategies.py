"""Which strategy to pick, measured: rounds to reach 1.05x the pooled-OLS MSE under each kind of
client skew, and the final MSE under Byzantine attack. Prints JSON; with ``--write`` it also
replaces the tables in docs/benchmarks.md.

    python benchmarks/bench_strategies.py [--write] [--max-rounds 60]

Everything runs through :func:`fl.simulation.simulate` (the engine with every client in this
process), so the numbers are the algorithms', not the orchestration's.

Skew scenarios (synthetic: 5 features, 50 clients x 100 rows, 10 clients (20%) per round,
5 local epochs; and the bundled diabetes data with label skew): rounds until the central MSE
first reaches 1.05x the MSE of OLS on the pooled rows (which federated training never sees).
Byzantine scenarios (the seed task, 10 clients, all every round, 20 rounds, 2 of 10 clients
attacking): final central MSE over clean FedAvg's.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
TARGET = 1.05

STRATEGIES: dict[str, list[str]] = {
    "fedavg": [],
    "fedprox (mu 0.1)": ["client.proximal_mu=0.1"],
    "fedavgm": ["server.strategy='fedavgm'"],
    "fedadam": ["server.strategy='fedadam'"],
    "fedyogi": ["server.strategy='fedyogi'"],
    "fedadagrad": ["server.strategy='fedadagrad'"],
    "median": ["server.strategy='median'"],
    "trimmed-mean (0.2)": ["server.strategy='trimmed-mean'", "server.trim_fraction=0.2"],
    "krum (f 2)": ["server.strategy='krum'", "server.byzantine_clients=2"],
    "multi-krum (f 2)": ["server.strategy='multi-krum'", "server.byzantine_clients=2"],
}

SYNTHETIC = [
    "data.num_features=5",
    "data.num_clients=50",
    "data.samples_per_client=100",
    "rounds.clients_per_round=10",
    "client.local_epochs=5",
]
SKEWS: dict[str, list[str]] = {
    "IID": [*SYNTHETIC, "data.partition='iid'"],
    "Dirichlet α=0.1": [*SYNTHETIC, "data.partition='dirichlet'", "data.alpha=0.1"],
    "label skew 0.9": [*SYNTHETIC, "data.partition='label-skew'", "data.strictness=0.9"],
    "diabetes, label skew": [
        "data.source='diabetes'",
        "data.num_clients=10",
        "data.partition='label-skew'",
        "client.local_epochs=5",
    ],
}

# Each client is Byzantine by its own seeded draw; with experiment.seed 3, exactly 2 of the 10
# (site-5 and site-9) are, as tests/test_strategies_robust.py checks.
ATTACKS: dict[str, list[str]] = {
    kind: [
        "experiment.seed=3",
        "faults.byzantine_fraction=0.2",
        f"faults.byzantine_kind='{kind}'",
        f"faults.byzantine_scale={scale}",
    ]
    for kind, scale in (("sign-flip", -1.0), ("scale", -20.0), ("gaussian", 10.0))
}
SEED_TASK = ["rounds.num_rounds=20"]


def _simulate(overrides: list[str]):
    from fedtune.fl.config import load_config
    from fedtune.fl.simulation import simulate

    return simulate(load_config(None, overrides))


def _baseline(overrides: list[str]) -> float:
    from fedtune.fl.config import load_config
    from fedtune.fl.evaluation import pooled_baseline

    config = load_config(None, overrides)
    return pooled_baseline(config.data, config.experiment.seed)


def rounds_to_target(skew: list[str], strategy: list[str], max_rounds: int) -> dict:
    """The first round whose central MSE is within ``TARGET`` of the pooled-OLS MSE."""
    overrides = [*skew, *strategy, f"rounds.num_rounds={max_rounds}"]
    baseline = _baseline(overrides)
    started = time.perf_counter()
    try:
        history = _simulate(overrides).history
    except ValueError as exc:  # e.g. Krum with too few clients a round
        return {"rounds": None, "error": str(exc)}
    mse = [h.get("central_mse", math.inf) for h in history]
    reached = next((i + 1 for i, m in enumerate(mse) if m <= TARGET * baseline), None)
    return {
        "rounds": reached,
        "final_ratio": mse[-1] / baseline,
        "baseline_mse": baseline,
        "seconds": time.perf_counter() - started,
    }


def byzantine_ratio(attack: list[str], strategy: list[str], clean_mse: float) -> float | None:
    try:
        history = _simulate([*SEED_TASK, *attack, *strategy]).history
    except ValueError:
        return None
    return history[-1]["central_mse"] / clean_mse


def _cell(value: float | int | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def tables(skew: dict, byzantine: dict, max_rounds: int) -> str:
    lines = [
        f"Rounds to reach {TARGET}× the pooled-OLS MSE (— : not within {max_rounds} rounds; in "
        "brackets, the final MSE over pooled OLS):",
        "",
        "| strategy | " + " | ".join(SKEWS) + " |",
        "|---" * (len(SKEWS) + 1) + "|",
    ]
    for name in STRATEGIES:
        found = [skew[s][name] for s in SKEWS]
        cells = [f"{_cell(f['rounds'], 'd')} ({_cell(f.get('final_ratio'), '.3f')})" for f in found]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Final central MSE over clean FedAvg's with 2 of 10 clients Byzantine (seed task, "
        "20 rounds; — : the strategy cannot run the round):",
        "",
        "| strategy | " + " | ".join(ATTACKS) + " |",
        "|---" * (len(ATTACKS) + 1) + "|",
    ]
    for name in STRATEGIES:
        cells = [_cell(byzantine[k][name], ".3g") for k in ATTACKS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_doc(text: str) -> None:
    begin, end = "<!-- strategies:begin -->", "<!-- strategies:end -->"
    doc = DOC.read_text()
    block = f"{begin}\n{text}\n{end}"
    if begin in doc:
        doc = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, doc, flags=re.S)
    else:
        doc = doc.rstrip() + "\n\n## Which strategy\n\n" + block + "\n"
    DOC.write_text(doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-rounds", type=int, default=60)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    skew = {
        s: {name: rounds_to_target(o, so, args.max_rounds) for name, so in STRATEGIES.items()}
        for s, o in SKEWS.items()
    }
    clean = _simulate([*SEED_TASK, "experiment.seed=3"]).history[-1]["central_mse"]
    byzantine = {
        k: {name: byzantine_ratio(a, so, clean) for name, so in STRATEGIES.items()}
        for k, a in ATTACKS.items()
    }
    print(json.dumps({"skew": skew, "byzantine": byzantine, "clean_mse": clean}, indent=1))
    if args.write:
        write_doc(tables(skew, byzantine, args.max_rounds))


if __name__ == "__main__":
    main()
