"""The exact discrete Gaussian sampler: shape against the exact pmf, moments, parity in the
tails at large sigma (numpy's Poisson failed there), the exact-decision path, overflow.

Each statistical check uses a fresh key (printed in the failure message, to reproduce).
Chi-square tests fail a correct sampler with probability P_MIN = 1e-6 each; moment and
parity checks use two-sided bounds of Z = 6 standard errors (normal approximation),
a false-failure rate of 2 * Phi(-6) = 2e-9 each. With about 30 such checks, the whole file
fails a correct sampler with probability below 4e-5.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from mpc_agg.dp import discrete_gaussian as dg
from mpc_agg.dp.discrete_gaussian import (
    MAX_SIGMA2,
    NoiseStream,
    SamplerOverflow,
    bernoulli,
    bernoulli_exp_minus_one,
    bernoulli_exp_neg,
    gaussian_tail_bound,
    sample_discrete_gaussian,
    sample_discrete_laplace,
)

N = 200_000
Z = 6.0
P_MIN = 1e-6


def fresh() -> tuple[NoiseStream, str]:
    key = os.urandom(32)
    return NoiseStream(key), key.hex()


def gaussian_pmf(sigma2: float, ks: np.ndarray) -> np.ndarray:
    """Exact (to float precision) pmf of N_Z(0, sigma2) at ``ks``."""
    span = int(math.ceil(40 * math.sqrt(sigma2))) + 10
    support = np.arange(-span, span + 1, dtype=np.float64)
    norm = np.exp(-(support**2) / (2 * sigma2)).sum()
    return np.exp(-(ks.astype(np.float64) ** 2) / (2 * sigma2)) / norm


def chi_square_p(x: np.ndarray, pmf) -> float:
    """p-value of a chi-square goodness-of-fit test of integer draws ``x`` against ``pmf``.

    Cells: every k with expected count >= 5, each tail merged into the outermost kept cell
    on its side (so no cell expects fewer than 5 draws: with a separate tail cell expecting
    0.3 draws, the chi-square approximation failed a correct sampler about 2.5e-4 of the
    time, far above ``P_MIN``)."""
    n = x.size
    k = 0
    while n * pmf(np.array([k + 1]))[0] >= 5:
        k += 1
    ks = np.arange(-k, k + 1)
    expected = n * pmf(ks)
    observed = np.array([(x == j).sum() for j in ks], dtype=np.float64)
    tail = n * (1.0 - pmf(ks).sum()) / 2
    if k > 0:
        observed[0] += float((x < -k).sum())
        observed[-1] += float((x > k).sum())
        expected[0] += tail
        expected[-1] += tail
    else:  # one central cell: the two tails are cells of their own (each expects >= 5)
        observed = np.concatenate([observed, [float((x < 0).sum()), float((x > 0).sum())]])
        expected = np.concatenate([expected, [tail, tail]])
    stat = float(((observed - expected) ** 2 / expected).sum())
    return float(stats.chi2.sf(stat, expected.size - 1))


# --------------------------------------------------------------------------- shape


@pytest.mark.parametrize("sigma2", [1, 2, 7, 50])
def test_shape_matches_the_exact_pmf(sigma2: int) -> None:
    stream, key = fresh()
    x = sample_discrete_gaussian(sigma2, N, stream)
    assert x.dtype == np.int64 and x.shape == (N,)
    p = chi_square_p(x, lambda ks: gaussian_pmf(sigma2, ks))
    assert p > P_MIN, f"key={key} p={p}"


def test_shape_is_exact_also_when_every_decision_goes_the_exact_way(monkeypatch) -> None:
    # A guard band of relative width 1/2 sends most Bernoulli trials to the exact
    # integer path: the distribution must not change.
    monkeypatch.setattr(dg, "GUARD", 0.5)
    stream, key = fresh()
    x = sample_discrete_gaussian(3, 40_000, stream)
    p = chi_square_p(x, lambda ks: gaussian_pmf(3, ks))
    assert p > P_MIN, f"key={key} p={p}"


def test_discrete_laplace_shape() -> None:
    stream, key = fresh()
    t = 3
    x = sample_discrete_laplace(t, N, stream)

    def pmf(ks: np.ndarray) -> np.ndarray:
        c = (1 - math.exp(-1 / t)) / (1 + math.exp(-1 / t))
        return c * np.exp(-np.abs(ks) / t)

    assert chi_square_p(x, pmf) > P_MIN, f"key={key}"


# --------------------------------------------------------------------------- moments


@pytest.mark.parametrize("sigma2", [10**4, 2**40, MAX_SIGMA2])
def test_mean_zero_and_variance_sigma2_at_large_sigma(sigma2: int) -> None:
    stream, key = fresh()
    x = sample_discrete_gaussian(sigma2, N, stream).astype(np.float64)
    # Mean: standard error sqrt(sigma2 / N). Sample variance of a (near) Gaussian: relative
    # standard error sqrt(2 / N).
    assert abs(x.mean()) <= Z * math.sqrt(sigma2 / N), f"key={key}"
    ratio = float(np.var(x, ddof=1)) / sigma2
    assert abs(ratio - 1) <= Z * math.sqrt(2 / N), f"key={key} var/sigma2={ratio}"


@pytest.mark.parametrize("sigma2", [2**40, MAX_SIGMA2])
def test_tail_draws_are_not_biased_in_parity(sigma2: int) -> None:
    # numpy's Poisson above 2^52 gave 89-95 % even draws beyond 2 sigma.
    stream, key = fresh()
    x = sample_discrete_gaussian(sigma2, 2 * N, stream)
    tail = x[np.abs(x) > 2 * math.sqrt(sigma2)]
    n = tail.size
    assert n > 10_000
    even = int((tail % 2 == 0).sum())
    assert abs(even - n / 2) <= Z * math.sqrt(n / 4), f"key={key} {even} even of {n}"
    # The low two bits are uniform over the whole sample too.
    counts = np.bincount((x & 3).astype(np.int64), minlength=4)
    assert stats.chisquare(counts).pvalue > P_MIN, f"key={key} {counts}"


def test_tail_frequency_matches_the_gaussian() -> None:
    sigma2 = 2**50
    stream, key = fresh()
    x = sample_discrete_gaussian(sigma2, N, stream)
    beyond = int((np.abs(x) > 3 * math.sqrt(sigma2)).sum())
    p = 2 * stats.norm.sf(3)  # exact to within 1e-10 relative at this sigma
    assert abs(beyond - N * p) <= Z * math.sqrt(N * p * (1 - p)), f"key={key} {beyond}"


# --------------------------------------------------------------------------- exact steps


def test_bernoulli_settles_ties_exactly(monkeypatch) -> None:
    # With a guard of 1, every trial goes to the integer path; P = 1/3 exactly.
    monkeypatch.setattr(dg, "GUARD", 1.0)
    stream, key = fresh()
    n = 60_000
    calls = []

    def exact(i: int) -> tuple[int, int]:
        calls.append(i)
        return 1, 3

    yes = bernoulli(stream, np.full(n, 1 / 3), exact)
    assert len(calls) > n / 2
    assert abs(yes.sum() - n / 3) <= Z * math.sqrt(n * 2 / 9), f"key={key}"


def test_bernoulli_extremes() -> None:
    stream = NoiseStream(bytes(32))
    assert not bernoulli(stream, np.zeros(1000), lambda i: (0, 1)).any()
    assert bernoulli(stream, np.ones(1000), lambda i: (1, 1)).all()


def test_exp_minus_one_threshold_is_exact() -> None:
    lo, hi = dg._exp_minus_one_bounds(30)
    assert lo < hi and hi - lo < Fraction(1, 2**100)
    assert float(lo) == pytest.approx(math.exp(-1), rel=1e-15)
    assert math.floor(lo * 2**53) == math.floor(hi * 2**53) == dg._E1_53
    assert dg._settle_exp_minus_one(NoiseStream(bytes(32)), dg._E1_53 - 1) is True
    assert dg._settle_exp_minus_one(NoiseStream(bytes(32)), dg._E1_53 + 1) is False


def test_bernoulli_exp_minus_one_and_algorithm_one_rates() -> None:
    stream, key = fresh()
    n = N
    p = math.exp(-1)
    got = int(bernoulli_exp_minus_one(stream, n).sum())
    assert abs(got - n * p) <= Z * math.sqrt(n * p * (1 - p)), f"key={key}"
    # Algorithm 1 at q = 3/4 (a = 3, c = 4): P = exp(-3/4).
    q = math.exp(-0.75)
    got = int(bernoulli_exp_neg(stream, np.full(n, 3, dtype=np.int64), 1, 4).sum())
    assert abs(got - n * q) <= Z * math.sqrt(n * q * (1 - q)), f"key={key}"


def test_uniform_below_is_uniform() -> None:
    stream, key = fresh()
    x = stream.below(7, N)
    assert x.min() >= 0 and x.max() < 7
    assert stats.chisquare(np.bincount(x, minlength=7)).pvalue > P_MIN, f"key={key}"


# --------------------------------------------------------------------------- limits


def test_overflow_fails_instead_of_drawing_inexactly() -> None:
    stream = NoiseStream(bytes(32))
    with pytest.raises(SamplerOverflow, match="nothing was drawn"):
        sample_discrete_laplace(5, 10_000, stream, max_geometric=0)


@pytest.mark.parametrize("sigma2", [0, -1, MAX_SIGMA2 + 1, 2.5, True, "4"])
def test_out_of_range_variance_is_refused(sigma2) -> None:
    with pytest.raises(ValueError, match="sigma2"):
        sample_discrete_gaussian(sigma2, 3, NoiseStream())


def test_stream_is_deterministic_under_a_key_and_hides_it() -> None:
    a = sample_discrete_gaussian(10**6, 1000, NoiseStream(b"k" * 32))
    b = sample_discrete_gaussian(10**6, 1000, NoiseStream(b"k" * 32))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, sample_discrete_gaussian(10**6, 1000, NoiseStream()))
    assert "k" * 8 not in repr(NoiseStream(b"k" * 32))
    with pytest.raises(ValueError, match="32 bytes"):
        NoiseStream(b"short")


def test_zero_size() -> None:
    assert sample_discrete_gaussian(4, 0, NoiseStream()).shape == (0,)


def test_tail_bound_holds_and_grows() -> None:
    stream, key = fresh()
    sigma2 = 3 * 10**6  # three parties' noise summed
    d = 100_000
    x = sum(sample_discrete_gaussian(10**6, d, stream) for _ in range(3))
    assert int(np.abs(x).max()) <= gaussian_tail_bound(sigma2, d), f"key={key}"
    assert gaussian_tail_bound(0, 10) == 0
    assert gaussian_tail_bound(1e4, 10) < gaussian_tail_bound(1e4, 10**6)
    assert gaussian_tail_bound(1e4, 10, 1e-3) < gaussian_tail_bound(1e4, 10, 1e-9)
    with pytest.raises(ValueError, match="d must"):
        gaussian_tail_bound(1.0, 0)


def reference_decision(key: bytes, head: int, num: int, den: int) -> bool:
    """``U < num / den`` with ``U = (head + V) / 2**53``, V's bits read from the same
    keystream, decided with Fractions once U's interval lies on one side."""
    words = NoiseStream(key)
    p = Fraction(num, den)
    lo, width = Fraction(head, 2**53), Fraction(1, 2**53)
    for _ in range(20):
        if lo + width <= p:
            return True
        if lo >= p:
            return False
        (b,) = words.words(1).tolist()
        width /= 2**64
        lo += b * width
    raise AssertionError("undecided after 20 words")


@pytest.mark.parametrize("case", range(200))
def test_exact_settlement_agrees_with_rational_arithmetic(case: int) -> None:
    rng = np.random.default_rng(case)
    den = int(rng.integers(1, 2**62)) * int(rng.integers(1, 2**40)) + 1  # up to 2**102
    num = int(rng.integers(0, 2**62)) * den // 2**62  # in [0, den)
    boundary = num * 2**53 // den  # the head whose interval holds num / den
    head = boundary + int(rng.integers(-1, 2))  # on, just below or just above it
    head = min(max(head, 0), 2**53 - 1)
    key = rng.bytes(32)
    got = dg._settle_exactly(NoiseStream(key), head, num, den)
    assert got == reference_decision(key, head, num, den)


def test_exact_settlement_of_an_exact_dyadic_boundary() -> None:
    # p = 1/2 exactly and head = 2**52: U >= 1/2 whatever the further bits.
    assert dg._settle_exactly(NoiseStream(bytes(32)), 2**52, 1, 2) is False
    assert dg._settle_exactly(NoiseStream(bytes(32)), 2**52 - 1, 1, 2) is True


@pytest.mark.parametrize("case", range(50))
def test_exact_settlement_that_needs_several_further_words(case: int) -> None:
    # p agrees with U on its first 53 + 64 bits, so the second extra word decides.
    rng = np.random.default_rng(1000 + case)
    key = rng.bytes(32)
    head = int(rng.integers(0, 2**53))
    (b1,) = NoiseStream(key).words(1).tolist()
    num, den = 3 * (head * 2**64 + b1) + int(rng.integers(1, 3)), 3 * 2**117
    got = dg._settle_exactly(NoiseStream(key), head, num, den)
    assert got == reference_decision(key, head, num, den)
