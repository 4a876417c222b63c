"""Integer noise samplers for the distributed Skellam mechanism (DESIGN.md, "DP mechanisms").

Noise is integer-valued from the start, so no floating-point noise value ever reaches an
output (Mironov 2012, "On significance of the least significant bits for differential
privacy"). Randomness is a parameter: production code passes :func:`noise_rng`; a seeded
generator appears only when a test passes one in.
"""

from __future__ import annotations

import math
import secrets

import numpy as np
import numpy.typing as npt

from mpc_agg.errors import UsageError

#: Largest Skellam parameter accepted: far beyond any useful noise (its standard deviation
#: would be about 2**31 times the p/2 = 2**60 headroom), and well inside numpy's Poisson limit.
MAX_MU = 2.0**120

_LOG_MARGIN = 1e-9  # relative slack on the tail exponent, for floating-point rounding


def noise_rng() -> np.random.Generator:
    """A PCG64 generator seeded with 256 bits from the OS CSPRNG (``secrets``).

    PCG64 is not a cryptographic generator; its seed is, and the noise stays secret to the
    aggregator that drew it. Each call returns an independent generator.
    """
    return np.random.Generator(np.random.PCG64(secrets.randbits(256)))


def _check_mu(mu: float) -> float:
    if isinstance(mu, bool) or not isinstance(mu, (int, float, np.integer, np.floating)):
        raise UsageError(f"mu must be a finite number in [0, {MAX_MU:.3g}], got {mu!r}")
    m = float(mu)
    if not (math.isfinite(m) and 0.0 <= m <= MAX_MU):
        raise UsageError(f"mu must be a finite number in [0, {MAX_MU:.3g}], got {mu!r}")
    return m


def sample_skellam(mu: float, size: int, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """``size`` independent draws of ``Sk(mu, mu) = Poisson(mu) - Poisson(mu)`` (int64).

    Mean 0, variance ``2 * mu``; ``mu == 0`` gives zeros. Skellam is closed under addition,
    so the sum of ``k`` parties' ``Sk(mu_i, mu_i)`` is ``Sk(sum mu_i, sum mu_i)``.

    Known limitation: numpy's Poisson sampler is exact in distribution only up to floating
    point. For ``mu >= 10`` it is Hörmann's PTRS transformed-rejection method, which
    computes with float64 internally, so its output distribution is an approximation of
    Poisson(mu) whose error is not quantified. The outputs themselves are integers, so the
    attack of Mironov 2012 on floating-point noise *values* does not apply; an exact
    sampler (e.g. Duchon, Duvignau 2016) would remove the approximation.
    """
    m = _check_mu(mu)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
        raise UsageError(f"size must be an integer >= 0, got {size!r}")
    if m == 0.0:
        return np.zeros(int(size), dtype=np.int64)
    plus = rng.poisson(m, int(size)).astype(np.int64, copy=False)
    minus = rng.poisson(m, int(size)).astype(np.int64, copy=False)
    return plus - minus


def _log_tail(mu: float, t: float) -> float:
    """``-log`` of the Chernoff bound on ``P(Sk(mu, mu) >= t)``: ``2 mu h(t / (2 mu))``."""
    u = t / (2.0 * mu)
    # h(u) = u asinh(u) - (sqrt(1 + u^2) - 1), the second term written without cancellation.
    h = u * math.asinh(u) - u * u / (math.sqrt(1.0 + u * u) + 1.0)
    return 2.0 * mu * h


def skellam_tail_bound(mu: float, d: int, failure: float = 2.0**-64) -> int:
    """An integer ``T`` with ``P(max_i |X_i| > T) <= failure`` for ``d`` i.i.d. ``X_i ~
    Sk(mu, mu)``: the bound on one aggregator's (or the total) noise for the overflow check.

    Chernoff bound from the exact moment generating function ``E exp(λX) = exp(2 mu (cosh λ
    - 1))``: with ``λ = asinh(t / (2 mu))``, ``P(X >= t) <= exp(-2 mu h(t / (2 mu)))`` where
    ``h(u) = u asinh(u) - sqrt(1 + u²) + 1`` (about ``exp(-t²/(4 mu))``, the Gaussian tail,
    for ``t << mu``). By symmetry and a union bound over ``d`` coordinates and two signs,
    ``P(max_i |X_i| >= t) <= 2 d exp(-2 mu h(t / (2 mu)))``. Returns the smallest ``T >= 0``
    for which this bound at ``t = T + 1`` is ``<= failure``; ``mu == 0`` gives 0.
    """
    m = _check_mu(mu)
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
        raise UsageError(f"d must be an integer >= 1, got {d!r}")
    if isinstance(failure, bool) or not isinstance(failure, (int, float)) or not 0 < failure < 1:
        raise UsageError(f"failure must be a probability in (0, 1), got {failure!r}")
    if m == 0.0:
        return 0
    need = math.log(2.0 * int(d) / failure) * (1.0 + _LOG_MARGIN)

    def ok(t: int) -> bool:  # the bound on P(max |X_i| >= t) is <= failure
        return _log_tail(m, float(t)) >= need

    lo, hi = 0, 1  # invariant once bracketed: not ok(lo), ok(hi)
    while not ok(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi - 1
