"""Secure aggregation: the server learns the sum of the clients' vectors and nothing else.

Two protocols, chosen by ``privacy.secagg_keys``:

* :mod:`fl.secagg.run_keys` (``"run"``, the default): a key pair per client once per run, then
  three exchanges with the clients per round (masked input, consistency check, unmasking), the
  self-mask shares held by a committee.
* :mod:`fl.secagg.bonawitz` (``"round"``): Bonawitz et al. (2017) in full every round: fresh
  keys, shares of them, masked input, consistency check, unmasking; five exchanges, recovering
  from dropouts at every step.

Both build on :mod:`fl.secagg.primitives` (fixed-point encoding, the PRG, key derivation and
agreement, Shamir sharing) and :mod:`fl.secagg.identity` (signed keys, the directory of
identity keys, the consistency check), and mask what :mod:`fl.secagg.scalars` appends to the
strategy's contribution (counts, losses, evaluation sums); the feature statistics are a round
of their own before training (:mod:`fl.secagg.statistics`).

The server may be actively malicious within the protocol (drop, delay, send different clients
different views, substitute keys): it learns the sum over at least t clients, or the round
aborts. Clients follow the protocol; up to t - 1 of them may collude with the server.
"""
