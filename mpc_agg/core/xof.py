"""Seed expansion: a 16-byte seed and a context become ``d`` uniform elements of GF(p).

DESIGN.md, "Additive sharing with seed compression" (after the XOF of Prio3/DAP,
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


def expand(seed: bytes, context: bytes, d: int) -> FieldArray:
    """Expand ``seed`` in ``context`` to ``d`` uniform, canonical elements of GF(p)."""
    if d < 0:
        raise ValueError(f"dimension must be >= 0, got {d}")
    return elements_from_stream(keystream(derive_key(seed, context)), d)
