"""The running sum against a Python big-int reference, with worst-case (largest) values.

``subtract(v)`` adds ``p - v`` internally, so ``subtract(0)`` adds ``p`` itself: the largest
value the lazy bound has to absorb. Sequences longer than LAZY_ADDS (7) of such values
overflow ``uint64`` if a fold is missing or late.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpc_agg.core.accumulator import Accumulator

P_REF = 2**61 - 1
DIM = 3

worst_values = st.sampled_from([0, 1, P_REF - 2, P_REF - 1])
element = st.one_of(worst_values, worst_values, st.integers(0, P_REF - 1))
vector = st.lists(element, min_size=DIM, max_size=DIM)
op = st.tuples(st.sampled_from(["add", "sub"]), vector)


def arr(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


def ints(a: np.ndarray) -> list[int]:
    return [int(v) for v in a]


def run(ops: list[tuple[str, list[int]]]) -> tuple[Accumulator, list[int], int]:
    acc = Accumulator(DIM)
    ref = [0] * DIM
    count = 0
    for kind, v in ops:
        if kind == "add":
            acc.add(arr(v))
            ref = [r + x for r, x in zip(ref, v, strict=True)]
            count += 1
        else:
            acc.subtract(arr(v))
            ref = [r - x for r, x in zip(ref, v, strict=True)]
            count -= 1
    return acc, [r % P_REF for r in ref], count


@settings(max_examples=150)
@given(st.lists(op, max_size=60))
def test_matches_python_reference(ops: list[tuple[str, list[int]]]) -> None:
    acc, expected, count = run(ops)
    got = acc.value()
    assert got.dtype == np.uint64
    assert ints(got) == expected
    assert acc.count == count


@pytest.mark.parametrize("n", [1, 7, 8, 9, 16, 50])
@pytest.mark.parametrize("pattern", ["add", "sub", "alternate"])
def test_worst_case_sequences(n: int, pattern: str) -> None:
    """Only the largest addends: p - 1 (add) and p (subtract of 0)."""
    ops = []
    for i in range(n):
        kind = pattern if pattern != "alternate" else ("add" if i % 2 else "sub")
        ops.append((kind, [P_REF - 1, 0, P_REF - 1] if kind == "add" else [0, 0, 0]))
    acc, expected, _ = run(ops)
    assert ints(acc.value()) == expected


@given(st.lists(op, min_size=1, max_size=30), st.lists(op, max_size=30))
def test_value_is_canonical_and_does_not_mutate(
    first: list[tuple[str, list[int]]], second: list[tuple[str, list[int]]]
) -> None:
    acc, expected1, _ = run(first)
    v1 = acc.value()
    assert all(int(x) < P_REF for x in v1)
    v2 = acc.value()
    assert ints(v1) == ints(v2) == expected1
    assert v1 is not v2
    v1[:] = 12345  # the caller owns the returned array
    assert ints(acc.value()) == expected1
    # The accumulator keeps working after value() (value() must not reset or fold wrongly).
    _, expected_all, count_all = run(first + second)
    for kind, v in second:
        (acc.add if kind == "add" else acc.subtract)(arr(v))
    assert ints(acc.value()) == expected_all
    assert acc.count == count_all


def test_add_then_subtract_same_vectors_is_zero() -> None:
    acc = Accumulator(2)
    vs = [arr([P_REF - 1, i]) for i in range(20)]
    for v in vs:
        acc.add(v)
    for v in reversed(vs):
        acc.subtract(v)
    assert ints(acc.value()) == [0, 0]
    assert acc.count == 0


@pytest.mark.parametrize("shape", [(2,), (4,), (3, 1), (1, 3), ()])
@pytest.mark.parametrize("method", ["add", "subtract"])
def test_shape_errors_change_nothing(shape: tuple[int, ...], method: str) -> None:
    acc = Accumulator(DIM)
    acc.add(arr([1, 2, 3]))
    with pytest.raises(ValueError, match="shape"):
        getattr(acc, method)(np.ones(shape, dtype=np.uint64))
    assert ints(acc.value()) == [1, 2, 3]
    assert acc.count == 1


def test_empty_and_zero_dim() -> None:
    assert ints(Accumulator(3).value()) == [0, 0, 0]
    acc = Accumulator(0)
    acc.add(np.zeros(0, dtype=np.uint64))
    assert acc.value().shape == (0,) and acc.count == 1


def test_repr_shows_no_values() -> None:
    acc = Accumulator(2)
    acc.add(arr([123456789, 987654321]))
    r = repr(acc)
    assert "123456789" not in r and "987654321" not in r
    assert "dim=2" in r
