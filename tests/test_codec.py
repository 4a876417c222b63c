"""Wire codecs: pinned bytes (good and bad), exact lengths, fuzzing.

The pinned vectors are written out field by field from the layout in codec.py's docstring,
not produced by the encoder.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpc_agg.core import codec
from mpc_agg.core.sharing import Share, ShareKind
from mpc_agg.errors import DimensionMismatch, InvalidRequest, MalformedUpload

P_REF = 2**61 - 1

# FULL share for aggregator 1, dim 2, vector [1, p - 1].
FULL_HEX = (
    "4d504153"  # magic b"MPAS"
    "01"  # version 1
    "00"  # kind 0 = FULL
    "01"  # aggregator index 1
    "00"  # ring 0 = gf_p61
    "02000000"  # dim = 2 (uint32 LE)
    "0100000000000000"  # vector[0] = 1 (uint64 LE)
    "feffffffffffff1f"  # vector[1] = p - 1 = 0x1ffffffffffffffe
)
FULL_BYTES = bytes.fromhex(FULL_HEX)

# SEED share for aggregator 2, dim 1000, seed 00 01 .. 0f.
SEED_HEX = (
    "4d504153"  # magic b"MPAS"
    "01"  # version 1
    "01"  # kind 1 = SEED
    "02"  # aggregator index 2
    "00"  # ring 0 = gf_p61
    "e8030000"  # dim = 1000 (uint32 LE)
    "000102030405060708090a0b0c0d0e0f"  # 16-byte seed
)
SEED_BYTES = bytes.fromhex(SEED_HEX)

# Result: total [5, p - 1], meta {"n":3}.
RESULT_HEX = (
    "4d504152"  # magic b"MPAR"
    "01"  # version 1
    "00"  # ring 0 = gf_p61
    "0000"  # reserved
    "02000000"  # dim = 2
    "07000000"  # meta_len = 7
    "7b226e223a337d"  # {"n":3}
    "0500000000000000"  # total[0] = 5
    "feffffffffffff1f"  # total[1] = p - 1
)
RESULT_BYTES = bytes.fromhex(RESULT_HEX)


def full_share() -> Share:
    return Share(1, ShareKind.FULL, 2, vector=np.array([1, P_REF - 1], dtype=np.uint64))


def seed_share() -> Share:
    return Share(2, ShareKind.SEED, 1000, seed=bytes(range(16)))


def with_byte(body: bytes, offset: int, value: int) -> bytes:
    b = bytearray(body)
    b[offset] = value
    return bytes(b)


# --------------------------------------------------------------------------- pinned vectors


def test_full_share_pinned_bytes() -> None:
    assert codec.encode_share(full_share()) == FULL_BYTES
    s = codec.decode_share(FULL_BYTES, aggregator=1, dim=2)
    assert (s.aggregator, s.kind, s.dim, s.seed) == (1, ShareKind.FULL, 2, None)
    assert s.vector is not None
    assert s.vector.dtype == np.uint64
    assert [int(v) for v in s.vector] == [1, P_REF - 1]


def test_seed_share_pinned_bytes() -> None:
    assert codec.encode_share(seed_share()) == SEED_BYTES
    s = codec.decode_share(SEED_BYTES, aggregator=2, dim=1000)
    assert (s.aggregator, s.kind, s.dim, s.vector) == (2, ShareKind.SEED, 1000, None)
    assert s.seed == bytes(range(16))
    assert codec.share_body_length(ShareKind.SEED, 1000) == 28
    assert codec.share_body_length(ShareKind.FULL, 2) == 28
    assert codec.share_body_length(ShareKind.FULL, 0) == 12


def test_result_pinned_bytes() -> None:
    total = np.array([5, P_REF - 1], dtype=np.uint64)
    assert codec.encode_result(total, {"n": 3}) == RESULT_BYTES
    got, meta = codec.decode_result(RESULT_BYTES)
    assert [int(v) for v in got] == [5, P_REF - 1] and got.dtype == np.uint64
    assert meta == {"n": 3}


# --------------------------------------------------------------------------- bad shares


@pytest.mark.parametrize(
    ("body", "aggregator", "dim", "message"),
    [
        (b"", 1, 2, "0 bytes"),
        (FULL_BYTES[:11], 1, 2, "11 bytes, shorter than the 12-byte header"),
        (b"MPAX" + FULL_BYTES[4:], 1, 2, "bad magic"),
        (b"mpas" + FULL_BYTES[4:], 1, 2, "bad magic"),
        (with_byte(FULL_BYTES, 4, 2), 1, 2, "unsupported version 2"),
        (with_byte(FULL_BYTES, 4, 0), 1, 2, "unsupported version 0"),
        (with_byte(FULL_BYTES, 5, 2), 1, 2, "unknown share kind 2"),
        (with_byte(FULL_BYTES, 5, 255), 1, 2, "unknown share kind 255"),
        (with_byte(SEED_BYTES, 7, 128), 2, 1000, "unknown ring 128 in the share header"),
        (FULL_BYTES, 0, 2, "addressed to aggregator 1, but this is aggregator 0"),
        (SEED_BYTES, 1, 1000, "addressed to aggregator 2, but this is aggregator 1"),
        (FULL_BYTES[:-1], 1, 2, "is 28 bytes, got 27"),
        (FULL_BYTES + b"\x00", 1, 2, "is 28 bytes, got 29"),
        (FULL_BYTES[:12], 1, 2, "is 28 bytes, got 12"),
        (SEED_BYTES[:-1], 2, 1000, "is 28 bytes, got 27"),
        (SEED_BYTES + b"\x00", 2, 1000, "is 28 bytes, got 29"),
        # A FULL header with a seed-sized payload for a larger dimension.
        (FULL_BYTES[:8] + struct.pack("<I", 3) + bytes(16), 1, 3, "is 36 bytes, got 28"),
    ],
)
def test_decode_share_rejects(body: bytes, aggregator: int, dim: int, message: str) -> None:
    with pytest.raises(MalformedUpload, match=message) as err:
        codec.decode_share(body, aggregator=aggregator, dim=dim)
    assert type(err.value) is MalformedUpload
    assert err.value.code == "malformed"


@pytest.mark.parametrize(("body", "dim"), [(FULL_BYTES, 3), (FULL_BYTES, 1), (SEED_BYTES, 999)])
def test_decode_share_wrong_dim(body: bytes, dim: int) -> None:
    hdr_dim = struct.unpack_from("<I", body, 8)[0]
    aggregator = body[6]
    with pytest.raises(DimensionMismatch, match=f"dimension {hdr_dim}.*{dim}") as err:
        codec.decode_share(body, aggregator=aggregator, dim=dim)
    assert isinstance(err.value, MalformedUpload)
    assert err.value.code == "wrong_dimension"


@pytest.mark.parametrize("index", [0, 1, 3])
@pytest.mark.parametrize("value", [P_REF, P_REF + 1, 2**61, 2**64 - 1])
def test_decode_share_rejects_value_not_below_p(index: int, value: int) -> None:
    values = [0, P_REF - 1, 7, 8]
    values[index] = value
    body = FULL_BYTES[:8] + struct.pack("<I", 4) + struct.pack("<4Q", *values)
    with pytest.raises(MalformedUpload, match=rf"index {index}\b"):
        codec.decode_share(body, aggregator=1, dim=4)


def test_decode_share_accepts_largest_value() -> None:
    body = FULL_BYTES[:8] + struct.pack("<I", 1) + struct.pack("<Q", P_REF - 1)
    s = codec.decode_share(body, aggregator=1, dim=1)
    assert s.vector is not None and int(s.vector[0]) == P_REF - 1


# --------------------------------------------------------------------------- round trips


@given(
    st.integers(0, 254),
    st.lists(st.integers(0, P_REF - 1), max_size=20),
)
def test_full_share_round_trip(aggregator: int, values: list[int]) -> None:
    share = Share(aggregator, ShareKind.FULL, len(values), vector=np.array(values, dtype=np.uint64))
    body = codec.encode_share(share)
    assert len(body) == 12 + 8 * len(values)
    back = codec.decode_share(body, aggregator=aggregator, dim=len(values))
    assert back.kind is ShareKind.FULL and back.aggregator == aggregator
    assert back.vector is not None and [int(v) for v in back.vector] == values


@given(st.integers(0, 254), st.integers(0, 2**32 - 1), st.binary(min_size=16, max_size=16))
def test_seed_share_round_trip(aggregator: int, dim: int, seed: bytes) -> None:
    body = codec.encode_share(Share(aggregator, ShareKind.SEED, dim, seed=seed))
    assert len(body) == 28
    back = codec.decode_share(body, aggregator=aggregator, dim=dim)
    assert (back.kind, back.aggregator, back.dim, back.seed) == (
        ShareKind.SEED,
        aggregator,
        dim,
        seed,
    )


meta_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


@given(
    st.lists(st.integers(0, P_REF - 1), max_size=10),
    st.dictionaries(st.text(max_size=8), meta_values, max_size=4),
)
def test_result_round_trip(values: list[int], meta: dict) -> None:
    total = np.array(values, dtype=np.uint64)
    got, got_meta = codec.decode_result(codec.encode_result(total, meta))
    assert [int(v) for v in got] == values
    assert got_meta == meta


def result_body(meta: bytes, values: list[int], dim: int | None = None) -> bytes:
    dim = len(values) if dim is None else dim
    header = b"MPAR" + b"\x01" + bytes(3) + struct.pack("<II", dim, len(meta))
    return header + meta + struct.pack(f"<{len(values)}Q", *values)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (RESULT_BYTES[:15], "shorter than its header"),
        (RESULT_BYTES + b"\x00", "should be 39 bytes, got 40"),
        (RESULT_BYTES[:-1], "should be 39 bytes, got 38"),
        (b"MPAS" + RESULT_BYTES[4:], "not an mpc_agg v1 result"),
        (with_byte(RESULT_BYTES, 4, 2), "not an mpc_agg v1 result"),
        (with_byte(RESULT_BYTES, 6, 1), "not an mpc_agg v1 result"),
        (result_body(b"{nope", [1]), "not JSON"),
        (result_body(b"\xff\xfe", [1]), "not JSON"),
        (result_body(b"[1,2]", [1]), "not a JSON object"),
        (result_body(b"3", []), "not a JSON object"),
        (result_body(b"{}", [1, P_REF]), "not below p"),
        (result_body(b"{}", [2**64 - 1]), "not below p"),
        (result_body(b"{}", [1], dim=2), "should be"),
    ],
)
def test_decode_result_rejects(body: bytes, message: str) -> None:
    with pytest.raises(MalformedUpload, match=message):
        codec.decode_result(body)


def test_decode_result_deeply_nested_meta() -> None:
    with pytest.raises(MalformedUpload):
        codec.decode_result(result_body(b"[" * 100_000, []))


# --------------------------------------------------------------------------- ids


@pytest.mark.parametrize("value", ["a", "Z", "0", "round-1", "client_2.x", "A" * 128, "9-._"])
def test_check_id_accepts(value: str) -> None:
    assert codec.check_id("round", value) == value


@pytest.mark.parametrize(
    "value",
    ["", "-a", ".a", "_a", "A" * 129, "a b", "a/b", "../x", "é", "a\n", "a\x00", None, 5, b"a"],
)
def test_check_id_rejects(value: object) -> None:
    with pytest.raises(InvalidRequest) as err:
        codec.check_id("client", value)  # type: ignore[arg-type]
    assert "client id" in str(err.value)
    assert repr(value) in str(err.value)


# --------------------------------------------------------------------------- fuzzing


def header_like() -> st.SearchStrategy[bytes]:
    """Bodies close to valid: real magic mostly, small fields, lengths near the exact one."""
    return st.builds(
        lambda magic, version, kind, index, reserved, dim, payload: (
            struct.pack("<4sBBBBI", magic, version, kind, index, reserved, dim) + payload
        ),
        st.sampled_from([b"MPAS", b"MPAS", b"MPAR", b"\x00" * 4]),
        st.sampled_from([1, 1, 0, 2]),
        st.sampled_from([0, 1, 2, 255]),
        st.sampled_from([0, 1, 2]),
        st.sampled_from([0, 0, 1]),
        st.integers(0, 4),
        st.binary(max_size=48),
    )


@settings(max_examples=400)
@given(st.one_of(st.binary(max_size=64), header_like()), st.integers(0, 2), st.integers(0, 4))
def test_decode_share_fuzz(body: bytes, aggregator: int, dim: int) -> None:
    try:
        share = codec.decode_share(body, aggregator=aggregator, dim=dim)
    except MalformedUpload:
        return
    assert isinstance(share, Share)
    assert share.aggregator == aggregator and share.dim == dim
    # Only exact encodings decode: re-encoding gives the same bytes.
    assert codec.encode_share(share) == body


@settings(max_examples=200)
@given(
    st.one_of(
        st.binary(max_size=64),
        st.builds(
            lambda meta, values, dim: result_body(meta, values, dim),
            st.one_of(st.binary(max_size=12), st.just(json.dumps({"a": 1}).encode())),
            st.lists(st.integers(0, 2**64 - 1), max_size=3),
            st.integers(0, 3),
        ),
    )
)
def test_decode_result_fuzz(body: bytes) -> None:
    try:
        total, meta = codec.decode_result(body)
    except MalformedUpload:
        return
    assert isinstance(meta, dict)
    assert all(int(v) < P_REF for v in total)
