"""The ring Z_(2^32) next to GF(2^61 - 1) (``encoding: {ring: z2_32}``, issue 15).

Properties of :mod:`mpc_agg.core.ring` for both rings (sharing sums back, wrap-around, the
centered lift), the Z_(2^32) seed expansion against AES-CTR itself, codec vectors with the
ring byte (good and mismatched), the headroom check naming its values, the topology checks
(binomial refused, fingerprints of GF(p) topologies unchanged), and rounds among three
in-process aggregators with and without discrete Gaussian noise. Real processes:
tests/test_ring_processes.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from mpc_agg import Client, Topology
from mpc_agg.aggregator import Aggregator
from mpc_agg.aggregator import privacy as privacy_module
from mpc_agg.aggregator.privacy import DiscreteGaussianNoise
from mpc_agg.config.fingerprint import fingerprint, section_values
from mpc_agg.core import codec, xof
from mpc_agg.core.accumulator import Accumulator
from mpc_agg.core.encoding import FixedPointEncoding
from mpc_agg.core.ring import GF_P61, RINGS, Z2_32, Ring, ring_named, ring_of
from mpc_agg.core.rounds import RoundState
from mpc_agg.core.sharing import Share, ShareKind, shard, unshard
from mpc_agg.core.statement import TOTAL_LABEL_Z2_32, total_digest
from mpc_agg.dp.planning import plan_noise
from mpc_agg.errors import (
    AgreementFailed,
    ConfigError,
    EncodingError,
    InvalidRequest,
    MalformedUpload,
    RingMismatch,
)
from mpc_agg.mpc.memory import InMemoryNetwork
from mpc_agg.mpc.reveal import combine_sum_shares, sum_share_payload

from .conftest import dp_topology_doc, topology_doc, write_topology
from .test_aggregator import run_round

BOTH = pytest.mark.parametrize("ring", [GF_P61, Z2_32], ids=lambda r: r.name)


def counter_bytes() -> Any:
    """A deterministic ``random_bytes`` for tests."""
    state = [0]

    def random_bytes(n: int) -> bytes:
        state[0] += 1
        return hashlib.sha256(struct.pack("<Q", state[0])).digest()[:n]

    return random_bytes


def elements(ring: Ring, d: int, seed: int) -> np.ndarray:
    """``d`` uniform canonical elements of ``ring``."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, ring.modulus, size=d, dtype=np.uint64).astype(ring.dtype)


# --------------------------------------------------------------------------- ring algebra


@BOTH
@settings(max_examples=60, deadline=None)
@given(d=st.integers(0, 300), m=st.integers(2, 5), seed=st.integers(0, 2**32))
def test_sharing_sums_back_exactly(ring: Ring, d: int, m: int, seed: int) -> None:
    x = elements(ring, d, seed)
    shares = shard(x, "r", "c", m, random_bytes=counter_bytes(), ring=ring)
    assert [s.ring for s in shares] == [ring] * m
    assert sum(s.kind is ShareKind.FULL for s in shares) == 1
    vectors = [s.expand("r", "c") for s in shares]
    assert all(v.dtype == ring.dtype and ring.is_canonical(v) for v in vectors)
    assert np.array_equal(unshard(vectors, ring), x)


@BOTH
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-(2**30), 2**30 - 1), min_size=1, max_size=40))
def test_centered_lift_round_trip(ring: Ring, values: list[int]) -> None:
    v = np.array(values, dtype=np.int64)
    x = ring.from_signed(v)
    assert x.dtype == ring.dtype and ring.is_canonical(x)
    assert np.array_equal(ring.to_signed(x), v)
    assert np.array_equal(ring.to_signed(ring.neg(x)), -v)


def test_z2_32_centered_lift_covers_the_whole_signed_range() -> None:
    edges = np.array([-(2**31), -1, 0, 1, 2**31 - 1], dtype=np.int64)
    x = Z2_32.from_signed(edges)
    assert x.tolist() == [2**31, 2**32 - 1, 0, 1, 2**31 - 1]
    assert Z2_32.to_signed(x).tolist() == edges.tolist()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=30))
def test_z2_32_sums_wrap_modulo_2_32(values: list[int]) -> None:
    """Sums are exact modulo 2^32; the lift recovers them exactly while they stay below 2^31."""
    v = np.array(values, dtype=np.int64)
    parts = [Z2_32.from_signed(v[i : i + 1]) for i in range(len(values))]
    total = Z2_32.sum_vectors(parts)
    exact = sum(values)
    assert int(total[0]) == exact % 2**32
    lifted = int(Z2_32.to_signed(total)[0])
    if -(2**31) <= exact < 2**31:
        assert lifted == exact
    else:  # exactly the silent wrap-around the headroom check exists to rule out
        assert lifted != exact and (lifted - exact) % 2**32 == 0


@BOTH
def test_accumulator_adds_subtracts_and_refuses_another_dtype(ring: Ring) -> None:
    vectors = [elements(ring, 50, s) for s in range(12)]
    acc = Accumulator(50, ring)
    for v in vectors:
        acc.add(v)
    acc.subtract(vectors[3])
    expected = ring.sum_vectors([v for i, v in enumerate(vectors) if i != 3])
    assert np.array_equal(acc.value(), expected) and acc.count == 11
    other = np.zeros(50, dtype=np.uint32 if ring is GF_P61 else np.uint64)
    with pytest.raises(ValueError, match="dtype"):
        acc.add(other)


def test_ring_lookup() -> None:
    assert ring_named("z2_32") is Z2_32 and ring_named("gf_p61") is GF_P61
    with pytest.raises(ValueError, match="gf_p61, z2_32"):
        ring_named("z2_64")
    assert ring_of(np.zeros(1, np.uint32)) is Z2_32
    assert ring_of(np.zeros(1, ">u8")) is GF_P61
    with pytest.raises(ValueError):
        ring_of(np.zeros(1, np.int32))
    assert {r.itemsize for r in RINGS.values()} == {4, 8}
    assert repr(Z2_32) == "Ring(z2_32)"


# --------------------------------------------------------------------------- expansion


def test_z2_32_expansion_is_the_aes_ctr_stream_as_uint32() -> None:
    """Known answer: the key under the z2_32 label, AES-128-CTR from a zero counter, each
    little-endian 4-byte word one element (nothing masked, nothing rejected)."""
    seed, context, d = bytes(range(16)), xof.share_context("r", "c", 1), 1000
    material = b"mpc_agg/xof/z2_32/v1" + struct.pack("<I", len(context)) + context + seed
    key = hashlib.sha256(material).digest()[:16]
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    expected = np.frombuffer(enc.update(bytes(4 * d)), dtype="<u4")
    assert np.array_equal(Z2_32.expand(seed, context, d), expected)
    # Another label than GF(p)'s: the two rings never read related streams from one seed.
    gf_words = GF_P61.expand(seed, context, d // 2).view(np.uint32)
    assert not np.array_equal(gf_words[: d // 2], expected[: d // 2])


@BOTH
@settings(max_examples=20, deadline=None)
@given(d=st.integers(0, 3 * 70_000), block=st.integers(1, 70_000))
def test_block_stream_matches_expand(ring: Ring, d: int, block: int) -> None:
    seed, context = b"s" * 16, b"ctx"
    blocks = ring.blocks(seed, context, block)
    parts = []
    for start in range(0, d, block):
        words = blocks.next_block(min(block, d - start))
        assert words is not None
        parts.append(words.copy())
    got = np.concatenate(parts) if parts else ring.zeros(0)
    assert np.array_equal(got, ring.expand(seed, context, d))


# --------------------------------------------------------------------------- codecs

# FULL share for aggregator 1, dim 2, vector [1, 2**32 - 1], ring z2_32.
Z_FULL_BYTES = bytes.fromhex(
    "4d504153"  # magic b"MPAS"
    "01"  # version 1
    "00"  # kind 0 = FULL
    "01"  # aggregator index 1
    "01"  # ring 1 = z2_32
    "02000000"  # dim = 2 (uint32 LE)
    "01000000"  # vector[0] = 1 (uint32 LE)
    "ffffffff"  # vector[1] = 2**32 - 1, i.e. -1
)
# SEED share for aggregator 2, dim 1000, ring z2_32.
Z_SEED_BYTES = bytes.fromhex("4d50415301010201e8030000000102030405060708090a0b0c0d0e0f")
# Result [5, 2**32 - 1] with meta {"n":3}, ring z2_32.
Z_RESULT_BYTES = bytes.fromhex(
    "4d504152"  # magic b"MPAR"
    "01"  # version 1
    "01"  # ring 1 = z2_32
    "0000"  # reserved
    "02000000"  # dim = 2
    "07000000"  # meta_len = 7
    "7b226e223a337d"  # {"n":3}
    "05000000"  # total[0] = 5
    "ffffffff"  # total[1] = 2**32 - 1
)


def test_z2_32_share_vectors_round_trip() -> None:
    full = codec.decode_share(Z_FULL_BYTES, aggregator=1, dim=2, ring=Z2_32)
    assert full.ring is Z2_32 and full.vector is not None
    assert full.vector.dtype == np.uint32 and full.vector.tolist() == [1, 2**32 - 1]
    assert bytes(codec.encode_share(full)) == Z_FULL_BYTES
    assert codec.share_body_length(ShareKind.FULL, 2, Z2_32) == len(Z_FULL_BYTES) == 20
    seed = codec.decode_share(Z_SEED_BYTES, aggregator=2, dim=1000, ring=Z2_32)
    assert seed.seed == bytes(range(16)) and bytes(codec.encode_share(seed)) == Z_SEED_BYTES
    body, view = codec.full_share_body(1, 2, Z2_32)
    view[:] = [1, 2**32 - 1]
    assert bytes(body) == Z_FULL_BYTES


def test_z2_32_result_round_trip() -> None:
    total, meta = codec.decode_result(Z_RESULT_BYTES, Z2_32)
    assert total.dtype == np.uint32 and total.tolist() == [5, 2**32 - 1] and meta == {"n": 3}
    assert codec.encode_result(total, {"n": 3}) == Z_RESULT_BYTES


@pytest.mark.parametrize(
    ("body", "ring", "theirs"),
    [
        (Z_FULL_BYTES, GF_P61, "z2_32"),
        (Z_SEED_BYTES, GF_P61, "z2_32"),
        (Z_FULL_BYTES[:7] + b"\x00" + Z_FULL_BYTES[8:], Z2_32, "gf_p61"),
    ],
)
def test_share_in_another_ring_is_refused_with_a_typed_error(
    body: bytes, ring: Ring, theirs: str
) -> None:
    kind = ShareKind(body[5])
    dim = 2 if kind is ShareKind.FULL else 1000
    with pytest.raises(RingMismatch) as err:
        codec.decode_share(body, aggregator=body[6], dim=dim, ring=ring)
    assert err.value.code == "wrong_ring"
    assert f"in ring {theirs}, but this topology's encoding.ring is {ring.name}" in str(err.value)


def test_unknown_ring_byte_and_mismatched_result_are_refused() -> None:
    with pytest.raises(MalformedUpload, match="unknown ring 7 in the share header") as err:
        codec.decode_share(Z_FULL_BYTES[:7] + b"\x07" + Z_FULL_BYTES[8:], aggregator=1, dim=2)
    assert type(err.value) is MalformedUpload
    with pytest.raises(RingMismatch, match="result is in ring z2_32"):
        codec.decode_result(Z_RESULT_BYTES, GF_P61)
    with pytest.raises(MalformedUpload, match="not an mpc_agg v1 result"):
        codec.decode_result(Z_RESULT_BYTES[:6] + b"\x01" + Z_RESULT_BYTES[7:], Z2_32)
    with pytest.raises(MalformedUpload, match="should be 31 bytes, got 30"):
        codec.decode_result(Z_RESULT_BYTES[:-1], Z2_32)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), max_size=50), st.integers(0, 254))
def test_z2_32_full_share_codec_round_trip(values: list[int], aggregator: int) -> None:
    vector = np.array(values, dtype=np.uint32)
    share = Share(aggregator, ShareKind.FULL, len(values), vector=vector, ring=Z2_32)
    body = codec.encode_share(share)
    assert len(body) == 12 + 4 * len(values)
    back = codec.decode_share(body, aggregator=aggregator, dim=len(values), ring=Z2_32)
    assert back.vector is not None and np.array_equal(back.vector, vector)
    codec.check_share_values(back)  # every uint32 is an element: nothing to refuse


def test_reveal_payload_is_four_bytes_per_element() -> None:
    parts = [elements(Z2_32, 10, s) for s in range(3)]
    payloads = [sum_share_payload(p, Z2_32) for p in parts]
    assert all(len(p) == 40 for p in payloads if p is not None)
    assert np.array_equal(combine_sum_shares(payloads, 10, Z2_32), Z2_32.sum_vectors(parts))
    with pytest.raises(AgreementFailed, match="wrong size"):
        combine_sum_shares(payloads, 10, GF_P61)


def test_total_digest_names_the_ring() -> None:
    values = [1, 2, 3]
    z = total_digest(np.array(values, dtype=np.uint32))
    gf = total_digest(np.array(values, dtype=np.uint64))
    assert z != gf
    h = hashlib.sha256(TOTAL_LABEL_Z2_32 + struct.pack("<Q", 3))
    h.update(np.array(values, dtype="<u4").tobytes())
    assert z == h.hexdigest()


# --------------------------------------------------------------------------- encoding, headroom


def test_encode_decode_in_z2_32() -> None:
    enc = FixedPointEncoding(frac_bits=16, coord_clip=1.0, ring=Z2_32)
    x = np.random.default_rng(1).uniform(-1, 1, 1000)
    v = enc.encode(x, np.random.default_rng(2))
    assert v.dtype == np.uint32
    assert np.max(np.abs(enc.decode(v) - x)) <= 2.0**-16
    with pytest.raises(EncodingError, match="z2_32 vector has dtype uint32, got uint64"):
        enc.decode(v.astype(np.uint64))
    with pytest.raises(ValueError, match="out must be uint32"):
        enc.encode(x, np.random.default_rng(2), out=np.empty(1000, np.uint64))


def test_headroom_z2_32_admits_32767_clients_of_clip_1_at_16_bits() -> None:
    enc = FixedPointEncoding(frac_bits=16, coord_clip=1.0, ring=Z2_32)
    enc.check_headroom(32767)  # 32767 * 2**16 = 2**31 - 2**16 < 2**31
    with pytest.raises(ConfigError) as err:
        enc.check_headroom(32768)
    assert err.value.path == "rounds.max_clients"
    for named in ("32768 clients", "max |value| 1.0", "2**16", "2^31", "encoding.ring z2_32"):
        assert named in err.value.detail
    enc.check_headroom(32767, noise_tail=2**16 - 1)  # 2**31 - 1: the largest that fits
    with pytest.raises(ConfigError, match=r"\(\+ noise tail 65536\) = 2.147e\+09"):
        enc.check_headroom(32767, noise_tail=2**16)
    # The same figures are nowhere near p/2 in GF(p).
    FixedPointEncoding(frac_bits=16, coord_clip=1.0).check_headroom(32768, noise_tail=2**40)


def test_default_encoding_does_not_fit_z2_32_and_says_so() -> None:
    doc = topology_doc(3, 1)
    doc["encoding"]["ring"] = "z2_32"  # frac_bits 24, coord_clip 1000, max_clients 1000
    with pytest.raises(ConfigError) as err:
        Topology.from_dict(doc)
    assert err.value.path == "rounds.max_clients"
    assert "1000 clients x max |value| 1000.0 x 2**24" in err.value.detail
    assert "can reach 2^31 (encoding.ring z2_32)" in err.value.detail
    assert "or use encoding.ring gf_p61" in err.value.detail


def z2_32_doc(**rounds: Any) -> dict[str, Any]:
    doc = topology_doc(3, 1)
    doc["encoding"] = {"ring": "z2_32", "frac_bits": 16, "coord_clip": 1.0}
    doc["rounds"].update(rounds)
    return doc


def test_topology_with_ring_loads_and_fingerprints() -> None:
    topo = Topology.from_dict(z2_32_doc())
    assert topo.encoding.ring is Z2_32
    assert section_values(topo)["encoding"]["ring"] == "z2_32"
    doc = z2_32_doc()
    doc["encoding"]["ring"] = "gf_p61"
    explicit_default = Topology.from_dict(doc)
    del doc["encoding"]["ring"]
    implicit_default = Topology.from_dict(doc)
    # The default ring is not named: fingerprints of every earlier topology stand.
    assert "ring" not in section_values(implicit_default)["encoding"]
    assert fingerprint(explicit_default) == fingerprint(implicit_default) != fingerprint(topo)


@pytest.mark.parametrize("value", ["z2_64", 32, True])
def test_unknown_ring_is_refused_at_its_yaml_path(value: object) -> None:
    doc = z2_32_doc()
    doc["encoding"]["ring"] = value
    with pytest.raises(ConfigError) as err:
        Topology.from_dict(doc)
    assert err.value.path == "encoding.ring" and "gf_p61, z2_32" in err.value.detail


def test_joint_binomial_with_z2_32_is_refused_at_load(tmp_path) -> None:
    doc = z2_32_doc()
    doc["encoding"] = {"ring": "z2_32", "frac_bits": 0, "coord_clip": None}
    doc["dp"] = {
        "mechanism": "binomial",
        "epsilon": 1.0,
        "delta": 1e-5,
        "l2_clip": 4.0,
        "budget": {"epsilon": 8.0, "delta": 1e-4},
    }
    with pytest.raises(ConfigError) as err:
        Topology.from_dict(doc)
    assert err.value.path == "encoding.ring"
    assert "z2_32 cannot carry joint binomial noise" in err.value.detail
    assert "GF(2^61-1)" in err.value.detail
    with pytest.raises(ConfigError, match="encoding.ring: z2_32 cannot carry joint binomial"):
        Topology.load(write_topology(tmp_path, doc))  # from a file, as a party loads it
    doc["encoding"]["ring"] = "gf_p61"
    Topology.from_dict(doc)  # the same topology in GF(p) is fine


def dp_z2_32_doc(max_clients: int = 1000, name: str = "ringdp") -> dict[str, Any]:
    doc = dp_topology_doc(name, budget_epsilon=8.0)
    doc["encoding"] = {"ring": "z2_32", "frac_bits": 16, "coord_clip": None}
    doc["rounds"]["max_clients"] = max_clients
    return doc


def test_noise_tail_is_checked_at_load_and_at_open_for_the_round_dimension(tmp_path) -> None:
    base = Topology.from_dict(dp_z2_32_doc())
    assert base.dp is not None
    per_client = base.encoding.max_abs_encoded  # l2_clip 1 at 16 bits: 2**16
    tail_1 = plan_noise(base.dp, base.encoding, 1, 3).tail
    tail_big = plan_noise(base.dp, base.encoding, 10**6, 3).tail
    # As many clients as fit beside the noise of a round of dimension 1...
    most = (2**31 - 1 - tail_1) // per_client
    assert most * per_client + tail_big >= 2**31, "the test needs a tail that grows past it"
    doc = dp_z2_32_doc(max_clients=most)
    doc["data_dir"] = str(tmp_path / "data")
    topo = Topology.from_dict(doc)
    # ... load, and rounds of dimension 1 open, but one of dimension 10^6 is refused.
    agg = Aggregator(topo, 0, InMemoryNetwork(0, {(0, 0): asyncio.Queue()}))
    assert agg.privacy.plan("small", 1) is not None
    with pytest.raises(InvalidRequest) as err:
        agg.privacy.plan("large", 10**6)
    assert f"{most} clients" in err.value.detail and f"noise tail {tail_big}" in err.value.detail
    assert "2^31 (encoding.ring z2_32)" in err.value.detail
    # One client more and not even dimension 1 fits: refused at load.
    with pytest.raises(ConfigError, match="rounds.max_clients") as err2:
        Topology.from_dict(dp_z2_32_doc(max_clients=most + 1))
    assert f"noise tail {tail_1}" in err2.value.detail


def test_a_noise_sample_beyond_the_ring_aborts(monkeypatch: pytest.MonkeyPatch) -> None:
    topo = Topology.from_dict(dp_z2_32_doc())
    assert topo.dp is not None
    plan = plan_noise(topo.dp, topo.encoding, 4, 3)
    mechanism = DiscreteGaussianNoise(plan, Z2_32)
    share = Z2_32.zeros(4)
    fake = np.array([0, 5, -(2**31), 1], dtype=np.int64)
    monkeypatch.setattr(privacy_module, "sample_discrete_gaussian", lambda *a: fake)
    with pytest.raises(AgreementFailed, match="magnitude 2147483648 is beyond"):
        mechanism.add_local(share, None)  # type: ignore[arg-type]
    fake[2] = -(2**31) + 1
    noisy = mechanism.add_local(share, None)  # type: ignore[arg-type]
    assert noisy.dtype == np.uint32 and Z2_32.to_signed(noisy).tolist() == fake.tolist()


# --------------------------------------------------------------------------- rounds


def federation(tmp_path: Path, doc: dict[str, Any]) -> list[Aggregator]:
    doc["data_dir"] = str(tmp_path / "data")
    topo = Topology.from_dict(doc)
    links = {(i, j): asyncio.Queue() for i in range(3) for j in range(3)}
    return [Aggregator(topo, i, InMemoryNetwork(i, links)) for i in range(3)]


def run(aggs: list[Aggregator], data: np.ndarray, round_id: str = "r", **client: Any) -> Any:
    d = data.shape[1]
    for a in aggs:
        a.open_round(round_id, d)
    for i, x in enumerate(data):
        bodies = Client(aggs[0].topology, f"c{i}", **client).prepare(round_id, x)
        full = [len(b) for b in bodies if len(b) > 28]
        assert full == [12 + aggs[0].topology.encoding.ring.itemsize * d]
        for a in aggs:
            assert a.receive_share(round_id, f"c{i}", bodies[a.index]) is True
    asyncio.run(run_round(aggs, round_id))
    for a in aggs:
        assert a.rounds[round_id].state is RoundState.DONE, a.rounds[round_id].failure
    ring = aggs[0].topology.encoding.ring
    totals = [codec.decode_result(a.result(round_id), ring) for a in aggs]
    assert all(np.array_equal(t, totals[0][0]) for t, _ in totals)
    return totals[0][0]


def test_in_process_round_in_z2_32_is_exact_with_negative_totals(tmp_path) -> None:
    aggs = federation(tmp_path, z2_32_doc())
    enc = aggs[0].topology.encoding
    # Integers in 2**-16 units decode exactly; the total of coordinate 0 is negative.
    units = np.random.default_rng(3).integers(-(2**16), 2**16, size=(7, 300))
    units[:, 0] = -(2**16)
    total = run(aggs, units / 2.0**16)
    assert total.dtype == np.uint32
    assert np.array_equal(enc.ring.to_signed(total), units.sum(axis=0))
    assert enc.decode(total)[0] == -7.0
    with pytest.raises(RingMismatch):
        codec.decode_result(aggs[0].result("r"), GF_P61)


def test_in_process_round_in_z2_32_with_a_client_secret_is_reproducible(tmp_path) -> None:
    aggs = federation(tmp_path, z2_32_doc())
    x = np.linspace(-1, 1, 64)
    a = Client(aggs[0].topology, "c0", secret=b"k" * 32).prepare("r", x)
    b = Client(aggs[0].topology, "c0", secret=b"k" * 32).prepare("r", x)
    assert [bytes(p) for p in a] == [bytes(p) for p in b]


def test_in_process_round_in_z2_32_with_discrete_gaussian_noise(tmp_path) -> None:
    aggs = federation(tmp_path, dp_z2_32_doc())
    d = 4000
    data = np.random.default_rng(4).normal(size=(5, d))
    data *= 0.9 / np.linalg.norm(data, axis=1, keepdims=True)
    total = run(aggs, data)
    plan = aggs[0].privacy.plan_of("r")
    assert plan is not None
    error = aggs[0].topology.encoding.decode(total) - data.sum(axis=0)
    # d = 4000: the sample std is within 6 % of the plan's (8 standard errors).
    assert np.std(error) == pytest.approx(plan.noise_stddev, rel=0.09)
    assert np.std(error) > 100 * 2.0**-16


def test_z2_32_round_recovers_from_its_journals_after_a_restart(tmp_path) -> None:
    doc = z2_32_doc()
    aggs = federation(tmp_path, doc)
    units = np.random.default_rng(6).integers(-(2**16), 2**16, size=(3, 500))
    for a in aggs:
        a.open_round("r", 500)
    for i, x in enumerate(units / 2.0**16):
        bodies = Client(aggs[0].topology, f"c{i}").prepare("r", x)
        for a in aggs:
            a.receive_share("r", f"c{i}", bodies[a.index])
    topo = aggs[0].topology
    for a in aggs:
        a.close_journals()
    links = {(i, j): asyncio.Queue() for i in range(3) for j in range(3)}
    restarted = [Aggregator(topo, i, InMemoryNetwork(i, links)) for i in range(3)]
    assert [a.recover() for a in restarted] == [1, 1, 1]
    asyncio.run(run_round(restarted, "r"))
    total, _ = codec.decode_result(restarted[0].result("r"), Z2_32)
    assert np.array_equal(Z2_32.to_signed(total), units.sum(axis=0))
