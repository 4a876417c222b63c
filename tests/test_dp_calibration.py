"""Noise calibration: sensitivities, RDP formulas, calibrated scales, cross-checks, errors.

The Gaussian reference is cross-checked against Google's ``dp-accounting`` RDP accountant
(a separate implementation of the Gaussian RDP curve) and, as a sanity bound only, against
the analytic Gaussian mechanism of Balle, Wang 2018, which is exact and so never needs more
noise than RDP.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import GaussianDpEvent
from dp_accounting.rdp import RdpAccountant
from scipy import optimize, stats

from mpc_agg.core.encoding import FixedPointEncoding
from mpc_agg.core.field import to_signed
from mpc_agg.dp.calibration import (
    ORDERS,
    SKELLAM_ORDERS,
    calibrate_gaussian,
    calibrate_skellam,
    epsilon,
    gaussian_rdp,
    sensitivities,
    skellam_rdp,
)
from mpc_agg.dp.checks import ParameterError

DELTA = 1e-5


def skellam_eps(mu: float, d1: float, d2: float, delta: float) -> float:
    return epsilon(SKELLAM_ORDERS, skellam_rdp(mu, d1, d2), delta)


def gaussian_eps(sigma: float, d2: float, delta: float) -> float:
    return epsilon(ORDERS, gaussian_rdp(sigma, d2), delta)


def analytic_gaussian_sigma(eps: float, delta: float, d2: float) -> float:
    """Balle, Wang 2018 (arXiv:1805.06530), Theorem 8: N(0, s^2) is (eps, delta)-DP iff
    Phi(d2/(2s) - eps s/d2) - e^eps Phi(-d2/(2s) - eps s/d2) <= delta; the root in s."""

    def excess(log_s: float) -> float:
        s = math.exp(log_s)
        a, b = d2 / (2 * s), eps * s / d2
        return stats.norm.cdf(a - b) - math.exp(eps + stats.norm.logcdf(-a - b)) - delta

    return math.exp(optimize.brentq(excess, math.log(d2) - 10, math.log(d2) + 10, xtol=1e-12))


# --------------------------------------------------------------------------- grid, sensitivity


def test_orders_grid() -> None:
    assert list(ORDERS) == sorted(set(ORDERS))
    assert {1.1, 1.9, 2.0, 64.0, 1024.0} <= set(ORDERS)
    assert all(float(o).is_integer() and o >= 2 for o in SKELLAM_ORDERS)
    assert len(SKELLAM_ORDERS) == 63 + 6  # 2..64, then 80, 96, 128, 256, 512, 1024


def test_sensitivities_formula() -> None:
    # delta2 = 1 * 2**8 + sqrt(10_000) = 356; delta1 = min(356**2, 100 * 356) = 35_600.
    assert sensitivities(1.0, 8, 10_000) == (35_600.0, 356.0)
    # delta2 = 0.5 * 2**16 + sqrt(1e6) = 33_768; delta1 = 1000 * 33_768.
    assert sensitivities(0.5, 16, 10**6) == (33_768_000.0, 33_768.0)
    # Tiny clip and d = 1: delta2 = 1 + 2**-10 and delta1 = min(delta2**2, delta2) = delta2.
    d1, d2 = sensitivities(2.0**-10, 0, 1)
    assert d2 == 1 + 2.0**-10 and d1 == d2


def test_sensitivities_bound_real_encodings() -> None:
    d, frac_bits = 1000, 8
    enc = FixedPointEncoding(frac_bits=frac_bits, coord_clip=None, l2_clip=1.0)
    d1, d2 = sensitivities(1.0, frac_bits, d)
    rng = np.random.default_rng(3)
    for scale in (1e-3, 1.0, 1e3):
        for _ in range(20):
            v = to_signed(enc.encode(rng.normal(0, scale, d), rng)).astype(np.float64)
            assert np.linalg.norm(v) <= d2 and np.sum(np.abs(v)) <= d1


# --------------------------------------------------------------------------- RDP formulas


def test_gaussian_rdp_formula() -> None:
    assert np.allclose(gaussian_rdp(2.0, 3.0, [2, 10]), [2 * 9 / 8, 10 * 9 / 8])


def test_skellam_rdp_formula_at_one_order() -> None:
    a, mu, d1, d2 = 5.0, 50.0, 40.0, 7.0
    head = a * d2**2 / (4 * mu)
    tail = min((2 * a * d2**2 + 6 * d1) / (16 * mu**2), 3 * d1 / (4 * mu))
    assert skellam_rdp(mu, d1, d2, [a])[0] == pytest.approx(head + tail, rel=1e-15)


def test_skellam_rdp_non_integer_order_uses_the_next_integer() -> None:
    got = skellam_rdp(10.0, 5.0, 3.0, [1.5, 2.0, 2.5, 3.0])
    assert got[0] == got[1] and got[2] == got[3] and got[1] < got[3]


@pytest.mark.parametrize("d1, d2", [(1.0, 1.0), (1000.0, 100.0), (35_600.0, 356.0)])
def test_skellam_rdp_tends_to_gaussian_at_the_same_variance(d1: float, d2: float) -> None:
    # The excess over the Gaussian is at most ((2a) d2^2 + 6 d1) / (16 mu^2), relative
    # (2a d2^2 + 6 d1) / (4 a mu d2^2) <= 1/(2 mu) + 3 d1 / (4 mu d2^2): < 1 % once mu is
    # 1000 times both d1 and d2^2.
    previous = math.inf
    for mu in (1e3 * max(d1, d2**2), 1e4 * max(d1, d2**2), 1e6 * max(d1, d2**2)):
        sk = skellam_rdp(mu, d1, d2)
        ga = gaussian_rdp(math.sqrt(2 * mu), d2, SKELLAM_ORDERS)
        assert np.all(sk >= ga)  # the Skellam bound is never below the Gaussian curve
        excess = float(np.max((sk - ga) / ga))
        assert excess < 0.01 and excess < previous, (mu, excess)
        previous = excess


# --------------------------------------------------------------------------- calibration


CASES = [
    (0.5, 1e-5, *sensitivities(1.0, 8, 1000)),
    (1.0, 1e-5, 1.0, 1.0),
    (2.0, 1e-6, *sensitivities(1.0, 16, 10**6)),
    (8.0, 1e-3, 10.0, 10.0),
    (30.0, 1e-5, 1.0, 1.0),  # large epsilon: the 3 delta1 / (4 mu) branch matters
]


@pytest.mark.parametrize("eps, delta, d1, d2", CASES)
def test_calibrate_skellam_meets_the_target_tightly(
    eps: float, delta: float, d1: float, d2: float
) -> None:
    mu = calibrate_skellam(eps, delta, d1, d2)
    assert skellam_eps(mu, d1, d2, delta) <= eps
    assert skellam_eps(mu * (1 - 1e-3), d1, d2, delta) > eps
    # Never less noise than the RDP-calibrated Gaussian (bisection tolerance 1e-4 each).
    sigma = calibrate_gaussian(eps, delta, d2)
    assert 2 * mu >= sigma**2 / (1 + 1e-4) ** 2


@pytest.mark.parametrize("eps, delta, d1, d2", CASES)
def test_calibrate_gaussian_meets_the_target_tightly(
    eps: float, delta: float, d1: float, d2: float
) -> None:
    sigma = calibrate_gaussian(eps, delta, d2)
    assert gaussian_eps(sigma, d2, delta) <= eps
    assert gaussian_eps(sigma * (1 - 1e-3), d2, delta) > eps


def test_calibration_is_monotone_in_epsilon_and_delta() -> None:
    d1, d2 = sensitivities(1.0, 8, 10**5)
    mus = [calibrate_skellam(e, DELTA, d1, d2) for e in (0.25, 0.5, 1.0, 2.0, 4.0)]
    assert mus == sorted(mus, reverse=True) and len(set(mus)) == len(mus)
    mus = [calibrate_skellam(1.0, dl, d1, d2) for dl in (1e-9, 1e-7, 1e-5, 1e-3)]
    assert mus == sorted(mus, reverse=True) and len(set(mus)) == len(mus)
    sigmas = [calibrate_gaussian(e, DELTA, d2) for e in (0.25, 0.5, 1.0, 2.0, 4.0)]
    assert sigmas == sorted(sigmas, reverse=True)
    sigmas = [calibrate_gaussian(1.0, dl, d2) for dl in (1e-9, 1e-7, 1e-5, 1e-3)]
    assert sigmas == sorted(sigmas, reverse=True)


@pytest.mark.parametrize("eps, delta, d2", [(0.5, 1e-5, 1.0), (1.0, 1e-5, 356.0), (4.0, 1e-7, 3.0)])
def test_calibrate_gaussian_against_dp_accountings_rdp_accountant(
    eps: float, delta: float, d2: float
) -> None:
    sigma = calibrate_gaussian(eps, delta, d2)
    acc = RdpAccountant(list(ORDERS)).compose(GaussianDpEvent(noise_multiplier=sigma / d2))
    assert acc.get_epsilon(delta) == pytest.approx(eps, rel=1e-3)


@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0, 4.0])
def test_rdp_gaussian_never_below_the_analytic_gaussian(eps: float) -> None:
    sigma = calibrate_gaussian(eps, DELTA, 1.0)
    exact = analytic_gaussian_sigma(eps, DELTA, 1.0)
    # RDP is not tight, so it needs more noise than the exact calibration, but not much.
    assert exact <= sigma <= 1.2 * exact


def test_known_value_epsilon_1_delta_1e5() -> None:
    # 4.05: the sigma (in units of delta2) at which dp-accounting's RDP-to-(eps, delta)
    # conversion (Canonne-Kamath-Steinke) on our ORDERS grid gives epsilon = 1 at delta =
    # 1e-5; computed with dp-accounting 0.6.0. The exact (analytic) Gaussian needs ~3.73.
    assert calibrate_gaussian(1.0, 1e-5, 1.0) == pytest.approx(4.05, rel=5e-3)
    assert calibrate_gaussian(1.0, 1e-5, 10.0) == pytest.approx(40.5, rel=5e-3)
    assert analytic_gaussian_sigma(1.0, 1e-5, 1.0) == pytest.approx(3.73, rel=5e-3)


def test_epsilon_matches_dp_accounting_for_the_gaussian() -> None:
    for sigma in (0.7, 4.0, 30.0):
        acc = RdpAccountant(list(ORDERS)).compose(GaussianDpEvent(noise_multiplier=sigma))
        assert gaussian_eps(sigma, 1.0, DELTA) == pytest.approx(acc.get_epsilon(DELTA))


# --------------------------------------------------------------------------- errors
# Pure functions raise ParameterError (a ValueError naming the argument), never ConfigError:
# only the planning boundary (tests/test_dp_planning.py) maps them to YAML paths.


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, "1", None, True])
def test_bad_epsilon_names_the_parameter(bad: object) -> None:
    with pytest.raises(ParameterError, match=r"^epsilon must be ") as info:
        calibrate_skellam(bad, DELTA, 1.0, 1.0)  # type: ignore[arg-type]
    assert info.value.name == "epsilon"
    with pytest.raises(ParameterError, match=r"^epsilon "):
        calibrate_gaussian(bad, DELTA, 1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0.0, 1.0, -1e-5, 1.5, math.nan, "1e-5"])
def test_bad_delta_names_the_parameter(bad: object) -> None:
    with pytest.raises(ParameterError, match=r"^delta .*got"):
        calibrate_skellam(1.0, bad, 1.0, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match=r"^delta "):
        calibrate_gaussian(1.0, bad, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match=r"^delta "):
        epsilon([2.0], [0.1], bad)  # type: ignore[arg-type]


def test_bad_sensitivities_and_scales_name_the_parameter() -> None:
    with pytest.raises(ParameterError, match=r"^delta1 .*got 0"):
        calibrate_skellam(1.0, DELTA, 0.0, 1.0)
    with pytest.raises(ParameterError, match=r"^delta2 .*got -2"):
        calibrate_skellam(1.0, DELTA, 1.0, -2.0)
    with pytest.raises(ParameterError, match=r"^delta2 "):
        calibrate_gaussian(1.0, DELTA, math.inf)
    with pytest.raises(ParameterError, match=r"^mu "):
        skellam_rdp(0.0, 1.0, 1.0)
    with pytest.raises(ParameterError, match=r"^sigma "):
        gaussian_rdp(-1.0, 1.0)
    with pytest.raises(ParameterError, match=r"^orders "):
        skellam_rdp(1.0, 1.0, 1.0, [1.0, 2.0])
    with pytest.raises(ParameterError, match=r"^rdp must hold one value per order") as info:
        epsilon([2.0, 3.0], [0.1], DELTA)
    assert info.value.name == "rdp"


def test_bad_sensitivity_inputs_name_the_parameter() -> None:
    with pytest.raises(ParameterError, match=r"^l2_clip .*got 0"):
        sensitivities(0.0, 8, 10)
    with pytest.raises(ParameterError, match=r"^frac_bits .*got -1"):
        sensitivities(1.0, -1, 10)
    with pytest.raises(ParameterError, match=r"^frac_bits .*got 8.0"):
        sensitivities(1.0, 8.0, 10)  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match=r"^d .*got 0"):
        sensitivities(1.0, 8, 0)
