"""Who is who in a run: each client's long-term signing key, the directory in which clients
find one another's public keys, and what a client signs.

Bonawitz et al. (2017) meet an *active* server with two additions to the honest-but-curious
protocol. Every public key a client advertises is signed with a long-term key registered with
a PKI, so a server that relays the keys cannot sit in the middle of the key agreement. And a
consistency round (their round 3, "ConsistencyCheck") comes before unmasking: each survivor
signs the survivor set it was sent, and a client reveals anything only after it holds at least
t valid signatures, from distinct members, on exactly that set. Without it a server tells
different clients different survivor sets and collects the two halves that unmask one client
from different clients. A client also answers for one set per round only (:class:`Identity`
remembers what it signed), so two views can never both gather t signatures from honest
clients.

**The PKI assumption.** A client's long-term public key, and the run's public parameters
(:class:`PublicParameters`: the threshold fraction and the committee size), reach the other
clients through a channel that the aggregation server does not control: the run's
:class:`Directory`, in which each client publishes its own key once, at setup, and which the
operator's configuration fills with the parameters. Here the directory belongs to the clients'
side of the deployment, the key store of :mod:`fl.secagg.parties` (in-process, the parties
object's; over Prefect, the task layer's); the server's protocol code (:mod:`fl.secagg.exchange`)
never writes to it and never relays its contents. A deployment whose clients run apart must put
a real PKI in its place (an operator-signed roster, a key transparency log).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from fedtune.fl.secagg.primitives import SecAggAbort, hkdf, id_bytes


@dataclass(frozen=True)
class PublicParameters:
    """What every client knows of the protocol without asking the server.

    threshold : the fraction of a cohort that must survive (``privacy.secagg_threshold``).
    committee : with keys once per run, the share holders per round (``None``: every client).
    min_cohort : the smallest cohort a round may have (:func:`cohort_floor`): t is taken of at
        least this many, so a server that tells a client its cohort is tiny (which, under DP,
        a client cannot check against the secret sample) still needs t survivors' signatures.
    statistics_clip_norm : under DP, ``C_s`` (``privacy.statistics_clip_norm``): in the
        statistics round a client sends its ``[means | stds]`` clipped to it, whatever the
        server's request says (:func:`fl.secagg.statistics.checked_vector`); None without DP.
    """

    threshold: float
    committee: int | None = None
    min_cohort: int = 2
    statistics_clip_norm: float | None = None

    @classmethod
    def of(cls, config) -> PublicParameters:
        """The parameters of a configuration (``[privacy]``, and the cohort floor its rounds
        and registered clients give)."""
        from fedtune.fl.data import registry

        num_clients = len(registry(config.data, config.experiment.seed))
        p = config.privacy
        floor = cohort_floor(config, num_clients)
        clip = p.statistics_clip_norm if p.dp else None
        return cls(p.secagg_threshold, p.committee_size, floor, clip)

    def survivors(self, cohort_size: int) -> int:
        """t: the fewest survivors (and signatures on their set) a cohort may unmask with."""
        return max(2, math.ceil(self.threshold * max(cohort_size, self.min_cohort)))


COHORT_SIGMAS = 5.5
"""Under DP, the cohort floor sits this many standard deviations below the expected Poisson
sample: an honest round falls below it with probability about 2e-8."""


def cohort_floor(config, num_clients: int) -> int:
    """The smallest cohort a round of ``config`` over ``num_clients`` registered clients may
    have: the fixed sample size without DP; under DP (Poisson sampling at rate q) the expected
    q·N less :data:`COHORT_SIGMAS` standard deviations; at least 2."""
    from fedtune.fl.rounds import clients_per_round

    rounds = config.rounds
    if not config.privacy.dp:
        return max(2, clients_per_round(rounds, num_clients))
    q = rounds.fraction or clients_per_round(rounds, num_clients) / num_clients
    expected = q * num_clients
    return max(2, math.floor(expected - COHORT_SIGMAS * math.sqrt(expected * (1 - q))))


# --------------------------------------------------------------------------------------------
# What gets signed


def statement(tag: str, session: str, *fields: bytes) -> bytes:
    """An unambiguous byte string of ``tag``, ``session`` and ``fields`` (each length-prefixed),
    so that a signature for one purpose, run or round never verifies for another."""
    parts = [tag.encode(), session.encode(), *fields]
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def survivor_statement(
    session: str, round_num: int, cohort: Iterable[int], survivors: Iterable[int]
) -> bytes:
    """What a survivor signs in the consistency round: the round, the cohort it masked for and
    the survivor set, both sorted. Signing the cohort too makes the dropped clients (cohort
    minus survivors) the same for every client that accepts the set."""
    return statement(
        "fedtune/secagg/survivors",
        session,
        id_bytes(round_num),
        hashlib.sha256(id_bytes(*sorted(cohort))).digest(),
        id_bytes(*sorted(survivors)),
    )


# --------------------------------------------------------------------------------------------
# The parties


class Identity:
    """A client's long-term Ed25519 signing key for one run, and its memory of what it has
    answered: for each round, one survivor set (and, with fresh keys every round, one key
    session). Losing that memory would let a server collect answers for two survivor sets, so
    it lives as long as the key, in the client's key store.

    Parameters
    ----------
    client_id : the client's protocol id.
    seed : 32 secret bytes to derive the key from (tests); default fresh from the OS.
    """

    def __init__(self, client_id: int, seed: bytes | None = None):
        self.client_id = client_id
        self._key = (
            Ed25519PrivateKey.generate()
            if seed is None
            else Ed25519PrivateKey.from_private_bytes(hkdf(seed, b"fedtune/secagg/identity"))
        )
        self.public = self._key.public_key().public_bytes_raw()
        self._answered: dict[tuple[str, int], bytes] = {}
        self._lock = threading.Lock()

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def commit(self, what: str, round_num: int, value: bytes) -> None:
        """Remember ``value`` as this client's only answer about ``what`` in ``round_num``;
        the same value again is a retry, any other is refused (fail closed)."""
        with self._lock:
            previous = self._answered.setdefault((what, round_num), value)
        if previous != value:
            raise SecAggAbort(
                f"client {self.client_id}: already answered for another {what} in round "
                f"{round_num}; a client answers for one per round"
            )

    def endorse(self, round_num: int, signed: bytes) -> bytes:
        """The consistency round: sign the survivor statement ``signed`` of ``round_num``, the
        only one this client will ever sign or act on for that round."""
        self.commit("survivor set", round_num, signed)
        return self.sign(signed)


class Directory:
    """The long-term public keys of a run's clients, each published once by the client itself
    (see the module's PKI assumption). Lookups and verification only; thread-safe.

    Verification is a deterministic function of public inputs (the published key, the message,
    the signature), so the directory remembers which triples verified: where one directory
    serves every client simulated in a process, each signature is then checked once, not once
    per client that relies on it (t checks by each of a round's unmasking clients would cost
    more than the round's training). A false result is never remembered, and a remembered one
    matches only the exact same triple. Clients that run apart each hold their own directory
    and check every signature themselves. ``memoize=False`` checks every time.
    """

    def __init__(self, memoize: bool = True) -> None:
        self.memoize = memoize
        self._keys: dict[int, Ed25519PublicKey] = {}
        self._raw: dict[int, bytes] = {}
        self._verified: set[tuple[int, bytes, bytes]] = set()
        self._lock = threading.Lock()

    def publish(self, client_id: int, public: bytes) -> None:
        with self._lock:
            known = self._raw.setdefault(client_id, public)
            if known != public:
                raise SecAggAbort(
                    f"directory: client {client_id} already published a different key"
                )
            self._keys.setdefault(client_id, Ed25519PublicKey.from_public_bytes(public))

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._keys

    def verify(self, client_id: int, signature: bytes, message: bytes) -> bool:
        """Whether ``signature`` is ``client_id``'s on ``message`` (False for an unknown id)."""
        return self._verify(client_id, signature, message, hashlib.sha256(message).digest())

    def _verify(self, client_id: int, signature: bytes, message: bytes, digest: bytes) -> bool:
        # `digest` is the SHA-256 of `message`, computed once for many signatures on it.
        key = self._keys.get(client_id)
        if key is None or not isinstance(signature, bytes):
            return False
        seen = (client_id, digest, signature)
        if self.memoize and seen in self._verified:
            return True
        try:
            key.verify(signature, message)
        except InvalidSignature:
            return False
        if self.memoize:
            with self._lock:
                self._verified.add(seen)
        return True

    def require(self, who: int, client_id: int, signature: bytes, message: bytes, what: str):
        """Fail closed, as client ``who``, unless ``signature`` is ``client_id``'s on
        ``message``."""
        if not self.verify(client_id, signature, message):
            raise SecAggAbort(
                f"client {who}: no valid signature of client {client_id} on its {what} (a "
                "substituted or forged key); aborting"
            )

    def require_endorsements(
        self,
        who: int,
        round_num: int,
        signed: bytes,
        signatures: Mapping[int, bytes],
        members: Iterable[int],
        needed: int,
    ) -> None:
        """Fail closed, as client ``who``, unless at least ``needed`` distinct ``members``
        signed ``signed`` (verification stops once there are enough)."""
        valid = 0
        digest = hashlib.sha256(signed).digest()
        for v in sorted(set(members) & signatures.keys()):
            valid += self._verify(v, signatures[v], signed, digest)
            if valid >= needed:
                return
        raise SecAggAbort(
            f"client {who}: only {valid} member(s) of the survivor set of round {round_num} "
            f"signed it, below the threshold {needed}; the server may have sent other clients "
            "other sets, so nothing is revealed"
        )


@dataclass(frozen=True)
class Membership:
    """What a client knows of a run without the server: its identity, the run's directory and
    the public parameters."""

    identity: Identity
    directory: Directory
    parameters: PublicParameters

    @property
    def client_id(self) -> int:
        return self.identity.client_id
