"""Secure aggregation's cost in-process: one JSON object.

    python benchmarks/bench_secagg.py [--clients 100] [--rounds 5] [--repeats 1]
                                      [--keys run round] [--check-per-client]

Every client takes part in every round (``--clients`` of them, 100 rows each, the seed
example's data). For the same configuration the plain in-process round (fl.exchange.InProcess)
and the secure one (fl.secagg.exchange.SecureExchange over InProcessParties) run in this one
process, round by round in turn, ``--repeats`` times, so that a change in the host's load hits
both alike. Reported per key schedule: the median round time (``round_seconds``: clients'
training, masking, the consistency check, unmasking, aggregation and central evaluation), its
ratio to the plain round's median, the one-off setup (identity keys, and with ``"run"`` each
client's key pair), and the median seconds per round of each protocol step (the clients' side
and the server's, in series: one process plays every client). By default the run's directory
checks each signature once for all the simulated clients (fl.secagg.identity.Directory);
``--check-per-client`` makes every client check every signature it relies on, as clients on
their own machines do (in parallel there, in series here).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

from fedtune.fl.config import load_config
from fedtune.fl.engine import Run
from fedtune.fl.exchange import InProcess
from fedtune.fl.secagg.exchange import SecureExchange
from fedtune.fl.secagg.parties import InProcessParties


class TimedParties(InProcessParties):
    """The in-process parties, timing each protocol step; with ``memoize=False`` every
    simulated client checks every signature itself, as clients that run apart do."""

    def __init__(self, config, memoize: bool = True):
        super().__init__(config)
        self.memoize = memoize
        self.seconds: dict[str, list[float]] = defaultdict(list)

    def enroll(self, session):
        super().enroll(session)
        self.store.directory(session).memoize = self.memoize

    def call(self, step, refs, shared, each=None, timeout=None):
        started = time.perf_counter()
        try:
            return super().call(step, refs, shared, each, timeout)
        finally:
            self.seconds[step].append(time.perf_counter() - started)


def start(config, parties: TimedParties | None):
    """A set-up run (the secure one over ``parties``), its state and its exchange."""
    plain = InProcess(config)
    exchange = plain if parties is None else SecureExchange(plain, parties, config)
    run = Run.setup(config, exchange)
    return run, run.start(), exchange


def interleaved(plain_config, config, parties: TimedParties) -> tuple[list, list, float]:
    """The plain and the secure run of the same configuration, round by round in turn (so that
    a change in the host's load hits both alike): each one's ``round_seconds``, and the secure
    run's setup seconds."""
    plain, plain_state, plain_exchange = start(plain_config, None)
    secure, secure_state, secure_exchange = start(config, parties)
    plain_s, secure_s = [], []
    try:
        for r in range(1, config.rounds.num_rounds + 1):
            plain_s.append(timed(plain, plain_state, r))
            secure_s.append(timed(secure, secure_state, r))
    finally:
        plain_exchange.close()
        secure_exchange.close()
    return plain_s, secure_s, secure.setup_seconds


def timed(run, state, r: int) -> tuple[float, float]:
    """Round ``r``'s ``round_seconds`` (wall clock) and the CPU seconds this process spent on
    it: on a shared host the second is the steadier measure of what the round costs."""
    cpu = time.process_time()
    seconds = run.round(state, r).metrics["round_seconds"]
    return seconds, time.process_time() - cpu


def per_round(steps: dict[str, list[float]], rounds: int) -> dict[str, float]:
    """Median seconds per round of each step (steps called several times a round, such as a
    second unmasking request, are summed within the round)."""
    out = {}
    for step, seconds in steps.items():
        if step == "setup":
            continue
        calls = len(seconds) // rounds
        sums = [sum(seconds[i * calls : (i + 1) * calls]) for i in range(rounds)]
        out[step] = round(statistics.median(sums), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--keys", nargs="+", choices=["run", "round"], default=["run", "round"])
    parser.add_argument(
        "--check-per-client",
        action="store_true",
        help="every simulated client checks every signature (no shared verification memo)",
    )
    args = parser.parse_args()
    base = [
        f"data.num_clients={args.clients}",
        f"rounds.num_rounds={args.rounds}",
    ]
    plain_config = load_config(None, base)
    out: dict = {
        "clients": args.clients,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "signatures_checked_per_client": args.check_per_client,
    }
    for keys in args.keys:
        config = load_config(
            None, [*base, "privacy.secure_aggregation=true", f"privacy.secagg_keys={keys!r}"]
        )
        plain_s, secure_s, setup_s = [], [], []
        parties = TimedParties(config, memoize=not args.check_per_client)
        for _ in range(args.repeats):
            plain, secure, setup = interleaved(plain_config, config, parties)
            plain_s += plain
            secure_s += secure
            setup_s.append(setup)
        plain, plain_cpu = (statistics.median(x) for x in zip(*plain_s, strict=True))
        secure, secure_cpu = (statistics.median(x) for x in zip(*secure_s, strict=True))
        out[f"keys_{keys}"] = {
            "median_round_seconds_plain": round(plain, 4),
            "median_round_seconds_secure": round(secure, 4),
            "ratio": round(secure / plain, 2),
            "median_round_cpu_seconds_plain": round(plain_cpu, 4),
            "median_round_cpu_seconds_secure": round(secure_cpu, 4),
            "cpu_ratio": round(secure_cpu / plain_cpu, 2),
            "setup_seconds": round(statistics.median(setup_s), 3),
            "step_seconds_per_round": per_round(parties.seconds, args.rounds * args.repeats),
        }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
