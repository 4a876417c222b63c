"""Signed result statements: a revealed total that anyone can verify, sans I/O.

README, "Security model"; docs/design.md, "A round, step by step" (the reveal) and "Security
model". After a round is revealed, each of the ``m`` aggregators signs a
:class:`ResultStatement` (what was revealed, for which round, topology and client set, with
which noise) with its own Ed25519 key. :func:`verify_result` checks, for a total and the
statements of all ``m`` aggregators, that every signature is valid for its signer's key,
that all statements agree, and that they describe this total; a saved result (total plus
statements as JSON) can be re-verified later by anyone holding the topology's public keys.
A statement binds the aggregators to what they revealed; it does not prove the total was
computed correctly (README, "Security model": malicious aggregators are not covered).

Signed message, version 1 (integers unsigned little-endian, floats IEEE-754 binary64
little-endian, digests as their 32 raw bytes)::

    offset  size  field
    0       28    label b"mpc_agg/result-statement/v1\\x00" (domain separation, version)
    --- content: what all m aggregators must agree on (:func:`statement_content`) ---
    28      32    topology_fingerprint (SHA-256)
    60      32    total_digest (:func:`total_digest`)
    92      32    clients_digest (:func:`clients_digest`)
    124     8     dim (uint64)
    132     8     num_clients (uint64)
    140     8     dropped_clients (uint64)
    148     1     epsilon present: 0 or 1
    149     8     epsilon (binary64; 0.0 when absent)
    157     1     delta present: 0 or 1
    158     8     delta
    166     1     noise_stddev present: 0 or 1
    167     8     noise_stddev
    175     2     n: byte length of round_id (uint16)
    177     n     round_id (UTF-8; ids are ASCII, see codec.check_id)
    --- end of content ---
    177+n   1     aggregator: the signer's index (0..254, as in the share codec)

Every field has a fixed size except ``round_id``, which is length-prefixed and last in the
content, so distinct statements have distinct messages. A binary layout rather than JSON:
floats are signed as their exact 64 bits (no decimal spelling to agree on), and a verifier
in any language rebuilds the message from the table above. ``-0.0`` is stored as ``0.0``.
The signer index is part of the message, so aggregator 1's signature does not verify as
aggregator 2's; the label keeps these signatures apart from any other use of the keys.

:func:`total_digest` is SHA-256 over ``b"mpc_agg/total/v1\\x00"``, ``d`` (uint64) and the
``d`` canonical field elements (uint64 each); a Z_(2^32) total uses the label
``b"mpc_agg/total/z2_32/u4/v1\\x00"`` and uint32 values. :func:`clients_digest` is SHA-256 over
``b"mpc_agg/client-set/v1\\x00"``, the number ``k`` of distinct ids (uint64), then each id,
sorted by its UTF-8 bytes, as its byte length (uint32) and its UTF-8 bytes.
:class:`TotalDigest` computes the total's digest block by block, so a total that streams
past (the collector's ``out=``) or lies in a memory-mapped file is checked in flat memory
(:func:`verify_result_digest`).

JSON (:meth:`SignedStatement.to_json`, for the HTTP API and saved results): one flat object
with ``"version": 1``, every field of :class:`ResultStatement` under its own name (digests
as lowercase hex, absent floats as ``null``) and ``"signature"`` (128 lowercase hex
characters). :meth:`SignedStatement.from_json` refuses missing and unknown keys.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mpc_agg.core.codec import check_id
from mpc_agg.core.ring import GF_P61, Z2_32, Ring, RingArray, ring_of
from mpc_agg.errors import EncodingError, InvalidRequest, MpcAggError

STATEMENT_LABEL = b"mpc_agg/result-statement/v1\x00"
"""Domain-separation label that starts every signed message (28 bytes)."""
TOTAL_LABEL = b"mpc_agg/total/v1\x00"
"""The label of a GF(2^61-1) total (``<u8`` values)."""
TOTAL_LABEL_Z2_32 = b"mpc_agg/total/z2_32/u4/v1\x00"
"""The label of a Z_(2^32) total (``<u4`` values): a signed digest names its ring and width,
so a statement over one ring's total never verifies a total read in the other."""
TOTAL_LABELS = {GF_P61.name: TOTAL_LABEL, Z2_32.name: TOTAL_LABEL_Z2_32}
CLIENTS_LABEL = b"mpc_agg/client-set/v1\x00"
JSON_VERSION = 1
"""The ``"version"`` of the JSON form."""

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
MAX_AGGREGATOR = 254
"""Largest signer index (one byte, as in the share codec)."""
_UINT64 = 2**64

_CONTENT = struct.Struct("<32s32s32sQQQBdBdBdH")
"""The fixed-size part of the content, up to and including round_id's length (149 bytes)."""
_HEX = frozenset("0123456789abcdef")
_FLOAT_FIELDS = ("epsilon", "delta", "noise_stddev")
_INT_FIELDS = ("num_clients", "dropped_clients", "dim")
_DIGEST_FIELDS = ("topology_fingerprint", "total_digest", "clients_digest")


class MalformedStatement(MpcAggError, ValueError):
    """A result statement, its JSON form or an Ed25519 public key is malformed (wrong key,
    type, length or range). The message names the field and its value."""

    code = "malformed_statement"


class ResultMismatch(MpcAggError):
    """The statements do not vouch for this total: a statement is missing, doubled or
    badly signed, the aggregators disagree, or they describe another round, topology or
    total. ``aggregators`` are the indices at fault (all involved when there is no
    majority); ``fields`` are the statement fields that differ."""

    code = "result_mismatch"

    def __init__(
        self, detail: str, *, aggregators: Iterable[int] = (), fields: Iterable[str] = ()
    ) -> None:
        self.detail = detail
        self.aggregators: tuple[int, ...] = tuple(sorted(set(aggregators)))
        self.fields: tuple[str, ...] = tuple(fields)
        super().__init__(detail)


# --------------------------------------------------------------------------- the statement


def _show(value: object) -> str:
    """``repr(value)``, cut to 80 characters (messages name values, never dump them)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_hex(value: object, chars: int) -> bool:
    return isinstance(value, str) and len(value) == chars and set(value) <= _HEX


@dataclass(frozen=True)
class ResultStatement:
    """What one aggregator vouches for about one revealed round.

    ``topology_fingerprint``, ``total_digest``, ``clients_digest``: 64 lowercase hex
    characters (SHA-256). ``num_clients``: clients in the agreed set; ``dropped_clients``:
    clients left out (missing at some aggregator); ``dim``: length of the total; all three
    in ``[0, 2**64)``. ``epsilon``, ``delta``: the round's privacy guarantee and
    ``noise_stddev``: the standard deviation of the added noise in field units (None
    without DP), finite and ``>= 0``, ``delta <= 1``; ints are stored as floats and
    ``-0.0`` as ``0.0``. ``aggregator``: the signer's index, 0..254, not part of the
    content the aggregators must agree on.
    """

    round_id: str
    topology_fingerprint: str
    total_digest: str
    clients_digest: str
    num_clients: int
    dropped_clients: int
    dim: int
    epsilon: float | None
    delta: float | None
    noise_stddev: float | None
    aggregator: int

    def __post_init__(self) -> None:
        try:
            check_id("round", self.round_id)
        except InvalidRequest as exc:
            raise MalformedStatement(f"result statement: {exc.detail}") from None
        for name in _DIGEST_FIELDS:
            value = getattr(self, name)
            if not _is_hex(value, 64):
                raise MalformedStatement(
                    f"result statement: {name} must be 64 lowercase hex characters "
                    f"(SHA-256), got {_show(value)}"
                )
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if not (_is_int(value) and 0 <= value < _UINT64):
                raise MalformedStatement(
                    f"result statement: {name} must be an integer in [0, 2**64), got {_show(value)}"
                )
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise MalformedStatement(
                    f"result statement: {name} must be a number or None, got {_show(value)}"
                )
            upper = 1.0 if name == "delta" else math.inf
            number = float(value)
            if not (math.isfinite(number) and 0.0 <= number <= upper):
                bound = "in [0, 1]" if name == "delta" else "finite and >= 0"
                raise MalformedStatement(f"result statement: {name} must be {bound}, got {value!r}")
            object.__setattr__(self, name, number + 0.0)  # int -> float, -0.0 -> 0.0
        if not (_is_int(self.aggregator) and 0 <= self.aggregator <= MAX_AGGREGATOR):
            raise MalformedStatement(
                f"result statement: aggregator must be an index in 0..{MAX_AGGREGATOR}, "
                f"got {_show(self.aggregator)}"
            )


_CONTENT_FIELDS = tuple(f.name for f in fields(ResultStatement) if f.name != "aggregator")


def statement_content(st: ResultStatement) -> bytes:
    """The content all aggregators must agree on: everything but ``aggregator``, in the
    layout of the module docstring (offsets 28 to 177+n of the signed message)."""
    floats: list[Any] = []
    for name in _FLOAT_FIELDS:
        value = getattr(st, name)
        floats += [0, 0.0] if value is None else [1, value]
    round_id = st.round_id.encode("utf-8")
    return (
        _CONTENT.pack(
            bytes.fromhex(st.topology_fingerprint),
            bytes.fromhex(st.total_digest),
            bytes.fromhex(st.clients_digest),
            st.dim,
            st.num_clients,
            st.dropped_clients,
            *floats,
            len(round_id),
        )
        + round_id
    )


def statement_bytes(st: ResultStatement) -> bytes:
    """The message aggregator ``st.aggregator`` signs: label, content, signer index
    (178 + len(round_id) bytes). Deterministic and injective."""
    return STATEMENT_LABEL + statement_content(st) + bytes([st.aggregator])


# --------------------------------------------------------------------------- digests


DIGEST_BLOCK = 1 << 20
"""Elements :func:`total_digest` hashes at a time (8 MiB of a GF(p) total)."""


class TotalDigest:
    """:func:`total_digest` computed block by block, for a total that is never whole in
    memory (a streamed result, a memory-mapped file).

    ``ring`` names the label and the width; ``d`` is the total's length, hashed first.
    :meth:`update` takes the next block of canonical elements (any split of the vector
    gives the digest of the whole); :meth:`hexdigest` refuses until exactly ``d`` elements
    were given. A block with a value that is not an element of ``ring``, or more elements
    than announced, raises :class:`EncodingError` and the digest is then unusable.
    """

    __slots__ = ("ring", "d", "done", "_h")

    def __init__(self, ring: Ring, d: int) -> None:
        if not (_is_int(d) and 0 <= d < _UINT64):
            raise EncodingError(f"a total's length must be an integer in [0, 2**64), got {d!r}")
        self.ring = ring
        self.d = d
        self.done = 0
        """Elements hashed so far."""
        self._h = hashlib.sha256(TOTAL_LABELS[ring.name])
        self._h.update(struct.pack("<Q", d))

    def __repr__(self) -> str:
        return f"TotalDigest({self.ring.name}, {self.done} of {self.d} elements)"

    def update(self, block: RingArray) -> None:
        """Hash the next ``len(block)`` elements (1-D, ``ring``'s element type)."""
        if (
            not isinstance(block, np.ndarray)
            or block.ndim != 1
            or block.dtype.kind != "u"
            or block.dtype.itemsize != self.ring.itemsize
        ):
            got = f"{block.ndim}-D {block.dtype}" if isinstance(block, np.ndarray) else _show(block)
            raise EncodingError(
                f"a block of a {self.ring.name} total is a 1-D "
                f"{np.dtype(self.ring.dtype)} vector, got {got}"
            )
        if self.done + block.shape[0] > self.d:
            raise EncodingError(
                f"the total has {self.d} elements, got {self.done + block.shape[0]} or more"
            )
        if not self.ring.is_canonical(block):
            raise EncodingError("total holds a value not below p = 2**61 - 1")
        self._h.update(np.ascontiguousarray(block, dtype=self.ring.wire).data)
        self.done += block.shape[0]

    def hexdigest(self) -> str:
        """The hex SHA-256 of the whole total, once all ``d`` elements were hashed."""
        if self.done != self.d:
            raise EncodingError(f"the total has {self.d} elements, only {self.done} were hashed")
        return self._h.hexdigest()


def total_digest(total: RingArray) -> str:
    """Hex SHA-256 of a revealed total: its ring's label, ``d`` (uint64 LE), values.

    ``total`` must be a 1-D vector of canonical ring elements, as
    :func:`mpc_agg.core.codec.decode_result` returns: ``uint64`` (each < p), hashed as
    ``'<u8'`` under :data:`TOTAL_LABEL`, or ``uint32`` (Z_(2^32)), hashed as ``'<u4'`` under
    :data:`TOTAL_LABEL_Z2_32`; else :class:`EncodingError`. O(d) time, hashed
    :data:`DIGEST_BLOCK` elements at a time (:class:`TotalDigest`), so a memory-mapped
    total is never read whole and a strided or big-endian one is copied a block at a time.
    """
    if not isinstance(total, np.ndarray) or total.ndim != 1 or total.dtype.kind != "u":
        raise EncodingError(
            "total must be a 1-D numpy uint64 vector of field elements, got "
            + (f"{total.ndim}-D {total.dtype}" if isinstance(total, np.ndarray) else _show(total))
        )
    try:
        ring = ring_of(total)
    except ValueError:
        raise EncodingError(
            f"total must have dtype uint64 (gf_p61) or uint32 (z2_32), got {total.dtype}"
        ) from None
    d = total.shape[0]
    digest = TotalDigest(ring, d)
    for start in range(0, d, DIGEST_BLOCK):
        digest.update(total[start : start + DIGEST_BLOCK])
    return digest.hexdigest()


def clients_digest(client_ids: Iterable[str]) -> str:
    """Hex SHA-256 of a client set: label, the number of distinct ids (uint64 LE), then each
    id, sorted by UTF-8 bytes, as uint32 LE byte length and UTF-8 bytes.

    A digest of the *set*: order and repetition do not matter; length prefixes keep
    ``["a", "bc"]`` and ``["ab", "c"]`` apart. A non-string id raises TypeError.
    """
    encoded: set[bytes] = set()
    for cid in client_ids:
        if not isinstance(cid, str):
            raise TypeError(f"client ids must be strings, got {_show(cid)}")
        encoded.add(cid.encode("utf-8"))
    h = hashlib.sha256(CLIENTS_LABEL)
    h.update(struct.pack("<Q", len(encoded)))
    for item in sorted(encoded):
        h.update(struct.pack("<I", len(item)))
        h.update(item)
    return h.hexdigest()


# --------------------------------------------------------------------------- keys


def public_key_hex(private_key: Ed25519PrivateKey) -> str:
    """The raw 32-byte Ed25519 public key of ``private_key`` as 64 lowercase hex characters
    (the form of a topology's ``signing_key``)."""
    return private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def _public_key(raw: object, what: str) -> Ed25519PublicKey:
    if not isinstance(raw, bytes):
        raise MalformedStatement(f"{what} must be {PUBLIC_KEY_BYTES} raw bytes, got {_show(raw)}")
    if len(raw) != PUBLIC_KEY_BYTES:
        raise MalformedStatement(
            f"{what} is {len(raw)} bytes, expected {PUBLIC_KEY_BYTES} (a raw Ed25519 key)"
        )
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise MalformedStatement(f"{what} is not an Ed25519 public key: {exc}") from None


def load_public_key(key_hex: str) -> Ed25519PublicKey:
    """The Ed25519 public key written as 64 lowercase hex characters (32 raw bytes);
    :class:`MalformedStatement` names the length or character that is wrong."""
    if not isinstance(key_hex, str):
        raise MalformedStatement(f"public key must be a hex string, got {_show(key_hex)}")
    if len(key_hex) != 2 * PUBLIC_KEY_BYTES:
        raise MalformedStatement(
            f"public key has {len(key_hex)} hex characters, expected {2 * PUBLIC_KEY_BYTES} "
            f"({PUBLIC_KEY_BYTES} bytes)"
        )
    if not set(key_hex) <= _HEX:
        raise MalformedStatement(f"public key {_show(key_hex)} is not lowercase hex (0-9 a-f)")
    return _public_key(bytes.fromhex(key_hex), "public key")


# --------------------------------------------------------------------------- signing


@dataclass(frozen=True)
class SignedStatement:
    """A statement and its signer's 64-byte Ed25519 signature over
    :func:`statement_bytes` (not checked here: see :func:`verify_signature`)."""

    statement: ResultStatement
    signature: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.statement, ResultStatement):
            raise MalformedStatement(
                f"statement must be a ResultStatement, got {type(self.statement).__name__}"
            )
        if not (isinstance(self.signature, bytes) and len(self.signature) == SIGNATURE_BYTES):
            got = (
                f"{len(self.signature)} bytes"
                if isinstance(self.signature, bytes)
                else type(self.signature).__name__
            )
            raise MalformedStatement(f"signature must be {SIGNATURE_BYTES} bytes, got {got}")

    def to_json(self) -> dict[str, Any]:
        """The flat JSON object of the module docstring (plain str, int, float, None)."""
        out: dict[str, Any] = {"version": JSON_VERSION}
        for f in fields(ResultStatement):
            out[f.name] = getattr(self.statement, f.name)
        out["signature"] = self.signature.hex()
        return out

    @classmethod
    def from_json(cls, data: object) -> SignedStatement:
        """Inverse of :meth:`to_json`. Refuses a non-object, missing or unknown keys, another
        version, wrong types (``true`` is no integer, ``3.0`` no count) and bad values, with
        :class:`MalformedStatement` naming the key."""
        if not isinstance(data, dict):
            raise MalformedStatement(
                f"a signed result statement is a JSON object, got {type(data).__name__}"
            )
        expected = {"version", *(f.name for f in fields(ResultStatement)), "signature"}
        missing = sorted(expected - data.keys())
        unknown = sorted(map(str, data.keys() - expected))
        if missing or unknown:
            parts = []
            if missing:
                parts.append("missing key(s) " + ", ".join(map(repr, missing)))
            if unknown:
                parts.append("unknown key(s) " + ", ".join(map(_show, unknown)))
            raise MalformedStatement("signed result statement: " + "; ".join(parts))
        version = data["version"]
        if not _is_int(version) or version != JSON_VERSION:
            raise MalformedStatement(
                f"signed result statement: version {_show(version)} is not supported "
                f"(this reader speaks {JSON_VERSION})"
            )
        for name in (*_INT_FIELDS, "aggregator"):
            if not _is_int(data[name]):
                raise MalformedStatement(
                    f"signed result statement: {name!r} must be an integer, got {_show(data[name])}"
                )
        for name in ("round_id", *_DIGEST_FIELDS, "signature"):
            if not isinstance(data[name], str):
                raise MalformedStatement(
                    f"signed result statement: {name!r} must be a string, got {_show(data[name])}"
                )
        signature = data["signature"]
        if not _is_hex(signature, 2 * SIGNATURE_BYTES):
            raise MalformedStatement(
                f"signed result statement: 'signature' must be {2 * SIGNATURE_BYTES} lowercase "
                f"hex characters, got {_show(signature)}"
            )
        statement = ResultStatement(**{f.name: data[f.name] for f in fields(ResultStatement)})
        return cls(statement, bytes.fromhex(signature))


def sign_statement(st: ResultStatement, private_key: Ed25519PrivateKey) -> SignedStatement:
    """``st`` signed by ``private_key`` (deterministic Ed25519 over :func:`statement_bytes`)."""
    return SignedStatement(st, private_key.sign(statement_bytes(st)))


def verify_signature(signed: SignedStatement, public_key: Ed25519PublicKey) -> bool:
    """True when ``signed.signature`` is ``public_key``'s signature of its statement."""
    try:
        public_key.verify(signed.signature, statement_bytes(signed.statement))
    except InvalidSignature:
        return False
    return True


# --------------------------------------------------------------------------- verification


def _who(indices: Sequence[int]) -> str:
    if len(indices) == 1:
        return f"aggregator {indices[0]}"
    return "aggregators " + ", ".join(map(str, indices))


def _value(name: str, value: object) -> str:
    if name in _DIGEST_FIELDS and isinstance(value, str):
        return value[:12] + "..."
    return _show(value)


def _disagreement(name: str, by_index: dict[int, object]) -> tuple[str, list[int]]:
    """One field on which the aggregators differ: the sentence and the aggregators at fault
    (the minority when there is a strict majority, else all)."""
    groups: dict[object, list[int]] = {}
    for j, value in by_index.items():
        groups.setdefault(value, []).append(j)
    ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[1][0]))
    (top_value, top), rest = ranked[0], ranked[1:]
    if len(top) > len(rest[0][1]):
        sentences = [
            f"{_who(g)}'s {name} ({_value(name, v)}) differs from {_who(top)}'s "
            f"({_value(name, top_value)})"
            for v, g in rest
        ]
        return "; ".join(sentences), [j for _, g in rest for j in g]
    listing = "; ".join(f"{_who(g)}: {_value(name, v)}" for v, g in ranked)
    return f"the aggregators disagree on {name} ({listing})", list(by_index)


def verify_result(
    total: RingArray,
    statements: Sequence[SignedStatement],
    public_keys: Sequence[bytes],
    fingerprint: str,
    round_id: str,
) -> ResultStatement:
    """Check that all ``m = len(public_keys)`` aggregators vouch for ``total`` of
    ``round_id`` under the topology ``fingerprint``; return the agreed statement (the one
    of aggregator 0).

    ``public_keys[j]`` is aggregator ``j``'s raw 32-byte Ed25519 key. Checked in order:
    exactly one statement per index ``0..m-1``; every signature valid for its index; all
    contents identical; round id, fingerprint, dim and total digest as expected. Any
    failure raises :class:`ResultMismatch` naming the aggregators and fields. Malformed
    keys or ``fingerprint`` raise :class:`MalformedStatement`, a ``total`` that is not a
    canonical uint64 vector :class:`EncodingError`. Cost: m signature checks and one
    SHA-256 pass over the ``8 d`` bytes of the total.
    """
    st = _agreed_statement(statements, public_keys, fingerprint, round_id)
    d = total.shape[0] if isinstance(total, np.ndarray) and total.ndim == 1 else None
    if d is not None:
        _check_dim(st, d, len(public_keys))
    _check_digest(st, total_digest(total), len(public_keys))
    return st


def verify_result_digest(
    digest: str,
    dim: int,
    statements: Sequence[SignedStatement],
    public_keys: Sequence[bytes],
    fingerprint: str,
    round_id: str,
) -> ResultStatement:
    """:func:`verify_result` for a total known by its length ``dim`` and its
    :func:`total_digest` (hex), e.g. computed with :class:`TotalDigest` while the total
    streamed past: the same checks in the same order, with the same errors."""
    st = _agreed_statement(statements, public_keys, fingerprint, round_id)
    _check_dim(st, dim, len(public_keys))
    _check_digest(st, digest, len(public_keys))
    return st


def _check_dim(st: ResultStatement, d: int, m: int) -> None:
    if d != st.dim:
        raise ResultMismatch(
            f"the total has dimension {d}, but all {m} aggregators signed dimension {st.dim}",
            fields=("dim",),
        )


def _check_digest(st: ResultStatement, digest: str, m: int) -> None:
    if digest != st.total_digest:
        raise ResultMismatch(
            f"the total's digest {_value('total_digest', digest)} differs from the "
            f"total_digest all {m} aggregators signed ({_value('total_digest', st.total_digest)})",
            fields=("total_digest",),
        )


def _agreed_statement(
    statements: Sequence[SignedStatement],
    public_keys: Sequence[bytes],
    fingerprint: str,
    round_id: str,
) -> ResultStatement:
    """The statement every aggregator signed alike for ``round_id`` under ``fingerprint``
    (all checks of :func:`verify_result` but those of the total)."""
    m = len(public_keys)
    if m == 0:
        raise MalformedStatement("verify_result needs the public key of every aggregator")
    keys = [_public_key(raw, f"public key of aggregator {j}") for j, raw in enumerate(public_keys)]
    if not _is_hex(fingerprint, 64):
        raise MalformedStatement(
            f"fingerprint must be 64 lowercase hex characters (SHA-256), got {_show(fingerprint)}"
        )

    # One statement per aggregator.
    by_index: dict[int, SignedStatement] = {}
    unknown: list[int] = []
    doubled: list[int] = []
    for s in statements:
        j = s.statement.aggregator
        if j >= m:
            unknown.append(j)
        elif j in by_index:
            doubled.append(j)
        else:
            by_index[j] = s
    if unknown:
        raise ResultMismatch(
            f"statement(s) from unknown {_who(sorted(set(unknown)))}: the topology names "
            f"{m} aggregators (0..{m - 1})",
            aggregators=unknown,
            fields=("aggregator",),
        )
    if doubled:
        raise ResultMismatch(
            f"more than one statement from {_who(sorted(set(doubled)))}",
            aggregators=doubled,
            fields=("aggregator",),
        )
    missing = [j for j in range(m) if j not in by_index]
    if missing:
        raise ResultMismatch(
            f"no statement from {_who(missing)}", aggregators=missing, fields=("aggregator",)
        )

    # Every signature, against the key of the index it claims.
    bad = [j for j in range(m) if not verify_signature(by_index[j], keys[j])]
    if bad:
        plural = "signatures" if len(bad) > 1 else "signature"
        verb = "are" if len(bad) > 1 else "is"
        raise ResultMismatch(
            f"{plural} of {_who(bad)} {verb} invalid", aggregators=bad, fields=("signature",)
        )

    # Identical contents.
    agreed = [by_index[j].statement for j in range(m)]
    contents = [statement_content(st) for st in agreed]
    if any(c != contents[0] for c in contents):
        sentences: list[str] = []
        at_fault: list[int] = []
        differing: list[str] = []
        for name in _CONTENT_FIELDS:
            values: dict[int, object] = {j: getattr(agreed[j], name) for j in range(m)}
            if len(set(values.values())) > 1:
                sentence, faulty = _disagreement(name, values)
                sentences.append(sentence)
                at_fault += faulty
                differing.append(name)
        raise ResultMismatch(
            "the aggregators' result statements differ: " + "; ".join(sentences),
            aggregators=at_fault,
            fields=differing,
        )

    # The agreed statement describes this round and topology.
    st = agreed[0]
    if st.round_id != round_id:
        raise ResultMismatch(
            f"the statements are for round {st.round_id!r}, expected {round_id!r}",
            fields=("round_id",),
        )
    if st.topology_fingerprint != fingerprint:
        raise ResultMismatch(
            f"the statements name topology fingerprint {st.topology_fingerprint[:12]}..., "
            f"expected {fingerprint[:12]}...",
            fields=("topology_fingerprint",),
        )
    return st
