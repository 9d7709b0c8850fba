"""Building blocks of secure aggregation, shared by :mod:`fl.secagg.bonawitz` and
:mod:`fl.secagg.run_keys`: failing closed, the rings masked vectors live in (:class:`Ring`),
fixed-point encoding into Z_(2^64) (in segments of their own scale, :class:`Segments`; exact
sums of wide values in Z_(2^384), :class:`ExactFixedPoint`), the PRG that expands mask seeds,
key derivation and agreement, and
Shamir sharing (of secrets over GF(2^521 - 1), and of 32-byte seeds, vectorised, over a small
prime). Signing keys and the directory of public keys are in :mod:`fl.secagg.identity`.
"""

from __future__ import annotations

import functools
import hashlib
import math
import secrets
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MOD_BITS = 64
"""Bits of a ``uint64`` word; fixed-point vectors live in Z_(2^64), a word a value."""

FRAC_BITS = 24
"""Default fixed-point resolution 2^-24 (about 6e-8); each value is rounded to within half of
it, and with it ``num_clients * bound`` may reach 2^39 (about 5.5e11)."""

SHAMIR_PRIME = 2**521 - 1
"""The Mersenne prime M521: a 32-byte secret is a single field element, no splitting."""


class SecAggAbort(RuntimeError):
    """The protocol stopped rather than reveal anything: too few clients, or a bad message."""


def require_quorum(count: int, threshold: int, step: str) -> None:
    """Fail closed, naming ``step``, unless ``count`` clients reach the ``threshold``."""
    if count < threshold:
        raise SecAggAbort(
            f"{step}: only {count} clients left, below the threshold {threshold}; "
            "aborting without revealing anything"
        )


# --------------------------------------------------------------------------------------------
# The rings masked vectors live in


_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


@dataclass(frozen=True)
class Ring:
    """Z_(2^(64 words)), its elements ``words`` consecutive ``uint64`` words each, least
    significant first, in flat ``uint64`` vectors (of a multiple of ``words`` values).

    Every party of a secure sum adds, subtracts and sums masked vectors and masks in its
    codec's ring (``codec.ring``): a mask is uniform in the ring, so a masked element is too,
    and the masks cancel in the sum of the elements, carries included, revealing only that
    sum. With ``words == 1`` it is numpy's ``uint64`` arithmetic, which wraps modulo 2^64.
    """

    words: int = 1

    def __post_init__(self) -> None:
        if self.words < 1:
            raise ValueError(f"words: must be at least 1 (got {self.words!r})")

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``a + b``, element by element."""
        if self.words == 1:
            return a + b
        x, y = self._rows(a), self._rows(b)
        out = x + y
        carry = out[:, 0] < x[:, 0]
        for k in range(1, self.words):
            word = out[:, k] + carry
            carry = (out[:, k] < x[:, k]) | (word < carry)
            out[:, k] = word
        return out.reshape(-1)

    def sub(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``a - b``, element by element."""
        if self.words == 1:
            return a - b
        x, y = self._rows(a), self._rows(b)
        out = x - y
        borrow = x[:, 0] < y[:, 0]
        for k in range(1, self.words):
            word = out[:, k] - borrow
            borrow = (x[:, k] < y[:, k]) | (out[:, k] < borrow)
            out[:, k] = word
        return out.reshape(-1)

    def neg(self, a: np.ndarray) -> np.ndarray:
        """``-a``, element by element."""
        if self.words == 1:
            return np.uint64(0) - a
        return self.sub(np.zeros_like(a, dtype=np.uint64), a)

    def sum(self, stack: np.ndarray) -> np.ndarray:
        """The sum of the rows of ``stack`` (fewer than 2^31 of them; zeros if none)."""
        stack = np.asarray(stack, dtype=np.uint64)
        if self.words == 1:
            return stack.sum(axis=0, dtype=np.uint64)
        if stack.shape[0] >= 2**31:
            raise ValueError(f"stack: at most 2^31 - 1 rows (got {stack.shape[0]})")
        # Each word's 32-bit halves summed apart (no sum of fewer than 2^31 of them reaches
        # 2^63), then the carries propagated half by half, least significant first.
        rows = stack.reshape(stack.shape[0], stack.shape[1] // self.words, self.words)
        lo = (rows & _LOW32).sum(axis=0, dtype=np.uint64)
        hi = (rows >> _SHIFT32).sum(axis=0, dtype=np.uint64)
        out = np.empty_like(lo)
        carry = np.zeros(lo.shape[0], dtype=np.uint64)
        for k in range(self.words):
            low = lo[:, k] + carry
            high = hi[:, k] + (low >> _SHIFT32)
            out[:, k] = (low & _LOW32) | (high << _SHIFT32)
            carry = high >> _SHIFT32
        return out.reshape(-1)

    def _rows(self, a: np.ndarray) -> np.ndarray:
        return np.asarray(a, dtype=np.uint64).reshape(-1, self.words)


WRAP = Ring(1)
"""Z_(2^64): numpy's ``uint64`` arithmetic, the ring of :class:`FixedPoint` and
:class:`Segments`."""


# --------------------------------------------------------------------------------------------
# Fixed-point encoding


@dataclass(frozen=True)
class FixedPoint:
    """Encoding of float vectors into Z_(2^64) for summing.

    Parameters
    ----------
    bound : R; every coordinate of every client's vector must lie in [-R, R].
    frac_bits : f; values are rounded to multiples of ``2^-f``.

    The sum of ``n`` encoded vectors decodes correctly while ``n * ceil(R * 2^f) < 2^63``
    (:meth:`check_capacity`); the decoded sum is then within ``n * 2^-f / 2`` of the exact sum.
    """

    bound: float
    frac_bits: int = FRAC_BITS

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise ValueError(f"bound: must be a positive finite number (got {self.bound!r})")
        if not 0 <= self.frac_bits <= MOD_BITS - 2:
            raise ValueError(f"frac_bits: must be in [0, {MOD_BITS - 2}] (got {self.frac_bits!r})")

    ring = WRAP
    """A value a ``uint64`` word, summed modulo 2^64."""

    @property
    def resolution(self) -> float:
        return 2.0**-self.frac_bits

    def check_capacity(self, num_clients: int) -> None:
        """Raise ``ValueError`` unless the sum of ``num_clients`` vectors cannot overflow."""
        largest = math.ceil(self.bound * 2**self.frac_bits)
        if not num_clients * largest < 2 ** (MOD_BITS - 1):
            raise ValueError(
                f"secure aggregation would overflow: num_clients * ceil(bound * 2^frac_bits) = "
                f"{num_clients} * ceil({self.bound} * 2^{self.frac_bits}) = "
                f"{num_clients * largest:.3e} must be below 2^{MOD_BITS - 1}; lower the bound, "
                "frac_bits or the number of clients"
            )

    def encode(self, x: np.ndarray) -> np.ndarray:
        """``round(x * 2^f)`` as two's-complement ``uint64``."""
        x = np.asarray(x, dtype=np.float64)
        if not (np.abs(x) <= self.bound).all():  # also false for a NaN
            self.check(x)
        return np.rint(np.ldexp(x, self.frac_bits)).astype(np.int64).view(np.uint64)

    def check(self, x: np.ndarray) -> None:
        """Raise ``ValueError`` if ``x`` has a non-finite value or one beyond the bound."""
        if not np.all(np.isfinite(x)):
            raise ValueError("x: has non-finite values")
        if np.any(np.abs(x) > self.bound):
            # The message goes to the server: it names the bound, never the client's value.
            raise ValueError(
                f"x: a value is outside the secure-aggregation bound [-{self.bound}, {self.bound}]"
            )

    def decode(self, v: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`encode`; also decodes a sum of encodings while
        :meth:`check_capacity` holds for the number of summands."""
        return np.ldexp(
            np.asarray(v, dtype=np.uint64).view(np.int64).astype(np.float64), -self.frac_bits
        )


@dataclass(frozen=True)
class Segments:
    """A vector encoded in consecutive segments, each in its own :class:`FixedPoint`: values
    of different magnitudes (a model update and a count, say) share one masked vector, each
    segment with the bound and resolution its values need.

    Parameters
    ----------
    parts : ``(length, codec)`` of each segment, in order.
    """

    parts: tuple[tuple[int, FixedPoint], ...]

    ring = WRAP
    """A value a ``uint64`` word, summed modulo 2^64."""

    @property
    def size(self) -> int:
        return sum(length for length, _ in self.parts)

    def check_capacity(self, num_clients: int) -> None:
        for _, codec in self.parts:
            codec.check_capacity(num_clients)

    def _split(self, x: np.ndarray) -> list[np.ndarray]:
        if x.shape != (self.size,):
            raise ValueError(f"x: expected {self.size} values, got shape {x.shape}")
        bounds = np.cumsum([0] + [length for length, _ in self.parts])
        return [x[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def encode(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        bounds, bits = _scales(self.parts)
        if x.shape != bounds.shape or not (np.abs(x) <= bounds).all():
            for (_, c), p in zip(self.parts, self._split(x), strict=True):
                c.check(p)  # raises, naming the segment's bound
        # Each segment as its own codec encodes it, in one go.
        return np.rint(np.ldexp(x, bits)).astype(np.int64).view(np.uint64)

    def decode(self, v: np.ndarray) -> np.ndarray:
        pieces = self._split(np.asarray(v, dtype=np.uint64))
        return np.concatenate([c.decode(p) for (_, c), p in zip(self.parts, pieces, strict=True)])


@functools.lru_cache(maxsize=64)
def _scales(parts: tuple[tuple[int, FixedPoint], ...]) -> tuple[np.ndarray, np.ndarray]:
    """Every coordinate's bound and fractional bits, for :meth:`Segments.encode`."""
    bounds = np.concatenate([np.full(n, c.bound) for n, c in parts])
    bits = np.concatenate([np.full(n, c.frac_bits) for n, c in parts])
    bounds.flags.writeable = bits.flags.writeable = False
    return bounds, bits


@dataclass(frozen=True)
class ExactFixedPoint:
    """Exact sums of rational numbers of any realistic magnitude, in Z_(2^384).

    :class:`FixedPoint` has 64 bits a value: a resolution of 2^-24 leaves 2^39 for the sum,
    too little for a sum of squares of raw data (a column near 10^9 squares to 10^18 a row).
    Here each value ``v`` is rounded to ``V = round(v * 2^frac_bits)``, an integer of
    :data:`EXACT_BITS` bits in two's complement, and sent as ``V mod 2^384``: one element of
    :data:`EXACT_RING`, :data:`EXACT_WORDS` full ``uint64`` words, least significant first.
    The parties mask and sum it as that one number, carries included (:class:`Ring`), so the
    masks cancel in the sum of the numbers and nothing else: the server learns each value's
    sum, not the sums of its words (which would count, say, the clients with a negative value).
    A client's values are bounded so that the sum of :data:`EXACT_MAX_CLIENTS` of them stays
    within 2^383 in magnitude, and :meth:`decode` reads it back as a signed integer.

    With the defaults (384 bits, 160 of them fractional) a float64 of magnitude at least
    2^-108 (3e-33) is encoded exactly (its last mantissa bit is worth 2^-160 or more), a
    smaller one to within 2^-161, and a client's values may reach 2^207 (2e62) in magnitude:
    the sum of ``n`` clients' values is the exact sum of what they encoded.

    Parameters
    ----------
    count : how many values a vector holds (it is sent as ``count * EXACT_WORDS`` words).
    """

    count: int
    frac_bits: int = 160

    @property
    def ring(self) -> Ring:
        return EXACT_RING

    @property
    def size(self) -> int:
        return self.count * EXACT_WORDS

    @property
    def resolution(self) -> Fraction:
        return Fraction(1, 2**self.frac_bits)

    @property
    def bound(self) -> Fraction:
        """The largest magnitude one client's value may have: the sum of
        :data:`EXACT_MAX_CLIENTS` of them cannot reach 2^(EXACT_BITS - 1)."""
        return Fraction(_EXACT_VALUE_LIMIT, 2**self.frac_bits)

    def check_capacity(self, num_clients: int) -> None:
        if not num_clients <= EXACT_MAX_CLIENTS:
            raise ValueError(
                f"secure aggregation would overflow: {num_clients} clients, exact sums take at "
                f"most {EXACT_MAX_CLIENTS}"
            )

    def encode(self, values) -> np.ndarray:
        """The words of every value (an int, float or :class:`fractions.Fraction`), in order."""
        values = list(values)
        if len(values) != self.count:
            raise ValueError(f"x: expected {self.count} values, got {len(values)}")
        out = bytearray()
        for v in values:
            if isinstance(v, float | np.floating) and not math.isfinite(v):
                raise ValueError("x: has non-finite values")
            scaled = round(Fraction(v) * 2**self.frac_bits)
            if abs(scaled) >= _EXACT_VALUE_LIMIT:
                limit = f"{float(self.bound):.3g}"
                raise ValueError(f"x: a value is outside the exact bound {limit}")
            out += (scaled % 2**EXACT_BITS).to_bytes(8 * EXACT_WORDS, "little")
        return np.frombuffer(bytes(out), dtype="<u8").astype(np.uint64)

    def decode(self, v: np.ndarray) -> list[Fraction]:
        """The exact values (of one vector, or of a sum of at most
        :data:`EXACT_MAX_CLIENTS` vectors) as fractions."""
        words = np.asarray(v, dtype=np.uint64).reshape(self.count, EXACT_WORDS)
        raw = words.astype("<u8").tobytes()
        width = 8 * EXACT_WORDS
        out = []
        for i in range(self.count):
            number = int.from_bytes(raw[width * i : width * (i + 1)], "little", signed=True)
            out.append(Fraction(number, 2**self.frac_bits))
        return out


EXACT_WORDS = 6
"""``uint64`` words an exact value takes."""
EXACT_BITS = MOD_BITS * EXACT_WORDS
"""Bits of an exact value, two's complement: 384."""
EXACT_RING = Ring(EXACT_WORDS)
"""Z_(2^384), where exact values are masked and summed."""
EXACT_MAX_CLIENTS = 2**16
"""The most clients an exact sum takes (65536; a cohort has at most :data:`MAX_COHORT`, 8192):
with each client's values below 2^(EXACT_BITS - 1) / EXACT_MAX_CLIENTS in magnitude, the sum
stays below 2^(EXACT_BITS - 1) and decodes as the signed integer it is."""
_EXACT_VALUE_LIMIT = 2 ** (EXACT_BITS - 1) // EXACT_MAX_CLIENTS


Codec = FixedPoint | Segments | ExactFixedPoint
"""How the parties of a secure sum encode its vectors."""


# --------------------------------------------------------------------------------------------
# Primitives: PRG, key derivation, Shamir sharing


SHAKE_MAX_SIZE = 512
"""Masks of up to this many values come from SHAKE-128, longer ones from AES-256-CTR: SHAKE
starts up four times faster, AES-CTR streams three times faster."""


def prg(seed: bytes, size: int) -> np.ndarray:
    """``size`` pseudorandom uint64s expanded from the 32-byte ``seed``: the SHAKE-128 output
    (``size <= SHAKE_MAX_SIZE``) or the AES-256-CTR keystream. Each seed is used for one mask
    only, so a fixed nonce is safe."""
    if size <= SHAKE_MAX_SIZE:
        return np.frombuffer(hashlib.shake_128(seed).digest(8 * size), dtype=np.uint64)
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * size)), dtype=np.uint64)


def prgs(seeds: Sequence[bytes], size: int) -> np.ndarray:
    """``[prg(seed, size) for seed in seeds]`` as one ``(len(seeds), size)`` array."""
    if size <= SHAKE_MAX_SIZE:
        shake, width = hashlib.shake_128, 8 * size
        stream = b"".join([shake(seed).digest(width) for seed in seeds])
        return np.frombuffer(stream, dtype=np.uint64).reshape(len(seeds), size)
    return np.stack([prg(seed, size) for seed in seeds])


def signed_sum(plus: Sequence[bytes], minus: Sequence[bytes], size: int, ring: Ring) -> np.ndarray:
    """``sum(plus) - sum(minus)`` in ``ring`` of vectors of ``size`` uint64s given as bytes
    (masks, say), each side summed in one go."""
    stacked = np.frombuffer(b"".join([*plus, *minus]), dtype=np.uint64)
    stacked = stacked.reshape(len(plus) + len(minus), size)
    # Each side's sum is zeros if it has no vectors.
    return ring.sub(ring.sum(stacked[: len(plus)]), ring.sum(stacked[len(plus) :]))


def hkdf(material: bytes, info: bytes) -> bytes:
    """32 bytes derived from ``material`` for the purpose ``info`` (HKDF-SHA256, no salt)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(material)


def id_bytes(*ids: int) -> bytes:
    """Client ids as 8-byte big-endian integers, to bind derived keys to the parties."""
    return struct.pack(f">{len(ids)}Q", *ids)


def agree(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The X25519 shared secret of ``private`` and the raw public key ``peer_public``."""
    return private.exchange(X25519PublicKey.from_public_bytes(peer_public))


SHAMIR_BYTES = (SHAMIR_PRIME.bit_length() + 7) // 8
"""Bytes of one element of GF(``SHAMIR_PRIME``)."""


def shamir_split(
    secret: int, threshold: int, xs: Sequence[int], random_bytes: Callable[[int], bytes]
) -> dict[int, int]:
    """Shares ``{x: f(x)}`` of ``secret`` for a random polynomial ``f`` of degree
    ``threshold - 1`` over GF(``SHAMIR_PRIME``) with ``f(0) = secret``."""
    if not 0 <= secret < SHAMIR_PRIME:
        raise ValueError("secret: must be a field element")
    # 16 bytes beyond the field size make the modular reduction's bias negligible (< 2^-120).
    coeffs = [secret] + [
        int.from_bytes(random_bytes(SHAMIR_BYTES + 16), "big") % SHAMIR_PRIME
        for _ in range(threshold - 1)
    ]
    shares = {}
    for x in xs:
        # Horner without reducing at each step: x is small, so acc grows by a few bits per
        # step, and one reduction at the end halves the time.
        acc = 0
        for c in reversed(coeffs):
            acc = acc * x + c
        shares[x] = acc % SHAMIR_PRIME
    return shares


def lagrange_at_zero(xs: Sequence[int], prime: int = SHAMIR_PRIME) -> list[int]:
    """Weights ``l_i`` with ``f(0) = sum_i l_i f(x_i)`` for any ``f`` of degree < len(xs)
    over GF(``prime``)."""
    weights = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % prime
                den = den * (xj - xi) % prime
        weights.append(num * pow(den, -1, prime) % prime)
    return weights


def shamir_reconstruct(shares: Mapping[int, int], threshold: int) -> int:
    """The secret from any ``threshold`` of its shares ``{x: f(x)}``."""
    if len(shares) < threshold:
        raise SecAggAbort(f"{len(shares)} shares cannot rebuild a secret; need {threshold}")
    xs = sorted(shares)[:threshold]
    return sum(w * shares[x] for w, x in zip(lagrange_at_zero(xs), xs, strict=True)) % SHAMIR_PRIME


def share_point(client_id: int) -> int:
    """The Shamir evaluation point of a client's share."""
    return client_id + 1  # x = 0 would hand out the secret itself


# --------------------------------------------------------------------------------------------
# Shamir sharing of 32-byte seeds, vectorised: 11 limbs of 24 bits, each shared t-of-n over
# GF(p) with p = 2^25 - 39, so that a share is 11 small integers and sharing a seed with n
# clients is one int64 matrix product (n x t Vandermonde times t x 11 coefficients; every sum of
# t products stays below 2^63 while t <= MAX_COHORT). Each limb has its own random polynomial,
# so t - 1 shares reveal nothing about any limb.

FIELD = 2**25 - 39
"""The prime of the self-mask seeds' Shamir shares."""
MAX_COHORT = 2**13
"""Largest cohort whose shares the int64 arithmetic can handle exactly."""
LIMBS = 11
"""A seed share is this many elements of GF(``FIELD``), one per 24-bit limb of the seed."""


_LIMB_BYTES = np.array([1 << 16, 1 << 8, 1], dtype=np.int64)


def _to_limbs(seed: bytes) -> np.ndarray:
    return np.frombuffer(b"\0" + seed, dtype=np.uint8).reshape(LIMBS, 3) @ _LIMB_BYTES


def _field_elements(count: int) -> np.ndarray:
    """``count`` uniform elements of GF(FIELD), by rejection from 25 random bits."""
    raw = np.frombuffer(secrets.token_bytes(4 * count), dtype=np.uint32)
    out = (raw & (2**25 - 1)).astype(np.int64)
    while not (out < FIELD).all():  # each draw is rejected with probability 39 / 2^25
        out = np.concatenate([out[out < FIELD], _field_elements(count)])[:count]
    return out


def split_seed(seed: bytes, threshold: int, xs: Sequence[int]) -> np.ndarray:
    """Shares of ``seed``: row ``i`` is the share for the point ``xs[i]`` (nonzero, distinct,
    below FIELD)."""
    if not 2 <= threshold <= MAX_COHORT:
        raise ValueError(f"threshold: must be between 2 and {MAX_COHORT} (got {threshold})")
    coeffs = np.empty((threshold, LIMBS), dtype=np.int64)
    coeffs[0] = _to_limbs(seed)
    coeffs[1:] = _field_elements((threshold - 1) * LIMBS).reshape(-1, LIMBS)
    return _vandermonde(tuple(xs), threshold) @ coeffs % FIELD


@functools.lru_cache(maxsize=64)
def _vandermonde(xs: tuple[int, ...], threshold: int) -> np.ndarray:
    """``x^j mod FIELD`` for the points ``xs`` and ``j < threshold``: public, and the same for
    every client of a round, so computed once."""
    points = np.asarray(xs, dtype=np.int64)
    powers = np.ones((points.size, threshold), dtype=np.int64)
    for j in range(1, threshold):
        powers[:, j] = powers[:, j - 1] * points % FIELD
    powers.flags.writeable = False
    return powers


def rebuild_seeds(shares: np.ndarray, xs: Sequence[int]) -> list[bytes | None]:
    """The seeds from ``shares[k, i]``, seed ``k``'s share for the point ``xs[i]``, one row of
    limbs each; ``None`` where the shares rebuild no 32-byte seed."""
    weights = np.asarray(lagrange_at_zero(xs, FIELD), dtype=np.int64)
    limbs = np.einsum("i,kil->kl", weights, shares) % FIELD
    # A limb above 24 bits (16 for the first, which holds the seed's top 2 bytes): not a seed,
    # the shares were wrong.
    valid = (limbs[:, 0] < 2**16) & np.all(limbs < 2**24, axis=1)
    octets = (limbs[:, :, None] >> np.array([16, 8, 0])) & 0xFF
    seeds = octets.astype(np.uint8).reshape(len(limbs), 3 * LIMBS)[:, 1:]
    return [row.tobytes() if ok else None for row, ok in zip(seeds, valid, strict=True)]
