"""Secure aggregation: the server learns the sum of the clients' vectors and nothing else.

Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal and Seth, 2017, "Practical
Secure Aggregation for Privacy-Preserving Machine Learning" (ACM CCS), the protocol against an
active server (the paper's malicious-server variant, with signed keys and the consistency
check), simulated in one process but with real cryptography. Rounds are numbered as in the
paper:

0. **Advertise keys.** Each client ``u`` makes two X25519 key pairs: ``c_u`` to encrypt the
   shares it sends to other clients, ``s_u`` to agree pairwise masks, and signs both public
   keys (with the run, round and its id) with its long-term identity key
   (:mod:`fl.secagg.identity`). The server broadcasts the roster of public keys (U1); each
   client checks every signature against the public key the run's directory holds for that
   client, never one the server sent, and aborts on any that fails.
1. **Share keys.** ``u`` picks a self-mask seed ``b_u`` and Shamir-shares ``b_u`` and the
   secret key of ``s_u``, t-of-n, among the roster; each share travels encrypted (AES-GCM,
   key from X25519 + HKDF-SHA256) through the server. U2: the clients whose shares arrived.
2. **Masked input.** ``u`` sends ``y_u = x_u + PRG(b_u) + sum_v +/-PRG(s_uv)`` in the
   codec's ring, where ``s_uv`` comes from key agreement with each ``v`` in U2, ``+`` if
   ``u < v`` and ``-`` otherwise, so that the pairwise masks cancel in the sum. U3: the
   clients whose masked input arrived.
3. **Consistency check.** The server sends U3 to its members; each signs (round, U2, U3) if U3
   is part of U2, holds itself and at least t clients, and if it signed no other set this
   round. The server forwards the signatures.
4. **Unmasking.** A surviving client that holds at least t valid signatures of members of U3
   on exactly its (round, U2, U3) sends, for every ``v`` in U3, its share of ``b_v`` and, for
   every ``v`` that dropped after sharing keys (U2 minus U3), its share of ``v``'s mask key:
   never both for the same client. With ``t`` responses the server rebuilds the self masks of
   U3 and the pairwise masks that dropped clients left behind, and removes them.

Every step needs at least ``threshold`` clients (t), which every client checks against the
run's public threshold fraction; with fewer the protocol fails closed with
:class:`SecAggAbort`. Up to ``n - t`` clients may drop out; ``t > n / 2``. Without the consistency
check, a server that lowers t, or tells some clients that ``u`` survived and others that it
dropped, collects shares of both ``b_u`` and ``u``'s mask key; with it, the clients that release
anything agreed on one U3, and each answers for one set per round. A client also takes part in
one key session per round, so a round cannot be run twice to difference two sums.

This is the ``privacy.secagg_keys = "round"`` protocol; :mod:`fl.secagg.run_keys` (the default)
agrees keys once per run and needs three exchanges per round instead of five.

Vectors are summed in fixed point (:class:`FixedPoint`): ``round(x * 2^frac_bits)`` as a
two's-complement 64-bit integer, so numpy's ``uint64`` arithmetic, which wraps modulo 2^64, is
the group Z_(2^64). Every vector and mask is added, negated and subtracted in its codec's ring
(``codec.ring``, a :class:`Ring`): Z_(2^64) for fixed point, Z_(2^384) for the exact
statistics (:class:`ExactFixedPoint`), whose values are masked as whole numbers, carries
included.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fedtune.fl.secagg.identity import (
    Directory,
    Identity,
    Membership,
    PublicParameters,
    statement,
    survivor_statement,
)
from fedtune.fl.secagg.primitives import (
    SHAMIR_BYTES,
    SHAMIR_PRIME,
    Codec,
    Ring,
    SecAggAbort,
    agree,
    hkdf,
    id_bytes,
    lagrange_at_zero,
    prg,
    require_quorum,
    shamir_split,
    share_point,
)

# --------------------------------------------------------------------------------------------
# Pairwise masks and share channels


def _pair_mask(shared: bytes, u: int, v: int, size: int, ring: Ring) -> np.ndarray:
    """The mask ``u`` adds for ``v`` from their agreed secret: ``+PRG(s_uv)`` if ``u < v``,
    else ``-PRG(s_uv)``, negated in the codec's ``ring``."""
    seed = hkdf(shared, b"fedtune/secagg/pairwise-mask" + id_bytes(min(u, v), max(u, v)))
    mask = prg(seed, size)
    return mask if u < v else ring.neg(mask)


def _channel(shared: bytes, sender: int, recipient: int) -> AESGCM:
    # One key per direction, each encrypting a single message: a fixed nonce is then safe.
    return AESGCM(hkdf(shared, b"fedtune/secagg/share-channel" + id_bytes(sender, recipient)))


_NONCE = bytes(12)


# --------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True)
class AdvertisedKeys:
    """Round 0, client to server: a client's two public keys, signed with its identity key
    (:func:`key_statement`)."""

    client_id: int
    channel_public: bytes
    mask_public: bytes
    signature: bytes


def key_statement(
    session: str, round_num: int, client_id: int, channel_public: bytes, mask_public: bytes
) -> bytes:
    """What a client signs to advertise its keys of one round."""
    return statement(
        "fedtune/secagg/round-keys",
        session,
        id_bytes(round_num, client_id),
        channel_public,
        mask_public,
    )


@dataclass(frozen=True)
class EncryptedShare:
    """Round 1, client to client through the server: the sender's shares of its self-mask
    seed and mask key for the recipient, readable only by the recipient."""

    sender: int
    recipient: int
    ciphertext: bytes


@dataclass(frozen=True)
class UnmaskingResponse:
    """Round 4, client to server: shares of survivors' self-mask seeds and of dropped clients'
    mask keys, keyed by the client they belong to."""

    sender: int
    self_mask_shares: dict[int, int]
    mask_key_shares: dict[int, int]


# --------------------------------------------------------------------------------------------
# Parties


class SecAggClient:
    """One client's side of the protocol for one round; each method is one protocol round.

    Every secret derives from ``seed`` and every message it needs is passed in. (Within one
    object, derived values are cached: key agreements, signature checks and Shamir shares are
    the costly part.) What must outlive a call, the survivor set it answers for, is kept by the
    client's :class:`~fl.secagg.identity.Identity`, which also lets it take part in one key
    session per round only.

    Parameters
    ----------
    member : the client's identity (its id orders the pairwise masks and names its Shamir
        point), the run's directory and public parameters.
    session : this round's session id; ``round_num`` the round. Both are signed with the keys.
    threshold : t, the number of clients needed to unmask.
    codec : the fixed-point encoding shared by all parties.
    seed : 32 secret bytes from which all the client's keys and randomness derive; default:
        fresh from the OS. Never reuse a seed for two sums: equal masks would reveal the
        difference of the inputs.
    """

    def __init__(
        self,
        member: Membership,
        session: str,
        round_num: int,
        threshold: int,
        codec: Codec,
        seed: bytes | None = None,
    ):
        if member.client_id < 0:
            raise ValueError(f"client_id: must be >= 0 (got {member.client_id!r})")
        if threshold < 2:
            raise ValueError(f"threshold: must be at least 2 (got {threshold!r})")
        member.identity.commit("key session", round_num, session.encode())
        self.client_id = member.client_id
        self.member = member
        self.session = session
        self.round_num = round_num
        self.threshold = threshold
        self.codec = codec
        seed = secrets.token_bytes(32) if seed is None else seed
        if len(seed) < 32:
            raise ValueError("seed: needs at least 32 bytes")
        self._channel_key = X25519PrivateKey.from_private_bytes(hkdf(seed, b"channel-key"))
        self._mask_key_bytes = hkdf(seed, b"mask-key")
        self._mask_key = X25519PrivateKey.from_private_bytes(self._mask_key_bytes)
        self._self_mask_seed = hkdf(seed, b"self-mask-seed")
        self._share_randomness = hkdf(seed, b"shamir-coefficients")
        channel = self._channel_key.public_key().public_bytes_raw()
        mask = self._mask_key.public_key().public_bytes_raw()
        signed = key_statement(session, round_num, self.client_id, channel, mask)
        self._public = AdvertisedKeys(self.client_id, channel, mask, member.identity.sign(signed))
        self._channel_secrets: dict[bytes, bytes] = {}
        self._share_cache: dict[tuple[AdvertisedKeys, ...], tuple[dict, dict]] = {}
        self._checked: set[tuple[AdvertisedKeys, ...]] = set()

    def advertise_keys(self) -> AdvertisedKeys:
        """Round 0."""
        return self._public

    def share_keys(self, roster: Sequence[AdvertisedKeys]) -> list[EncryptedShare]:
        """Round 1: one encrypted share of ``b_u`` and of the mask key for each other client."""
        self._check_roster(roster)
        self_mask, mask_key = self._shares(roster)
        out = []
        for peer in roster:
            if peer.client_id == self.client_id:
                continue
            x = share_point(peer.client_id)
            plaintext = self_mask[x].to_bytes(SHAMIR_BYTES, "big") + mask_key[x].to_bytes(
                SHAMIR_BYTES, "big"
            )
            ids = id_bytes(self.client_id, peer.client_id)
            aead = _channel(
                self._channel_secret(peer.channel_public), self.client_id, peer.client_id
            )
            out.append(
                EncryptedShare(self.client_id, peer.client_id, aead.encrypt(_NONCE, plaintext, ids))
            )
        return out

    def masked_input(
        self, x: np.ndarray, roster: Sequence[AdvertisedKeys], inbox: Sequence[EncryptedShare]
    ) -> np.ndarray:
        """Round 2: ``y_u``. ``inbox`` holds the shares sent to this client by the others that
        completed round 1 (U2); the pairwise masks are agreed with exactly those clients."""
        keys = self._check_roster(roster)
        cohort = self._check_inbox(inbox, keys)
        encoded = self.codec.encode(x)
        size, ring = encoded.shape[0], self.codec.ring
        masked = ring.add(encoded, prg(self._self_mask_seed, size))
        for v in cohort:
            if v != self.client_id:
                shared = agree(self._mask_key, keys[v].mask_public)
                masked = ring.add(masked, _pair_mask(shared, self.client_id, v, size, ring))
        return masked

    def consistency_check(
        self,
        roster: Sequence[AdvertisedKeys],
        inbox: Sequence[EncryptedShare],
        survivors: Sequence[int],
    ) -> bytes:
        """Round 3: this client's signature on (round, U2, U3), the only survivor set it will
        sign or unmask for in this round."""
        keys = self._check_roster(roster)
        cohort = self._check_inbox(inbox, keys)
        signed = self._survivor_statement(cohort, survivors)
        return self.member.identity.endorse(self.round_num, signed)

    def unmasking_shares(
        self,
        roster: Sequence[AdvertisedKeys],
        inbox: Sequence[EncryptedShare],
        survivors: Sequence[int],
        signatures: Mapping[int, bytes],
    ) -> UnmaskingResponse:
        """Round 4: given the clients whose masked input arrived (U3), release shares of their
        self-mask seeds and of the mask keys of the others in U2, and nothing more; only for
        the one set this client answers for in the round, and only if at least t members of
        U3 signed it (``signatures``).

        The client works out who dropped from its own view of U2, so it never releases both
        shares of the same client: with both, the server could unmask that client's input.
        """
        keys = self._check_roster(roster)
        cohort = self._check_inbox(inbox, keys)
        alive = set(survivors)
        signed = self._survivor_statement(cohort, survivors)
        self.member.identity.commit("survivor set", self.round_num, signed)
        self._check_endorsements(signed, signatures, alive)
        received = self._decrypt(inbox, keys)
        own_self_mask, own_mask_key = self._shares(roster)
        mine = share_point(self.client_id)
        received[self.client_id] = (own_self_mask[mine], own_mask_key[mine])
        return UnmaskingResponse(
            self.client_id,
            self_mask_shares={v: received[v][0] for v in sorted(alive)},
            mask_key_shares={v: received[v][1] for v in sorted(cohort - alive)},
        )

    def _channel_secret(self, peer_public: bytes) -> bytes:
        # Both directions of a channel use the same agreement; compute it once.
        if peer_public not in self._channel_secrets:
            self._channel_secrets[peer_public] = agree(self._channel_key, peer_public)
        return self._channel_secrets[peer_public]

    def _shares(self, roster: Sequence[AdvertisedKeys]) -> tuple[dict[int, int], dict[int, int]]:
        # A deterministic function of the seed and the roster, so rounds 1 and 4 agree without
        # stored state; the cache only saves recomputing it.
        cache_key = tuple(roster)
        if cache_key not in self._share_cache:
            self._share_cache[cache_key] = self._split_secrets(roster)
        return self._share_cache[cache_key]

    def _split_secrets(
        self, roster: Sequence[AdvertisedKeys]
    ) -> tuple[dict[int, int], dict[int, int]]:
        stream = Cipher(algorithms.AES(self._share_randomness), modes.CTR(bytes(16))).encryptor()
        xs = [share_point(k.client_id) for k in roster]

        def random_bytes(n: int) -> bytes:
            return stream.update(bytes(n))

        self_mask = shamir_split(
            int.from_bytes(self._self_mask_seed, "big"), self.threshold, xs, random_bytes
        )
        mask_key = shamir_split(
            int.from_bytes(self._mask_key_bytes, "big"), self.threshold, xs, random_bytes
        )
        return self_mask, mask_key

    def _survivor_statement(self, cohort: set[int], survivors: Sequence[int]) -> bytes:
        """The statement on ``survivors`` this client may sign, after the checks every
        survivor set must pass: part of U2, this client in it, at least t."""
        me, alive = self.client_id, set(survivors)
        if len(alive) != len(survivors):
            raise SecAggAbort(f"client {me}: the survivors it was sent repeat a client")
        if not alive <= cohort:
            raise SecAggAbort(f"client {me}: survivors {sorted(alive - cohort)} never shared keys")
        if me not in alive:
            raise SecAggAbort(f"client {me}: not among the survivors it was sent")
        if len(alive) < self.threshold:
            raise SecAggAbort(
                f"client {me}: {len(alive)} survivors are fewer than the threshold {self.threshold}"
            )
        return survivor_statement(self.session, self.round_num, cohort, alive)

    def _check_endorsements(
        self, signed: bytes, signatures: Mapping[int, bytes], alive: set[int]
    ) -> None:
        self.member.directory.require_endorsements(
            self.client_id, self.round_num, signed, signatures, alive, self.threshold
        )

    def _check_threshold(self, roster_size: int) -> None:
        """t must be at least what the public threshold fraction gives the roster: with a
        lower one, fewer clients' shares would rebuild a secret."""
        floor = self.member.parameters.survivors(roster_size)
        if self.threshold < floor:
            raise SecAggAbort(
                f"client {self.client_id}: the server's threshold {self.threshold} is below "
                f"the published threshold {floor} for a roster of {roster_size}"
            )

    def _check_roster(self, roster: Sequence[AdvertisedKeys]) -> dict[int, AdvertisedKeys]:
        keys = {k.client_id: k for k in roster}
        if len(keys) != len(roster):
            raise SecAggAbort(f"client {self.client_id}: the roster repeats a client id")
        if keys.get(self.client_id) != self.advertise_keys():
            raise SecAggAbort(f"client {self.client_id}: the roster does not hold its own keys")
        if len(keys) < self.threshold:
            raise SecAggAbort(
                f"client {self.client_id}: roster of {len(keys)} is below the threshold "
                f"{self.threshold}"
            )
        if tuple(roster) not in self._checked:
            self._check_threshold(len(keys))
            self._check_keys(roster)
            self._checked.add(tuple(roster))
        return keys

    def _check_keys(self, roster: Sequence[AdvertisedKeys]) -> None:
        """Every peer's keys must carry its signature, checked against the directory."""
        for k in roster:
            if k.client_id != self.client_id:
                signed = key_statement(
                    self.session, self.round_num, k.client_id, k.channel_public, k.mask_public
                )
                self.member.directory.require(
                    self.client_id, k.client_id, k.signature, signed, "round keys"
                )

    def _check_inbox(
        self, inbox: Sequence[EncryptedShare], keys: Mapping[int, AdvertisedKeys]
    ) -> set[int]:
        senders = {s.sender for s in inbox}
        if any(s.recipient != self.client_id for s in inbox) or len(senders) != len(inbox):
            raise SecAggAbort(f"client {self.client_id}: inbox holds misrouted or repeated shares")
        if not senders <= keys.keys() or self.client_id in senders:
            raise SecAggAbort(f"client {self.client_id}: inbox holds shares from unknown senders")
        cohort = senders | {self.client_id}
        if len(cohort) < self.threshold:
            raise SecAggAbort(
                f"client {self.client_id}: {len(cohort)} clients shared keys, fewer than the "
                f"threshold {self.threshold}"
            )
        return cohort

    def _decrypt(
        self, inbox: Sequence[EncryptedShare], keys: Mapping[int, AdvertisedKeys]
    ) -> dict[int, tuple[int, int]]:
        received = {}
        for share in inbox:
            aead = _channel(
                self._channel_secret(keys[share.sender].channel_public),
                share.sender,
                self.client_id,
            )
            try:
                plaintext = aead.decrypt(
                    _NONCE, share.ciphertext, id_bytes(share.sender, self.client_id)
                )
            except InvalidTag:
                raise SecAggAbort(
                    f"client {self.client_id}: share from client {share.sender} failed "
                    "authentication"
                ) from None
            received[share.sender] = (
                int.from_bytes(plaintext[:SHAMIR_BYTES], "big"),
                int.from_bytes(plaintext[SHAMIR_BYTES:], "big"),
            )
        return received


class SecAggServer:
    """The server's side of one secure sum; each method is one round, called in order.

    Parameters
    ----------
    threshold : t, the number of clients needed at every step.
    codec : the fixed-point encoding shared by all parties.
    dimension : the length of the vectors being summed.

    It sees public keys, encrypted shares, masked vectors and, at the end, the shares needed
    to remove the masks: enough to learn the sum of U3's vectors and nothing about any one.
    """

    def __init__(self, threshold: int, codec: Codec, dimension: int):
        if threshold < 2:
            raise ValueError(f"threshold: must be at least 2 (got {threshold!r})")
        self.threshold = threshold
        self.codec = codec
        self.dimension = dimension
        self.roster_: list[AdvertisedKeys] = []
        self.shared_keys_: list[int] = []
        self.survivors_: list[int] = []
        self.signatures_: dict[int, bytes] = {}
        self._masked_sum = np.zeros(dimension, dtype=np.uint64)

    def collect_keys(self, keys: Sequence[AdvertisedKeys]) -> list[AdvertisedKeys]:
        """Round 0: the roster (U1) to broadcast to every client."""
        ids = [k.client_id for k in keys]
        if len(set(ids)) != len(ids):
            raise SecAggAbort("advertise keys: a client id appears twice")
        self._require(len(keys), "advertise keys")
        self.codec.check_capacity(len(keys))
        self.roster_ = sorted(keys, key=lambda k: k.client_id)
        return list(self.roster_)

    def route_shares(
        self, outboxes: Sequence[Sequence[EncryptedShare]]
    ) -> dict[int, list[EncryptedShare]]:
        """Round 1: forward the encrypted shares; the clients that sent theirs form U2, and each
        member of U2 gets the shares addressed to it by the others."""
        roster = {k.client_id for k in self.roster_}
        senders = {share.sender for outbox in outboxes for share in outbox}
        if not senders <= roster:
            raise SecAggAbort(
                f"share keys: shares from clients {sorted(senders - roster)} outside the roster"
            )
        self._require(len(senders), "share keys")
        self.shared_keys_ = sorted(senders)
        inboxes: dict[int, list[EncryptedShare]] = {u: [] for u in self.shared_keys_}
        for outbox in outboxes:
            for share in outbox:
                if share.recipient in inboxes:
                    inboxes[share.recipient].append(share)
        return inboxes

    def collect_masked_inputs(self, masked: Mapping[int, np.ndarray]) -> list[int]:
        """Round 2: add up the masked vectors; returns the survivors (U3) to send to clients."""
        unknown = masked.keys() - set(self.shared_keys_)
        if unknown:
            raise SecAggAbort(f"masked input: from clients {sorted(unknown)} outside U2")
        self._require(len(masked), "masked input")
        total = np.zeros(self.dimension, dtype=np.uint64)
        for u, y in masked.items():
            y = np.asarray(y)
            if y.dtype != np.uint64 or y.shape != (self.dimension,):
                raise SecAggAbort(f"masked input: client {u} sent a malformed vector")
            total = self.codec.ring.add(total, y)
        self._masked_sum = total
        self.survivors_ = sorted(masked)
        return list(self.survivors_)

    def collect_signatures(self, signatures: Mapping[int, bytes]) -> dict[int, bytes]:
        """Round 3: the survivors' signatures on U3 (U4: those who signed), at least t, to
        forward with the unmasking request; the clients check them."""
        unknown = signatures.keys() - set(self.survivors_)
        if unknown:
            raise SecAggAbort(f"consistency check: signatures from non-survivors {sorted(unknown)}")
        self._require(len(signatures), "consistency check")
        self.signatures_ = dict(sorted(signatures.items()))
        return dict(self.signatures_)

    def unmask(self, responses: Sequence[UnmaskingResponse]) -> np.ndarray:
        """Round 4: the decoded float sum of the survivors' vectors."""
        survivors = set(self.survivors_)
        dropped = sorted(set(self.shared_keys_) - survivors)
        responders = sorted((r for r in responses if r.sender in survivors), key=lambda r: r.sender)
        self._require(len(responders), "unmasking")
        for r in responders:
            if r.self_mask_shares.keys() != survivors or r.mask_key_shares.keys() != set(dropped):
                raise SecAggAbort(f"unmasking: client {r.sender} sent the wrong set of shares")
        responders = responders[: self.threshold]
        xs = [share_point(r.sender) for r in responders]
        weights = lagrange_at_zero(xs)

        def rebuild(field: str, v: int) -> bytes:
            shares = [getattr(r, field)[v] for r in responders]
            secret = sum(w * s for w, s in zip(weights, shares, strict=True)) % SHAMIR_PRIME
            if secret >= 2**256:
                raise SecAggAbort(f"unmasking: the shares of client {v} rebuild no 32-byte secret")
            return secret.to_bytes(32, "big")

        total, ring = self._masked_sum.copy(), self.codec.ring
        for v in self.survivors_:
            total = ring.sub(total, prg(rebuild("self_mask_shares", v), self.dimension))
        keys = {k.client_id: k for k in self.roster_}
        for v in dropped:
            key = X25519PrivateKey.from_private_bytes(rebuild("mask_key_shares", v))
            if key.public_key().public_bytes_raw() != keys[v].mask_public:
                raise SecAggAbort(f"unmasking: the rebuilt mask key of client {v} is wrong")
            # Each survivor u added its mask for v; the same agreement, made from v's side.
            for u in self.survivors_:
                mask = _pair_mask(agree(key, keys[u].mask_public), u, v, self.dimension, ring)
                total = ring.sub(total, mask)
        return self.codec.decode(total)

    def _require(self, count: int, step: str) -> None:
        require_quorum(count, self.threshold, step)


@dataclass(frozen=True)
class SecureSum:
    """Result of :func:`secure_sum`: the sum and the clients (U3) whose vectors it holds."""

    total: np.ndarray
    included: list[int]


def secure_sum(
    vectors: Mapping[int, np.ndarray],
    threshold: int,
    codec: Codec,
    *,
    drop_before_sharing: Sequence[int] = (),
    drop_before_masking: Sequence[int] = (),
    drop_before_unmasking: Sequence[int] = (),
    seeds: Mapping[int, bytes] | None = None,
) -> SecureSum:
    """Run the whole protocol in-process over ``{client_id: vector}``, with clients dropping at
    the given steps (a client that drops before unmasking also misses the consistency check),
    and return what the server recovers. Every client gets an identity in a fresh directory
    whose public threshold is ``threshold`` of the clients.

    ``seeds`` makes the run reproducible (tests); by default every client draws fresh secrets.
    """
    dims = {np.shape(v) for v in vectors.values()}
    if len(dims) != 1 or len(next(iter(dims))) != 1:
        raise ValueError("vectors: must be 1-D and of equal length")
    # The masked vectors' length: one word a value, or more (ExactFixedPoint).
    server = SecAggServer(threshold, codec, len(codec.encode(next(iter(vectors.values())))))
    directory = Directory()
    # Half a client below t, so that ceil(fraction * n) is t whatever the rounding.
    parameters = PublicParameters((threshold - 0.5) / len(vectors))
    clients = {}
    for u in vectors:
        seed = None if seeds is None else seeds[u]
        identity = Identity(u, seed)
        directory.publish(u, identity.public)
        member = Membership(identity, directory, parameters)
        clients[u] = SecAggClient(member, "secure-sum", 1, threshold, codec, seed)
    roster = server.collect_keys([c.advertise_keys() for c in clients.values()])
    inboxes = server.route_shares(
        [c.share_keys(roster) for u, c in clients.items() if u not in set(drop_before_sharing)]
    )
    gone = set(drop_before_sharing) | set(drop_before_masking)
    survivors = server.collect_masked_inputs(
        {
            u: clients[u].masked_input(vectors[u], roster, inboxes[u])
            for u in inboxes
            if u not in gone
        }
    )
    gone |= set(drop_before_unmasking)
    answering = [u for u in survivors if u not in gone]
    signatures = server.collect_signatures(
        {u: clients[u].consistency_check(roster, inboxes[u], survivors) for u in answering}
    )
    responses = [
        clients[u].unmasking_shares(roster, inboxes[u], survivors, signatures) for u in answering
    ]
    return SecureSum(server.unmask(responses), survivors)
