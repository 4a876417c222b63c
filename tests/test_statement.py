"""Signed result statements: pinned bytes, JSON round trips, and every way verification fails.

The pinned messages and digest preimages are written out field by field from the layout in
statement.py's docstring, not produced by the encoder; a reference parser written from the
same table shows that the encoding is injective.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import replace

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from mpc_agg.core import statement as sm
from mpc_agg.core.statement import (
    MalformedStatement,
    ResultMismatch,
    ResultStatement,
    SignedStatement,
    clients_digest,
    load_public_key,
    public_key_hex,
    sign_statement,
    statement_bytes,
    statement_content,
    total_digest,
    verify_result,
    verify_signature,
)
from mpc_agg.errors import EncodingError, MpcAggError

P_REF = 2**61 - 1
FINGERPRINT = "ab" * 32

# --------------------------------------------------------------------------- pinned vectors

# Aggregator 2's statement for round "r1": fingerprint 11..11, total digest 22..22, clients
# digest 33..33, dim 4, 3 clients, 1 dropped, epsilon 1.0, no delta, noise stddev 2.5.
PINNED = ResultStatement(
    round_id="r1",
    topology_fingerprint="11" * 32,
    total_digest="22" * 32,
    clients_digest="33" * 32,
    num_clients=3,
    dropped_clients=1,
    dim=4,
    epsilon=1.0,
    delta=None,
    noise_stddev=2.5,
    aggregator=2,
)
PINNED_HEX = (
    "6d70635f6167672f726573756c742d73746174656d656e742f763100"  # b"mpc_agg/result-statement/v1\0"
    + "11" * 32  # topology_fingerprint, 32 raw bytes
    + "22" * 32  # total_digest
    + "33" * 32  # clients_digest
    + "0400000000000000"  # dim = 4 (uint64 LE)
    + "0300000000000000"  # num_clients = 3
    + "0100000000000000"  # dropped_clients = 1
    + "01"  # epsilon present
    + "000000000000f03f"  # epsilon = 1.0 (binary64 LE: 0x3ff0000000000000)
    + "00"  # delta absent
    + "0000000000000000"  # delta slot, zero
    + "01"  # noise_stddev present
    + "0000000000000440"  # noise_stddev = 2.5 (0x4004000000000000)
    + "0200"  # round_id length = 2 (uint16 LE)
    + "7231"  # round_id "r1"
    + "02"  # signer: aggregator 2
)
PINNED_BYTES = bytes.fromhex(PINNED_HEX)

# Ed25519 is deterministic: the signature of PINNED_BYTES under the key with seed 00 01 .. 1f.
# Produced once by the implementation; pins the message layout and the key handling.
PINNED_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PINNED_PUBLIC_HEX = "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
PINNED_SIGNATURE_HEX = (
    "f77414de19d1b129d4f2486bf8c418ca77e5bc403f0e6561be9a53c70e94a382"
    "3ffd3cc40fded321b17917bb7d6c5f686aaef3e5777b6ed4437c8dc9cf6a8700"
)


def test_statement_bytes_pinned() -> None:
    assert statement_bytes(PINNED) == PINNED_BYTES
    assert len(PINNED_BYTES) == 178 + len("r1")
    assert statement_content(PINNED) == PINNED_BYTES[28:-1]
    # The content excludes the signer; the message does not.
    other = replace(PINNED, aggregator=0)
    assert statement_content(other) == statement_content(PINNED)
    assert statement_bytes(other) == PINNED_BYTES[:-1] + b"\x00"


def test_signature_pinned() -> None:
    assert public_key_hex(PINNED_KEY) == PINNED_PUBLIC_HEX
    signed = sign_statement(PINNED, PINNED_KEY)
    assert signed.signature.hex() == PINNED_SIGNATURE_HEX
    public = load_public_key(PINNED_PUBLIC_HEX)
    public.verify(signed.signature, PINNED_BYTES)  # raises if invalid
    assert verify_signature(signed, public)


def test_total_digest_pinned() -> None:
    preimage = bytes.fromhex(
        "6d70635f6167672f746f74616c2f763100"  # b"mpc_agg/total/v1\0"
        "0200000000000000"  # d = 2 (uint64 LE)
        "0500000000000000"  # total[0] = 5
        "feffffffffffff1f"  # total[1] = p - 1
    )
    total = np.array([5, P_REF - 1], dtype=np.uint64)
    assert total_digest(total) == hashlib.sha256(preimage).hexdigest()
    empty = bytes.fromhex(
        "6d70635f6167672f746f74616c2f763100"  # b"mpc_agg/total/v1\0"
        "0000000000000000"  # d = 0, no values
    )
    assert total_digest(np.zeros(0, dtype=np.uint64)) == hashlib.sha256(empty).hexdigest()
    # Byte order and memory layout do not matter, only the values.
    assert total_digest(total.astype(">u8")) == total_digest(total)
    strided = np.array([5, 9, P_REF - 1, 9], dtype=np.uint64)[::2]
    assert total_digest(strided) == total_digest(total)


def test_clients_digest_pinned() -> None:
    preimage = bytes.fromhex(
        "6d70635f6167672f636c69656e742d7365742f763100"  # b"mpc_agg/client-set/v1\0"
        "0200000000000000"  # k = 2 distinct ids (uint64 LE)
        "01000000"  # len("a") = 1 (uint32 LE); ids sorted by UTF-8 bytes
        "61"  # "a"
        "02000000"  # len("bc") = 2
        "6263"  # "bc"
    )
    assert clients_digest(["bc", "a"]) == hashlib.sha256(preimage).hexdigest()


# --------------------------------------------------------------------------- digests


def test_clients_digest_is_a_set_digest() -> None:
    ids = ["c-2", "a", "b.1", "A", "0"]
    assert clients_digest(ids) == clients_digest(sorted(ids)) == clients_digest(reversed(ids))
    assert clients_digest(ids + ["a", "A"]) == clients_digest(ids)
    assert clients_digest(frozenset(ids)) == clients_digest(ids)
    assert clients_digest(iter(ids)) == clients_digest(ids)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (["a", "bc"], ["ab", "c"]),
        (["abc"], ["a", "bc"]),
        ([], [""]),
        (["a"], ["a", ""]),
        (["a", "b"], ["ab"]),
        (["\x01a"], ["\x01", "a"]),  # a length byte inside an id
        (["é"], ["e\u0301"]),  # precomposed vs combining: different UTF-8
        ([], ["a"]),
    ],
)
def test_clients_digest_tells_tricky_sets_apart(left: list[str], right: list[str]) -> None:
    assert clients_digest(left) != clients_digest(right)


@given(
    st.frozensets(st.text(max_size=6), max_size=5),
    st.frozensets(st.text(max_size=6), max_size=5),
)
def test_clients_digest_injective(a: frozenset[str], b: frozenset[str]) -> None:
    assert (clients_digest(a) == clients_digest(b)) == (a == b)


def test_clients_digest_rejects_non_strings() -> None:
    with pytest.raises(TypeError, match="client ids must be strings"):
        clients_digest(["a", b"b"])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("total", "message"),
    [
        (np.array([1, 2], dtype=np.int64), "uint64"),
        (np.array([1.0]), "uint64"),
        (np.array([1, 2], dtype=np.uint16), "dtype uint64"),  # uint32 is a z2_32 total
        (np.zeros((2, 2), dtype=np.uint64), "1-D"),
        (np.array([P_REF], dtype=np.uint64), "not below p"),
        (np.array([0, 2**64 - 1], dtype=np.uint64), "not below p"),
        ([1, 2], "1-D numpy uint64"),
    ],
)
def test_total_digest_rejects(total: object, message: str) -> None:
    with pytest.raises(EncodingError, match=message):
        total_digest(total)  # type: ignore[arg-type]


def test_total_digest_changes_with_any_coordinate_and_length() -> None:
    total = np.arange(1, 9, dtype=np.uint64)
    digests = {total_digest(total)}
    for i in range(total.size):
        t = total.copy()
        t[i] += np.uint64(1)
        digests.add(total_digest(t))
    digests.add(total_digest(total[:-1]))
    digests.add(total_digest(np.append(total, np.uint64(0))))
    assert len(digests) == total.size + 3


# --------------------------------------------------------------------------- statements

round_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", fullmatch=True)
hex64 = st.binary(min_size=32, max_size=32).map(bytes.hex)
counts = st.integers(0, 2**64 - 1)
nonneg = st.floats(0, 1e300, allow_nan=False, allow_infinity=False)
statements = st.builds(
    ResultStatement,
    round_id=round_ids,
    topology_fingerprint=hex64,
    total_digest=hex64,
    clients_digest=hex64,
    num_clients=counts,
    dropped_clients=counts,
    dim=counts,
    epsilon=st.none() | nonneg,
    delta=st.none() | st.floats(0, 1),
    noise_stddev=st.none() | nonneg | st.integers(0, 2**53),
    aggregator=st.integers(0, 254),
)


def parse_message(message: bytes) -> ResultStatement:
    """Reference parser, written from the table in statement.py's docstring."""
    assert message[:28] == b"mpc_agg/result-statement/v1\x00"
    fp, td, cd = message[28:60].hex(), message[60:92].hex(), message[92:124].hex()
    dim, num, dropped = struct.unpack_from("<QQQ", message, 124)
    floats: list[float | None] = []
    for offset in (148, 157, 166):
        present, value = struct.unpack_from("<Bd", message, offset)
        assert present in (0, 1)
        if not present:
            assert value == 0.0
        floats.append(value if present else None)
    (n,) = struct.unpack_from("<H", message, 175)
    assert len(message) == 177 + n + 1
    round_id = message[177 : 177 + n].decode("utf-8")
    return ResultStatement(
        round_id, fp, td, cd, num, dropped, dim, floats[0], floats[1], floats[2], message[-1]
    )


@settings(max_examples=300)
@given(statements)
def test_statement_bytes_deterministic_and_injective(s: ResultStatement) -> None:
    message = statement_bytes(s)
    assert message == statement_bytes(replace(s)) == statement_bytes(s)
    assert message.startswith(sm.STATEMENT_LABEL)
    assert len(message) == 178 + len(s.round_id)
    # The message determines the statement (so distinct statements have distinct messages).
    assert parse_message(message) == s
    assert statement_content(s) == message[28:-1]


@given(statements, statements)
def test_statement_bytes_equal_exactly_for_equal_statements(
    a: ResultStatement, b: ResultStatement
) -> None:
    assert (statement_bytes(a) == statement_bytes(b)) == (a == b)


def test_float_fields_none_vs_values() -> None:
    base = replace(PINNED, epsilon=None, delta=None, noise_stddev=None)
    message = statement_bytes(base)
    for offset in (148, 157, 166):
        assert message[offset : offset + 9] == bytes(9)  # absent: flag 0, zero slot
    variants = {statement_bytes(base)}
    for name in ("epsilon", "delta", "noise_stddev"):
        for value in (0.0, 1.0, 5e-324):  # 0.0 is present, not absent
            variants.add(statement_bytes(replace(base, **{name: value})))
    assert len(variants) == 1 + 3 * 3
    # ints become floats; -0.0 is 0.0, in the dataclass and on the wire.
    as_int = replace(base, epsilon=2, noise_stddev=-0.0)
    assert as_int.epsilon == 2.0 and isinstance(as_int.epsilon, float)
    assert as_int.noise_stddev is not None and math.copysign(1.0, as_int.noise_stddev) == 1.0
    assert statement_bytes(as_int) == statement_bytes(replace(base, epsilon=2.0, noise_stddev=0.0))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"round_id": ""}, "round id '' is invalid"),
        ({"round_id": "a/b"}, "round id 'a/b' is invalid"),
        ({"round_id": 5}, "round id 5 is invalid"),
        ({"topology_fingerprint": "11" * 31}, "topology_fingerprint must be 64 lowercase hex"),
        ({"total_digest": "AB" * 32}, "total_digest must be 64 lowercase hex"),
        ({"clients_digest": "g" * 64}, "clients_digest must be 64 lowercase hex"),
        ({"clients_digest": None}, "clients_digest must be 64"),
        ({"num_clients": -1}, "num_clients must be an integer in"),
        ({"dropped_clients": 2**64}, "dropped_clients must be an integer in"),
        ({"dim": True}, "dim must be an integer"),
        ({"dim": 4.0}, "dim must be an integer"),
        ({"epsilon": math.nan}, "epsilon must be finite and >= 0, got nan"),
        ({"epsilon": math.inf}, "epsilon must be finite"),
        ({"noise_stddev": -1.0}, "noise_stddev must be finite and >= 0"),
        ({"delta": 1.5}, r"delta must be in \[0, 1\]"),
        ({"delta": "0.1"}, "delta must be a number or None"),
        ({"epsilon": True}, "epsilon must be a number or None"),
        ({"aggregator": -1}, "aggregator must be an index in 0..254"),
        ({"aggregator": 255}, "aggregator must be an index in 0..254"),
    ],
)
def test_statement_validation(change: dict[str, object], message: str) -> None:
    with pytest.raises(MalformedStatement, match=message) as err:
        replace(PINNED, **change)
    assert isinstance(err.value, ValueError) and isinstance(err.value, MpcAggError)
    assert err.value.code == "malformed_statement"


def test_extreme_values_are_accepted() -> None:
    s = replace(
        PINNED,
        round_id="Z" * 128,
        num_clients=2**64 - 1,
        dropped_clients=0,
        dim=0,
        delta=1.0,
        epsilon=1e308,
        aggregator=254,
    )
    assert parse_message(statement_bytes(s)) == s


# --------------------------------------------------------------------------- JSON


@settings(max_examples=300)
@given(statements, st.binary(min_size=64, max_size=64))
def test_json_round_trip(s: ResultStatement, signature: bytes) -> None:
    signed = SignedStatement(s, signature)
    data = signed.to_json()
    assert data["version"] == 1 and data["signature"] == signature.hex()
    back = SignedStatement.from_json(json.loads(json.dumps(data)))
    assert back == signed
    assert statement_bytes(back.statement) == statement_bytes(s)  # floats survive exactly


def test_json_pinned() -> None:
    signed = SignedStatement(PINNED, bytes.fromhex(PINNED_SIGNATURE_HEX))
    assert signed.to_json() == {
        "version": 1,
        "round_id": "r1",
        "topology_fingerprint": "11" * 32,
        "total_digest": "22" * 32,
        "clients_digest": "33" * 32,
        "num_clients": 3,
        "dropped_clients": 1,
        "dim": 4,
        "epsilon": 1.0,
        "delta": None,
        "noise_stddev": 2.5,
        "aggregator": 2,
        "signature": PINNED_SIGNATURE_HEX,
    }
    # A JSON writer that spells 1.0 as 1 is accepted, and verifies alike.
    data = signed.to_json() | {"epsilon": 1}
    assert SignedStatement.from_json(data) == signed


def good_json() -> dict[str, object]:
    return SignedStatement(PINNED, bytes.fromhex(PINNED_SIGNATURE_HEX)).to_json()


def without(key: str) -> dict[str, object]:
    data = good_json()
    del data[key]
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "is a JSON object, got list"),
        ("{}", "is a JSON object, got str"),
        (None, "is a JSON object, got NoneType"),
        ({}, "missing key.*'aggregator'"),
        (without("signature"), "missing key\\(s\\) 'signature'$"),
        (without("delta"), "missing key\\(s\\) 'delta'$"),
        (without("version"), "missing key\\(s\\) 'version'$"),
        (good_json() | {"extra": 1}, "unknown key\\(s\\) 'extra'$"),
        (without("dim") | {"Dim": 4}, "missing key\\(s\\) 'dim'; unknown key\\(s\\) 'Dim'"),
        (good_json() | {"version": 2}, "version 2 is not supported"),
        (good_json() | {"version": "1"}, "version '1' is not supported"),
        (good_json() | {"version": True}, "version True is not supported"),
        (good_json() | {"dim": "4"}, "'dim' must be an integer, got '4'"),
        (good_json() | {"num_clients": 3.0}, "'num_clients' must be an integer, got 3.0"),
        (good_json() | {"aggregator": False}, "'aggregator' must be an integer, got False"),
        (good_json() | {"aggregator": None}, "'aggregator' must be an integer"),
        (good_json() | {"round_id": 1}, "'round_id' must be a string, got 1"),
        (good_json() | {"total_digest": None}, "'total_digest' must be a string"),
        (good_json() | {"signature": None}, "'signature' must be a string"),
        (good_json() | {"signature": "00" * 63}, "'signature' must be 128 lowercase hex"),
        (good_json() | {"signature": PINNED_SIGNATURE_HEX.upper()}, "'signature' must be 128"),
        (good_json() | {"signature": "zz" * 64}, "'signature' must be 128"),
        (good_json() | {"epsilon": "1.0"}, "epsilon must be a number or None"),
        (good_json() | {"epsilon": -1.0}, "epsilon must be finite and >= 0"),
        (good_json() | {"dim": -4}, "dim must be an integer in"),
        (good_json() | {"round_id": "../x"}, "round id '../x' is invalid"),
        (good_json() | {"clients_digest": "33" * 33}, "clients_digest must be 64"),
        (good_json() | {"aggregator": 300}, "aggregator must be an index"),
    ],
)
def test_from_json_rejects(data: object, message: str) -> None:
    with pytest.raises(MalformedStatement, match=message):
        SignedStatement.from_json(data)


def test_signed_statement_validation() -> None:
    with pytest.raises(MalformedStatement, match="signature must be 64 bytes, got 63 bytes"):
        SignedStatement(PINNED, bytes(63))
    with pytest.raises(MalformedStatement, match="signature must be 64 bytes, got str"):
        SignedStatement(PINNED, "00" * 64)  # type: ignore[arg-type]
    with pytest.raises(MalformedStatement, match="must be a ResultStatement, got dict"):
        SignedStatement({}, bytes(64))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- keys


def test_public_key_hex_round_trip() -> None:
    key = Ed25519PrivateKey.generate()
    key_hex = public_key_hex(key)
    assert len(key_hex) == 64 and key_hex == key_hex.lower()
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert load_public_key(key_hex).public_bytes(Encoding.Raw, PublicFormat.Raw) == raw


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (PINNED_PUBLIC_HEX[:-2], "has 62 hex characters, expected 64 \\(32 bytes\\)"),
        (PINNED_PUBLIC_HEX + "00", "has 66 hex characters, expected 64"),
        ("", "has 0 hex characters"),
        (PINNED_PUBLIC_HEX.upper(), "is not lowercase hex"),
        ("zz" * 32, "is not lowercase hex"),
        (bytes.fromhex(PINNED_PUBLIC_HEX), "must be a hex string, got b'"),
        (None, "must be a hex string, got None"),
    ],
)
def test_load_public_key_rejects(value: object, message: str) -> None:
    with pytest.raises(MalformedStatement, match=message):
        load_public_key(value)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- verification

KEYS = [Ed25519PrivateKey.from_private_bytes(bytes([j + 1]) * 32) for j in range(3)]
PUBLIC = [k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) for k in KEYS]
TOTAL = np.array([7, 0, P_REF - 1, 12345], dtype=np.uint64)
CLIENTS = ["c1", "c2", "c3"]


def honest(j: int, total: np.ndarray = TOTAL, **change: object) -> ResultStatement:
    base = ResultStatement(
        round_id="round-7",
        topology_fingerprint=FINGERPRINT,
        total_digest=total_digest(total),
        clients_digest=clients_digest(CLIENTS),
        num_clients=len(CLIENTS),
        dropped_clients=1,
        dim=int(total.shape[0]),
        epsilon=0.5,
        delta=1e-6,
        noise_stddev=3.25,
        aggregator=j,
    )
    return replace(base, **change)


def signed_all(**change: object) -> list[SignedStatement]:
    return [sign_statement(honest(j, **change), KEYS[j]) for j in range(3)]


def check(
    statements: list[SignedStatement],
    total: np.ndarray = TOTAL,
    fingerprint: str = FINGERPRINT,
    round_id: str = "round-7",
) -> ResultStatement:
    return verify_result(total, statements, PUBLIC, fingerprint, round_id)


def mismatch(statements: list[SignedStatement], message: str, **kwargs: object) -> ResultMismatch:
    with pytest.raises(ResultMismatch, match=message) as err:
        check(statements, **kwargs)  # type: ignore[arg-type]
    assert err.value.code == "result_mismatch" and isinstance(err.value, MpcAggError)
    return err.value


def test_verify_three_honest_signers() -> None:
    statements = signed_all()
    agreed = check(statements)
    assert agreed == honest(0)
    # Any order; and from saved JSON.
    assert check(statements[::-1]) == agreed
    saved = json.loads(json.dumps([s.to_json() for s in statements]))
    assert check([SignedStatement.from_json(s) for s in saved]) == agreed


def test_verify_without_dp_fields() -> None:
    statements = signed_all(epsilon=None, delta=None, noise_stddev=None)
    assert check(statements).epsilon is None


def test_changed_coordinate_of_the_total() -> None:
    for i in range(TOTAL.size):
        total = TOTAL.copy()
        total[i] = (int(total[i]) + 1) % P_REF
        err = mismatch(
            signed_all(),
            r"^the total's digest [0-9a-f]{12}\.\.\. differs from the total_digest all 3 "
            r"aggregators signed \([0-9a-f]{12}\.\.\.\)$",
            total=total,
        )
        assert err.fields == ("total_digest",) and err.aggregators == ()


def test_total_of_another_length() -> None:
    err = mismatch(
        signed_all(),
        "the total has dimension 3, but all 3 aggregators signed dimension 4",
        total=TOTAL[:3],
    )
    assert err.fields == ("dim",)


def test_non_canonical_total_is_an_encoding_error() -> None:
    total = TOTAL.copy()
    total[0] = P_REF
    with pytest.raises(EncodingError, match="not below p"):
        check(signed_all(), total=total)


def test_one_aggregator_signs_another_count() -> None:
    statements = signed_all()
    statements[1] = sign_statement(honest(1, num_clients=4), KEYS[1])  # its own valid key
    err = mismatch(
        statements,
        r"^the aggregators' result statements differ: aggregator 1's num_clients \(4\) "
        r"differs from aggregators 0, 2's \(3\)$",
    )
    assert err.aggregators == (1,) and err.fields == ("num_clients",)


def test_one_aggregator_signs_another_total_and_no_dp() -> None:
    statements = signed_all()
    other = TOTAL.copy()
    other[3] += np.uint64(1)
    statements[0] = sign_statement(honest(0, total=other, epsilon=None), KEYS[0])
    err = mismatch(
        statements,
        "aggregator 0's total_digest \\([0-9a-f]{12}\\.\\.\\.\\) differs from aggregators 1, 2's",
    )
    assert "aggregator 0's epsilon (None) differs from aggregators 1, 2's (0.5)" in err.detail
    assert err.aggregators == (0,) and err.fields == ("total_digest", "epsilon")


def test_no_majority_names_everyone() -> None:
    statements = signed_all()
    statements[1] = sign_statement(honest(1, dropped_clients=0), KEYS[1])
    statements[2] = sign_statement(honest(2, dropped_clients=2), KEYS[2])
    err = mismatch(
        statements,
        r"the aggregators disagree on dropped_clients \(aggregator 0: 1; aggregator 1: 0; "
        r"aggregator 2: 2\)",
    )
    assert err.aggregators == (0, 1, 2)


def test_two_aggregators_disagree() -> None:
    statements = signed_all()[:2]
    statements[1] = sign_statement(honest(1, noise_stddev=3.0), KEYS[1])
    with pytest.raises(ResultMismatch, match="disagree on noise_stddev") as err:
        verify_result(TOTAL, statements, PUBLIC[:2], FINGERPRINT, "round-7")
    assert err.value.aggregators == (0, 1)


def test_statement_signed_with_the_wrong_key() -> None:
    statements = signed_all()
    statements[2] = sign_statement(honest(2), KEYS[0])
    err = mismatch(statements, "^signature of aggregator 2 is invalid$")
    assert err.aggregators == (2,) and err.fields == ("signature",)
    statements[0] = sign_statement(honest(0), Ed25519PrivateKey.generate())
    mismatch(statements, "^signatures of aggregators 0, 2 are invalid$")


def test_tampered_statement_or_signature() -> None:
    statements = signed_all()
    statements[0] = SignedStatement(honest(0, num_clients=4), statements[0].signature)
    mismatch(statements, "^signature of aggregator 0 is invalid$")
    statements = signed_all()
    flipped = bytearray(statements[1].signature)
    flipped[5] ^= 1
    statements[1] = SignedStatement(statements[1].statement, bytes(flipped))
    mismatch(statements, "^signature of aggregator 1 is invalid$")


def test_signature_of_aggregator_1_replayed_as_aggregator_2() -> None:
    statements = signed_all()
    # Same content, claimed as aggregator 2's, with aggregator 1's signature.
    statements[2] = SignedStatement(
        replace(statements[1].statement, aggregator=2), statements[1].signature
    )
    mismatch(statements, "^signature of aggregator 2 is invalid$")
    # Even if aggregator 2's key were aggregator 1's, the index in the message differs.
    with pytest.raises(ResultMismatch, match="signature of aggregator 2 is invalid"):
        verify_result(TOTAL, statements, [PUBLIC[0], PUBLIC[1], PUBLIC[1]], FINGERPRINT, "round-7")
    # Aggregator 1's statement sent twice, as is.
    statements = signed_all()
    statements[2] = statements[1]
    err = mismatch(statements, "^more than one statement from aggregator 1$")
    assert err.aggregators == (1,)


def test_missing_statement() -> None:
    statements = signed_all()
    err = mismatch(statements[:1] + statements[2:], "^no statement from aggregator 1$")
    assert err.aggregators == (1,)
    mismatch(statements[:1], "^no statement from aggregators 1, 2$")
    mismatch([], "^no statement from aggregators 0, 1, 2$")


def test_duplicate_index() -> None:
    statements = signed_all()
    again = sign_statement(honest(0, num_clients=9), KEYS[0])
    mismatch([*statements, again], "^more than one statement from aggregator 0$")


def test_unknown_index() -> None:
    stranger = sign_statement(honest(3), Ed25519PrivateKey.generate())
    err = mismatch(
        [*signed_all(), stranger],
        r"^statement\(s\) from unknown aggregator 3: the topology names 3 aggregators \(0..2\)$",
    )
    assert err.aggregators == (3,)


def test_wrong_fingerprint() -> None:
    err = mismatch(
        signed_all(),
        "^the statements name topology fingerprint abababababab..., expected cdcdcdcdcdcd...$",
        fingerprint="cd" * 32,
    )
    assert err.fields == ("topology_fingerprint",)
    with pytest.raises(MalformedStatement, match="fingerprint must be 64 lowercase hex"):
        check(signed_all(), fingerprint="AB" * 32)


def test_wrong_round_id() -> None:
    err = mismatch(
        signed_all(),
        "^the statements are for round 'round-7', expected 'round-8'$",
        round_id="round-8",
    )
    assert err.fields == ("round_id",)


def test_statements_of_another_round_signed_by_everyone() -> None:
    # All three honestly signed round-6's statements; the collector asked for round-7.
    mismatch(signed_all(round_id="round-6"), "are for round 'round-6', expected 'round-7'")


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ([], "needs the public key of every aggregator"),
        (
            [PUBLIC[0], PUBLIC[1][:31], PUBLIC[2]],
            "public key of aggregator 1 is 31 bytes, expected 32",
        ),
        (
            [PUBLIC[0], PUBLIC[1], PUBLIC[2].hex()],
            "public key of aggregator 2 must be 32 raw bytes",
        ),
    ],
)
def test_verify_rejects_malformed_keys(keys: list[bytes], message: str) -> None:
    with pytest.raises(MalformedStatement, match=message):
        verify_result(TOTAL, signed_all(), keys, FINGERPRINT, "round-7")
