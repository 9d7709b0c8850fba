"""Secure aggregation with keys agreed once per run: three exchanges with the clients per round.

:mod:`fl.secagg.bonawitz` runs Bonawitz et al. (2017) in full every round: fresh keys, shares of
them, masked input, consistency check, unmasking, five exchanges. In a flow, where each exchange
is one task per client, that costs five times the tasks of a plain round, and O(n^2) key
agreements every round. This variant moves the key agreement to a one-off setup, in the spirit
of multi-round protocols such as Flamingo (Ma, Woods, Angel, Polychroniadou and Rabin, 2023,
IEEE S&P), and keeps the rest of Bonawitz et al.'s design, including what meets an active
server (:mod:`fl.secagg.identity`):

* **Setup (once per run).** Each client makes one X25519 key pair and advertises the public
  key, signed with its long-term identity key, whose public half the other clients hold from
  the run's directory, not from the server. Before client ``u`` derives a long-term pair key
  ``K_uv = HKDF(X25519(u, v))`` with a peer ``v`` (once; it is cached), it checks ``v``'s
  signature on that key; a key without it (a server in the middle) aborts the round.
* **Masked input (round r, cohort S).** ``u`` picks a fresh self-mask seed ``b_u`` and sends

      y_u = x_u + PRG(b_u) + sum_{v in S, v != u} +/-PRG(k_uv^r)

  (``+`` if ``u < v``), where ``k_uv^r`` and a channel key ``e_uv^r`` are the two halves of
  a PRF of ``r`` keyed with ``K_uv`` (SHAKE-256); with it a hash commitment to ``b_u`` and
  Shamir shares of ``b_u``, each encrypted for its recipient under ``e_uv^r`` (AES-GCM). The
  recipients are the round's *share holders* H, a committee of ``Quorum.holders`` members of
  S (all of S when S is no larger; :func:`share_holders`), any ``Quorum.rebuild`` of whose
  shares rebuild the seed.
  U = the clients whose message arrived (the survivors), D = S minus U (the dropped).
* **Consistency check.** The server sends every survivor U; each signs (run, round, S, U)
  with its identity key, if U is part of its cohort, holds itself and at least t clients,
  and if it has signed no other set this round. The server forwards the signatures.
* **Unmasking.** A survivor ``v`` asked to unmask gets U, the signatures and the shares
  addressed to it. Only if at least t members of U signed exactly (run, round, S, U), and U is
  the one set it answers for this round, does it return its shares of ``b_u`` for every ``u``
  in U (if it is a share holder) and the round seeds ``k_vu^r`` it shares with every ``u`` in
  D = S minus U: never both for the same client, and only once per round. The server rebuilds
  the self masks from ``rebuild`` holders' answers (checked against the commitments), removes
  the pairwise masks that the dropped clients left behind, and decodes the sum of U's
  vectors. When nobody dropped, only ``rebuild`` surviving holders are asked
  (:meth:`RunKeysServer.to_ask`), more only if some fail to answer; when somebody dropped,
  every survivor is asked.

**Why the consistency check.** Without it, each client checks only its own view. A server that
tells ``rebuild`` share holders "nobody dropped", the target "those holders dropped" and everyone
else "the target dropped" collects the target's self-mask shares from the first, the round
seeds it shares with the holders from the target itself and those it shares with everyone else
from the rest: the target's input, with no colluding client. With it, a client that reveals
a round seed for a dropped ``w`` holds t signatures on one set without ``w``, and each honest
signer answers for that set only; an honest signer ``v`` of the target's set never reveals
``k_tv`` (the target is alive in it), and neither does the target, so the target's input stays
masked unless t - 1 signers collude with the server (:mod:`tests.test_secagg_attacks`).

**The committee.** Share holders are ranked by SHA-256 of (round, id), so the server and every
client compute the same committee from the cohort, and nobody picks it; it changes every
round. It shortens the unmasking exchange from ``t`` clients to ``rebuild`` (in the spirit of
Bell et al., 2020, who share with O(log n) neighbours, and of Flamingo's decryptor committee),
at one cost: the shares of a
*dropped* client's self mask are held by the committee only, so its input, should it arrive
late, stays hidden unless ``rebuild`` committee members collude with the server, rather than
``t`` members of the cohort. A survivor's input is protected by the pairwise masks it shares
with every other survivor, whatever the committee. Every client computes the quorum (t,
committee size, ``rebuild``) itself from the run's public parameters and refuses another.

What the server learns is what Bonawitz et al.'s server learns: the sum over U. A round seed
``k_uv^r`` masks round ``r`` only (a PRF output), so revealing it for a dropped client exposes
nothing of other rounds, and no long-term secret is ever revealed; a dropped client's input,
should it arrive late, is still hidden by its self mask, whose shares no client releases.

The price of the saved exchanges: a dropped client's pairwise masks are known only to it and to
each survivor, so they can be removed only if *every* survivor answers the unmasking request.
A round therefore recovers from clients dropping before the masked input (down to t survivors
and ``rebuild`` holders) or from survivors not answering the unmasking request (down to
``rebuild`` holders), but not from both in the same round:
that round fails closed (:class:`~fl.secagg.primitives.SecAggAbort`) and the model stays as it
was. Use ``privacy.secagg_keys = "round"`` (:mod:`fl.secagg.bonawitz`) where that matters more
than speed.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import secrets
import struct
import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fedtune.fl.secagg.identity import Membership, statement, survivor_statement
from fedtune.fl.secagg.primitives import (
    FIELD,
    LIMBS,
    MAX_COHORT,
    Codec,
    SecAggAbort,
    hkdf,
    id_bytes,
    prg,
    prgs,
    rebuild_seeds,
    require_quorum,
    share_point,
    split_seed,
)

_ROUND_TAG = b"fedtune/secagg/round"
_U64 = struct.Struct(">Q")
_IDS = struct.Struct(">QQQ")
_HOLDERS_TAG = b"fedtune/secagg/share-holders"
_ROUND_ID = struct.Struct(">QQ")


def _round_secrets(pair_keys: Iterable[tuple[int, bytes]], round_num: int) -> dict[int, bytes]:
    """``{v: k_uv^r + e_uv^r}`` for each ``(v, K_uv)``: the pair's mask seed (the first 32
    bytes) and share-channel key (the last 32) for round ``round_num``, 64 bytes of SHAKE-256
    keyed with ``K_uv`` (a PRF, as KMAC is: each half reveals nothing of the other, nor of
    other rounds; a third of HMAC-SHA512's cost, which matters at n - 1 pairs per client and
    round)."""
    tag = _ROUND_TAG + _U64.pack(round_num)
    return {v: hashlib.shake_256(key + tag).digest(64) for v, key in pair_keys}


def _nonce(sender: int, recipient: int) -> bytes:
    # One channel key per pair and round, one message each way: the direction is the nonce.
    return (sender > recipient).to_bytes(12, "big")


def _signed_masks(plus: list[bytes], minus: list[bytes], size: int) -> np.ndarray:
    """``sum PRG(plus) - sum PRG(minus)`` in Z_(2^64), expanding every seed in one go."""
    total = np.zeros(size, dtype=np.uint64)
    for seeds, sign in ((plus, 1), (minus, -1)):
        if seeds:
            part = prgs(seeds, size).sum(axis=0, dtype=np.uint64)
            total = total + part if sign > 0 else total - part
    return total


_SHARE = struct.Struct(f">{LIMBS}I")
"""A self-mask seed share on the wire: its limbs, 4 bytes each."""


def _commit(seed: bytes) -> bytes:
    return hashlib.sha256(b"fedtune/secagg/self-mask-commitment" + seed).digest()


def key_statement(session: str, client_id: int, public: bytes) -> bytes:
    """What a client signs to advertise its run key: the run, its id and the key."""
    return statement("fedtune/secagg/run-key", session, id_bytes(client_id), public)


# --------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True)
class PublicKey:
    """Setup, client to server: a client's public key for this run, signed with its identity
    key (:func:`key_statement`)."""

    client_id: int
    public: bytes
    signature: bytes


@dataclass(frozen=True)
class MaskedInput:
    """Round step 1, client to server: the masked vector, a commitment to the self-mask seed,
    and the seed's shares, each encrypted for the cohort member it names."""

    client_id: int
    round_num: int
    masked: np.ndarray
    commitment: bytes
    shares: dict[int, bytes]


@dataclass(frozen=True)
class Unmasking:
    """Round step 3, survivor to server: shares of the survivors' self-mask seeds and the
    round seeds it shared with the dropped clients."""

    sender: int
    round_num: int
    self_mask_shares: dict[int, bytes]
    pair_seeds: dict[int, bytes]


@dataclass(frozen=True)
class Quorum:
    """The numbers every party of a round checks.

    survivors : the fewest clients whose sum may be revealed (Bonawitz et al.'s t).
    holders : the committee: how many cohort members hold shares of each self-mask seed.
    rebuild : how many of those shares rebuild a seed.
    """

    survivors: int
    holders: int
    rebuild: int

    def __post_init__(self):
        if not (self.survivors >= 2 and 2 <= self.rebuild <= self.holders):
            raise ValueError(f"quorum: needs survivors >= 2 and 2 <= rebuild <= holders ({self})")

    @classmethod
    def of(
        cls,
        cohort_size: int,
        fraction: float,
        committee: int | None = None,
        min_cohort: int = 2,
    ) -> Quorum:
        """``fraction`` of a cohort of ``cohort_size`` (taken as at least ``min_cohort``, the
        public floor) must survive; seeds are shared with ``committee`` of its members (all of
        them if None or the cohort is no larger), any ``fraction`` of whom rebuild them."""
        holders = cohort_size if committee is None else min(committee, cohort_size)
        return cls(
            survivors=max(2, math.ceil(fraction * max(cohort_size, min_cohort))),
            holders=max(2, holders),
            rebuild=max(2, math.ceil(fraction * holders)),
        )

    def fits(self, cohort_size: int) -> bool:
        return self.holders <= cohort_size and self.survivors <= cohort_size


def share_holders(cohort: Iterable[int], count: int, round_num: int) -> list[int]:
    """Round ``round_num``'s committee: the ``count`` members of ``cohort`` that rank first by
    SHA-256 of (round, id), in that order. Any party computes it from the cohort alone."""
    return list(_committee(tuple(sorted(cohort)), count, round_num))


@functools.lru_cache(maxsize=256)
def _committee(cohort: tuple[int, ...], count: int, round_num: int) -> tuple[int, ...]:
    # Public inputs, public output: every party of a round asks for the same committee, so one
    # answer serves all the clients simulated in a process.
    def rank(v: int) -> bytes:
        return hashlib.sha256(_HOLDERS_TAG + _ROUND_ID.pack(round_num, v)).digest()

    return tuple(sorted(cohort, key=rank)[:count])


# --------------------------------------------------------------------------------------------
# Parties


def _serialised(method):
    """One call at a time per client object."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


@dataclass
class _Pending:
    quorum: Quorum
    cohort: frozenset[int]
    holders: frozenset[int]
    own_share: bytes | None  # None: not a share holder this round
    round_secrets: dict[int, bytes]  # peer -> mask seed + channel key


class RunKeysClient:
    """One client's side: a key pair for the run, then :meth:`masked_input`,
    :meth:`consistency` and :meth:`unmasking` once per round it is sampled for.

    Parameters
    ----------
    member : the client's identity, the run's directory and public parameters.
    session : the run's session id (bound into everything the client signs).
    seed : 32 secret bytes from which the key pair derives; default fresh from the OS. Self-mask
        seeds are always fresh from the OS.
    """

    def __init__(self, member: Membership, session: str, seed: bytes | None = None):
        if member.client_id < 0:
            raise ValueError(f"client_id: must be >= 0 (got {member.client_id!r})")
        seed = secrets.token_bytes(32) if seed is None else seed
        if len(seed) < 32:
            raise ValueError("seed: needs at least 32 bytes")
        self.client_id = member.client_id
        self.member = member
        self.session = session
        self._key = X25519PrivateKey.from_private_bytes(hkdf(seed, b"run-key"))
        public = self._key.public_key().public_bytes_raw()
        signature = member.identity.sign(key_statement(session, self.client_id, public))
        self._public = PublicKey(self.client_id, public, signature)
        self._pair_keys: dict[tuple[int, bytes], bytes] = {}
        self._pending: dict[int, _Pending] = {}
        self._last_round = 0
        # A straggler's late answer may race its next round's in another thread.
        self._lock = threading.Lock()

    def public_key(self) -> PublicKey:
        """Setup."""
        return self._public

    @_serialised
    def masked_input(
        self,
        x: np.ndarray,
        round_num: int,
        roster: Sequence[PublicKey],
        quorum: Quorum,
        codec: Codec,
    ) -> MaskedInput:
        """Step 1 of round ``round_num``, whose cohort is ``roster`` (this client included)."""
        me = self.client_id
        if round_num <= self._last_round:
            raise SecAggAbort(
                f"client {me}: round {round_num} is not after round {self._last_round}; "
                "masks are never reused"
            )
        peers = {k.client_id: k for k in roster}
        if len(peers) != len(roster):
            raise SecAggAbort(f"client {me}: the roster repeats a client id")
        if peers.get(me) != self._public:
            raise SecAggAbort(f"client {me}: the roster does not hold its own key")
        self._check_quorum(quorum, len(peers))
        pair_keys = [
            (v, self._pair_keys.get((v, key.public)) or self._pair_key(key))
            for v, key in peers.items()
            if v != me
        ]
        self._last_round = round_num
        self._pending = {}  # a client answers only for its latest round
        encoded = codec.encode(x)
        size = encoded.shape[0]
        self_seed = secrets.token_bytes(32)
        masked = encoded + prg(self_seed, size)
        holders = share_holders(peers, quorum.holders, round_num)
        split = split_seed(self_seed, quorum.rebuild, [share_point(v) for v in holders])
        shares = dict(zip(holders, (_SHARE.pack(*row) for row in split.tolist()), strict=True))
        round_secrets = _round_secrets(pair_keys, round_num)
        masked += _signed_masks(
            [k[:32] for v, k in round_secrets.items() if v > me],
            [k[:32] for v, k in round_secrets.items() if v < me],
            size,
        )
        sealed = {
            v: AESGCM(round_secrets[v][32:]).encrypt(
                _nonce(me, v), share, _IDS.pack(round_num, me, v)
            )
            for v, share in shares.items()
            if v != me
        }
        self._pending[round_num] = _Pending(
            quorum, frozenset(peers), frozenset(holders), shares.get(me), round_secrets
        )
        return MaskedInput(me, round_num, masked, _commit(self_seed), sealed)

    @_serialised
    def consistency(self, round_num: int, survivors: Sequence[int]) -> bytes:
        """Step 2, Bonawitz et al.'s consistency check: this client's signature on the
        survivor set of its round, the only set it will sign or unmask for in that round."""
        pending = self._pending.get(round_num)
        if pending is None:
            raise SecAggAbort(
                f"client {self.client_id}: no unanswered masked input for round {round_num}"
            )
        signed = self._survivor_statement(pending, round_num, survivors)
        return self.member.identity.endorse(round_num, signed)

    @_serialised
    def unmasking(
        self,
        round_num: int,
        survivors: Sequence[int],
        signatures: Mapping[int, bytes],
        inbox: Mapping[int, bytes],
    ) -> Unmasking:
        """Step 3: shares of the survivors' self-mask seeds (if this client holds shares this
        round), round seeds shared with the dropped clients (its cohort minus ``survivors``).
        Answers once per round, for the set it signed (or, if it signed none, commits to now),
        and only if t survivors signed that set (``signatures``)."""
        me = self.client_id
        pending = self._pending.pop(round_num, None)
        if pending is None:
            raise SecAggAbort(f"client {me}: no unanswered masked input for round {round_num}")
        signed = self._survivor_statement(pending, round_num, survivors)
        self.member.identity.commit("survivor set", round_num, signed)
        alive = set(survivors)
        self._check_endorsements(round_num, signed, signatures, alive, pending.quorum.survivors)
        holder = me in pending.holders
        if set(inbox) != (alive - {me} if holder else set()):
            raise SecAggAbort(
                f"client {me}: the inbox does not hold one share per survivor"
                if holder
                else f"client {me}: holds no shares in round {round_num} but was sent some"
            )
        self_mask_shares = {me: pending.own_share} if holder else {}
        for u, sealed in inbox.items():
            try:
                plaintext = AESGCM(pending.round_secrets[u][32:]).decrypt(
                    _nonce(u, me), sealed, _IDS.pack(round_num, u, me)
                )
            except InvalidTag:
                raise SecAggAbort(
                    f"client {me}: share from client {u} failed authentication"
                ) from None
            self_mask_shares[u] = plaintext
        gone = sorted(pending.cohort - alive)
        pair_seeds = {u: pending.round_secrets[u][:32] for u in gone}
        return Unmasking(me, round_num, self_mask_shares, pair_seeds)

    def _survivor_statement(
        self, pending: _Pending, round_num: int, survivors: Sequence[int]
    ) -> bytes:
        """The statement on ``survivors`` this client may sign, after the checks every
        survivor set must pass: part of the cohort, this client in it, at least t."""
        me, alive = self.client_id, set(survivors)
        if len(alive) != len(survivors) or not alive <= pending.cohort:
            raise SecAggAbort(
                f"client {me}: the survivors of round {round_num} are not a set of clients of "
                "the cohort it masked for"
            )
        if me not in alive:
            raise SecAggAbort(f"client {me}: not among the survivors it was sent")
        if len(alive) < pending.quorum.survivors:
            raise SecAggAbort(
                f"client {me}: {len(alive)} survivors are fewer than the threshold "
                f"{pending.quorum.survivors}"
            )
        return survivor_statement(self.session, round_num, pending.cohort, alive)

    def _check_quorum(self, quorum: Quorum, cohort_size: int) -> None:
        """The server's quorum must be the one the public parameters give this cohort: a lower
        threshold or a smaller committee would need fewer colluders."""
        p = self.member.parameters
        expected = Quorum.of(cohort_size, p.threshold, p.committee, p.min_cohort)
        if quorum != expected:
            raise SecAggAbort(
                f"client {self.client_id}: the server's {quorum} is not the published "
                f"{expected} for a cohort of {cohort_size}"
            )

    def _check_endorsements(
        self,
        round_num: int,
        signed: bytes,
        signatures: Mapping[int, bytes],
        alive: set[int],
        needed: int,
    ) -> None:
        self.member.directory.require_endorsements(
            self.client_id, round_num, signed, signatures, alive, needed
        )

    def _check_key(self, key: PublicKey) -> None:
        """The peer's run key must carry its signature, checked against the directory."""
        signed = key_statement(self.session, key.client_id, key.public)
        self.member.directory.require(
            self.client_id, key.client_id, key.signature, signed, "run key"
        )

    def _pair_key(self, key: PublicKey) -> bytes:
        """``K_uv`` with the peer of ``key``, once its signature checks out."""
        peer = key.client_id
        pair_key = self._pair_keys.get((peer, key.public))
        if pair_key is None:
            self._check_key(key)
            shared = self._key.exchange(X25519PublicKey.from_public_bytes(key.public))
            ids = id_bytes(min(peer, self.client_id), max(peer, self.client_id))
            pair_key = hkdf(shared, b"fedtune/secagg/run-pair-key" + ids)
            self._pair_keys[(peer, key.public)] = pair_key
        return pair_key


class RunKeysServer:
    """The server's side of one round: :meth:`collect_masked_inputs`,
    :meth:`collect_signatures`, :meth:`to_ask` (until it asks nobody), then :meth:`unmask`.

    It sees masked vectors, commitments, encrypted shares, signatures and, at the end,
    ``rebuild`` shares of each survivor's self-mask seed and the dropped clients' round seeds:
    the sum over the survivors and nothing about any one of them.
    """

    def __init__(
        self,
        round_num: int,
        cohort: Sequence[int],
        quorum: Quorum,
        codec: Codec,
        dimension: int,
    ):
        self.round_num = round_num
        self.cohort = sorted(cohort)
        self.quorum = quorum
        self.codec = codec
        self.dimension = dimension
        require_quorum(len(self.cohort), quorum.survivors, "cohort")
        if not quorum.fits(len(self.cohort)):
            raise ValueError(f"{quorum} does not fit a cohort of {len(self.cohort)}")
        if len(self.cohort) > MAX_COHORT or share_point(self.cohort[-1]) >= FIELD:
            raise ValueError(
                f"cohort: at most {MAX_COHORT} clients with ids below {FIELD - 1} "
                f"(got {len(self.cohort)}, largest id {self.cohort[-1]})"
            )
        codec.check_capacity(len(self.cohort))
        self.holders = share_holders(self.cohort, quorum.holders, round_num)
        self.survivors_: list[int] = []
        self.dropped_: list[int] = []
        self.signatures_: dict[int, bytes] = {}
        self._inputs: dict[int, MaskedInput] = {}

    def collect_masked_inputs(
        self, inputs: Mapping[int, MaskedInput]
    ) -> tuple[list[int], list[int], dict[int, dict[int, bytes]]]:
        """The survivors, the dropped clients, and each survivor's inbox of shares (empty for
        a survivor that holds none)."""
        unknown = inputs.keys() - set(self.cohort)
        if unknown:
            raise SecAggAbort(f"masked input: from clients {sorted(unknown)} outside the cohort")
        require_quorum(len(inputs), self.quorum.survivors, "masked input")
        holders = set(self.holders)
        for u, m in inputs.items():
            y = np.asarray(m.masked)
            if (
                m.client_id != u
                or m.round_num != self.round_num
                or y.dtype != np.uint64
                or y.shape != (self.dimension,)
                or set(m.shares) != holders - {u}
            ):
                raise SecAggAbort(f"masked input: client {u} sent a malformed message")
        left = sum(v in inputs for v in self.holders)
        if left < self.quorum.rebuild:
            raise SecAggAbort(
                f"masked input: only {left} of the {len(self.holders)} share holders left, below "
                f"the threshold {self.quorum.rebuild}; aborting without revealing anything (a "
                'larger privacy.secagg_committee, or "all", rides out more dropouts)'
            )
        self._inputs = dict(inputs)
        self.survivors_ = sorted(inputs)
        self.dropped_ = sorted(set(self.cohort) - set(inputs))
        inboxes = {
            v: {u: self._inputs[u].shares[v] for u in self.survivors_ if u != v}
            if v in holders
            else {}
            for v in self.survivors_
        }
        return list(self.survivors_), list(self.dropped_), inboxes

    def collect_signatures(self, signatures: Mapping[int, bytes]) -> dict[int, bytes]:
        """The survivors' signatures on their set, to forward with the unmasking request; at
        least t of them (every client that unmasks checks them itself)."""
        unknown = signatures.keys() - set(self.survivors_)
        if unknown:
            raise SecAggAbort(f"consistency check: signatures from non-survivors {sorted(unknown)}")
        require_quorum(len(signatures), self.quorum.survivors, "consistency check")
        self.signatures_ = dict(sorted(signatures.items()))
        return dict(self.signatures_)

    def to_ask(self, asked: Collection[int], answered: Collection[int]) -> list[int]:
        """Whom to ask for unmasking next, given who was asked and who answered so far (empty:
        ask nobody more). If anybody dropped, every survivor at once (each holds round seeds
        shared with the dropped); else the surviving share holders in committee order, as many
        as are still needed to rebuild the seeds."""
        if self.dropped_:
            return [] if asked else list(self.survivors_)
        need = self.quorum.rebuild - len(set(answered) & set(self.holders))
        alive = set(self.survivors_)
        return [v for v in self.holders if v in alive and v not in asked][: max(need, 0)]

    def unmask(self, responses: Sequence[Unmasking]) -> np.ndarray:
        """The decoded float sum of the survivors' vectors."""
        survivors = set(self.survivors_)
        answered = {r.sender: r for r in responses if r.sender in survivors}
        silent = sorted(survivors - answered.keys())
        if self.dropped_ and silent:
            raise SecAggAbort(
                f"unmasking: clients {self.dropped_} dropped before masking and clients "
                f"{silent} did not answer the unmasking request; the masks they shared cannot "
                "be removed, so the round is aborted without revealing anything"
            )
        holders = set(self.holders)
        for r in answered.values():
            if (
                r.round_num != self.round_num
                or r.self_mask_shares.keys() != (survivors if r.sender in holders else set())
                or r.pair_seeds.keys() != set(self.dropped_)
            ):
                raise SecAggAbort(f"unmasking: client {r.sender} sent the wrong set of shares")
        responders = [v for v in self.holders if v in answered]
        require_quorum(len(responders), self.quorum.rebuild, "unmasking")
        responders = responders[: self.quorum.rebuild]
        try:
            shares = np.array(
                [
                    [_SHARE.unpack(answered[v].self_mask_shares[u]) for v in responders]
                    for u in self.survivors_
                ],
                dtype=np.int64,
            )
        except struct.error:
            raise SecAggAbort("unmasking: a self-mask share is malformed") from None
        seeds = rebuild_seeds(shares, [share_point(v) for v in responders])
        total = np.zeros(self.dimension, dtype=np.uint64)
        for u, seed in zip(self.survivors_, seeds, strict=True):
            if seed is None or not hmac.compare_digest(_commit(seed), self._inputs[u].commitment):
                raise SecAggAbort(
                    f"unmasking: the shares of client {u}'s self mask do not match its commitment"
                )
            total += self._inputs[u].masked - prg(seed, self.dimension)
        for u in self.dropped_:
            # Each survivor v added its mask for u; the same round seed, now from v's answer.
            seeds = [(v, answered[v].pair_seeds[u]) for v in self.survivors_]
            total -= _signed_masks(
                [seed for v, seed in seeds if v < u],
                [seed for v, seed in seeds if v > u],
                self.dimension,
            )
        return self.codec.decode(total)
