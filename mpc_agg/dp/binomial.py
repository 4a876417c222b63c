"""Tight (ε, δ) accounting and calibration of the joint binomial mechanism.

docs/design.md, "Differential privacy" (mechanism ``binomial``): the revealed total (an
integer vector of length ``d``, in encoded units) gets independent noise
``Z_i = Bin(B, 1/2) - B/2`` on every coordinate (``B`` even, variance ``B/4``). Neighbouring
inputs differ by one client's encoded vector ``v``: an integer vector with
``||v||_2 <= delta2``, so ``sum v_i**2 <= floor(delta2**2)``.

Binomial noise has finite support, so its Rényi divergences are infinite and the RDP
machinery of :mod:`mpc_agg.dp.calibration` does not apply. We use privacy loss distributions
(PLDs) instead: Koskela, Jälkö, Honkela 2020 (arXiv:1906.03049); Meiser, Mohammadi 2018
(Privacy Buckets); the implementation is Google's ``dp-accounting``
(``dp_accounting.pld``, notes ``common_docs/Privacy_Loss_Distributions.pdf``), always with
pessimistic rounding, so every ε returned here is an upper bound on the true one. The facts
the reduction relies on, each argued where it is used:

1. The mirror maps ``x -> B + k - x`` and ``x -> B - x`` make the PLD of one coordinate the
   same in both directions (add and remove) and the same for shifts ``k`` and ``-k``
   (:func:`binomial_pld`).
2. Noise is independent across coordinates, so the PLD of a vector shift is the composition
   of the PLDs of its nonzero coordinates (zero coordinates contribute nothing).
3. Dropping a coordinate is post-processing, so adding a part to a multiset of shifts never
   lowers ε(δ): only multisets that cannot take another part 1 need checking
   (:func:`worst_case_shifts`). Monotonicity in the size of a part is *not* assumed.
4. ``Bin(B + 2, 1/2) = Bin(B, 1/2) + Bin(2, 1/2)``: more trials is post-processing (adding
   independent noise), so ε is non-increasing in ``B`` and bisection is exact
   (:func:`calibrate_binomial`).

Privacy losses are in nats; ``trials`` and shifts in encoded integer units. An argument
outside its domain raises :class:`~mpc_agg.dp.checks.ParameterError` naming it; a
sensitivity beyond :data:`MAX_DELTA2` raises its subclass :class:`SensitivityTooLarge`.
scipy (``gammaln``) and dp-accounting are imported where they are used, not at import time.
Compositions and ε go through :mod:`mpc_agg.dp.pld_dense`, which gives dp-accounting's results
bit for bit without its per-entry Python loops.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from mpc_agg.dp import checks, pld_dense
from mpc_agg.dp.calibration import calibrate_gaussian
from mpc_agg.dp.checks import ParameterError

if TYPE_CHECKING:
    from dp_accounting.pld.privacy_loss_distribution import PrivacyLossDistribution

MAX_DELTA2 = 8.0
"""Largest L2 sensitivity (encoded units) the exact accounting accepts: the worst case is
searched over every partition of ``floor(delta2**2) <= 64`` into squares."""

MAX_TRIALS = 2**31
"""Calibration gives up above this many trials per coordinate (far beyond any affordable
round: ``trials * d`` secret bits are generated inside MPC)."""

VALUE_DISCRETIZATION = 1e-4
"""Grid of the discretized privacy loss (nats). Losses are rounded up (pessimistic), so a
PLD composed over ``n`` coordinates overstates ε by less than ``n`` times this."""

LOG_TAIL_MASS = -60.0
"""Outcomes whose (upper) probability is below ``e**-60`` are given infinite privacy loss,
as is the noise mass outside the window of :func:`_window` (bounded by Hoeffding). That mass
is added to δ whole, so it keeps ε an upper bound and overstates δ by at most
``(B + 2) e**-60`` per coordinate."""

_DELTA2_MESSAGE = (
    "the exact accounting of joint binomial noise is limited to small sensitivities "
    "(delta2 = l2_clip*2^frac_bits + sqrt(d) <= {max:g}), meant for counts and histograms; "
    "got delta2={delta2!r}; use discrete_gaussian, or lower frac_bits/l2_clip"
)


# --------------------------------------------------------------------------- checks


class SensitivityTooLarge(ParameterError):
    """``delta2`` exceeds :data:`MAX_DELTA2`, beyond which the worst case is not searched:
    a limit of the mechanism rather than a wrong number (the configuration maps it to
    ``dp.mechanism``)."""


def _check_trials(trials: int) -> int:
    return checks.even_integer("trials", trials, 2)


def _check_dimension(d: int) -> int:
    return checks.integer("d", d, 1)


def _check_delta2(delta2: float) -> float:
    d2 = checks.positive("delta2", delta2)
    if d2 > MAX_DELTA2:
        raise SensitivityTooLarge("delta2", _DELTA2_MESSAGE.format(max=MAX_DELTA2, delta2=delta2))
    return d2


def _squared_budget(delta2: float) -> int:
    """``floor(delta2**2)``, the largest ``sum v_i**2`` of an integer ``v`` with
    ``||v||_2 <= delta2``. The ``1e-9`` absorbs float error in ``delta2**2`` (e.g.
    ``sqrt(2)**2 = 2.0000000000000004`` or ``1.9999999999999996``); it can only enlarge the
    set of vectors considered, which is the safe direction."""
    return math.floor(delta2 * delta2 + 1e-9)


# --------------------------------------------------------------------------- one coordinate


def _window(trials: int) -> tuple[int, int, float]:
    """``(lo, hi, log_tail)``: outcomes ``lo..hi`` of ``Bin(trials, 1/2)`` are represented
    exactly; the rest has probability at most ``exp(log_tail) <= e**-60``.

    Hoeffding 1963 (Theorem 1): ``P(|X - B/2| >= t) <= 2 exp(-2 t**2 / B)``; outside the
    window ``|X - B/2| >= w + 1``.
    """
    c = trials // 2
    w = math.ceil(math.sqrt(trials * (-LOG_TAIL_MASS + math.log(2.0)) / 2.0))
    lo, hi = max(0, c - w), min(trials, c + w)
    if lo == 0 and hi == trials:
        return lo, hi, -math.inf
    return lo, hi, math.log(2.0) - 2.0 * (w + 1) ** 2 / trials


def _log_pmf(trials: int, x: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """``ln P(Bin(trials, 1/2) = x)`` for integer ``x`` (``-inf`` off ``0..trials``).

    Written so that ``x`` and ``trials - x`` give bit-identical values (the addition of the
    two ``gammaln`` terms commutes), which keeps the mirror symmetry exact in floating point.
    """
    from scipy import special  # imported here, not at import time of mpc_agg.dp

    inside = (x >= 0) & (x <= trials)
    xi = np.where(inside, x, 0).astype(np.float64)
    lp = (
        special.gammaln(trials + 1.0)
        - (special.gammaln(xi + 1.0) + special.gammaln(trials - xi + 1.0))
        - trials * math.log(2.0)
    )
    return np.where(inside, lp, -math.inf)


def log_pmfs(trials: int, shift: int) -> tuple[dict[object, float], dict[object, float]]:
    """``(lower, upper)`` log-pmfs (nats) of ``Bin(trials, 1/2) + shift`` and
    ``Bin(trials, 1/2)``, over the window of :func:`_window`, in the form
    ``dp_accounting``'s ``from_two_probability_mass_functions`` takes.

    The mass of the upper distribution outside the window is bounded (Hoeffding) and put on
    an outcome ``"tail"`` that the lower distribution lacks, so it counts as infinite privacy
    loss; outcomes ``x < shift`` (where the lower pmf is zero) are likewise absent from
    ``lower``. Exposed for tests.
    """
    lo, hi, log_tail = _window(trials)
    x = np.arange(lo, hi + 1)
    upper: dict[object, float] = dict(zip(x.tolist(), _log_pmf(trials, x).tolist(), strict=True))
    lower_lp = _log_pmf(trials, x - shift)
    lower: dict[object, float] = {
        int(xi): float(lp) for xi, lp in zip(x, lower_lp, strict=True) if lp != -math.inf
    }
    if log_tail != -math.inf:
        upper["tail"] = log_tail
    return lower, upper


def binomial_pld(trials: int, shift: int) -> PrivacyLossDistribution:
    """The PLD of ``Bin(trials, 1/2)`` (upper) against ``Bin(trials, 1/2) + shift`` (lower).

    Built by ``dp_accounting.pld.privacy_loss_distribution.from_two_probability_mass_functions``
    with ``pessimistic_estimate=True``: losses are rounded *up* to multiples of
    :data:`VALUE_DISCRETIZATION`; outcomes the lower distribution cannot produce
    (``x < shift``), tail mass outside :func:`_window` and outcomes of upper mass below
    ``e**LOG_TAIL_MASS`` all go to the infinite-loss mass, which ``dp_accounting`` adds to δ
    whole. ``trials`` even, ``shift >= 1`` (encoded units).

    Symmetric (one PLD serves add and remove): ``f(x) = trials + shift - x`` maps
    ``Bin`` onto ``Bin + shift`` and back, since ``Bin(trials, 1/2)`` is symmetric about
    ``trials/2``; so the pair (``Bin + shift``, ``Bin``) has the same PLD as
    (``Bin``, ``Bin + shift``). Likewise ``x -> trials - x`` shows a shift of ``-shift`` has
    the same PLD. Both are checked numerically in ``tests/test_dp_binomial.py``.
    """
    t = _check_trials(trials)
    return _binomial_pld(t, checks.integer("shift", shift, 1))


@functools.lru_cache(maxsize=512)
def _binomial_pld(trials: int, shift: int) -> PrivacyLossDistribution:
    # Cached on validated ints only, so ``2.0`` can never hit the entry of ``2``.
    from dp_accounting.pld import privacy_loss_distribution as pld

    lower, upper = log_pmfs(trials, shift)
    return pld.from_two_probability_mass_functions(
        lower,
        upper,
        pessimistic_estimate=True,
        value_discretization_interval=VALUE_DISCRETIZATION,
        log_mass_truncation_bound=LOG_TAIL_MASS,
        symmetric=True,
    )


# --------------------------------------------------------------------------- vector shifts


def _partitions(budget: int, parts: int, largest: int) -> Iterator[tuple[int, ...]]:
    """Every non-increasing tuple of integers in ``1..largest`` with at most ``parts``
    entries and sum of squares ``<= budget`` (the empty tuple included)."""
    yield ()
    if parts == 0:
        return
    for k in range(min(largest, math.isqrt(budget)), 0, -1):
        for rest in _partitions(budget - k * k, parts - 1, k):
            yield (k, *rest)


def worst_case_shifts(delta2: float, d: int) -> tuple[tuple[int, ...], ...]:
    """The multisets of per-coordinate shifts ``|v_i|`` (non-increasing tuples) that
    :func:`binomial_epsilon` must check, for integer ``v`` with ``||v||_2 <= delta2`` and at
    most ``d`` nonzero coordinates.

    Only the nonzero ``|v_i|`` matter (facts 1 and 2 of the module docstring). A multiset
    that can take one more part ``1`` (sum of squares ``< floor(delta2**2)`` and fewer than
    ``d`` parts) is dominated by the multiset with that part: the mechanism on fewer
    coordinates is a post-processing of the one on more (drop the extra coordinate), so its
    ε(δ) cannot be larger. The maximal multisets remain; for ``delta2 = 1 + sqrt(10)``,
    ``d = 10`` (budget 17) there are 9 of them.
    """
    budget = _squared_budget(_check_delta2(delta2))
    return _maximal_shifts(budget, min(_check_dimension(d), budget))


@functools.lru_cache(maxsize=128)
def _maximal_shifts(budget: int, parts: int) -> tuple[tuple[int, ...], ...]:
    return tuple(
        p
        for p in _partitions(budget, parts, math.isqrt(budget))
        if p and (len(p) == parts or sum(k * k for k in p) + 1 > budget)
    )


def _runs(shifts: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """``(3, 2, 2, 1)`` -> ``((3, 1), (2, 2), (1, 1))``: (shift, count), shifts descending."""
    out: list[tuple[int, int]] = []
    for k in shifts:
        if out and out[-1][0] == k:
            out[-1] = (k, out[-1][1] + 1)
        else:
            out.append((k, 1))
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _self_composed(trials: int, shift: int, times: int) -> PrivacyLossDistribution:
    base = _binomial_pld(trials, shift)
    return base if times == 1 else pld_dense.self_compose(base, times)


def shifts_pld(trials: int, shifts: tuple[int, ...]) -> PrivacyLossDistribution:
    """The PLD of the whole vector mechanism for one multiset of shifts (fact 2): repeated
    shifts via ``self_compose``, then ``compose`` (both truncate at most 1e-15 of tail mass,
    pessimistically: the right tail goes to the infinite-loss mass)."""
    t = _check_trials(trials)
    if not shifts or not all(checks.is_integer(k) and k >= 1 for k in shifts):
        raise ParameterError("shifts", f"must be integers >= 1, at least one, got {shifts!r}")
    runs = _runs(tuple(sorted((int(k) for k in shifts), reverse=True)))
    out = _self_composed(t, *runs[0])
    for k, n in runs[1:]:
        out = pld_dense.compose(out, _self_composed(t, k, n))
    return out


def binomial_epsilon(trials: int, delta: float, delta2: float, d: int) -> float:
    """The ε (nats) for which ``Bin(trials, 1/2) - trials/2`` noise on each of ``d``
    coordinates is (ε, ``delta``)-DP when one client changes the total by an integer vector
    of L2 norm ``<= delta2`` (encoded units). ``math.inf`` if no finite ε works (too few
    trials: the noise support cannot hide the shift with probability ``1 - delta``).

    The maximum, over :func:`worst_case_shifts`, of the composed PLD's
    ``get_epsilon_for_delta(delta)``; an upper bound on the exact worst-case ε, above it by
    at most about ``1e-4`` per nonzero coordinate (discretization). ``0.0`` when
    ``delta2 < 1`` (no nonzero integer vector fits). Raises :class:`SensitivityTooLarge` for
    ``delta2 > MAX_DELTA2``.
    """
    t = _check_trials(trials)
    dl = checks.probability("delta", delta)
    d2 = _check_delta2(delta2)
    budget = _squared_budget(d2)
    return _epsilon(t, dl, budget, min(_check_dimension(d), budget))


_EPSILON_CACHE_SIZE = 4096
_epsilons: dict[tuple[int, float, int, int], float] = {}
"""``_epsilon`` by its arguments (filled by :func:`_meets` too); the oldest entry goes first
once full."""
_epsilons_lock = threading.Lock()


def _remember(key: tuple[int, float, int, int], epsilon: float) -> float:
    with _epsilons_lock:
        if key not in _epsilons and len(_epsilons) >= _EPSILON_CACHE_SIZE:
            del _epsilons[next(iter(_epsilons))]
        _epsilons[key] = epsilon
    return epsilon


def _epsilon(trials: int, delta: float, budget: int, parts: int) -> float:
    key = (trials, delta, budget, parts)
    cached = _epsilons.get(key)
    if cached is not None:
        return cached
    worst = 0.0
    if budget != 0:
        for epsilon in _candidate_epsilons(trials, delta, budget, parts):
            worst = max(worst, epsilon)
            if worst == math.inf:
                break
    return _remember(key, worst)


def _candidate_epsilons(trials: int, delta: float, budget: int, parts: int) -> Iterator[float]:
    """ε of each maximal multiset of shifts, in the order of :func:`worst_case_shifts`."""
    candidates = [_runs(shifts) for shifts in _maximal_shifts(budget, parts)]
    # Prefixes of runs shared between candidates are composed once, and dropped after their
    # last use: the dense PLDs are large, while the resulting floats are cached.
    last_use = {runs[:i]: n for n, runs in enumerate(candidates) for i in range(1, len(runs) + 1)}
    prefix: dict[tuple[tuple[int, int], ...], PrivacyLossDistribution] = {}
    for n, runs in enumerate(candidates):
        for i in range(1, len(runs) + 1):
            if runs[:i] not in prefix:
                piece = _self_composed(trials, *runs[i - 1])
                prefix[runs[:i]] = (
                    piece if i == 1 else pld_dense.compose(prefix[runs[: i - 1]], piece)
                )
        yield float(pld_dense.epsilon_for_delta(prefix[runs], delta))
        for key in [key for key in prefix if last_use[key] == n]:
            del prefix[key]


def _meets(trials: int, delta: float, budget: int, parts: int, epsilon: float) -> bool:
    """``_epsilon(trials, delta, budget, parts) <= epsilon``, stopping at the first candidate
    above ``epsilon``: a bisection probe that fails usually costs one candidate (the first,
    with the largest single shift, is usually the worst). A probe that passes computes every
    candidate, and its ε is cached for :func:`_epsilon`."""
    key = (trials, delta, budget, parts)
    cached = _epsilons.get(key)
    if cached is not None:
        return cached <= epsilon
    worst = 0.0
    for candidate in _candidate_epsilons(trials, delta, budget, parts):
        if candidate > epsilon:
            return False
        worst = max(worst, candidate)
    return _remember(key, worst) <= epsilon


# --------------------------------------------------------------------------- calibration


def calibrate_binomial(epsilon: float, delta: float, delta2: float, d: int) -> int:
    """The smallest even ``B`` for which ``Bin(B, 1/2) - B/2`` noise on each of ``d``
    coordinates is (``epsilon``, ``delta``)-DP by :func:`binomial_epsilon`, for L2
    sensitivity ``delta2`` (encoded units). The noise variance is ``B / 4``.

    Bisection over even integers, exact because ε is non-increasing in ``B`` (fact 4 of the
    module docstring: ``Bin(B + 2) = Bin(B) + Bin(2)``, and adding independent noise is
    post-processing). Raises :class:`SensitivityTooLarge` for ``delta2 > MAX_DELTA2`` and
    :class:`~mpc_agg.dp.checks.ParameterError` (``epsilon``, ``delta``, ``delta2``, ``d``)
    for bad arguments or a target no affordable number of trials meets.
    """
    eps = checks.positive("epsilon", epsilon)
    dl = checks.probability("delta", delta)
    d2 = _check_delta2(delta2)
    dim = _check_dimension(d)
    budget = _squared_budget(d2)
    return _calibrate(eps, dl, budget, min(dim, budget))


@functools.lru_cache(maxsize=1024)
def _calibrate(eps: float, delta: float, budget: int, parts: int) -> int:
    if budget == 0:
        return 2

    def meets(half: int) -> bool:
        return _meets(2 * half, delta, budget, parts, eps)

    # Start near the Gaussian of the same variance (RDP-calibrated, usually a little above).
    sigma = calibrate_gaussian(eps, delta, math.sqrt(budget))
    hi = max(1, math.ceil(2.0 * sigma * sigma))  # half of B = 4 sigma**2
    while not meets(hi):
        hi *= 2
        if 2 * hi > MAX_TRIALS:
            raise ParameterError(
                "epsilon",
                f"no binomial noise with at most {MAX_TRIALS} trials meets epsilon={eps!r}",
            )
    lo = hi // 2
    while lo >= 1 and meets(lo):
        hi, lo = lo, lo // 2
    # Invariant: meets(hi), and lo == 0 or not meets(lo).
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return 2 * hi


def binomial_bits(trials: int, d: int) -> int:
    """Secure random bits the joint mechanism generates: ``trials`` per coordinate."""
    return _check_trials(trials) * _check_dimension(d)


def clear_caches() -> None:
    """Forget every cached PLD, ε and calibration (to bound memory, or to time a cold run)."""
    for cached in (_binomial_pld, _self_composed, _maximal_shifts, _calibrate):
        cached.cache_clear()
    with _epsilons_lock:
        _epsilons.clear()
