"""Noise calibration: how much Skellam (or reference Gaussian) noise meets an (ε, δ) target.

docs/design.md, "Differential privacy". Everything here is a pure function of numbers; an
argument outside its domain raises :class:`~mpc_agg.dp.checks.ParameterError` naming it.
Noise parameters and sensitivities are in *encoded integer units* (one unit =
``2**-frac_bits`` float units) unless a docstring says otherwise. The neighbouring relation
is add/remove one client, so a sensitivity bounds the norm of one client's encoded vector.

Privacy is tracked as Rényi DP (Mironov 2017) on the order grid :data:`ORDERS` and converted
to (ε, δ) with the bound of Canonne, Kamath, Steinke 2020 (Proposition 12 of
arXiv:2004.00010v4), as implemented by Google's ``dp-accounting``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from mpc_agg.dp import checks
from mpc_agg.dp.checks import ParameterError

#: RDP orders: 1.1..1.9 (small orders help only for large ε), every integer 2..64, then a
#: sparse tail for small ε or δ.
ORDERS: tuple[float, ...] = (
    tuple(round(1.0 + k / 10, 1) for k in range(1, 10))
    + tuple(float(a) for a in range(2, 65))
    + (80.0, 96.0, 128.0, 256.0, 512.0, 1024.0)
)

#: The integer orders >= 2 of :data:`ORDERS`: the Skellam RDP theorem is stated for those.
SKELLAM_ORDERS: tuple[float, ...] = tuple(o for o in ORDERS if float(o).is_integer() and o >= 2)

_REL_TOL = 1e-4  # calibration returns a noise scale within this relative distance of optimal
_MAX_DOUBLINGS = 400  # bracket search: 2**400 covers every float ratio that can arise


def sensitivities(l2_clip: float, frac_bits: int, d: int) -> tuple[float, float]:
    """``(delta1, delta2)``: L1 and L2 norm bounds of one client's encoded vector.

    Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private Federated
    Learning", NeurIPS 2021 (arXiv:2110.04995), Section 4 (scaling and randomized rounding):
    the clipped vector has L2 norm ``<= l2_clip`` (float units), so ``l2_clip * 2**frac_bits``
    after scaling; unconditional randomized rounding moves each of the ``d`` coordinates by
    less than one unit, so by the triangle inequality ``delta2 = l2_clip * 2**frac_bits +
    sqrt(d)``. The encoded vector is an integer vector, so ``|v_i| <= v_i**2`` gives
    ``||v||_1 <= delta2**2``, and Cauchy-Schwarz gives ``||v||_1 <= sqrt(d) * delta2``:
    ``delta1 = min(delta2**2, sqrt(d) * delta2)`` (the second is the smaller whenever
    ``delta2 > sqrt(d)``, which always holds here).
    """
    c = checks.positive("l2_clip", l2_clip)
    f = checks.integer("frac_bits", frac_bits, 0)
    root_d = math.sqrt(checks.integer("d", d, 1))
    delta2 = c * 2.0**f + root_d
    delta1 = min(delta2**2, root_d * delta2)
    return delta1, delta2


def skellam_rdp(
    mu: float, delta1: float, delta2: float, orders: Sequence[float] = SKELLAM_ORDERS
) -> npt.NDArray[np.float64]:
    """RDP ε(α) of adding ``Sk(mu, mu) = Poisson(mu) - Poisson(mu)`` to every coordinate.

    The noise has variance ``2 * mu`` per coordinate; ``delta1``, ``delta2`` bound the L1 and
    L2 norms of the (integer) difference between neighbouring sums. Agarwal, Kairouz, Liu 2021
    (arXiv:2110.04995), Theorem 3.5 (multidimensional Skellam), written for variance
    ``2 * mu``, with ``2α`` in place of the paper's ``2α - 1`` (slightly conservative)::

        ε(α) = α Δ2² / (4μ) + min(((2α) Δ2² + 6 Δ1) / (16 μ²), 3 Δ1 / (4μ))

    The theorem holds for integer α > 1. A non-integer order α > 1 is given the bound at
    ``ceil(α)``, which is sound because Rényi divergence is non-decreasing in its order
    (van Erven, Harremoës 2014, Theorem 3). Returns one value per order (nats).
    """
    m = checks.positive("mu", mu)
    d1 = checks.positive("delta1", delta1)
    d2 = checks.positive("delta2", delta2)
    a = np.ceil(checks.orders("orders", orders))
    head = a * d2**2 / (4.0 * m)
    tail = np.minimum((2.0 * a * d2**2 + 6.0 * d1) / (16.0 * m**2), 3.0 * d1 / (4.0 * m))
    return head + tail


def gaussian_rdp(
    sigma: float, delta2: float, orders: Sequence[float] = ORDERS
) -> npt.NDArray[np.float64]:
    """RDP ε(α) = α Δ2² / (2 σ²) of adding N(0, σ²) to every coordinate (Mironov 2017,
    Proposition 7). The reference against which Skellam noise is measured; never sampled."""
    s = checks.positive("sigma", sigma)
    d2 = checks.positive("delta2", delta2)
    return checks.orders("orders", orders) * d2**2 / (2.0 * s**2)


def epsilon(orders: Sequence[float], rdp: npt.ArrayLike, delta: float) -> float:
    """The ε of (ε, δ)-DP implied by RDP values ``rdp`` at ``orders``, for ``delta`` in (0, 1).

    Canonne, Kamath, Steinke 2020 (arXiv:2004.00010, Proposition 12), minimised over the
    orders, via ``dp_accounting.rdp.rdp_privacy_accountant.compute_epsilon``.
    """
    # Imported here, not at module top: dp_accounting pulls in much of scipy (about 1 s),
    # which importing mpc_agg.dp should not cost to code that only samples noise.
    from dp_accounting.rdp import rdp_privacy_accountant

    dl = checks.probability("delta", delta)
    a = checks.orders("orders", orders)
    r = np.asarray(rdp, dtype=np.float64)
    if r.shape != a.shape:
        raise ParameterError(
            "rdp", f"must hold one value per order: {a.size} orders but {r.size} RDP values"
        )
    eps, _ = rdp_privacy_accountant.compute_epsilon(a.tolist(), r.tolist(), dl)
    return float(eps)


# The calibrators' parameter ``epsilon`` (the target) shadows the function of that name.
_epsilon_of = epsilon


def _smallest_scale(eps_of: Callable[[float], float], target: float, guess: float) -> float:
    """Smallest ``x > 0`` (to relative ``_REL_TOL``, rounded up) with ``eps_of(x) <= target``.

    ``eps_of`` must be non-increasing in ``x`` and tend to infinity as ``x -> 0``. Bisection
    on ``log x``; returns the upper end of the final bracket, so the guarantee holds.
    """
    lo = hi = guess
    for _ in range(_MAX_DOUBLINGS):
        if eps_of(hi) <= target:
            break
        lo, hi = hi, hi * 2.0
    else:
        raise ParameterError("epsilon", f"no noise scale meets epsilon={target!r}")
    if lo == hi:  # the guess already meets the target: find a lower end that does not
        for _ in range(_MAX_DOUBLINGS):
            lo = lo / 2.0
            if eps_of(lo) > target:
                break
            hi = lo
        else:
            raise ParameterError("epsilon", f"epsilon={target!r} is met by vanishing noise")
    while hi > lo * (1.0 + _REL_TOL):
        mid = math.sqrt(lo * hi)
        if eps_of(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def _gaussian_guess(eps: float, delta: float, delta2: float) -> float:
    # The classical bound sigma = delta2 * sqrt(2 ln(1.25/delta)) / eps (Dwork, Roth 2014,
    # Theorem A.1): only a starting point for the bracket search.
    return delta2 * math.sqrt(2.0 * math.log(1.25 / delta)) / eps


def calibrate_skellam(epsilon: float, delta: float, delta1: float, delta2: float) -> float:
    """The smallest ``mu`` such that ``Sk(mu, mu)`` noise on every coordinate is
    (``epsilon``, ``delta``)-DP for sensitivities ``delta1``, ``delta2`` (encoded units).

    :func:`skellam_rdp` on :data:`SKELLAM_ORDERS`, converted by :func:`epsilon`; ``mu`` is
    within relative 1e-4 of the smallest such value and never below it. The total noise
    variance is ``2 * mu``; in the distributed mechanism it is the honest parties' sum.
    """
    eps = checks.positive("epsilon", epsilon)
    dl = checks.probability("delta", delta)
    d1 = checks.positive("delta1", delta1)
    d2 = checks.positive("delta2", delta2)

    def eps_of(mu: float) -> float:
        return _epsilon_of(SKELLAM_ORDERS, skellam_rdp(mu, d1, d2), dl)

    return _smallest_scale(eps_of, eps, _gaussian_guess(eps, dl, d2) ** 2 / 2.0)


def calibrate_gaussian(epsilon: float, delta: float, delta2: float) -> float:
    """The smallest ``sigma`` such that N(0, sigma²) noise on every coordinate is
    (``epsilon``, ``delta``)-DP by :func:`gaussian_rdp` on :data:`ORDERS` (within relative
    1e-4, never below). The RDP-calibrated reference for Skellam; not the optimal (analytic)
    Gaussian calibration of Balle, Wang 2018, which is a few percent smaller."""
    eps = checks.positive("epsilon", epsilon)
    dl = checks.probability("delta", delta)
    d2 = checks.positive("delta2", delta2)

    def eps_of(sigma: float) -> float:
        return _epsilon_of(ORDERS, gaussian_rdp(sigma, d2), dl)

    return _smallest_scale(eps_of, eps, _gaussian_guess(eps, dl, d2))


# ------------------------------------------------------------ distributed discrete Gaussian

#: Integer orders >= 2, on which the distributed discrete Gaussian is accounted.
INTEGER_ORDERS: tuple[float, ...] = SKELLAM_ORDERS


def ddg_tau(sigma2: float, n: int) -> float:
    """``tau = 10 sum_{k=1}^{n-1} exp(-2 pi² sigma2 k / (k + 1))``: how far a sum of ``n``
    discrete Gaussians of variance parameter ``sigma2`` is from one discrete Gaussian
    (Kairouz, Liu, Steinke, ICML 2021, arXiv:2102.06387, Theorem 1). Zero for ``n = 1``;
    below ``1e-40`` once ``sigma2 >= 10``."""
    s = checks.positive("sigma2", sigma2)
    count = checks.integer("n", n, 1)
    return 10.0 * sum(math.exp(-2.0 * math.pi**2 * s * k / (k + 1)) for k in range(1, count))


def ddg_rdp(
    sigma2: float,
    n: int,
    delta1: float,
    delta2: float,
    d: int,
    orders: Sequence[float] = INTEGER_ORDERS,
) -> npt.NDArray[np.float64]:
    """RDP ε(α) of the sum of ``n`` independent ``N_Z(0, sigma2)`` noise vectors (one per
    honest aggregator) added to an integer query of L1/L2 sensitivity ``delta1``/``delta2``
    in ``d`` coordinates.

    Kairouz, Liu, Steinke 2021 (arXiv:2102.06387), Theorem 1 with Proposition 14: with
    ``tau`` from :func:`ddg_tau`, ``l2 = delta2 / sqrt(n sigma2)``, ``l1 = delta1 / sqrt(n
    sigma2)``::

        ε(α) = min(α l2² / 2 + tau d,
                   α (l2² + 2 l1 tau + tau² d) / 2,
                   α (l2 + tau sqrt(d))² / 2)

    Requires ``sigma2 >= 1/4``. For ``n = 1`` it is the discrete Gaussian's own bound,
    ``α l2² / 2`` (Canonne, Kamath, Steinke 2020). Returns one value per order (nats).
    """
    s = checks.positive("sigma2", sigma2)
    if s < 0.25:
        raise ParameterError("sigma2", f"must be >= 1/4 for this bound, got {sigma2!r}")
    d1 = checks.positive("delta1", delta1)
    d2 = checks.positive("delta2", delta2)
    dim = checks.integer("d", d, 1)
    tau = ddg_tau(s, n)
    a = checks.orders("orders", orders)
    l2 = d2 / math.sqrt(n * s)
    l1 = d1 / math.sqrt(n * s)
    first = a * l2**2 / 2.0 + tau * dim
    second = a * (l2**2 + 2.0 * l1 * tau + tau**2 * dim) / 2.0
    third = a * (l2 + tau * math.sqrt(dim)) ** 2 / 2.0
    return np.minimum(np.minimum(first, second), third)


def calibrate_ddg(
    epsilon: float, delta: float, delta1: float, delta2: float, d: int, n: int
) -> int:
    """The smallest integer ``sigma2 >= 1`` such that ``n`` honest aggregators each adding
    ``N_Z(0, sigma2)`` make the sum (``epsilon``, ``delta``)-DP (:func:`ddg_rdp` on
    :data:`INTEGER_ORDERS`, converted by :func:`epsilon`); to within relative 1e-4 of the
    smallest real value, rounded up, never below it."""
    eps = checks.positive("epsilon", epsilon)
    dl = checks.probability("delta", delta)

    def eps_of(s: float) -> float:
        return _epsilon_of(INTEGER_ORDERS, ddg_rdp(max(s, 1.0), n, delta1, delta2, d), dl)

    if eps_of(1.0) <= eps:
        return 1
    guess = _gaussian_guess(eps, dl, checks.positive("delta2", delta2)) ** 2 / n
    return max(1, math.ceil(_smallest_scale(eps_of, eps, max(guess, 1.0))))
