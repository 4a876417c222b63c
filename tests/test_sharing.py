"""Additive sharing with seed-compressed shares: reconstruction, layout, secrecy of reprs."""

from __future__ import annotations

import hashlib
import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpc_agg.core import field as field_mod
from mpc_agg.core import sharing, xof
from mpc_agg.core import xof as xof_mod
from mpc_agg.core.sharing import Share, ShareKind

P_REF = 2**61 - 1

element = st.one_of(st.sampled_from([0, 1, P_REF - 1, P_REF // 2]), st.integers(0, P_REF - 1))
field_vectors = st.lists(element, max_size=12)
client_ids = st.text(min_size=1, max_size=10)


def arr(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


def counter_bytes(start: int = 0):
    """A deterministic stand-in for secrets.token_bytes: SHA-256 of a counter."""
    state = {"i": start}

    def random_bytes(n: int) -> bytes:
        i = state["i"]
        state["i"] += 1
        return hashlib.sha256(i.to_bytes(8, "little")).digest()[:n]

    return random_bytes


def reconstruct(shares: list[Share], round_id: str, client_id: str) -> list[int]:
    """Sum of expanded shares with Python ints (independent of field.sum_vectors)."""
    d = shares[0].dim
    total = [0] * d
    for s in shares:
        for i, v in enumerate(s.expand(round_id, client_id)):
            total[i] += int(v)
    return [t % P_REF for t in total]


@settings(max_examples=80)
@given(field_vectors, st.integers(2, 5), client_ids, st.text(min_size=1, max_size=10))
def test_shares_reconstruct(xs: list[int], m: int, client_id: str, round_id: str) -> None:
    x = arr(xs)
    shares = sharing.shard(x, round_id, client_id, m)
    assert len(shares) == m
    assert [s.aggregator for s in shares] == list(range(m))
    assert all(s.dim == len(xs) for s in shares)
    expanded = [s.expand(round_id, client_id) for s in shares]
    assert all(e.dtype == np.uint64 and e.shape == (len(xs),) for e in expanded)
    assert all(int(v) < P_REF for e in expanded for v in e)
    assert [int(v) for v in sharing.unshard(expanded)] == xs
    assert reconstruct(shares, round_id, client_id) == xs
    assert [int(v) for v in x] == xs  # shard does not modify its input
    # Exactly one FULL share, at the rotating index; the others are 16-byte seeds.
    full = [s.aggregator for s in shares if s.kind is ShareKind.FULL]
    assert full == [sharing.full_share_index(client_id, m)]
    for s in shares:
        if s.kind is ShareKind.SEED:
            assert s.vector is None and isinstance(s.seed, bytes) and len(s.seed) == 16
        else:
            assert s.seed is None and s.vector is not None


@given(field_vectors, st.integers(2, 5), st.data())
def test_full_index_override(xs: list[int], m: int, data: st.DataObject) -> None:
    full_index = data.draw(st.integers(0, m - 1))
    shares = sharing.shard(arr(xs), "r", "c", m, full_index=full_index)
    assert [s.kind for s in shares] == [
        ShareKind.FULL if j == full_index else ShareKind.SEED for j in range(m)
    ]
    assert reconstruct(shares, "r", "c") == xs


@pytest.mark.parametrize("full_index", [-1, 3, 10])
def test_full_index_out_of_range(full_index: int) -> None:
    with pytest.raises(ValueError, match=str(full_index)):
        sharing.shard(arr([1, 2]), "r", "c", 3, full_index=full_index)


@pytest.mark.parametrize("m", [0, 1])
def test_needs_two_aggregators(m: int) -> None:
    with pytest.raises(ValueError, match="m >= 2"):
        sharing.shard(arr([1]), "r", "c", m)


@pytest.mark.parametrize("bad", [P_REF, 2**64 - 1])
def test_non_canonical_input_refused(bad: int) -> None:
    with pytest.raises(ValueError, match="canonical"):
        sharing.shard(arr([1, bad]), "r", "c", 2)


def test_zero_dim() -> None:
    shares = sharing.shard(arr([]), "r", "c", 3)
    assert all(s.dim == 0 for s in shares)
    assert sharing.unshard([s.expand("r", "c") for s in shares]).shape == (0,)


def test_seed_shares_are_uniform_looking_not_x() -> None:
    """The FULL share is not x itself (it is masked by the seed expansions)."""
    x = arr([0] * 16)
    shares = sharing.shard(x, "r", "c", 3, full_index=0)
    assert shares[0].vector is not None
    assert np.count_nonzero(shares[0].vector) >= 15


# --------------------------------------------------------------------------- reprs


def test_repr_hides_contents() -> None:
    x = arr([123456789012345, 987654321098765, 5555555555])
    shares = sharing.shard(x, "r", "alice", 3, random_bytes=counter_bytes())
    for s in shares:
        text = repr(s) + str(s) + f"{s!r}"
        assert s.kind.name in text and str(s.aggregator) in text
        if s.kind is ShareKind.FULL:
            assert s.vector is not None
            for v in s.vector:
                assert str(int(v)) not in text
                assert format(int(v), "x") not in text
            assert "3 elements" in text
        else:
            assert s.seed is not None
            assert s.seed.hex() not in text
            assert repr(s.seed) not in text
            assert str(list(s.seed)) not in text
            assert "16-byte seed" in text
        for v in (123456789012345, 987654321098765, 5555555555):
            assert str(v) not in text


# --------------------------------------------------------------------------- injected randomness


def test_shard_reproducible_with_injected_random_bytes() -> None:
    x = arr([1, 2, 3, P_REF - 1])
    a = sharing.shard(x, "r", "alice", 4, random_bytes=counter_bytes())
    b = sharing.shard(x, "r", "alice", 4, random_bytes=counter_bytes())
    c = sharing.shard(x, "r", "alice", 4, random_bytes=counter_bytes(start=100))
    for sa, sb in zip(a, b, strict=True):
        assert sa.kind == sb.kind and sa.seed == sb.seed
        assert np.array_equal(sa.expand("r", "alice"), sb.expand("r", "alice"))
    # The seeds really come from the injected source, in aggregator order.
    source = counter_bytes()
    expected_seeds = [source(16) for _ in range(3)]
    assert [s.seed for s in a if s.kind is ShareKind.SEED] == expected_seeds
    # Another seed source gives other shares with the same sum.
    full = sharing.full_share_index("alice", 4)
    assert a[full].vector is not None and c[full].vector is not None
    assert not np.array_equal(a[full].vector, c[full].vector)
    assert reconstruct(c, "r", "alice") == [1, 2, 3, P_REF - 1]


def test_seed_share_expands_to_its_context() -> None:
    x = arr([7, 8, 9])
    shares = sharing.shard(x, "round-1", "client-1", 3, full_index=0, random_bytes=counter_bytes())
    s = shares[1]
    assert s.seed is not None
    own = s.expand("round-1", "client-1")
    assert np.array_equal(own, xof.expand(s.seed, xof.share_context("round-1", "client-1", 1), 3))
    assert not np.array_equal(own, s.expand("round-2", "client-1"))
    assert not np.array_equal(own, s.expand("round-1", "client-2"))
    moved = Share(2, ShareKind.SEED, 3, seed=s.seed)  # same seed sent to another aggregator
    assert not np.array_equal(own, moved.expand("round-1", "client-1"))
    # Expanding in the wrong context breaks reconstruction.
    wrong = [
        shares[0].expand("round-1", "client-1"),
        s.expand("round-2", "client-1"),
        shares[2].expand("round-1", "client-1"),
    ]
    assert [int(v) for v in sharing.unshard(wrong)] != [7, 8, 9]


# --------------------------------------------------------------------------- rotation


@pytest.mark.parametrize("m", [2, 3, 4, 5, 7])
def test_full_share_index_spreads(m: int) -> None:
    """Each index gets at least 20% of its fair share of 300 clients.

    For a uniform hash the count is Binomial(300, 1/m); the chance that some index falls
    below 0.2 * 300/m is below 1e-9 for every m here (checked below, exactly).
    """
    n = 300
    floor_count = math.ceil(0.2 * n / m)
    q = 1 / m
    tail = sum(math.comb(n, k) * q**k * (1 - q) ** (n - k) for k in range(floor_count))
    assert m * tail < 1e-9
    counts = Counter(sharing.full_share_index(f"client-{i}", m) for i in range(n))
    assert set(counts) == set(range(m))
    assert min(counts.values()) >= floor_count, counts


@given(client_ids, st.integers(2, 9))
def test_full_share_index_deterministic_in_range(client_id: str, m: int) -> None:
    j = sharing.full_share_index(client_id, m)
    assert 0 <= j < m
    assert sharing.full_share_index(client_id, m) == j


# --------------------------------------------------------------------------- Share validation


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": ShareKind.FULL, "dim": 2},
        {"kind": ShareKind.FULL, "dim": 2, "vector": arr([1, 2, 3])},
        {"kind": ShareKind.FULL, "dim": 2, "vector": arr([1, 2]), "seed": bytes(16)},
        {"kind": ShareKind.SEED, "dim": 2},
        {"kind": ShareKind.SEED, "dim": 2, "seed": bytes(15)},
        {"kind": ShareKind.SEED, "dim": 2, "seed": bytes(17)},
        {"kind": ShareKind.SEED, "dim": 2, "seed": bytes(16), "vector": arr([1, 2])},
    ],
)
def test_share_rejects_inconsistent_fields(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Share(0, **kwargs)


def test_unshard_matches_python() -> None:
    vs = [arr([P_REF - 1, 3]), arr([P_REF - 1, 4]), arr([5, P_REF - 7])]
    assert [int(v) for v in sharing.unshard(vs)] == [
        (2 * (P_REF - 1) + 5) % P_REF,
        (7 + P_REF - 7) % P_REF,
    ]


def test_a_seed_whose_stream_holds_the_rejected_word_is_replaced(monkeypatch) -> None:
    """If a seed's stream hits the rejected word in some block (probability about d·2^-61,
    so forced here), the blocks already subtracted are restored and a fresh seed is drawn:
    the shares still add up to x, and each seed share expands (by the aggregator's own
    rejection-sampling ``expand``) to exactly what was subtracted."""
    d = 3 * field_mod.BLOCK + 11
    x = np.random.default_rng(5).integers(0, field_mod.P, size=d, dtype=np.uint64)
    seeds = iter([bytes([k]) * 16 for k in range(1, 10)])
    real_next = xof_mod.BlockStream.next_block
    calls = {"n": 0}

    def next_block(self, n):  # the first stream fails at its third block
        calls["n"] += 1
        if calls["n"] == 3:
            return None
        return real_next(self, n)

    monkeypatch.setattr(xof_mod.BlockStream, "next_block", next_block)
    shares = sharing.shard(x, "r", "c", 3, full_index=0, random_bytes=lambda n: next(seeds))
    monkeypatch.undo()
    assert [s.seed for s in shares[1:]] == [bytes([2]) * 16, bytes([3]) * 16]  # seed 1 dropped
    expanded = [s.expand("r", "c") for s in shares]
    assert np.array_equal(sharing.unshard(expanded), x)


def test_full_share_is_canonical_even_where_a_lazy_sum_lands_on_p(monkeypatch) -> None:
    """x = 1 minus a stream word of 1 is 1 + (p - 1) = p before reduction: the full share
    must hold 0 there, never p (aggregators refuse values >= p)."""
    d = field_mod.BLOCK + 5

    def ones(self, n):
        return np.ones(n, dtype=np.uint64)

    monkeypatch.setattr(xof_mod.BlockStream, "next_block", ones)
    shares = sharing.shard(np.ones(d, dtype=np.uint64), "r", "c", 2, full_index=0)
    full = shares[0].vector
    assert full is not None and int(full.max()) == 0
