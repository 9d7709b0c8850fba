"""Secure aggregation: the server learns the sum of the clients' vectors and nothing else.

Two protocols, chosen by ``privacy.secagg_keys``:

* :mod:`fl.secagg.run_keys` (``"run"``, the default): a key pair per client once per run, then
  two exchanges with the clients per round (masked input, unmasking), the self-mask shares held
  by a committee.
* :mod:`fl.secagg.bonawitz` (``"round"``): Bonawitz et al. (2017) in full every round: fresh
  keys, shares of them, masked input, unmasking; four exchanges, recovering from dropouts at
  every step.

Both build on :mod:`fl.secagg.primitives`: fixed-point encoding, the PRG, key derivation and
agreement, Shamir sharing.

Clients are trusted to follow the protocol, and so is the server, which may however try to
learn from what it sees (honest-but-curious).
"""
