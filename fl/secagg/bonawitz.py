"""Secure aggregation: the server learns the sum of the clients' vectors and nothing else.

Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal and Seth, 2017, "Practical
Secure Aggregation for Privacy-Preserving Machine Learning" (ACM CCS), the protocol for an
honest-but-curious server, simulated in one process but with real cryptography. Rounds are
numbered as in the paper (round 3, the consistency check, belongs to the malicious-server
variant, which is not implemented):

0. **Advertise keys.** Each client ``u`` makes two X25519 key pairs: ``c_u`` to encrypt the
   shares it sends to other clients, ``s_u`` to agree pairwise masks. The server broadcasts the
   roster of public keys (U1).
1. **Share keys.** ``u`` picks a self-mask seed ``b_u`` and Shamir-shares ``b_u`` and the
   secret key of ``s_u``, t-of-n, among the roster; each share travels encrypted (AES-GCM,
   key from X25519 + HKDF-SHA256) through the server. U2: the clients whose shares arrived.
2. **Masked input.** ``u`` sends ``y_u = x_u + PRG(b_u) + sum_v +/-PRG(s_uv)`` in Z_(2^64),
   where ``s_uv`` comes from key agreement with each ``v`` in U2, ``+`` if ``u < v`` and ``-``
   otherwise, so that the pairwise masks cancel in the sum. U3: the clients whose masked input
   arrived.
4. **Unmasking.** Each surviving client sends, for every ``v`` in U3, its share of ``b_v``
   and, for every ``v`` that dropped after sharing keys (U2 minus U3), its share of ``v``'s
   mask key: never both for the same client. With ``t`` responses the server rebuilds the
   self masks of U3 and the pairwise masks that dropped clients left behind, and removes them.

Every step needs at least ``threshold`` clients (t); with fewer the protocol fails closed with
:class:`SecAggAbort`. Up to ``n - t`` clients may drop out; the usual choice is a majority,
``t > n / 2``. Clients are trusted to follow the protocol, and so is the server, which may
however try to learn from what it sees (honest-but-curious).

This is the ``privacy.secagg_keys = "round"`` protocol; :mod:`fl.secagg.run_keys` (the default)
agrees keys once per run and needs two exchanges per round instead of four.

Vectors are summed in fixed point (:class:`FixedPoint`): ``round(x * 2^frac_bits)`` as a
two's-complement 64-bit integer, so numpy's ``uint64`` arithmetic, which wraps modulo 2^64, is
the group Z_(2^64).
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
from fedtune.fl.secagg.primitives import (
    SHAMIR_BYTES,
    SHAMIR_PRIME,
    FixedPoint,
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


def _pair_mask(shared: bytes, u: int, v: int, size: int) -> np.ndarray:
    """The mask ``u`` adds for ``v`` from their agreed secret: ``+PRG(s_uv)`` if ``u < v``,
    else ``-PRG(s_uv)``."""
    seed = hkdf(shared, b"fedtune/secagg/pairwise-mask" + id_bytes(min(u, v), max(u, v)))
    mask = prg(seed, size)
    return mask if u < v else np.uint64(0) - mask


def _channel(shared: bytes, sender: int, recipient: int) -> AESGCM:
    # One key per direction, each encrypting a single message: a fixed nonce is then safe.
    return AESGCM(hkdf(shared, b"fedtune/secagg/share-channel" + id_bytes(sender, recipient)))


_NONCE = bytes(12)


# --------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True)
class AdvertisedKeys:
    """Round 0, client to server: a client's two public keys."""

    client_id: int
    channel_public: bytes
    mask_public: bytes


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
    """One client's side of the protocol; each method is one round.

    The methods keep no state between rounds: every secret derives from ``seed`` and every
    message it needs is passed in. A client rebuilt from the same seed (for example inside a
    later task) therefore continues the same session. (Within one object, derived values are
    cached: key agreements and Shamir shares are the costly part.)

    Parameters
    ----------
    client_id : a distinct integer >= 0; orders the pairwise masks and names the Shamir point.
    threshold : t, the number of clients needed to unmask.
    codec : the fixed-point encoding shared by all parties.
    seed : 32 secret bytes from which all the client's keys and randomness derive; default:
        fresh from the OS. Never reuse a seed for two sums: equal masks would reveal the
        difference of the inputs.
    """

    def __init__(
        self, client_id: int, threshold: int, codec: FixedPoint, seed: bytes | None = None
    ):
        if client_id < 0:
            raise ValueError(f"client_id: must be >= 0 (got {client_id!r})")
        if threshold < 2:
            raise ValueError(f"threshold: must be at least 2 (got {threshold!r})")
        self.client_id = client_id
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
        self._public = AdvertisedKeys(
            client_id,
            self._channel_key.public_key().public_bytes_raw(),
            self._mask_key.public_key().public_bytes_raw(),
        )
        self._channel_secrets: dict[bytes, bytes] = {}
        self._share_cache: dict[tuple[AdvertisedKeys, ...], tuple[dict, dict]] = {}

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
        masked = encoded + prg(self._self_mask_seed, encoded.shape[0])
        for v in cohort:
            if v != self.client_id:
                shared = agree(self._mask_key, keys[v].mask_public)
                masked += _pair_mask(shared, self.client_id, v, encoded.shape[0])
        return masked

    def unmasking_shares(
        self,
        roster: Sequence[AdvertisedKeys],
        inbox: Sequence[EncryptedShare],
        survivors: Sequence[int],
    ) -> UnmaskingResponse:
        """Round 4: given the clients whose masked input arrived (U3), release shares of their
        self-mask seeds and of the mask keys of the others in U2, and nothing more.

        The client works out who dropped from its own view of U2, so it never releases both
        shares of the same client: with both, the server could unmask that client's input.
        """
        keys = self._check_roster(roster)
        cohort = self._check_inbox(inbox, keys)
        alive = set(survivors)
        if not alive <= cohort:
            raise SecAggAbort(
                f"client {self.client_id}: survivors {sorted(alive - cohort)} never shared keys"
            )
        if self.client_id not in alive:
            raise SecAggAbort(f"client {self.client_id}: not among the survivors it was sent")
        if len(alive) < self.threshold:
            raise SecAggAbort(
                f"client {self.client_id}: {len(alive)} survivors are fewer than the "
                f"threshold {self.threshold}"
            )
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
        return keys

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

    def __init__(self, threshold: int, codec: FixedPoint, dimension: int):
        if threshold < 2:
            raise ValueError(f"threshold: must be at least 2 (got {threshold!r})")
        self.threshold = threshold
        self.codec = codec
        self.dimension = dimension
        self.roster_: list[AdvertisedKeys] = []
        self.shared_keys_: list[int] = []
        self.survivors_: list[int] = []
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
            total += y
        self._masked_sum = total
        self.survivors_ = sorted(masked)
        return list(self.survivors_)

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

        total = self._masked_sum.copy()
        for v in self.survivors_:
            total -= prg(rebuild("self_mask_shares", v), self.dimension)
        keys = {k.client_id: k for k in self.roster_}
        for v in dropped:
            key = X25519PrivateKey.from_private_bytes(rebuild("mask_key_shares", v))
            if key.public_key().public_bytes_raw() != keys[v].mask_public:
                raise SecAggAbort(f"unmasking: the rebuilt mask key of client {v} is wrong")
            # Each survivor u added its mask for v; the same agreement, made from v's side.
            for u in self.survivors_:
                total -= _pair_mask(agree(key, keys[u].mask_public), u, v, self.dimension)
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
    codec: FixedPoint,
    *,
    drop_before_sharing: Sequence[int] = (),
    drop_before_masking: Sequence[int] = (),
    drop_before_unmasking: Sequence[int] = (),
    seeds: Mapping[int, bytes] | None = None,
) -> SecureSum:
    """Run the whole protocol in-process over ``{client_id: vector}``, with clients dropping at
    the given steps, and return what the server recovers.

    ``seeds`` makes the run reproducible (tests); by default every client draws fresh secrets.
    """
    dims = {np.shape(v) for v in vectors.values()}
    if len(dims) != 1 or len(next(iter(dims))) != 1:
        raise ValueError("vectors: must be 1-D and of equal length")
    server = SecAggServer(threshold, codec, next(iter(dims))[0])
    clients = {
        u: SecAggClient(u, threshold, codec, None if seeds is None else seeds[u]) for u in vectors
    }
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
    responses = [
        clients[u].unmasking_shares(roster, inboxes[u], survivors)
        for u in survivors
        if u not in gone
    ]
    return SecureSum(server.unmask(responses), survivors)
