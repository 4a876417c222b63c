"""The full share built block by block (:mod:`mpc_agg.core.share_stream`) against the
whole-vector path (:meth:`Client.prepare`, ``shard_in_place``), byte for byte.

Properties over random dimensions (1, below a block, not a multiple of it), block sizes,
both rings, with and without ``l2_clip``, with a client secret and with injected
rng/random_bytes; seekable streams (a stream started at word ``k`` is the tail of the one
started at 0); the block encoder; a seed whose stream holds the rejected word p is replaced
(attempt + 1) before the first byte of the body exists; a vector that changes between two
bodies (a retry) stops the second one before the first changed block, having yielded only
bytes the first body held.
"""

from __future__ import annotations

import functools
import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpc_agg import Client, Topology
from mpc_agg.core import codec, field, sharing, xof
from mpc_agg.core.encoding import FixedPointEncoding
from mpc_agg.core.ring import GF_P61, Z2_32, Ring
from mpc_agg.core.share_stream import shard_streamed
from mpc_agg.core.sharing import full_share_index
from mpc_agg.core.xof import BlockStream, ClientSecret, CoinStream, WordStream
from mpc_agg.errors import EncodingError, VectorChanged

from .conftest import topology_doc

RINGS = {"gf_p61": GF_P61, "z2_32": Z2_32}
ENCODINGS = {
    # (frac_bits, coord_clip, l2_clip); z2_32 needs headroom below 2^31 for 1000 clients
    "coord": (16, 1.0, None),
    "l2": (14, None, 20.0),
    "both": (12, 2.0, 25.0),
}


@functools.cache
def topology(ring: str, encoding: str, m: int = 3) -> Topology:
    doc = topology_doc(m, 1 if m > 2 else 0, name=f"stream-{ring}-{encoding}-{m}", insecure=True)
    frac_bits, coord_clip, l2_clip = ENCODINGS[encoding]
    doc["encoding"] = {
        "ring": ring,
        "frac_bits": frac_bits,
        "coord_clip": coord_clip,
        "l2_clip": l2_clip,
    }
    return Topology.from_dict(doc)


def vector(d: int, seed: int, dtype: str = "float64") -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 2.0, size=d)
    x[rng.random(d) < 0.1] = 0.0  # some exact zeros, some values past the clip
    return x.astype(dtype)


def streamed_body(shard) -> bytes:
    chunks = list(shard.chunks())
    body = b"".join(chunks)
    assert len(body) == shard.length
    assert len(chunks[0]) == codec.SHARE_HEADER.size
    itemsize = shard.ring.itemsize
    assert all(0 < len(c) <= shard.block * itemsize for c in chunks[1:])
    return body


dims = st.one_of(st.just(1), st.integers(1, 50), st.integers(51, 3000))
block_sizes = st.integers(1, 600)  # in values: d < block, d = block, d a multiple, not


# --------------------------------------------------------------------------- against prepare


@settings(max_examples=60, deadline=None)
@given(
    d=dims,
    block=block_sizes,
    ring=st.sampled_from(sorted(RINGS)),
    encoding=st.sampled_from(sorted(ENCODINGS)),
    seed=st.integers(0, 2**32 - 1),
    client_id=st.sampled_from(["alice", "bob", "carol", "dave"]),
    m=st.sampled_from([2, 3, 5]),
)
def test_streamed_body_is_prepare_with_a_secret(d, block, ring, encoding, seed, client_id, m):
    topo = topology(ring, encoding, m)
    secret = seed.to_bytes(4, "little") * 8
    x = vector(d, seed)
    bodies = Client(topo, client_id, secret=secret).prepare("r1", x)
    client = Client(topo, client_id, secret=secret)
    shard = client.prepare_streamed("r1", x, block_bytes=block * RINGS[ring].itemsize)
    full = full_share_index(client_id, m)
    assert shard.full_index == full
    assert streamed_body(shard) == bytes(bodies[full])
    assert shard.seed_bodies() == {j: bytes(b) for j, b in enumerate(bodies) if j != full}
    # A retry: the body again from the start, the same bytes; so does a new plan.
    assert b"".join(shard.chunks()) == bytes(bodies[full])
    again = client.prepare_streamed("r1", x, block_bytes=7 * RINGS[ring].itemsize)
    assert b"".join(again.chunks()) == bytes(bodies[full])


def fake_random_bytes(seed: int):
    r = random.Random(seed)
    return lambda n: r.randbytes(n)


@settings(max_examples=40, deadline=None)
@given(
    d=dims,
    block=block_sizes,
    ring=st.sampled_from(sorted(RINGS)),
    encoding=st.sampled_from(sorted(ENCODINGS)),
    seed=st.integers(0, 2**32 - 1),
)
def test_streamed_body_is_prepare_with_injected_rng_and_seeds(d, block, ring, encoding, seed):
    """Without a secret: the same coins (a numpy generator, made afresh for each pass) and
    the same seeds (drawn in the same order) give prepare's bytes."""
    topo = topology(ring, encoding)
    x = vector(d, seed)
    client = Client(
        topo, "alice", rng=np.random.default_rng(seed), random_bytes=fake_random_bytes(seed)
    )
    bodies = client.prepare("r", x)
    draw = fake_random_bytes(seed)
    shard = shard_streamed(
        x,
        topo.encoding,
        "r",
        "alice",
        3,
        coins=lambda: np.random.default_rng(seed),
        seed_for=lambda j, attempt, digest: draw(xof.SEED_BYTES),
        block_bytes=block * RINGS[ring].itemsize,
    )
    assert streamed_body(shard) == bytes(bodies[shard.full_index])
    assert shard.seed_bodies() == {
        j: bytes(b) for j, b in enumerate(bodies) if j != shard.full_index
    }


@pytest.mark.parametrize("ring", sorted(RINGS))
@pytest.mark.parametrize("dtype", ["float32", "float16", "int32", "int64"])
def test_any_real_dtype_is_read_block_by_block_as_prepare_reads_it(ring, dtype):
    topo = topology(ring, "both")
    x = vector(70_001, 3, dtype) if dtype.startswith("float") else np.arange(-9, 9, dtype=dtype)
    client = Client(topo, "alice", secret=bytes(16))
    bodies = client.prepare("r", x)
    shard = client.prepare_streamed("r", x, block_bytes=4096)
    assert streamed_body(shard) == bytes(bodies[shard.full_index])


@pytest.mark.parametrize("ring", sorted(RINGS))
def test_a_share_of_a_million_in_megabyte_blocks_is_prepare(ring):
    """Default blocks (1 MiB), several L2 passes of field.BLOCK, d not a multiple of either."""
    topo = topology(ring, "l2")
    x = vector(1_000_003, 11)
    client = Client(topo, "bob", secret=bytes(range(32)))
    bodies = client.prepare("r", x)
    shard = client.prepare_streamed("r", x)
    assert streamed_body(shard) == bytes(bodies[shard.full_index])
    shares = [
        codec.decode_share(
            b if j != shard.full_index else b"".join(shard.chunks()),
            aggregator=j,
            dim=x.size,
            ring=RINGS[ring],
        ).expand("r", "bob")
        for j, b in enumerate(bodies)
    ]
    coins = ClientSecret(bytes(range(32))).coins(client.fingerprint, "r", "bob")
    expected = topo.encoding.encode(x, coins)
    assert np.array_equal(sharing.unshard(shares, RINGS[ring]), expected)


def test_a_vector_that_cannot_be_encoded_is_refused_before_any_chunk():
    topo = topology("gf_p61", "coord")
    client = Client(topo, "alice", secret=bytes(16))
    x = vector(300_000, 1)
    x[200_001] = np.nan
    with pytest.raises(EncodingError, match="at index 200001"):
        client.prepare_streamed("r", x)
    topo_l2 = topology("gf_p61", "l2")
    x[200_001] = -np.inf
    with pytest.raises(EncodingError, match="-inf at index 200001"):
        Client(topo_l2, "alice", secret=bytes(16)).prepare_streamed("r", x)
    with pytest.raises(EncodingError, match="1-dimensional"):
        client.prepare_streamed("r", np.zeros((2, 2)))
    with pytest.raises(EncodingError, match="real numbers"):
        client.prepare_streamed("r", np.array(["a", "b"]))


def test_repr_shows_sizes_only():
    client = Client(topology("gf_p61", "coord"), "alice", secret=bytes(16))
    shard = client.prepare_streamed("r", np.ones(10))
    text = repr(shard)
    assert "10 elements of gf_p61" in text and "2 seed shares" in text
    for s in shard.seed_shares:
        assert s.seed is not None and s.seed.hex() not in text


# --------------------------------------------------------------------------- changed vectors


def changed_value(v: float) -> float:
    """A value whose encoding differs from ``v``'s in every test encoding (another sign,
    half a unit or more away, inside every clip)."""
    return 0.5 if v < 0 else -0.5


def body_until_refused(shard) -> tuple[list[bytes], VectorChanged]:
    """The chunks a body yields before it raises :class:`VectorChanged`."""
    got: list[bytes] = []
    with pytest.raises(VectorChanged) as caught:
        for chunk in shard.chunks():
            got.append(chunk)
    return got, caught.value


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(1, 3 * field.BLOCK + 7),
    block=st.one_of(st.integers(1, 600), st.integers(field.BLOCK - 3, field.BLOCK + 3)),
    ring=st.sampled_from(sorted(RINGS)),
    encoding=st.sampled_from(sorted(ENCODINGS)),
    seed=st.integers(0, 2**32 - 1),
    where=st.floats(0.0, 1.0, exclude_max=True),
    secret=st.booleans(),
)
def test_a_vector_changed_between_two_bodies_stops_before_the_changed_block(
    d, block, ring, encoding, seed, where, secret
):
    """A retry reads the vector again under the same seeds: the block holding the first
    changed coordinate (and all after it) is never yielded; what is yielded before it is
    the first body's bytes. With a secret and with the object's own (no secret)."""
    topo = topology(ring, encoding)
    x = vector(d, seed)
    client = Client(topo, "alice", secret=seed.to_bytes(4, "little") * 8 if secret else None)
    itemsize = RINGS[ring].itemsize
    shard = client.prepare_streamed("r", x, block_bytes=block * itemsize)
    first = list(shard.chunks())
    i = int(where * d)
    old = x[i]
    x[i] = changed_value(old)
    got, refused = body_until_refused(shard)
    assert refused.code == "vector_changed" and isinstance(refused, EncodingError)
    assert got == first[: len(got)]  # the header, then whole unchanged blocks, as before
    sent = (sum(map(len, got)) - codec.SHARE_HEADER.size) // itemsize
    assert sent <= i and refused.start == sent  # nothing of the changed block
    assert sent == i // shard.check * shard.check  # and everything before its check block
    # The same vector again: the same body, whole.
    x[i] = old
    assert list(shard.chunks()) == first


@pytest.mark.parametrize("ring", sorted(RINGS))
def test_a_vector_changed_after_its_seeds_were_settled_sends_only_the_header(ring):
    topo = topology(ring, "l2")
    x = vector(5_000, 7)
    shard = Client(topo, "bob", secret=bytes(16)).prepare_streamed("r", x, block_bytes=800)
    x[4_999] += 1.0  # the last coordinate, in the only check block
    got, refused = body_until_refused(shard)
    assert got == [codec.full_share_header(shard.full_index, 5_000, RINGS[ring])]
    assert refused.start == 0 and "submit a copy" in str(refused)


def test_a_value_made_non_finite_after_settling_is_refused_before_its_block():
    topo = topology("gf_p61", "coord")
    x = vector(3 * field.BLOCK, 8)
    shard = Client(topo, "carol", secret=bytes(16)).prepare_streamed("r", x)
    first = list(shard.chunks())
    x[2 * field.BLOCK + 5] = np.nan
    got: list[bytes] = []
    with pytest.raises(EncodingError, match="at index"):
        for chunk in shard.chunks():
            got.append(chunk)
    assert got == first[: len(got)] and len(got) < len(first)


def test_prefix_digests_are_32_bytes_per_check_block_and_end_with_the_vector_digest():
    topo = topology("gf_p61", "coord")
    x = vector(1_000_003, 9)
    secret = ClientSecret(bytes(range(32)))
    client = Client(topo, "dave", secret=bytes(range(32)))
    shard = client.prepare_streamed("r", x)  # 1 MiB blocks: one check block each
    assert shard.check == shard.block == (1 << 20) // 8
    assert len(shard.prefixes) == math.ceil(x.size / shard.check)
    assert all(len(p) == 32 for p in shard.prefixes)
    encoded = topo.encoding.encode(x, secret.coins(client.fingerprint, "r", "dave"))
    assert shard.prefixes[-1] == xof.vector_digest(encoded)
    assert shard.prefixes[0] == xof.vector_digest(encoded[: shard.check])


# --------------------------------------------------------------------------- encoding blocks


@settings(max_examples=60, deadline=None)
@given(
    d=st.integers(0, 2000),
    cuts=st.lists(st.integers(0, 2000), max_size=6),
    ring=st.sampled_from(sorted(RINGS)),
    encoding=st.sampled_from(sorted(ENCODINGS)),
    seed=st.integers(0, 2**32 - 1),
)
def test_encode_blocks_in_any_cuts_are_encode(d, cuts, ring, encoding, seed):
    enc = topology(ring, encoding).encoding
    x = vector(d, seed) * 10
    whole = enc.encode(x, CoinStream(bytes(16)))
    factor = enc.l2_factor(x)
    coins = CoinStream(bytes(16))
    out = RINGS[ring].empty(d)
    bounds = sorted({0, d, *(c for c in cuts if c <= d)})
    for a, b in zip(bounds, bounds[1:], strict=False):
        enc.encode_block(x[a:b], coins, factor, out[a:b], start=a)
    assert np.array_equal(out, whole)


@settings(max_examples=40, deadline=None)
@given(d=st.integers(1, 3 * field.BLOCK), scale=st.sampled_from([1e-300, 1.0, 1e300]))
def test_l2_factor_is_the_same_for_float32_views_and_clips_the_norm(d, scale):
    enc = FixedPointEncoding(frac_bits=8, coord_clip=None, l2_clip=1.0)
    x = np.random.default_rng(d).normal(size=d) * scale
    factor = enc.l2_factor(x)
    norm = np.linalg.norm(x / np.max(np.abs(x))) * np.max(np.abs(x))
    if factor is None:
        assert norm <= 1.0 * (1 + 1e-12)
    else:
        assert factor == pytest.approx(1.0 / norm, rel=1e-12)
        assert np.linalg.norm(x * factor) <= 1.0 * (1 + 1e-12)
    x32 = (np.random.default_rng(d).normal(size=d) * 100).astype(np.float32)
    assert enc.l2_factor(x32) == enc.l2_factor(x32.astype(np.float64))


def test_l2_factor_does_not_depend_on_blas_threads():
    """Pinned: a sum of squares computed by numpy's pairwise sum in fixed blocks, not a BLAS
    dot product (whose value changes with OpenBLAS's thread count above 10,000 values)."""
    x = np.random.default_rng(0).normal(size=300_000)
    enc = FixedPointEncoding(frac_bits=8, coord_clip=None, l2_clip=1.0)
    peak = float(np.max(np.abs(x)))
    sums = [
        float(np.add.reduce((x[s : s + field.BLOCK] / peak) ** 2))
        for s in range(0, x.size, field.BLOCK)
    ]
    expected = (1.0 / (peak * math.sqrt(math.fsum(sums)))) * (1.0 - 2.0**-50)
    assert enc.l2_factor(x) == expected


# --------------------------------------------------------------------------- seekable streams

KEY = bytes(range(16))


@settings(max_examples=60, deadline=None)
@given(k=st.integers(0, 5000), n=st.integers(0, 3000), first=st.integers(0, 3000))
def test_coin_stream_started_at_k_is_the_tail(k, n, first):
    whole = CoinStream(KEY).random(k + first + n)
    seeked = CoinStream(KEY, start=k)
    assert np.array_equal(seeked.random(first), whole[k : k + first])
    assert np.array_equal(seeked.random(n), whole[k + first :])
    secret = ClientSecret(bytes(32))
    assert np.array_equal(
        secret.coins("ab", "r", "c", start=k).random(n),
        secret.coins("ab", "r", "c").random(k + n)[k:],
    )


@settings(max_examples=60, deadline=None)
@given(k=st.integers(0, 5000), n=st.integers(0, 3000), block=st.integers(1, 4000))
def test_gf_p61_stream_started_at_k_is_the_tail(k, n, block):
    seed, context = bytes(16), xof.share_context("r", "c", 1)
    whole = xof.expand(seed, context, k + n)
    stream = BlockStream(xof.derive_key(seed, context), block, start=k)
    got = stream.next_block(n)
    assert got is not None and np.array_equal(got, whole[k:])


@settings(max_examples=60, deadline=None)
@given(k=st.integers(0, 5000), n=st.integers(0, 3000), block=st.integers(1, 4000))
def test_z2_32_stream_started_at_k_is_the_tail(k, n, block):
    seed, context = bytes(16), xof.share_context("r", "c", 2)
    whole = xof.expand_u32(seed, context, k + n)
    stream = WordStream(xof.derive_key(seed, context, xof.DOMAIN_Z2_32), block, start=k)
    assert np.array_equal(stream.next_block(n), whole[k:])


def test_a_stream_seeks_past_a_64_bit_counter_word():
    """The CTR counter is 128 bits: offsets past 2**64 blocks carry into the upper half."""
    k = 2**65 * 2  # word 2**66: counter block 2**65
    a = CoinStream(KEY, start=k).random(4)
    b = CoinStream(KEY, start=k - 3).random(7)[3:]
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="offset"):
        CoinStream(KEY, start=-1)


# --------------------------------------------------------------------------- rejection


REJECTED_AT = 2_345  # the coordinate whose word is p in the rejected stream


@pytest.fixture
def reject_first_seed_of_aggregator(monkeypatch):
    """Make every stream whose key is in ``rejected`` hold the word p at REJECTED_AT (well
    inside it, in no particular block), wherever the stream is read from."""
    rejected: set[bytes] = set()
    real_init, real_next = BlockStream.__init__, BlockStream.next_block

    def init(self, key, block, start=0):
        real_init(self, key, block, start)
        self._test_key, self._test_pos = key, start

    def next_block(self, n):
        words = real_next(self, n)
        pos, self._test_pos = self._test_pos, self._test_pos + n
        if self._test_key in rejected and pos <= REJECTED_AT < pos + n:
            return None  # as if words[REJECTED_AT - pos] were p
        return words

    monkeypatch.setattr(BlockStream, "__init__", init)
    monkeypatch.setattr(BlockStream, "next_block", next_block)
    return rejected


@pytest.mark.parametrize("block", [1, 100, 1000, 5000])
def test_a_rejected_seed_is_replaced_before_the_first_byte(reject_first_seed_of_aggregator, block):
    topo = topology("gf_p61", "coord", 3)
    raw = bytes(range(32))
    secret = ClientSecret(raw)
    x = vector(4_000, 5)
    client = Client(topo, "carol", secret=raw)
    full = full_share_index("carol", 3)
    j = next(i for i in range(3) if i != full)  # the first seed drawn
    encoded = topo.encoding.encode(x, secret.coins(client.fingerprint, "r", "carol"))
    digest = xof.vector_digest(encoded)
    first_seed = secret.seed(client.fingerprint, "r", "carol", j, 0, digest)
    context = xof.share_context("r", "carol", j)
    reject_first_seed_of_aggregator.add(xof.derive_key(first_seed, context))

    events: list[tuple] = []

    def seed_for(aggregator, attempt, vector_digest):
        events.append(("seed", aggregator, attempt))
        return secret.seed(client.fingerprint, "r", "carol", aggregator, attempt, vector_digest)

    shard = shard_streamed(
        x,
        topo.encoding,
        "r",
        "carol",
        3,
        coins=functools.partial(secret.coins, client.fingerprint, "r", "carol"),
        seed_for=seed_for,
        block_bytes=8 * block,
    )
    # Every seed, the replacement included, was settled before a chunk existed.
    assert ("seed", j, 0) in events and ("seed", j, 1) in events
    settled = list(events)
    body = b""
    for chunk in shard.chunks():
        body += chunk
        assert events == settled  # no seed is drawn while the body is made
    replaced = next(s for s in shard.seed_shares if s.aggregator == j)
    assert replaced.seed == secret.seed(client.fingerprint, "r", "carol", j, 1, digest)
    # The whole-vector path meets the same rejection and makes the same choice.
    bodies = client.prepare("r", x)
    assert body == bytes(bodies[full])
    assert shard.seed_bodies()[j] == bytes(bodies[j])


def test_z2_32_never_reads_a_stream_to_choose_a_seed(monkeypatch):
    calls = []
    monkeypatch.setattr(WordStream, "next_block", lambda self, n: calls.append(n))
    topo = topology("z2_32", "coord")
    shard = Client(topo, "alice", secret=bytes(16)).prepare_streamed("r", np.ones(1000))
    assert calls == [] and len(shard.seed_shares) == 2


def test_rejects_words_only_in_gf_p61():
    from mpc_agg.core.share_stream import _rejects_words

    assert _rejects_words(GF_P61) and not _rejects_words(Z2_32)
    assert all(isinstance(r, Ring) for r in RINGS.values())
