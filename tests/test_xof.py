"""Seed expansion: determinism, context binding, exact rejection sampling, a known answer.

The known-answer vector is derived twice: pinned as numbers, and recomputed here from
hashlib.sha256 and raw AES blocks (ECB over explicit counter blocks, not the CTR mode the
code uses), following the construction in the xof.py docstring. The docstring leaves the
width of ``len(context)`` open; the code (and this test) use a 4-byte little-endian length.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given
from hypothesis import strategies as st

from mpc_agg.core import xof

P_REF = 2**61 - 1
MASK61 = 2**61 - 1

seeds = st.binary(min_size=16, max_size=16)
ids = st.text(max_size=8)


# --------------------------------------------------------------------------- expand basics


@given(seeds, st.binary(max_size=40), st.integers(0, 50))
def test_expand_deterministic_canonical_length(seed: bytes, context: bytes, d: int) -> None:
    a = xof.expand(seed, context, d)
    b = xof.expand(seed, context, d)
    assert a.dtype == np.uint64
    assert a.shape == (d,)
    assert np.array_equal(a, b)
    assert all(int(v) < P_REF for v in a)


def test_expand_zero_length() -> None:
    out = xof.expand(bytes(16), b"ctx", 0)
    assert out.shape == (0,) and out.dtype == np.uint64


def test_expand_negative_length_raises() -> None:
    with pytest.raises(ValueError, match="-1"):
        xof.expand(bytes(16), b"ctx", -1)


@given(seeds, st.integers(1, 30), st.integers(1, 30))
def test_expand_is_a_prefix_stream(seed: bytes, d1: int, d2: int) -> None:
    """The first elements do not depend on d (one stream per key)."""
    short, long_ = sorted((d1, d2))
    assert np.array_equal(xof.expand(seed, b"c", long_)[:short], xof.expand(seed, b"c", short))


@given(seeds, seeds, st.binary(max_size=20))
def test_different_seed_different_output(s1: bytes, s2: bytes, context: bytes) -> None:
    if s1 != s2:
        # 8 elements of 61 bits: a collision would be a 2**-488 event.
        assert not np.array_equal(xof.expand(s1, context, 8), xof.expand(s2, context, 8))


@given(seeds, st.binary(max_size=20), st.binary(max_size=20))
def test_different_context_different_output(seed: bytes, c1: bytes, c2: bytes) -> None:
    if c1 != c2:
        assert not np.array_equal(xof.expand(seed, c1, 8), xof.expand(seed, c2, 8))


def test_context_fields_each_change_the_stream() -> None:
    seed = bytes(range(16))
    base = xof.expand(seed, xof.share_context("r", "c", 1), 4)
    for ctx in (
        xof.share_context("r2", "c", 1),
        xof.share_context("r", "c2", 1),
        xof.share_context("r", "c", 2),
    ):
        assert not np.array_equal(base, xof.expand(seed, ctx, 4))


# --------------------------------------------------------------------------- share_context


def parse_context(ctx: bytes) -> tuple[str, str, int]:
    """Independent parser of the length-prefixed layout; fails on leftover bytes."""
    (n,) = struct.unpack_from("<H", ctx, 0)
    r = ctx[2 : 2 + n].decode("utf-8")
    pos = 2 + n
    (n,) = struct.unpack_from("<H", ctx, pos)
    c = ctx[pos + 2 : pos + 2 + n].decode("utf-8")
    pos += 2 + n
    (j,) = struct.unpack_from("<H", ctx, pos)
    assert pos + 2 == len(ctx)
    return r, c, j


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("ab", "c", 0), ("a", "bc", 0)),
        (("", "abc", 0), ("abc", "", 0)),
        (("a", "b", 1), ("a", "b", 256)),
        (("a\x00", "b", 0), ("a", "\x00b", 0)),
        (("r", "c", 0), ("r", "c\x00\x00", 0)),
        (("é", "", 0), ("\xc3\xa9", "", 0)),
    ],
)
def test_share_context_tricky_pairs(a: tuple[str, str, int], b: tuple[str, str, int]) -> None:
    assert xof.share_context(*a) != xof.share_context(*b)


@given(ids, ids, st.integers(0, 2**16 - 1), ids, ids, st.integers(0, 2**16 - 1))
def test_share_context_injective(r1: str, c1: str, j1: int, r2: str, c2: str, j2: int) -> None:
    t1, t2 = (r1, c1, j1), (r2, c2, j2)
    assert parse_context(xof.share_context(*t1)) == t1
    if t1 != t2:
        assert xof.share_context(*t1) != xof.share_context(*t2)


def test_share_context_layout() -> None:
    assert xof.share_context("round-1", "client-1", 2) == bytes.fromhex(
        "0700" + b"round-1".hex() + "0800" + b"client-1".hex() + "0200"
    )


# --------------------------------------------------------------------------- rejection sampling


class FakeStream:
    """A byte stream made of given 64-bit words; records how far it was read."""

    def __init__(self, words: list[int]) -> None:
        self.data = b"".join(struct.pack("<Q", w) for w in words)
        self.pos = 0

    def __call__(self, n: int) -> bytes:
        assert self.pos + n <= len(self.data), "read past the end of the fake stream"
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out


REJECT_A = 0xFFFFFFFFFFFFFFFF  # low 61 bits == p
REJECT_B = 0x1FFFFFFFFFFFFFFF  # == p
REJECT_C = 0x3FFFFFFFFFFFFFFF  # low 61 bits == p


def test_rejection_skips_words_equal_to_p_after_masking() -> None:
    words = [5, REJECT_A, 7, REJECT_B, 9, 0xE000000000000003, 11, 13]
    stream = FakeStream(words)
    out = xof.elements_from_stream(stream, 4)
    # 5, 7 from the first 4 words; 9 and 0xE0..03 & (2**61 - 1) = 3 from the refill.
    assert [int(v) for v in out] == [5, 7, 9, 3]
    assert out.dtype == np.uint64
    assert stream.pos == 6 * 8  # 11 and 13 are left for nobody: the stream stops exactly


def test_rejection_in_refill_reads_again() -> None:
    words = [REJECT_A, REJECT_B, 1, REJECT_C, REJECT_A, 2, REJECT_B, 3, 4, 99]
    stream = FakeStream(words)
    out = xof.elements_from_stream(stream, 4)
    assert [int(v) for v in out] == [1, 2, 3, 4]
    assert stream.pos == 9 * 8


def test_masking_keeps_values_just_below_p() -> None:
    words = [P_REF - 1, 0xE000000000000000 | (P_REF - 1), 0x2000000000000000, 0]
    out = xof.elements_from_stream(FakeStream(words), 4)
    assert [int(v) for v in out] == [P_REF - 1, P_REF - 1, 0, 0]


@given(
    st.lists(
        st.one_of(st.sampled_from([REJECT_A, REJECT_B, REJECT_C]), st.integers(0, 2**64 - 1)),
        min_size=1,
        max_size=40,
    ),
    st.integers(0, 10),
)
def test_rejection_matches_reference(words: list[int], d: int) -> None:
    kept = [w & MASK61 for w in words if w & MASK61 != P_REF]
    if len(kept) < d:
        return  # the fake stream would run dry
    stream = FakeStream(words + [0] * 8)
    out = xof.elements_from_stream(stream, d)
    assert [int(v) for v in out] == kept[:d]


# --------------------------------------------------------------------------- known answer

KAT_SEED = bytes(range(16))
KAT_CONTEXT = bytes.fromhex("0700726f756e642d310800636c69656e742d310200")
KAT_KEY = bytes.fromhex("9801369a060dc0d87d181e6e33651872")
KAT_ELEMENTS = [
    0x12D775297C82354E,
    0x04E745957AEBF217,
    0x16D847ED86935844,
    0x195A1C1DBD2A630C,
]


def reference_expand(seed: bytes, context: bytes, d: int) -> tuple[bytes, list[int]]:
    """Recompute expand from the docstring, with AES blocks over explicit counters."""
    h = hashlib.sha256(b"mpc_agg/xof/v1" + len(context).to_bytes(4, "little") + context + seed)
    key = h.digest()[:16]
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    out: list[int] = []
    block = 0
    while len(out) < d:
        ks = ecb.update(block.to_bytes(16, "big"))  # CTR from a zero counter block
        block += 1
        for i in range(0, 16, 8):
            w = int.from_bytes(ks[i : i + 8], "little") & MASK61
            if w != P_REF and len(out) < d:
                out.append(w)
    return key, out


def test_known_answer_vector() -> None:
    assert xof.share_context("round-1", "client-1", 2) == KAT_CONTEXT
    key, ref = reference_expand(KAT_SEED, KAT_CONTEXT, 4)
    assert key == KAT_KEY
    assert ref == KAT_ELEMENTS
    assert xof.derive_key(KAT_SEED, KAT_CONTEXT) == KAT_KEY
    got = xof.expand(KAT_SEED, xof.share_context("round-1", "client-1", 2), 4)
    assert [int(v) for v in got] == KAT_ELEMENTS


@given(seeds, st.binary(max_size=30), st.integers(0, 20))
def test_expand_matches_reference_construction(seed: bytes, context: bytes, d: int) -> None:
    key, ref = reference_expand(seed, context, d)
    assert xof.derive_key(seed, context) == key
    assert [int(v) for v in xof.expand(seed, context, d)] == ref


@pytest.mark.parametrize("n", [0, 1, 15, 17, 32])
def test_derive_key_rejects_wrong_seed_length(n: int) -> None:
    with pytest.raises(ValueError, match=str(n)):
        xof.derive_key(bytes(n), b"ctx")
    with pytest.raises(ValueError):
        xof.expand(bytes(n), b"ctx", 3)


# --------------------------------------------------------------------------- uniformity


def chi2_sf(x: float, k: int) -> float:
    """Survival function of the chi-square distribution with k degrees of freedom.

    Q(k/2, x/2) by the recurrence Q(a + 1, y) = Q(a, y) + y**a e**-y / Gamma(a + 1),
    from Q(1/2, y) = erfc(sqrt(y)) or Q(1, y) = e**-y.
    """
    y = x / 2
    if k % 2:
        a, q = 0.5, math.erfc(math.sqrt(y))
    else:
        a, q = 1.0, math.exp(-y)
    while a < k / 2:
        q += math.exp(a * math.log(y) - y - math.lgamma(a + 1)) if y > 0 else 0.0
        a += 1
    return q


def test_chi2_sf_reference_points() -> None:
    # Textbook quantiles: chi2(7) at 14.067 is the 5% point, at 24.322 the 0.1% point.
    assert abs(chi2_sf(14.067, 7) - 0.05) < 1e-4
    assert abs(chi2_sf(24.322, 7) - 0.001) < 1e-5
    assert abs(chi2_sf(3.841, 1) - 0.05) < 1e-4


def test_top_and_low_bits_look_uniform() -> None:
    """Chi-square over 8 bins of the top 3 bits and of the low 3 bits of 100k elements.

    The seed is fresh each run; a correct XOF fails each check with probability 1e-6
    (the p-value threshold), so the test fails falsely about twice in a million runs.
    A missing mask (top bits of 64-bit words) or a biased reduction is far outside this.
    """
    n = 100_000
    seed = os.urandom(16)
    x = xof.expand(seed, b"uniformity", n)
    # Exact bin probabilities over [0, p): the top bin has one value fewer (p itself).
    top_probs = np.full(8, 2**58 / P_REF)
    top_probs[7] = (2**58 - 1) / P_REF
    low_probs = np.full(8, 1 / 8)  # off by < 2**-58: negligible at n = 1e5
    for name, bins, probs in (
        ("top", (x >> np.uint64(58)).astype(np.int64), top_probs),
        ("low", (x & np.uint64(7)).astype(np.int64), low_probs),
    ):
        counts = np.bincount(bins, minlength=8)
        assert counts.size == 8, f"{name} bins out of range for seed {seed.hex()}"
        expected = n * probs
        stat = float(((counts - expected) ** 2 / expected).sum())
        pval = chi2_sf(stat, 7)
        assert pval > 1e-6, f"{name} 3 bits: chi2 = {stat:.1f}, p = {pval:.2e}, seed {seed.hex()}"


def test_fast_path_falls_back_to_the_stream_when_a_word_is_rejected(monkeypatch) -> None:
    """``expand`` fills its output from the keystream in place; if a word is the rejected
    value (never seen in practice: probability about d * 2**-61) it must give exactly what
    rejection sampling over the same stream gives. The fast path is made to see such a word."""
    seed, context, d = bytes(range(16)), b"ctx", 1000
    reference = xof.elements_from_stream(xof.keystream(xof.derive_key(seed, context)), d)
    assert np.array_equal(xof.expand(seed, context, d), reference)  # the usual path
    real_fill = xof._fill_keystream

    def fill_with_a_rejected_word(key: bytes, out: memoryview) -> None:
        real_fill(key, out)
        out[8 * 17 : 8 * 18] = struct.pack("<Q", REJECT_A)

    monkeypatch.setattr(xof, "_fill_keystream", fill_with_a_rejected_word)
    assert np.array_equal(xof.expand(seed, context, d), reference)


STEP = (1 << 19) // 8  # elements per 512 KiB keystream step


@pytest.mark.parametrize("d", [0, 1, 2, STEP - 2, STEP - 1, STEP, STEP + 1, 2 * STEP + 3])
def test_chunked_keystream_fill_equals_one_stream(d: int) -> None:
    """Filling in 512 KiB steps (with OpenSSL's 15 spare bytes) gives the words of one long
    ``update``, at lengths around the step boundaries."""
    key = xof.derive_key(bytes(16), b"c")
    whole = np.frombuffer(xof.keystream(key)(8 * d), dtype="<u8") & np.uint64(MASK61)
    assert not (whole == np.uint64(P_REF)).any()  # no rejection for these fixed inputs
    assert np.array_equal(xof.expand(bytes(16), b"c", d), whole)
