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
*before* touching the payload, and reject any leftover byte. A long result is sent and read
as a stream in the same layout: :class:`ResultParts` yields the head then views of the
total; a reader checks :func:`decode_result_header` first, then the metadata, then each
piece (:func:`decode_result_block`). Ids (round, client) travel in
the URL and are checked by :func:`check_id`.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
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


def full_share_header(aggregator: int, dim: int, ring: Ring = GF_P61) -> bytes:
    """The first :data:`SHARE_HEADER` bytes of a FULL share's upload body (what
    :func:`full_share_body` writes), for a body sent block by block."""
    return SHARE_HEADER.pack(SHARE_MAGIC, VERSION, int(ShareKind.FULL), aggregator, ring.code, dim)


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
    kind = decode_share_header(body, aggregator=aggregator, dim=dim, ring=ring, length=len(body))
    if kind is ShareKind.SEED:
        return Share(aggregator, kind, dim, seed=bytes(body[SHARE_HEADER.size :]), ring=ring)
    vector = ring.from_wire(body, SHARE_HEADER.size, dim)
    share = Share(aggregator, kind, dim, vector=vector, ring=ring)
    if check_values:
        check_share_values(share)
    return share


def decode_share_header(
    prefix: bytes | bytearray | memoryview,
    *,
    aggregator: int,
    dim: int,
    ring: Ring = GF_P61,
    length: int,
) -> ShareKind:
    """Check the header of an upload meant for ``aggregator`` in a round of dimension
    ``dim`` in ``ring`` from the body's first :data:`SHARE_HEADER` ``.size`` bytes (or
    more), and that the whole body, ``length`` bytes (for a streamed body: its announced
    Content-Length), has exactly the length its kind needs; returns the kind. The same
    checks and errors as :func:`decode_share`, before any value is read."""
    if len(prefix) < SHARE_HEADER.size:
        raise MalformedUpload(
            f"body has {len(prefix)} bytes, shorter than the {SHARE_HEADER.size}-byte header"
        )
    magic, version, kind_byte, index, ring_code, hdr_dim = SHARE_HEADER.unpack_from(prefix)
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
    if length != expected:
        raise MalformedUpload(
            f"a {kind.name.lower()} share of dimension {dim} is {expected} bytes, got {length}"
        )
    return kind


def check_share_values(share: Share) -> None:
    """Raise :class:`MalformedUpload` unless every value of a FULL share is an element of
    its ring: below p in GF(p) (O(d)); nothing to check in Z_(2^32) (O(1))."""
    if share.vector is None:
        return
    check_share_block(share.vector, share.ring)


def check_share_block(values: RingArray, ring: Ring, start: int = 0) -> None:
    """Raise :class:`MalformedUpload` unless every value of ``values``, the coordinates of a
    FULL share from ``start`` on (a block of a streamed body), is an element of ``ring``;
    the message names the coordinate."""
    bad = ring.noncanonical_index(values)
    if bad is not None:
        raise MalformedUpload(f"value at index {start + bad} is not below p = 2**61 - 1")


RESULT_SLICE = 1 << 20
"""Elements per piece of a result sent or read as a stream (8 MiB of a GF(p) total)."""

RESULT_STREAM_BYTES = 1 << 20
"""A result body longer than this is sent as a stream (:meth:`ResultParts.chunks`); a
shorter one as one body, as before streaming existed."""

MAX_RESULT_META = 1 << 20
"""Longest metadata a streamed result may announce, in bytes (checked before it is read;
an aggregator's is a few hundred)."""


@dataclass(frozen=True)
class ResultParts:
    """A result body as its two parts: ``head``, the header and metadata
    (:func:`result_head`), and ``total``, the canonical total the header announces, held as
    is (no copy), so it can be sent a slice at a time (:meth:`chunks`)."""

    head: bytes
    total: RingArray

    def __repr__(self) -> str:
        return f"ResultParts({len(self.head)}-byte head, total of {self.total.shape[0]})"

    @property
    def length(self) -> int:
        """Bytes of the whole body (its ``Content-Length``)."""
        return len(self.head) + ring_of(self.total).itemsize * int(self.total.shape[0])

    def chunks(self, elements: int = RESULT_SLICE) -> Iterator[bytes | memoryview]:
        """The body in order: the head, then the total ``elements`` at a time as views of
        its memory (copies only on a big-endian machine or for a strided total)."""
        yield self.head
        ring = ring_of(self.total)
        for start in range(0, self.total.shape[0], elements):
            part = self.total[start : start + elements]
            if part.flags.c_contiguous and part.dtype == np.dtype(ring.wire):
                yield part.view(np.uint8).data
            else:
                yield ring.to_wire(part)


def result_head(ring: Ring, dim: int, meta: dict[str, Any]) -> bytes:
    """The bytes of a result body before its total: header (naming ``ring`` and ``dim``),
    then ``meta`` as compact JSON with sorted keys."""
    meta_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")
    header = RESULT_HEADER.pack(RESULT_MAGIC, VERSION, ring.code, bytes(2), dim, len(meta_bytes))
    return header + meta_bytes


def result_parts(total: RingArray, meta: dict[str, Any]) -> ResultParts:
    """The body of :func:`encode_result` as its parts, ``total`` not copied."""
    return ResultParts(result_head(ring_of(total), total.shape[0], meta), total)


def encode_result(total: RingArray, meta: dict[str, Any]) -> bytes:
    """The result body: header (naming the ring of ``total``'s dtype), JSON ``meta``, then
    the canonical ``total``."""
    return result_head(ring_of(total), total.shape[0], meta) + ring_of(total).to_wire(total)


def result_body_length(ring: Ring, dim: int, meta_len: int) -> int:
    """Exact byte length of a result of dimension ``dim`` in ``ring`` whose metadata is
    ``meta_len`` bytes."""
    return RESULT_HEADER.size + meta_len + ring.itemsize * dim


def decode_result_header(prefix: bytes | bytearray, ring: Ring = GF_P61) -> tuple[int, int]:
    """``(dim, meta_len)`` from the first :data:`RESULT_HEADER` ``.size`` bytes of a result
    (more may follow); raises :class:`MalformedUpload` (:class:`RingMismatch` for a result
    in another ring than ``ring``). What a streaming reader checks before anything else."""
    if len(prefix) < RESULT_HEADER.size:
        raise MalformedUpload(f"result has {len(prefix)} bytes, shorter than its header")
    magic, version, ring_code, reserved, dim, meta_len = RESULT_HEADER.unpack_from(prefix)
    if magic != RESULT_MAGIC or version != VERSION or reserved != bytes(2):
        raise MalformedUpload("result header is not an mpc_agg v1 result")
    _check_ring(ring_code, ring, "result")
    return int(dim), int(meta_len)


def decode_result_meta(raw: bytes | bytearray) -> dict[str, Any]:
    """The metadata of a result from its ``meta_len`` bytes (a JSON object)."""
    try:
        meta = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise MalformedUpload(f"result metadata is not JSON: {type(exc).__name__}") from None
    if not isinstance(meta, dict):
        raise MalformedUpload("result metadata is not a JSON object")
    return meta


def decode_result_block(raw: Any, ring: Ring = GF_P61) -> RingArray:
    """Elements of a result's total from ``raw`` (a whole number of ``ring`` elements), as
    a view of ``raw`` where the byte order allows; raises :class:`MalformedUpload` for a
    value that is not an element of ``ring``."""
    if len(raw) % ring.itemsize:
        raise MalformedUpload(f"a piece of a {ring.name} total of {len(raw)} bytes")
    block = ring.from_wire(raw, 0, len(raw) // ring.itemsize)
    if not ring.is_canonical(block):
        raise MalformedUpload("result holds a value not below p")
    return block


def decode_result(body: bytes, ring: Ring = GF_P61) -> tuple[RingArray, dict[str, Any]]:
    """Inverse of :func:`encode_result` for a total in ``ring``; raises
    :class:`MalformedUpload` on any defect (:class:`RingMismatch` for another ring)."""
    dim, meta_len = decode_result_header(body, ring)
    expected = result_body_length(ring, dim, meta_len)
    if len(body) != expected:
        raise MalformedUpload(
            f"result of dimension {dim} should be {expected} bytes, got {len(body)}"
        )
    meta_end = RESULT_HEADER.size + meta_len
    meta = decode_result_meta(body[RESULT_HEADER.size : meta_end])
    total = ring.from_wire(body, meta_end, dim).astype(ring.dtype)  # a writable copy
    if not ring.is_canonical(total):
        raise MalformedUpload("result holds a value not below p")
    return total, meta
