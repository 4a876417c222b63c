"""Exact binary codecs: share uploads and revealed results.

Share upload, version 1 (all integers little-endian)::

    offset size  field
    0      4     magic  b"MPAS"
    4      1     version = 1
    5      1     kind: 0 = FULL, 1 = SEED
    6      1     aggregator index the share is for (0..254)
    7      1     ring: 0 = GF(2^61-1) (``gf_p61``), 1 = Z_(2^32) (``z2_32``)
    8      4     dim (uint32): length of the round's vectors
    12     ...   FULL: dim x uint64, each < p (gf_p61) or dim x uint32 (z2_32);
                 SEED: 16-byte seed

Revealed result, version 1::

    0      4     magic  b"MPAR"
    4      1     version = 1
    5      1     ring, as above
    6      2     reserved, must be 0
    8      4     dim (uint32)
    12     4     meta_len (uint32): length of the UTF-8 JSON object that follows
    16     ...   meta JSON, then the revealed total: dim x uint64 (each < p) or dim x uint32

The ring byte was a reserved zero byte before Z_(2^32) existed, so GF(p) bodies are
unchanged. A decoder is told the ring of its topology and refuses a body in another one
(:class:`~mpc_agg.errors.RingMismatch`). Decoders check the header, then the exact length
*before* touching the payload, and reject any leftover byte. Ids (round, client) travel in
the URL and are checked by :func:`check_id`.
"""

from __future__ import annotations

import json
import re
import struct
from typing import Any

import numpy as np

from mpc_agg.core.ring import GF_P61, Ring, RingArray, ring_by_code, ring_of
from mpc_agg.core.sharing import Share, ShareKind
from mpc_agg.core.xof import SEED_BYTES
from mpc_agg.errors import DimensionMismatch, InvalidRequest, MalformedUpload, RingMismatch

SHARE_MAGIC = b"MPAS"
RESULT_MAGIC = b"MPAR"
VERSION = 1
SHARE_HEADER = struct.Struct("<4sBBBBI")
RESULT_HEADER = struct.Struct("<4sBB2sII")
MAX_DIM = 2**32 - 1

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_id(kind: str, value: str) -> str:
    """Return ``value`` if it is a valid round or client id, else raise InvalidRequest.

    Ids are 1-128 characters of ``A-Z a-z 0-9 . _ -``, starting with a letter or digit,
    so they are safe in URLs, file names and logs.
    """
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise InvalidRequest(
            f"{kind} id {value!r} is invalid: use 1-128 characters of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return value


def share_body_length(kind: ShareKind, dim: int, ring: Ring = GF_P61) -> int:
    """Exact byte length of an upload of ``kind`` for vectors of length ``dim`` in ``ring``."""
    return SHARE_HEADER.size + (ring.itemsize * dim if kind is ShareKind.FULL else SEED_BYTES)


def encode_share(share: Share) -> bytes | bytearray:
    """The upload body for ``share`` (a ``bytearray`` for FULL shares: built in place)."""
    if share.kind is ShareKind.FULL:
        assert share.vector is not None
        # One copy of the vector, straight into the body (no tobytes + concatenation).
        body, vector = full_share_body(share.aggregator, share.dim, share.ring)
        vector[:] = share.vector
        return body
    assert share.seed is not None
    header = SHARE_HEADER.pack(
        SHARE_MAGIC, VERSION, int(share.kind), share.aggregator, share.ring.code, share.dim
    )
    return header + share.seed


def full_share_body(aggregator: int, dim: int, ring: Ring = GF_P61) -> tuple[bytearray, RingArray]:
    """An upload body for a FULL share, header written, and a writable view of its vector:
    whatever is written into the view is the upload (no serialisation copy)."""
    body = bytearray(share_body_length(ShareKind.FULL, dim, ring))
    body[: SHARE_HEADER.size] = SHARE_HEADER.pack(
        SHARE_MAGIC, VERSION, int(ShareKind.FULL), aggregator, ring.code, dim
    )
    vector = np.frombuffer(body, dtype=ring.wire, offset=SHARE_HEADER.size).view(ring.dtype)
    return body, vector


def _check_ring(code: int, ring: Ring, what: str) -> None:
    """Refuse a header's ring byte ``code`` unless it names ``ring``."""
    if code == ring.code:
        return
    theirs = ring_by_code(code)
    if theirs is None:
        raise MalformedUpload(f"unknown ring {code} in the {what} header")
    raise RingMismatch(
        f"the {what} is in ring {theirs.name}, but this topology's encoding.ring is {ring.name}"
    )


def decode_share(
    body: bytes | bytearray,
    *,
    aggregator: int,
    dim: int,
    ring: Ring = GF_P61,
    check_values: bool = True,
) -> Share:
    """Decode an upload meant for ``aggregator`` in a round of dimension ``dim`` in ``ring``.

    Raises :class:`MalformedUpload` (or its subclasses ``DimensionMismatch``,
    ``RingMismatch``) naming the field. A FULL share's vector is a view of ``body`` (no
    copy). ``check_values=False`` checks the header and length only (O(1)); the caller must
    then run :func:`check_share_values` (a no-op in Z_(2^32), where every word is valid).
    """
    if len(body) < SHARE_HEADER.size:
        raise MalformedUpload(
            f"body has {len(body)} bytes, shorter than the {SHARE_HEADER.size}-byte header"
        )
    magic, version, kind_byte, index, ring_code, hdr_dim = SHARE_HEADER.unpack_from(body)
    if magic != SHARE_MAGIC:
        raise MalformedUpload(f"bad magic {magic!r}: expected {SHARE_MAGIC!r}")
    if version != VERSION:
        raise MalformedUpload(f"unsupported version {version}: this aggregator speaks {VERSION}")
    try:
        kind = ShareKind(kind_byte)
    except ValueError:
        raise MalformedUpload(
            f"unknown share kind {kind_byte}: expected 0 (full) or 1 (seed)"
        ) from None
    _check_ring(ring_code, ring, "share")
    if index != aggregator:
        raise MalformedUpload(
            f"share is addressed to aggregator {index}, but this is aggregator {aggregator}"
        )
    if hdr_dim != dim:
        raise DimensionMismatch(
            f"share has dimension {hdr_dim}, but the round's dimension is {dim}"
        )
    expected = share_body_length(kind, dim, ring)
    if len(body) != expected:
        raise MalformedUpload(
            f"a {kind.name.lower()} share of dimension {dim} is {expected} bytes, got {len(body)}"
        )
    if kind is ShareKind.SEED:
        return Share(aggregator, kind, dim, seed=bytes(body[SHARE_HEADER.size :]), ring=ring)
    vector = ring.from_wire(body, SHARE_HEADER.size, dim)
    share = Share(aggregator, kind, dim, vector=vector, ring=ring)
    if check_values:
        check_share_values(share)
    return share


def check_share_values(share: Share) -> None:
    """Raise :class:`MalformedUpload` unless every value of a FULL share is an element of
    its ring: below p in GF(p) (O(d)); nothing to check in Z_(2^32) (O(1))."""
    if share.vector is None:
        return
    bad = share.ring.noncanonical_index(share.vector)
    if bad is not None:
        raise MalformedUpload(f"value at index {bad} is not below p = 2**61 - 1")


def encode_result(total: RingArray, meta: dict[str, Any]) -> bytes:
    """The result body: header (naming the ring of ``total``'s dtype), JSON ``meta``, then
    the canonical ``total``."""
    ring = ring_of(total)
    meta_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")
    header = RESULT_HEADER.pack(
        RESULT_MAGIC, VERSION, ring.code, bytes(2), total.shape[0], len(meta_bytes)
    )
    return header + meta_bytes + ring.to_wire(total)


def decode_result(body: bytes, ring: Ring = GF_P61) -> tuple[RingArray, dict[str, Any]]:
    """Inverse of :func:`encode_result` for a total in ``ring``; raises
    :class:`MalformedUpload` on any defect (:class:`RingMismatch` for another ring)."""
    if len(body) < RESULT_HEADER.size:
        raise MalformedUpload(f"result has {len(body)} bytes, shorter than its header")
    magic, version, ring_code, reserved, dim, meta_len = RESULT_HEADER.unpack_from(body)
    if magic != RESULT_MAGIC or version != VERSION or reserved != bytes(2):
        raise MalformedUpload("result header is not an mpc_agg v1 result")
    _check_ring(ring_code, ring, "result")
    expected = RESULT_HEADER.size + meta_len + ring.itemsize * dim
    if len(body) != expected:
        raise MalformedUpload(
            f"result of dimension {dim} should be {expected} bytes, got {len(body)}"
        )
    meta_end = RESULT_HEADER.size + meta_len
    try:
        meta = json.loads(body[RESULT_HEADER.size : meta_end].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise MalformedUpload(f"result metadata is not JSON: {type(exc).__name__}") from None
    if not isinstance(meta, dict):
        raise MalformedUpload("result metadata is not a JSON object")
    total = ring.from_wire(body, meta_end, dim).astype(ring.dtype)  # a writable copy
    if not ring.is_canonical(total):
        raise MalformedUpload("result holds a value not below p")
    return total, meta
