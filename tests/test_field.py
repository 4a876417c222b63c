"""GF(2**61 - 1) vector arithmetic against Python big-int arithmetic mod p.

Every expected value here is computed with Python ints (``% P_REF``), never with
``mpc_agg.core.field`` itself, so a wrong fold, a lost carry or a wrapped ``uint64`` shows up.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpc_agg.core import field

P_REF = 2**61 - 1  # written out, not imported: the test must not trust field.P
U64_MAX = 2**64 - 1
HALF_REF = P_REF // 2

EDGE_U64 = [
    0,
    1,
    2,
    P_REF - 2,
    P_REF - 1,
    P_REF,
    P_REF + 1,
    2**61,
    2**61 + 6,
    2**62,
    2**63,
    U64_MAX - 1,
    U64_MAX,
]
EDGE_CANONICAL = [0, 1, 2, HALF_REF - 1, HALF_REF, HALF_REF + 1, P_REF - 2, P_REF - 1]

any_u64 = st.one_of(st.sampled_from(EDGE_U64), st.integers(0, U64_MAX))
any_canonical = st.one_of(st.sampled_from(EDGE_CANONICAL), st.integers(0, P_REF - 1))
# from_signed's precondition is |v| < p/2, i.e. |v| <= HALF.
any_signed = st.one_of(
    st.sampled_from([0, 1, -1, HALF_REF, -HALF_REF, HALF_REF - 1, -(HALF_REF - 1)]),
    st.integers(-HALF_REF, HALF_REF),
)


def arr(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


def ints(a: np.ndarray) -> list[int]:
    return [int(v) for v in a]


def test_constants_match_the_design() -> None:
    assert field.P == P_REF
    assert field.HALF == HALF_REF
    # LAZY_ADDS must respect the 64-bit bound stated in field.py: a folded value plus
    # LAZY_ADDS values <= p must fit in uint64.
    assert (2**61 + 6) + field.LAZY_ADDS * P_REF <= U64_MAX


# --------------------------------------------------------------------------- fold / canonical


@given(st.lists(any_u64, max_size=20))
def test_fold_is_congruent_and_bounded(xs: list[int]) -> None:
    x = arr(xs)
    out = field.fold(x)
    assert out.dtype == np.uint64
    for orig, got in zip(xs, ints(out), strict=True):
        assert got % P_REF == orig % P_REF
        assert got <= 2**61 + 6
    assert ints(x) == xs  # fold without ``out`` must not touch its input


@pytest.mark.parametrize("x", [0, 1, P_REF - 1, P_REF, 2**61, U64_MAX])
def test_canonical_edge_values(x: int) -> None:
    assert ints(field.canonical(arr([x]))) == [x % P_REF]


@given(st.lists(any_u64, max_size=20))
def test_canonical_matches_python_mod(xs: list[int]) -> None:
    x = arr(xs)
    got = field.canonical(x)
    assert got.dtype == np.uint64
    assert ints(got) == [v % P_REF for v in xs]
    assert ints(x) == xs


def test_canonical_in_place() -> None:
    x = arr([P_REF, U64_MAX, 5])
    out = field.canonical(x, out=x)
    assert out is x
    assert ints(x) == [0, U64_MAX % P_REF, 5]


# --------------------------------------------------------------------------- add / sub / neg


@given(st.lists(st.tuples(any_canonical, any_canonical), max_size=20))
def test_add_sub_match_python(pairs: list[tuple[int, int]]) -> None:
    a = arr([x for x, _ in pairs])
    b = arr([y for _, y in pairs])
    assert ints(field.add(a, b)) == [(x + y) % P_REF for x, y in pairs]
    assert ints(field.sub(a, b)) == [(x - y) % P_REF for x, y in pairs]
    assert ints(a) == [x for x, _ in pairs] and ints(b) == [y for _, y in pairs]


@given(st.lists(any_canonical, max_size=20))
def test_neg_matches_python(xs: list[int]) -> None:
    got = field.neg(arr(xs))
    assert ints(got) == [(-x) % P_REF for x in xs]
    # neg(0) must be 0, not p: the result is canonical.
    assert field.is_canonical(got)


# --------------------------------------------------------------------------- signed embedding


@given(st.lists(any_signed, max_size=20))
def test_from_signed_matches_python_and_round_trips(vs: list[int]) -> None:
    v = np.array(vs, dtype=np.int64)
    x = field.from_signed(v)
    assert x.dtype == np.uint64
    assert ints(x) == [w % P_REF for w in vs]
    back = field.to_signed(x)
    assert back.dtype == np.int64
    assert [int(w) for w in back] == vs


@given(st.lists(any_canonical, max_size=20))
def test_to_signed_matches_python(xs: list[int]) -> None:
    got = [int(w) for w in field.to_signed(arr(xs))]
    assert got == [x if x <= HALF_REF else x - P_REF for x in xs]


def test_to_signed_boundary() -> None:
    # HALF is the largest positive value, HALF + 1 the most negative one.
    got = field.to_signed(arr([HALF_REF, HALF_REF + 1, P_REF - 1, 0]))
    assert [int(w) for w in got] == [HALF_REF, -HALF_REF, -1, 0]


# --------------------------------------------------------------------------- sum_vectors


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 15, 16, 17, 40])
def test_sum_vectors_worst_case_no_overflow(n: int) -> None:
    """n vectors of p - 1: a missing fold would overflow uint64 after 8 additions."""
    vectors = [arr([P_REF - 1, P_REF - 1, 0, 1]) for _ in range(n)]
    got = field.sum_vectors(vectors)
    assert ints(got) == [(n * (P_REF - 1)) % P_REF, (n * (P_REF - 1)) % P_REF, 0, n % P_REF]
    assert ints(vectors[0]) == [P_REF - 1, P_REF - 1, 0, 1]  # the first input is not mutated


@settings(max_examples=60)
@given(
    st.integers(1, 4).flatmap(
        lambda d: st.lists(st.lists(any_canonical, min_size=d, max_size=d), min_size=1, max_size=40)
    )
)
def test_sum_vectors_matches_python(rows: list[list[int]]) -> None:
    got = field.sum_vectors([arr(r) for r in rows])
    expected = [sum(col) % P_REF for col in zip(*rows, strict=True)]
    assert ints(got) == expected


def test_sum_vectors_empty_raises() -> None:
    with pytest.raises(ValueError):
        field.sum_vectors([])


# --------------------------------------------------------------------------- misc


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], True),
        ([0], True),
        ([P_REF - 1], True),
        ([0, P_REF - 1, 5], True),
        ([P_REF], False),
        ([0, P_REF], False),
        ([2**61], False),
        ([U64_MAX], False),
    ],
)
def test_is_canonical(values: list[int], expected: bool) -> None:
    assert field.is_canonical(arr(values)) is expected


def test_zeros() -> None:
    z = field.zeros(3)
    assert z.dtype == np.uint64 and ints(z) == [0, 0, 0]
    assert field.zeros(0).shape == (0,)
