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
"""

from __future__ import annotations

import hashlib
import struct
import sys
from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from mpc_agg.core.field import FieldArray, P

SEED_BYTES = 16
"""Length of a seed share, in bytes."""

_DOMAIN = b"mpc_agg/xof/v1"
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


def derive_key(seed: bytes, context: bytes) -> bytes:
    """The AES-128 key for ``seed`` in ``context``."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"seed must be {SEED_BYTES} bytes, got {len(seed)}")
    h = hashlib.sha256()
    h.update(_DOMAIN)
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
    """

    def __init__(self, key: bytes, block: int) -> None:
        self._enc = Cipher(algorithms.AES(key), modes.CTR(_ZERO_BLOCK)).encryptor()
        self._buf = np.empty(block + 2, dtype=np.uint64)  # 16 spare bytes for OpenSSL
        self._bytes = memoryview(self._buf.data).cast("B")

    def next_block(self, n: int) -> FieldArray | None:
        self._enc.update_into(_ZEROS[: 8 * n], self._bytes[: 8 * n + 15])
        out = self._buf[:n]
        if sys.byteorder == "big":  # pragma: no cover
            out.byteswap(inplace=True)
        np.bitwise_and(out, _MASK, out=out)
        if n and out.max() == _MASK:
            return None
        return out
