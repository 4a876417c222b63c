"""Fixed-point encoding: round trip, unbiased rounding, clipping, validation, headroom.

Statistical tests use a fresh seed per run (printed on failure) and a bound of 6 standard
deviations, so a correct implementation fails each of them with probability about 2e-9.
"""

from __future__ import annotations

import math
import os
import re
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpc_agg.core import field
from mpc_agg.core.accumulator import Accumulator
from mpc_agg.core.encoding import FixedPointEncoding
from mpc_agg.errors import ConfigError, EncodingError

P_REF = 2**61 - 1
HALF_REF = P_REF // 2


def fresh_rng() -> tuple[np.random.Generator, int]:
    seed = int.from_bytes(os.urandom(8), "little")
    return np.random.default_rng(seed), seed


def signed_ints(v: np.ndarray) -> list[int]:
    """Decode canonical field values to signed ints with Python arithmetic."""
    return [int(x) if int(x) <= HALF_REF else int(x) - P_REF for x in v]


class AlwaysUp:
    """A stand-in for the rounding generator whose coins always round up (0.0 < frac)."""

    def random(self, n: int) -> np.ndarray:
        return np.zeros(n)


# --------------------------------------------------------------------------- round trip


@settings(max_examples=150)
@given(
    st.sampled_from([0, 1, 8, 24, 40]),
    st.data(),
)
def test_round_trip_error_at_most_resolution(frac_bits: int, data: st.DataObject) -> None:
    clip = 1000.0
    enc = FixedPointEncoding(frac_bits=frac_bits, coord_clip=clip)
    xs = data.draw(st.lists(st.floats(-clip, clip, allow_nan=False), max_size=16))
    seed = data.draw(st.integers(0, 2**32))
    v = enc.encode(np.array(xs, dtype=np.float64), np.random.default_rng(seed))
    assert v.dtype == np.uint64 and v.shape == (len(xs),)
    assert field.is_canonical(v)
    back = enc.decode(v)
    for x, y, w in zip(xs, back, signed_ints(v), strict=True):
        assert abs(float(y) - x) <= 2.0**-frac_bits
        # The integer is floor or ceil of x * 2**f, nothing else.
        scaled = Fraction(x) * 2**frac_bits
        assert w in (math.floor(scaled), math.ceil(scaled))
        assert float(y) == w / 2**frac_bits


def test_exact_values_encode_exactly() -> None:
    enc = FixedPointEncoding(frac_bits=8, coord_clip=10.0)
    rng, _ = fresh_rng()
    x = [0.0, 1.0, -1.0, 0.5, -0.5, 2**-8, -(2**-8), 10.0, -10.0]
    v = enc.encode(x, rng)
    assert signed_ints(v) == [round(a * 256) for a in x]
    assert list(enc.decode(v)) == x


def test_negatives_decode_negative() -> None:
    enc = FixedPointEncoding(frac_bits=24, coord_clip=1000.0)
    rng, seed = fresh_rng()
    x = np.array([-0.5, -1e-3, -999.0, -1000.0, -(2.0**-24)])
    v = enc.encode(x, rng)
    # Negatives live above p/2 in the field.
    assert all(int(e) > HALF_REF for e in v), seed
    back = enc.decode(v)
    assert np.all(back < 0), seed
    assert back[0] == -0.5 and back[2] == -999.0 and back[3] == -1000.0
    assert back[4] == -(2.0**-24)


# --------------------------------------------------------------------------- unbiasedness


@pytest.mark.parametrize("units", [0.3, -1.7, 123.9])
def test_randomized_rounding_is_unbiased(units: float) -> None:
    """Mean of n encodings of ``units * 2**-f`` is ``units`` (integer units) within 6 sigma.

    Each coordinate rounds to floor or ceil, a Bernoulli(frac) step, so the mean of n of
    them has standard deviation sqrt(frac * (1 - frac) / n). Round-to-nearest or floor would
    be off by 0.3 units, about 290 sigma here.
    """
    f = 24
    n = 200_000
    enc = FixedPointEncoding(frac_bits=f, coord_clip=1000.0)
    rng, seed = fresh_rng()
    x = np.full(n, units * 2.0**-f)
    ints = field.to_signed(enc.encode(x, rng))
    lo = math.floor(units)
    assert set(np.unique(ints).tolist()) <= {lo, lo + 1}, seed
    frac = units - lo
    sigma = math.sqrt(frac * (1 - frac) / n)
    mean = float(ints.mean())
    assert abs(mean - units) <= 6 * sigma, f"mean {mean} vs {units}, seed {seed}"


# --------------------------------------------------------------------------- clipping


vectors = st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=12)


@given(vectors)
def test_l2_clip(xs: list[float]) -> None:
    enc = FixedPointEncoding(frac_bits=16, coord_clip=None, l2_clip=1.0)
    x = np.array(xs)
    y = enc.clip(x)
    norm_x = math.sqrt(sum(a * a for a in xs))
    assert math.sqrt(sum(float(a) ** 2 for a in y)) <= 1.0 + 1e-12
    if norm_x <= 1.0:
        assert np.array_equal(y, x)
    else:
        np.testing.assert_allclose(y, x / norm_x, rtol=1e-12, atol=1e-300)
    assert np.array_equal(x, np.array(xs))  # the input is not modified


@given(vectors)
def test_coord_clip(xs: list[float]) -> None:
    enc = FixedPointEncoding(frac_bits=16, coord_clip=5.0)
    y = enc.clip(xs)
    assert list(y) == [min(max(a, -5.0), 5.0) for a in xs]


@given(vectors)
def test_both_clips_and_encoded_bound(xs: list[float]) -> None:
    enc = FixedPointEncoding(frac_bits=20, coord_clip=0.5, l2_clip=2.0)
    y = enc.clip(xs)
    assert all(abs(a) <= 0.5 for a in y)
    assert float(np.linalg.norm(y)) <= 2.0 + 1e-12
    v = enc.encode(xs, np.random.default_rng(0))
    assert max(abs(w) for w in signed_ints(v)) <= enc.max_abs_encoded
    v_up = enc.encode(xs, AlwaysUp())  # type: ignore[arg-type]
    assert max(abs(w) for w in signed_ints(v_up)) <= enc.max_abs_encoded


def test_l2_clip_of_huge_finite_vector_keeps_direction() -> None:
    enc = FixedPointEncoding(frac_bits=10, coord_clip=None, l2_clip=1.0)
    y = enc.clip([1e200, 1e200])
    np.testing.assert_allclose(y, [math.sqrt(0.5), math.sqrt(0.5)], rtol=1e-12)


def test_l2_only_clip_respects_max_abs_encoded() -> None:
    enc = FixedPointEncoding(frac_bits=24, coord_clip=None, l2_clip=3.0)
    x = [189.05849255410402]
    assert abs(float(enc.clip(x)[0])) <= enc.max_abs_coordinate
    v = enc.encode(x, AlwaysUp())  # type: ignore[arg-type]
    assert abs(signed_ints(v)[0]) <= enc.max_abs_encoded


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("x", "index"),
    [
        ([0.0, 1.0, float("nan")], 2),
        ([float("inf")], 0),
        ([1.0, 2.0, 3.0, float("-inf")], 3),
        ([1.0, float("nan"), float("inf")], 1),
    ],
)
def test_non_finite_raises_with_index(x: list[float], index: int) -> None:
    enc = FixedPointEncoding()
    with pytest.raises(EncodingError, match=rf"\bindex {index}\b"):
        enc.encode(x, np.random.default_rng(0))


@pytest.mark.parametrize("x", [[[1.0, 2.0], [3.0, 4.0]], 1.5, [[1.0]]])
def test_not_one_dimensional_raises(x: object) -> None:
    enc = FixedPointEncoding()
    shape = np.shape(x)
    with pytest.raises(EncodingError, match=re.escape(str(shape))):
        enc.encode(x, np.random.default_rng(0))  # type: ignore[arg-type]


@pytest.mark.parametrize("frac_bits", [-1, 41, 1.5, "24", None])
def test_frac_bits_out_of_range(frac_bits: object) -> None:
    with pytest.raises(ConfigError) as err:
        FixedPointEncoding(frac_bits=frac_bits)  # type: ignore[arg-type]
    assert err.value.path == "encoding.frac_bits"
    assert repr(frac_bits) in str(err.value)


@pytest.mark.parametrize("frac_bits", [0, 40])
def test_frac_bits_limits_accepted(frac_bits: int) -> None:
    assert FixedPointEncoding(frac_bits=frac_bits, coord_clip=1.0).frac_bits == frac_bits


def test_no_clip_set() -> None:
    with pytest.raises(ConfigError) as err:
        FixedPointEncoding(coord_clip=None, l2_clip=None)
    assert err.value.path == "encoding"


@pytest.mark.parametrize("name", ["coord_clip", "l2_clip"])
@pytest.mark.parametrize("value", [0, 0.0, -1.0, float("nan"), float("inf"), "1"])
def test_bad_clip(name: str, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        FixedPointEncoding(**{name: value})  # type: ignore[arg-type]
    assert err.value.path == f"encoding.{name}"


def test_float_exactness_bound() -> None:
    # 4096 * 2**40 = 2**52: float64 could no longer represent every half-unit.
    with pytest.raises(ConfigError) as err:
        FixedPointEncoding(frac_bits=40, coord_clip=4096.0)
    assert err.value.path == "encoding.frac_bits"
    FixedPointEncoding(frac_bits=40, coord_clip=4095.0)


# --------------------------------------------------------------------------- headroom


CONFIGS = [
    FixedPointEncoding(frac_bits=24, coord_clip=1000.0),
    FixedPointEncoding(frac_bits=20, coord_clip=0.3),
    FixedPointEncoding(frac_bits=16, coord_clip=None, l2_clip=7.25),
    FixedPointEncoding(frac_bits=40, coord_clip=3000.0, l2_clip=5000.0),
    FixedPointEncoding(frac_bits=0, coord_clip=1.0),
]


def ref_max_abs_encoded(enc: FixedPointEncoding) -> int:
    bounds = [b for b in (enc.coord_clip, enc.l2_clip) if b is not None]
    return math.ceil(Fraction(min(bounds)) * 2**enc.frac_bits)


def ref_limit(enc: FixedPointEncoding) -> int:
    """Smallest max_clients whose worst case reaches p // 2."""
    mae = ref_max_abs_encoded(enc)
    return -(-HALF_REF // mae)


@pytest.mark.parametrize("enc", CONFIGS)
def test_max_abs_encoded(enc: FixedPointEncoding) -> None:
    assert enc.max_abs_encoded == ref_max_abs_encoded(enc)


@pytest.mark.parametrize("enc", CONFIGS)
def test_check_headroom_exact_boundary(enc: FixedPointEncoding) -> None:
    limit = ref_limit(enc)
    mae = ref_max_abs_encoded(enc)
    assert (limit - 1) * mae < HALF_REF <= limit * mae
    enc.check_headroom(limit - 1)
    enc.check_headroom(1)
    with pytest.raises(ConfigError) as err:
        enc.check_headroom(limit)
    assert err.value.path == "rounds.max_clients"
    assert str(limit) in str(err.value)
    with pytest.raises(ConfigError) as err:
        enc.check_headroom(limit, path="topology.rounds.max_clients")
    assert err.value.path == "topology.rounds.max_clients"


@pytest.mark.parametrize("enc", CONFIGS)
def test_check_headroom_noise_tail_boundary(enc: FixedPointEncoding) -> None:
    n = ref_limit(enc) - 1
    room = HALF_REF - n * ref_max_abs_encoded(enc)  # > 0
    enc.check_headroom(n, noise_tail=room - 1)
    with pytest.raises(ConfigError):
        enc.check_headroom(n, noise_tail=room)


def test_sum_at_largest_accepted_max_clients_does_not_wrap() -> None:
    """Sum n worst-case vectors with the real field code, n the largest accepted max_clients.

    3000 * 2**40 per coordinate gives a limit of 350 clients; at 349 the sum decodes exactly,
    and at 350 (refused by check_headroom) it would really wrap around: the check is tight.
    """
    enc = FixedPointEncoding(frac_bits=40, coord_clip=3000.0)
    limit = ref_limit(enc)
    assert limit == 350
    n = limit - 1
    enc.check_headroom(n)
    rng, _ = fresh_rng()
    x = np.array([3000.0, -3000.0, 2999.5, -2999.5, 0.0, 1e9, -1e9])  # 1e9 clips to 3000
    one = enc.encode(x, rng)  # exact: every coordinate is a multiple of 2**-40
    total = field.sum_vectors([one] * n)
    acc = Accumulator(x.size)
    for _ in range(n):
        acc.add(one)
    assert np.array_equal(total, acc.value())
    expected_units = [n * w for w in signed_ints(one)]
    assert signed_ints(total) == expected_units
    assert signed_ints(total)[0] == n * 3000 * 2**40
    assert list(enc.decode(total)) == [
        n * 3000.0,
        -n * 3000.0,
        n * 2999.5,
        -n * 2999.5,
        0.0,
        n * 3000.0,
        -n * 3000.0,
    ]
    # One more client and the worst case passes p/2: the decoded sum has the wrong sign.
    over = field.sum_vectors([one] * limit)
    assert enc.decode(over)[0] < 0


def test_decode_of_random_sums_at_limit() -> None:
    enc = FixedPointEncoding(frac_bits=40, coord_clip=3000.0)
    n = ref_limit(enc) - 1
    rng, seed = fresh_rng()
    xs = rng.uniform(-3000.0, 3000.0, size=(n, 5))
    xs[:, 0] = 3000.0  # keep one coordinate at the worst case
    encoded = [enc.encode(row, rng) for row in xs]
    got = enc.decode(field.sum_vectors(encoded))
    exact = [sum(Fraction(float(a)) for a in col) for col in xs.T]
    for g, e in zip(got, exact, strict=True):
        assert abs(Fraction(float(g)) - e) <= n * Fraction(1, 2**40) + abs(e) * Fraction(
            1, 2**50
        ), seed
