"""Skellam sampler and tail bound: moments, shape, tails, validation.

Statistical checks use a fresh seed per run (in the failure message, to reproduce) and a
two-sided bound of 6 standard errors, so a correct sampler fails each of them with
probability about 2 * Phi(-6) = 2e-9 (normal approximation of the sample mean and variance,
n = 200_000). The chi-square shape test fails a correct sampler with probability 1e-6.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from scipy import stats

from mpc_agg.dp.mechanisms import MAX_MU, noise_rng, sample_skellam, skellam_tail_bound
from mpc_agg.errors import UsageError

N = 200_000
Z = 6.0  # standard errors; two-sided false-failure rate 2 * Phi(-6) ~ 2e-9 per check
P_MIN = 1e-6  # chi-square p-value threshold: false-failure rate 1e-6


def fresh_rng() -> tuple[np.random.Generator, int]:
    seed = int.from_bytes(os.urandom(8), "little")
    return np.random.default_rng(seed), seed


# --------------------------------------------------------------------------- moments


@pytest.mark.parametrize("mu", [0.5, 10.0, 1e4, 1e7])
def test_mean_zero_and_variance_two_mu(mu: float) -> None:
    rng, seed = fresh_rng()
    x = sample_skellam(mu, N, rng)
    assert x.dtype == np.int64 and x.shape == (N,)
    var = 2.0 * mu
    # Mean: standard error sqrt(var / n).
    mean = float(np.mean(x))
    assert abs(mean) <= Z * math.sqrt(var / N), f"seed={seed} mean={mean}"
    # Sample variance: Var(S^2) ~ (mu4 - sigma^4) / n. Sk(mu, mu) has cumulants
    # k2 = k4 = 2 mu (sum of a Poisson's and its negative's), so mu4 = k4 + 3 k2^2
    # = 2 mu + 12 mu^2 and mu4 - sigma^4 = 2 mu + 8 mu^2.
    s2 = float(np.var(x.astype(np.float64), ddof=1))
    se = math.sqrt((2.0 * mu + 8.0 * mu**2) / N)
    assert abs(s2 - var) <= Z * se, f"seed={seed} var={s2} expected {var} +- {Z * se}"


def test_shape_chi_square_mu_3() -> None:
    mu = 3.0
    rng, seed = fresh_rng()
    x = sample_skellam(mu, N, rng)
    dist = stats.skellam(mu, mu)
    # Cells k = -K..K and the two pooled tails, each with expected count >= 5.
    k_max = 0
    while N * dist.pmf(k_max + 1) >= 5.0 and N * dist.sf(k_max + 1) >= 5.0:
        k_max += 1
    ks = np.arange(-k_max, k_max + 1)
    expected = np.concatenate(([dist.cdf(-k_max - 1)], dist.pmf(ks), [dist.sf(k_max)])) * N
    observed = np.concatenate(
        ([np.sum(x < -k_max)], [np.sum(x == k) for k in ks], [np.sum(x > k_max)])
    )
    assert np.all(expected >= 5.0)
    expected *= N / expected.sum()  # pmf rounding: the totals must match exactly
    p = stats.chisquare(observed, expected).pvalue
    assert p > P_MIN, f"seed={seed} p={p}"


def test_mu_zero_gives_zeros() -> None:
    x = sample_skellam(0.0, 1000, np.random.default_rng(1))
    assert x.dtype == np.int64 and not np.any(x)
    assert sample_skellam(0, 0, np.random.default_rng(1)).shape == (0,)


def test_integer_dtype_and_reproducible_with_a_seeded_generator() -> None:
    a = sample_skellam(1e6, 100, np.random.default_rng(7))
    b = sample_skellam(1e6, 100, np.random.default_rng(7))
    assert a.dtype == np.int64
    assert np.array_equal(a, b)


def test_noise_rng_is_pcg64_and_fresh_each_call() -> None:
    g1, g2 = noise_rng(), noise_rng()
    assert isinstance(g1.bit_generator, np.random.PCG64)
    assert not np.array_equal(g1.integers(0, 2**62, 4), g2.integers(0, 2**62, 4))


# --------------------------------------------------------------------------- tail bound


@pytest.mark.parametrize("mu", [0.5, 3.0, 1e4, 1e7])
def test_empirical_max_of_a_million_stays_below_the_tail_bound(mu: float) -> None:
    d = 10**6
    rng, seed = fresh_rng()
    t = skellam_tail_bound(mu, d)
    peak = int(np.max(np.abs(sample_skellam(mu, d, rng))))
    assert peak <= t, f"seed={seed} max |x| = {peak} > bound {t}"


def test_tail_bound_is_not_absurd() -> None:
    mu, d = 1e4, 10**6
    sigma = math.sqrt(2 * mu)
    t = skellam_tail_bound(mu, d)
    # 2 d exp(-t^2 / (2 sigma^2)) = 2^-64 gives t ~ 10.85 sigma for a Gaussian.
    assert 10 * sigma < t < 20 * sigma


@pytest.mark.parametrize("mu", [0.5, 3.0, 100.0, 1e4])
@pytest.mark.parametrize("failure", [1e-3, 1e-6])
def test_tail_bound_against_the_exact_skellam_tail(mu: float, failure: float) -> None:
    t = skellam_tail_bound(mu, 1, failure)
    # Sound: the exact two-sided tail P(|X| > T) is at most the allowed failure.
    assert 2 * stats.skellam.sf(t, mu, mu) <= failure
    # Not loose: within 30 % of the exact quantile (Chernoff loses a polynomial factor).
    assert t <= 1.3 * stats.skellam.isf(failure / 2, mu, mu)


def test_tail_bound_monotone_and_zero_for_mu_zero() -> None:
    assert skellam_tail_bound(0.0, 10**6) == 0
    assert skellam_tail_bound(1e4, 10) < skellam_tail_bound(1e4, 10**6)
    assert skellam_tail_bound(1e4, 10) < skellam_tail_bound(4e4, 10)
    assert skellam_tail_bound(1e4, 10, 1e-3) < skellam_tail_bound(1e4, 10, 1e-9)
    assert isinstance(skellam_tail_bound(1e4, 10), int)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("mu", [-1.0, math.nan, math.inf, 2 * MAX_MU, "3", True])
def test_bad_mu_names_the_parameter(mu: object) -> None:
    with pytest.raises(UsageError, match=r"^mu must be"):
        sample_skellam(mu, 3, np.random.default_rng(0))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"^mu must be"):
        skellam_tail_bound(mu, 3)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [-1, 2.0, None])
def test_bad_size_names_the_parameter(size: object) -> None:
    with pytest.raises(UsageError, match=r"^size must be"):
        sample_skellam(1.0, size, np.random.default_rng(0))  # type: ignore[arg-type]


def test_bad_tail_arguments_name_the_parameter() -> None:
    with pytest.raises(UsageError, match=r"^d must be"):
        skellam_tail_bound(1.0, 0)
    for failure in (0.0, 1.0, -0.5):
        with pytest.raises(UsageError, match=r"^failure must be"):
            skellam_tail_bound(1.0, 10, failure)
