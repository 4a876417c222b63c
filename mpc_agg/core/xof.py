"""Seed expansion: a 16-byte seed and a context become ``d`` uniform elements of GF(p).

docs/design.md, "Cryptographic core" (additive sharing with seed compression) (after the XOF of
Prio3/DAP,
draft-irtf-cfrg-vdaf section 6.2). Construction:

* ``key = SHA-256("mpc_agg/xof/v1" || u32le(len(context)) || context || seed)[:16]``: the context
  (round id, client id, aggregator index) is bound into the key, so the same seed expands
  to an unrelated stream in any other context and a seed share cannot be replayed elsewhere.
* the stream is AES-128-CTR under ``key`` from a zero counter block (``cryptography``/OpenSSL);
  each key is used for one stream only, since seeds are fresh per share.
* each 8-byte little-endian word is masked to 61 bits; the one value that is not below p
  (``2**61 - 1`` itself, probability ``2**-61`` per word) is *rejected* and the next word of
  the stream is used instead, so the elements are exactly uniform, not merely close to it.

16-byte (128-bit) seeds suffice for privacy-only additive shares; Prio3 moved to 32-byte
seeds for the soundness of its proofs, which mpc_agg does not rely on.

A client may instead derive its seeds and rounding coins from a long-term secret
(:class:`ClientSecret`; docs/design.md, "Cryptographic core", resubmission across restarts):
HKDF-SHA256 (RFC 5869) with the secret as input keying material and an ``info`` string that
binds every use, so that a restarted client resends byte-identical shares.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mpc_agg.core.field import FieldArray, P
from mpc_agg.errors import UsageError

SEED_BYTES = 16
"""Length of a seed share, in bytes."""

_DOMAIN = b"mpc_agg/xof/v1"
DOMAIN_Z2_32 = b"mpc_agg/xof/z2_32/v1"
"""The key-derivation label of streams read as elements of Z_(2^32) (GF(p) keeps ``v1``)."""
_MASK = np.uint64(P)  # 61 low bits set
_ZERO_BLOCK = bytes(16)


def share_context(round_id: str, client_id: str, aggregator: int) -> bytes:
    """Context bytes binding a seed to (round, client, aggregator index).

    Each id is length-prefixed, so distinct triples never give the same bytes.
    """
    r = round_id.encode("utf-8")
    c = client_id.encode("utf-8")
    return (
        struct.pack("<H", len(r))
        + r
        + struct.pack("<H", len(c))
        + c
        + struct.pack("<H", aggregator)
    )


def derive_key(seed: bytes, context: bytes, domain: bytes = _DOMAIN) -> bytes:
    """The AES-128 key for ``seed`` in ``context``; ``domain`` names the ring the stream is
    read in (:data:`DOMAIN_Z2_32` for Z_(2^32)), so one seed never gives related streams in
    two rings."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"seed must be {SEED_BYTES} bytes, got {len(seed)}")
    h = hashlib.sha256()
    h.update(domain)
    h.update(struct.pack("<I", len(context)))
    h.update(context)
    h.update(seed)
    return h.digest()[:16]


def keystream(key: bytes) -> Callable[[int], bytes]:
    """A function returning the next ``n`` bytes of AES-128-CTR under ``key``."""
    enc = Cipher(algorithms.AES(key), modes.CTR(_ZERO_BLOCK)).encryptor()

    def next_bytes(n: int) -> bytes:
        return enc.update(bytes(n))

    return next_bytes


def elements_from_stream(next_bytes: Callable[[int], bytes], d: int) -> FieldArray:
    """Draw ``d`` elements of GF(p) from a byte stream by masking and rejection.

    Words whose low 61 bits equal p are skipped; the stream continues where it stopped,
    so the result is a deterministic function of the stream.
    """
    out = np.frombuffer(next_bytes(8 * d), dtype="<u8").astype(np.uint64, copy=True)
    out &= _MASK
    rejected = np.flatnonzero(out == _MASK)
    if rejected.size == 0:
        return out
    kept = out[out != _MASK]
    parts = [kept]
    have = kept.size
    while have < d:
        extra = np.frombuffer(next_bytes(8 * (d - have)), dtype="<u8") & _MASK
        extra = extra[extra != _MASK]
        parts.append(extra)
        have += extra.size
    return np.concatenate(parts)[:d].astype(np.uint64, copy=False)


_CHUNK_BYTES = 1 << 19
"""Keystream is produced in 512 KiB steps, encrypting a shared buffer of zeros."""
_ZEROS = memoryview(bytes(_CHUNK_BYTES))


def _fill_keystream(key: bytes, out: memoryview) -> None:
    """Write the first ``len(out) - 15`` bytes of AES-128-CTR under ``key`` into ``out``.

    ``update_into`` encrypts zeros straight into the caller's buffer: no keystream
    ``bytes`` object and no input of the full length are ever allocated (5-7x faster than
    :func:`keystream` for megabytes). OpenSSL asks for ``block_size - 1 = 15`` spare bytes
    at the end of the output buffer.
    """
    enc = Cipher(algorithms.AES(key), modes.CTR(_ZERO_BLOCK)).encryptor()
    n = len(out) - 15
    for start in range(0, n, _CHUNK_BYTES):
        stop = min(start + _CHUNK_BYTES, n)
        enc.update_into(_ZEROS[: stop - start], out[start : stop + 15])


def _encryptor_at(key: bytes, offset: int) -> Any:
    """An AES-128-CTR encryptor under ``key`` positioned at byte ``offset`` of the stream
    that starts from a zero counter block: the counter block is ``offset // 16`` (the
    128-bit big-endian counter OpenSSL increments), and the ``offset % 16`` bytes before
    ``offset`` in that block are produced and dropped."""
    if offset < 0:
        raise ValueError(f"stream offset must be >= 0, got {offset}")
    counter, skip = divmod(offset, 16)
    enc = Cipher(algorithms.AES(key), modes.CTR(counter.to_bytes(16, "big"))).encryptor()
    if skip:
        enc.update(bytes(skip))
    return enc


def _stream_into(enc: Any, out: memoryview, n: int) -> None:
    """The next ``n`` bytes of the keystream of ``enc`` into ``out[:n]`` (which has 15
    spare bytes after them), in steps of at most :data:`_CHUNK_BYTES` (the zeros buffer)."""
    for start in range(0, n, _CHUNK_BYTES):
        stop = min(start + _CHUNK_BYTES, n)
        enc.update_into(_ZEROS[: stop - start], out[start : stop + 15])


def expand(seed: bytes, context: bytes, d: int) -> FieldArray:
    """Expand ``seed`` in ``context`` to ``d`` uniform, canonical elements of GF(p).

    Fast path: the keystream is written into the result array in place and masked; only if
    some word hits the rejected value (probability about ``d * 2**-61``) is the stream read
    again through :func:`elements_from_stream`, which gives the same answer by definition.
    """
    if d < 0:
        raise ValueError(f"dimension must be >= 0, got {d}")
    key = derive_key(seed, context)
    buf = np.empty(d + 2, dtype=np.uint64)  # 16 spare bytes for OpenSSL, see above
    _fill_keystream(key, memoryview(buf.data).cast("B"))
    out = buf[:d]
    if sys.byteorder == "big":  # pragma: no cover - the stream's words are little-endian
        out.byteswap(inplace=True)
    np.bitwise_and(out, _MASK, out=out)
    if d == 0 or out.max() != _MASK:
        return out
    return elements_from_stream(keystream(key), d)


class BlockStream:
    """The expansion of one key, produced block by block (the fast path of :func:`expand`).

    :meth:`next_block` returns the next ``n`` masked words, or None if one of them is the
    rejected value p: only :func:`expand` (rejection sampling over the whole stream) defines
    the elements then, and the caller must start over with another seed or fall back. A
    block is a view into this object's scratch buffer, valid until the next call.
    ``start`` seeks: the first block begins at word ``start`` of the stream (AES-CTR from
    counter block ``start // 2``), which is element ``start`` when no earlier word was
    rejected. ``block`` bounds ``n`` only for the scratch buffer, which grows if needed.
    No caller in the package seeks (a retried upload makes its body again from word 0).
    """

    def __init__(self, key: bytes, block: int, start: int = 0) -> None:
        self._enc = _encryptor_at(key, 8 * start)
        self._buf = np.empty(block + 2, dtype=np.uint64)  # 16 spare bytes for OpenSSL
        self._bytes = memoryview(self._buf.data).cast("B")

    def next_block(self, n: int) -> FieldArray | None:
        if n + 2 > self._buf.size:
            self._buf = np.empty(n + 2, dtype=np.uint64)
            self._bytes = memoryview(self._buf.data).cast("B")
        _stream_into(self._enc, self._bytes, 8 * n)
        out = self._buf[:n]
        if sys.byteorder == "big":  # pragma: no cover
            out.byteswap(inplace=True)
        np.bitwise_and(out, _MASK, out=out)
        if n and out.max() == _MASK:
            return None
        return out


def expand_u32(seed: bytes, context: bytes, d: int) -> npt.NDArray[np.uint32]:
    """Expand ``seed`` in ``context`` to ``d`` uniform elements of Z_(2^32).

    The key is derived under :data:`DOMAIN_Z2_32`; each little-endian 4-byte word of the
    AES-128-CTR stream is one element: every ``uint32`` is an element, so nothing is masked
    or rejected and the stream is used as it comes.
    """
    if d < 0:
        raise ValueError(f"dimension must be >= 0, got {d}")
    buf = np.empty(d + 4, dtype=np.uint32)  # 16 spare bytes for OpenSSL, see above
    _fill_keystream(derive_key(seed, context, DOMAIN_Z2_32), memoryview(buf.data).cast("B"))
    out = buf[:d]
    if sys.byteorder == "big":  # pragma: no cover - the stream's words are little-endian
        out.byteswap(inplace=True)
    return out


class WordStream:
    """The expansion of one Z_(2^32) key, block by block (what :func:`expand_u32` gives).

    :meth:`next_block` returns the next ``n`` words (never None: no word is rejected), a
    view into this object's scratch buffer, valid until the next call. ``start`` seeks: the
    first block begins at element ``start`` (AES-CTR from counter block ``start // 4``).
    No caller in the package seeks (a retried upload makes its body again from word 0).
    """

    def __init__(self, key: bytes, block: int, start: int = 0) -> None:
        self._enc = _encryptor_at(key, 4 * start)
        self._buf = np.empty(block + 4, dtype=np.uint32)  # 16 spare bytes for OpenSSL
        self._bytes = memoryview(self._buf.data).cast("B")

    def next_block(self, n: int) -> npt.NDArray[np.uint32]:
        if n + 4 > self._buf.size:
            self._buf = np.empty(n + 4, dtype=np.uint32)
            self._bytes = memoryview(self._buf.data).cast("B")
        _stream_into(self._enc, self._bytes, 4 * n)
        out = self._buf[:n]
        if sys.byteorder == "big":  # pragma: no cover
            out.byteswap(inplace=True)
        return out


# --------------------------------------------------------------------------- client secret

CLIENT_SECRET_MIN_BYTES = 16
"""The shortest client secret accepted (128 bits); :func:`~mpc_agg.client.load_client_secret`
makes 32-byte ones."""

_DERIVE_LABEL = b"mpc_agg/client-derive/v1"
_SEED = b"seed"
_COINS = b"coins"
_DIGEST_BYTES = 32  # SHA-256


def _lp(data: bytes) -> bytes:
    """``data`` with a u16 little-endian length prefix."""
    if len(data) > 0xFFFF:
        raise ValueError(f"a derivation field is limited to 65535 bytes, got {len(data)}")
    return struct.pack("<H", len(data)) + data


def derivation_info(
    purpose: bytes, fingerprint: str, round_id: str, client_id: str, tail: bytes = b""
) -> bytes:
    """The HKDF ``info`` of one derived value (the layout is part of the wire behaviour).

    ``label || lp(purpose) || lp(fingerprint) || lp(round_id) || lp(client_id) || tail``,
    ``lp`` a u16 little-endian length prefix; ``tail`` is fixed-length for each purpose
    (``u16 aggregator || u32 attempt || SHA-256 of the encoded vector`` for a seed, empty for
    the coins), so distinct inputs never give the same bytes.
    """
    return (
        _DERIVE_LABEL
        + _lp(purpose)
        + _lp(fingerprint.encode("ascii"))
        + _lp(round_id.encode("utf-8"))
        + _lp(client_id.encode("utf-8"))
        + tail
    )


class ClientSecret:
    """A client's long-term secret, from which each submission's randomness is derived.

    With it, the ``m - 1`` seeds and the rounding coins of ``prepare(round, vector)`` are a
    function of (secret, topology fingerprint, round, client, vector): a restarted client
    resubmitting the same vector sends the same bytes, which aggregators accept as a retry.
    Every value is ``HKDF-SHA256(ikm=secret, no salt, info=derivation_info(...))``, 16 bytes.

    Security (docs/design.md, "Cryptographic core"):

    * The secret is as sensitive as the vectors: with it and the full share held by one
      aggregator, the vector follows. It stays on the client, and never appears in a repr.
    * Seeds never repeat across rounds, topologies, clients or aggregators (each is bound in
      ``info``), and a *different* vector to the same round gets unrelated seeds (the SHA-256
      of the encoded vector is bound too): otherwise the full-share aggregator, which sees the
      refused second upload, would learn the difference of the two vectors.
    * The coins were private randomness already; deriving them from the secret (an AES-128-CTR
      stream, :class:`CoinStream`) keeps the rounding unbiased and hides nothing less.
    """

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, (bytes, bytearray)):
            raise UsageError(f"secret must be bytes, got {type(secret).__name__}")
        if len(secret) < CLIENT_SECRET_MIN_BYTES:
            raise UsageError(
                f"secret must be at least {CLIENT_SECRET_MIN_BYTES} bytes, got {len(secret)}"
            )
        self._secret = bytes(secret)

    def __repr__(self) -> str:
        return "ClientSecret(<hidden>)"

    def _derive(self, info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=16, salt=None, info=info).derive(self._secret)

    def seed(
        self,
        fingerprint: str,
        round_id: str,
        client_id: str,
        aggregator: int,
        attempt: int,
        vector_digest: bytes,
    ) -> bytes:
        """Seed number ``attempt`` (0 first; another only after a rejected stream) of
        ``aggregator``'s share of the encoded vector whose SHA-256 is ``vector_digest``."""
        if len(vector_digest) != _DIGEST_BYTES:
            raise ValueError(
                f"vector_digest must be {_DIGEST_BYTES} bytes, got {len(vector_digest)}"
            )
        tail = struct.pack("<HI", aggregator, attempt) + vector_digest
        return self._derive(derivation_info(_SEED, fingerprint, round_id, client_id, tail))

    def coins(self, fingerprint: str, round_id: str, client_id: str, start: int = 0) -> CoinStream:
        """The rounding coins of this client's submissions to ``round_id``, from the coin
        of coordinate ``start`` on."""
        key = self._derive(derivation_info(_COINS, fingerprint, round_id, client_id))
        return CoinStream(key, start)


def vector_digest(x: npt.NDArray[np.unsignedinteger[Any]]) -> bytes:
    """SHA-256 of the encoded vector ``x`` as little-endian words of its width (8 bytes in
    GF(p), 4 in Z_(2^32); what :meth:`ClientSecret.seed` binds; the ring is bound by the
    topology fingerprint in the same ``info``)."""
    data = x if sys.byteorder == "little" else x.astype(x.dtype.newbyteorder("<"))
    return hashlib.sha256(np.ascontiguousarray(data).data).digest()


_COIN_SCALE = 2.0**-53


class CoinStream:
    """Uniform doubles in [0, 1) from AES-128-CTR under ``key`` (from a zero counter).

    Each little-endian 8-byte word ``w`` gives ``(w >> 11) * 2**-53``: each of the ``2**53``
    multiples of ``2**-53`` with probability exactly ``2**-53`` (numpy's ``Generator.random``
    makes its doubles from 64-bit words the same way), so ``P(u < f) = ceil(f * 2**53) /
    2**53`` for any double ``f`` in [0, 1): within ``2**-53`` of ``f``. Defined by AES and
    IEEE 754 alone: the same on every machine and numpy version. Successive calls continue
    the stream. Only :meth:`random` is offered: what
    :meth:`~mpc_agg.core.encoding.FixedPointEncoding.encode` draws its coins with.
    ``start`` seeks: the first double is the one of word ``start`` (the coin of coordinate
    ``start``), from AES-CTR counter block ``start // 2``. No caller in the package seeks
    (a retried upload draws its coins again from word 0).
    """

    __slots__ = ("_enc", "_words")

    def __init__(self, key: bytes, start: int = 0) -> None:
        self._enc = _encryptor_at(key, 8 * start)
        self._words = np.empty(0, dtype=np.uint64)

    def __repr__(self) -> str:
        return "CoinStream(<hidden>)"

    def random(self, size: int) -> npt.NDArray[np.float64]:
        """The next ``size`` doubles of the stream (a new array)."""
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if self._words.size < size + 2:  # 16 spare bytes for OpenSSL, see _fill_keystream
            self._words = np.empty(size + 2, dtype=np.uint64)
        raw = memoryview(self._words.data).cast("B")
        for start in range(0, 8 * size, _CHUNK_BYTES):
            stop = min(start + _CHUNK_BYTES, 8 * size)
            self._enc.update_into(_ZEROS[: stop - start], raw[start : stop + 15])
        words = self._words[:size]
        if sys.byteorder == "big":  # pragma: no cover - the stream's words are little-endian
            words.byteswap(inplace=True)
        np.right_shift(words, np.uint64(11), out=words)
        out = np.empty(size, dtype=np.float64)
        np.multiply(words, _COIN_SCALE, out=out)  # exact: words < 2**53
        return out
