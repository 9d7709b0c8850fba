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
  the run's directory, not from the server. Before client ``u`` derives two long-term pair
  keys with a peer ``v``, ``K_uv`` for masks and ``E_uv`` for the share channel (each
  ``HKDF(X25519(u, v))`` for its purpose; once, then cached), it checks ``v``'s signature on
  ``v``'s public key; a key without it (a server in the middle) aborts the round.
* **Masked input (round r, cohort S).** ``u`` picks a fresh self-mask seed ``b_u`` and sends

      y_u = x_u + PRG(b_u) + sum_{v in S, v != u} +/-M_uv^r

  (``+`` if ``u < v``; in the codec's ring, :class:`~fl.secagg.primitives.Ring`), where
  the pair mask ``M_uv^r`` is a PRF output of ``r`` keyed with ``K_uv`` (the AES-256-CTR
  keystream; :func:`_pair_mask`); with it a hash commitment to ``b_u`` and Shamir shares of
  ``b_u``, each encrypted for its recipient under ``E_uv``
  (AES-GCM, the round and the direction as the nonce: one message each way per round). The
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
  in U (if it is a share holder) and the pair masks ``M_vu^r`` it shares with every ``u`` in
  D = S minus U: never both for the same client, and only once per round. The server rebuilds
  the self masks from ``rebuild`` holders' answers (checked against the commitments), removes
  the pairwise masks that the dropped clients left behind, and decodes the sum of U's
  vectors. When nobody dropped, only ``rebuild`` surviving holders are asked
  (:meth:`RunKeysServer.to_ask`), more only if some fail to answer; when somebody dropped,
  every survivor is asked.

**Why the consistency check.** Without it, each client checks only its own view. A server that
tells ``rebuild`` share holders "nobody dropped", the target "those holders dropped" and everyone
else "the target dropped" collects the target's self-mask shares from the first, the pair
masks it shares with the holders from the target itself and those it shares with everyone else
from the rest: the target's input, with no colluding client. With it, a client that reveals
a pair mask for a dropped ``w`` holds t signatures on one set without ``w``, and each honest
signer answers for that set only; an honest signer ``v`` of the target's set never reveals
``M_tv^r`` (the target is alive in it), and neither does the target, so the target's input stays
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

What the server learns is what Bonawitz et al.'s server learns: the sum over U. A pair mask
``M_uv^r`` masks round ``r`` only (a PRF output), so revealing it for a dropped client exposes
nothing of other rounds, and no long-term secret is ever revealed; a dropped client's input,
should it arrive late, is still hidden by its self mask, whose shares no client releases.
(Bonawitz et al. reveal the seed a pair mask is expanded from, 32 bytes; this protocol reveals
the mask, ``8 * size`` bytes, the same information: the seed served that one mask only. What it
buys: a pair derives its masks for a block of rounds in one call, instead of a seed and a mask
every round, which at n - 1 pairs per client was most of a round's masking.)

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
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fedtune.fl.secagg.identity import (
    Membership,
    PublicParameters,
    statement,
    survivor_statement,
)
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
    signed_sum,
    split_seed,
)

_MASK_COUNTER = struct.Struct(">QII")  # size, block of rounds, AES block
_U64 = struct.Struct(">Q")
_IDS = struct.Struct(">QQQ")
_HOLDERS_TAG = b"fedtune/secagg/share-holders"
_ROUND_ID = struct.Struct(">QQ")


MASK_BLOCK_BYTES = 2048
"""A pair derives its masks for a block of rounds at once: as many rounds as fit in this many
bytes (one round for vectors of more than 128 values)."""


def _rounds_per_block(size: int) -> int:
    return MASK_BLOCK_BYTES // (8 * size) or 1


def _pair_masks(pair_key: bytes, size: int, block: int) -> bytes:
    """The pair's masks ``M_uv^r`` of ``size`` values for the rounds ``r`` of ``block``
    (``r // _rounds_per_block(size) == block``), ``8 * size`` bytes each, in order: the
    AES-256-CTR keystream under ``K_uv`` from the counter block (size, block, 0)."""
    nonce = _MASK_COUNTER.pack(size, block, 0)
    encryptor = Cipher(algorithms.AES(pair_key), modes.CTR(nonce)).encryptor()
    return encryptor.update(bytes(8 * size * _rounds_per_block(size)))


def _pair_mask(pair_key: bytes, round_num: int, size: int) -> bytes:
    """``M_uv^r``: the mask of ``size`` values (``8 * size`` bytes, uint64s) that the pair with
    key ``K_uv`` adds in round ``r = round_num``, ``+`` by the lower id and ``-`` by the higher.
    A PRF output of the round (AES-256-CTR keystream, its counter blocks distinct for every
    round and size): revealing one round's mask exposes nothing of another's, nor of ``K_uv``.
    :meth:`_Pair.mask` computes the same, a block of rounds at a time."""
    block, i = divmod(round_num, _rounds_per_block(size))
    width = 8 * size
    return _pair_masks(pair_key, size, block)[width * i : width * (i + 1)]


@functools.lru_cache(maxsize=16)
def _counter_blocks(size: int, block: int) -> bytes:
    """CTR mode's counter blocks for :func:`_pair_masks`: public, and the same for every pair."""
    count = -(-8 * size * _rounds_per_block(size) // 16)
    blocks = np.zeros(count, dtype=[("size", ">u8"), ("block", ">u4"), ("index", ">u4")])
    blocks["size"], blocks["block"], blocks["index"] = size, block, np.arange(count)
    return blocks.tobytes()


def _nonce(round_num: int, sender: int, recipient: int) -> bytes:
    # One channel key per pair for the run, one message each way per round: the round and the
    # direction make the nonce, never used twice (a client masks once per round, rounds only
    # grow).
    return _U64.pack(round_num) + (sender > recipient).to_bytes(4, "big")


class _Pair:
    """What a client holds for one peer: the peer's run key, ``K_uv``, the share channel
    (AES-GCM under a key derived beside ``K_uv``) and the pair's masks of the latest block of
    rounds."""

    __slots__ = ("public", "key", "channel", "_aes", "block", "masks")

    def __init__(self, shared: bytes, u: int, v: int, public: bytes):
        # K_uv and the channel key: each HKDF of the X25519 secret for its own purpose, bound
        # to both ids.
        ids = id_bytes(min(u, v), max(u, v))
        self.public = public
        self.key = hkdf(shared, b"fedtune/secagg/run-pair-key" + ids)
        self.channel = AESGCM(hkdf(shared, b"fedtune/secagg/run-channel-key" + ids))
        # AES-256 under K_uv, block by block: applied to the counter blocks, CTR mode.
        self._aes = Cipher(algorithms.AES(self.key), modes.ECB()).encryptor()
        self.block: tuple[int, int] | None = None  # (size, block) of `masks`
        self.masks = b""

    def mask(self, round_num: int, size: int) -> bytes:
        """:func:`_pair_mask`, with a key schedule made once per run and each block of rounds
        derived once (and kept, if it holds more than this round)."""
        rounds = _rounds_per_block(size)
        block, i = divmod(round_num, rounds)
        if self.block != (size, block):
            masks = self._aes.update(_counter_blocks(size, block))
            if rounds == 1:
                return masks[: 8 * size]  # the keystream ends in whole AES blocks
            self.masks, self.block = masks, (size, block)
        return self.masks[8 * size * i : 8 * size * (i + 1)]


_SHARE = struct.Struct(f">{LIMBS}I")
"""A self-mask seed share on the wire: its limbs, 4 bytes each."""
_SHARE_LIMB = np.dtype(">u4")


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
    round's masks it shared with the dropped clients (:func:`_pair_mask`, 8 bytes a value)."""

    sender: int
    round_num: int
    self_mask_shares: dict[int, bytes]
    pair_masks: dict[int, bytes]


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


@functools.lru_cache(maxsize=256)
def _share_points(holders: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(share_point(v) for v in holders)


@functools.lru_cache(maxsize=256)
def _published_quorum(parameters: PublicParameters, cohort_size: int) -> Quorum:
    p = parameters
    return Quorum.of(cohort_size, p.threshold, p.committee, p.min_cohort)


@functools.lru_cache(maxsize=64)
def _survivor_statement(
    session: str, round_num: int, cohort: frozenset[int], survivors: frozenset[int]
) -> bytes:
    # Public inputs, public output: every client of a round signs the same statement, so one
    # serves all the clients simulated in a process.
    return survivor_statement(session, round_num, cohort, survivors)


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
    pairs: Mapping[int, _Pair]  # by peer; made once per peer and run, never replaced
    size: int  # of the masked vector


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
        self._pairs: dict[int, _Pair] = {}
        self._pending: dict[int, _Pending] = {}
        # Round 0 is the feature statistics' (fl.secagg.statistics); training counts from 1.
        self._last_round = -1
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
        """Step 1 of round ``round_num`` (0 or later, each later than the last), whose cohort
        is ``roster`` (this client included)."""
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
        encoded = codec.encode(x)
        size = encoded.shape[0]
        plus, minus = self._masks_with(peers, round_num, size)
        pairs = self._pairs
        self._last_round = round_num
        self._pending = {}  # a client answers only for its latest round
        self_seed = secrets.token_bytes(32)
        holders = _committee(tuple(sorted(peers)), quorum.holders, round_num)
        split = split_seed(self_seed, quorum.rebuild, _share_points(holders))
        rows = split.astype(_SHARE_LIMB).tobytes()
        step = _SHARE.size
        shares = {v: rows[i * step : (i + 1) * step] for i, v in enumerate(holders)}
        ring = codec.ring
        masked = ring.add(
            ring.add(encoded, prg(self_seed, size)), signed_sum(plus, minus, size, ring)
        )
        nonces = (_nonce(round_num, 0, 1), _nonce(round_num, 1, 0))  # to a higher id, a lower
        sealed = {
            v: pairs[v].channel.encrypt(nonces[me > v], share, _IDS.pack(round_num, me, v))
            for v, share in shares.items()
            if v != me
        }
        self._pending[round_num] = _Pending(
            quorum, frozenset(peers), frozenset(holders), shares.get(me), pairs, size
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
        round), the round's masks shared with the dropped clients (its cohort minus
        ``survivors``). Answers once per round, for the set it signed (or, if it signed none,
        commits to now), and only if t survivors signed that set (``signatures``)."""
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
        nonces = (_nonce(round_num, 0, 1), _nonce(round_num, 1, 0))  # from a lower id, a higher
        for u, sealed in inbox.items():
            try:
                plaintext = pending.pairs[u].channel.decrypt(
                    nonces[u > me], sealed, _IDS.pack(round_num, u, me)
                )
            except InvalidTag:
                raise SecAggAbort(
                    f"client {me}: share from client {u} failed authentication"
                ) from None
            self_mask_shares[u] = plaintext
        gone = sorted(pending.cohort - alive)
        pair_masks = {u: pending.pairs[u].mask(round_num, pending.size) for u in gone}
        return Unmasking(me, round_num, self_mask_shares, pair_masks)

    def _survivor_statement(
        self, pending: _Pending, round_num: int, survivors: Sequence[int]
    ) -> bytes:
        """The statement on ``survivors`` this client may sign, after the checks every
        survivor set must pass: part of the cohort, this client in it, at least t."""
        me, alive = self.client_id, frozenset(survivors)
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
        return _survivor_statement(self.session, round_num, pending.cohort, alive)

    def _check_quorum(self, quorum: Quorum, cohort_size: int) -> None:
        """The server's quorum must be the one the public parameters give this cohort: a lower
        threshold or a smaller committee would need fewer colluders."""
        expected = _published_quorum(self.member.parameters, cohort_size)
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

    def _masks_with(
        self, peers: Mapping[int, PublicKey], round_num: int, size: int
    ) -> tuple[list[bytes], list[bytes]]:
        """The masks of round ``round_num`` this client shares with every peer in ``peers``:
        with those above its id, and below. Its pair with a peer is made the first time it sees
        the peer's key, after the key's signature checks out; a client has one run key, so
        another one for the same peer is refused."""
        me, known = self.client_id, self._pairs
        block, i = divmod(round_num, _rounds_per_block(size))
        current, lo, hi = (size, block), 8 * size * i, 8 * size * (i + 1)
        plus, minus = [], []
        for v, key in peers.items():
            if v == me:
                continue
            pair = known.get(v)
            if pair is None:
                pair = known[v] = self._pair_with(key)
            elif pair.public != key.public:
                raise SecAggAbort(f"client {me}: client {v} comes with another run key than before")
            # Pair.mask, inlined where the block is at hand
            mask = pair.masks[lo:hi] if pair.block == current else pair.mask(round_num, size)
            (plus if v > me else minus).append(mask)
        return plus, minus

    def _pair_with(self, key: PublicKey) -> _Pair:
        """The pair with the peer of ``key``, once its signature checks out."""
        self._check_key(key)
        shared = self._key.exchange(X25519PublicKey.from_public_bytes(key.public))
        return _Pair(shared, self.client_id, key.client_id, key.public)


class RunKeysServer:
    """The server's side of one round: :meth:`collect_masked_inputs`,
    :meth:`collect_signatures`, :meth:`to_ask` (until it asks nobody), then :meth:`unmask`.

    It sees masked vectors, commitments, encrypted shares, signatures and, at the end,
    ``rebuild`` shares of each survivor's self-mask seed and the dropped clients' pair masks:
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
        ask nobody more). If anybody dropped, every survivor at once (each holds pair masks
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
                or r.pair_masks.keys() != set(self.dropped_)
            ):
                raise SecAggAbort(f"unmasking: client {r.sender} sent the wrong set of shares")
            width = 8 * self.dimension
            if any(not (isinstance(m, bytes) and len(m) == width) for m in r.pair_masks.values()):
                raise SecAggAbort(f"unmasking: client {r.sender} sent a malformed pair mask")
        seeds = self._self_mask_seeds(answered)
        masked = np.stack([self._inputs[u].masked for u in self.survivors_])
        ring = self.codec.ring  # masked and unmasked as the codec's numbers, carries included
        total = ring.sub(ring.sum(masked), ring.sum(prgs(seeds, self.dimension)))
        # Each survivor v added its mask for a dropped u, + if v < u; v's answer holds it.
        plus = [answered[v].pair_masks[u] for u in self.dropped_ for v in self.survivors_ if v > u]
        minus = [answered[v].pair_masks[u] for u in self.dropped_ for v in self.survivors_ if v < u]
        total = ring.add(total, signed_sum(plus, minus, self.dimension, ring))
        return self.codec.decode(total)

    def _self_mask_seeds(self, answered: Mapping[int, Unmasking]) -> list[bytes]:
        """Every survivor's self-mask seed, rebuilt from the first ``rebuild`` share holders'
        answers and checked against its commitment."""
        responders = [v for v in self.holders if v in answered]
        require_quorum(len(responders), self.quorum.rebuild, "unmasking")
        responders = responders[: self.quorum.rebuild]
        shares = [answered[v].self_mask_shares[u] for u in self.survivors_ for v in responders]
        try:
            malformed = set(map(len, shares)) != {_SHARE.size}
            blob = b"".join(shares)
        except TypeError:
            malformed = True
        if malformed:
            raise SecAggAbort("unmasking: a self-mask share is malformed")
        limbs = np.frombuffer(blob, dtype=_SHARE_LIMB).astype(np.int64)
        seeds = rebuild_seeds(
            limbs.reshape(len(self.survivors_), len(responders), LIMBS),
            [share_point(v) for v in responders],
        )
        for u, seed in zip(self.survivors_, seeds, strict=True):
            if seed is None or not hmac.compare_digest(_commit(seed), self._inputs[u].commitment):
                raise SecAggAbort(
                    f"unmasking: the shares of client {u}'s self mask do not match its commitment"
                )
        return seeds
