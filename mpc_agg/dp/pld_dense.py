"""Composition and ε of privacy loss distributions, bit for bit as ``dp_accounting`` does them.

:mod:`mpc_agg.dp.binomial` composes PLDs with ``dp_accounting.pld``. Once a composition
no longer fits its sparse form, the library stores it densely: one probability per loss
on the ``1e-4`` grid, so 10^4 to 10^6 entries. Several steps of its dense path run a
Python loop over every entry (or over a long prefix):

* converting a sparse PMF to a dense one (``common.dictionary_to_list``);
* trimming the tails after a composition (``pld_pmf._truncate_tails``);
* the Chernoff bounds of a self-composition (``common.compute_self_convolve_bounds``: 40
  ``logsumexp`` calls over the whole array);
* ε for a δ (``pld_pmf._get_epsilon_for_delta``).

Most of the binomial accounting's time went into those loops. The functions here do the same
steps with numpy and give the same result bit for bit. Running sums use ``np.cumsum``,
which adds in the loops' order, so their floats match. The losses, produced by
``itertools.count`` through repeated addition, are built the same way. ``np.exp`` and
``np.log`` can differ from :mod:`math` in the last place, so they only find where the
answer is; the values that decide it are then computed with :mod:`math` (or, for
the Chernoff bounds, with the library's own ``logsumexp``). Anything else goes to the
library unchanged: asymmetric PLDs, sparse compositions, other PMF classes. The PMFs made
here are plain ``DensePLDPmf`` objects, so they compose with any other PLD as before.
``tests/test_dp_binomial.py`` compares both paths bit for bit.

Private to :mod:`mpc_agg.dp`. It relies on ``dp_accounting.pld`` internals
(``PrivacyLossDistribution._pmf_remove``, ``DensePLDPmf._probs``, ...), checked by that
test. scipy and dp-accounting are imported where they are used, not at import time.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

TAIL_MASS_TRUNCATION = 1e-15
"""``dp_accounting``'s default ``tail_mass_truncation`` of ``compose`` and ``self_compose``."""

_APPROX_BOUNDS_MAX_SUPPORT = 4096
"""The Chernoff bounds are estimated from the nonzero entries only when there are at most
this many (always, for the binomial's single-coordinate PMFs); otherwise all 40 ``logsumexp``
calls are made, as in the library."""

_EPSILON_MARGIN = 256
"""Extra entries past the estimated stopping point of the ε scan that are computed exactly."""

Floats = npt.NDArray[np.float64]


def _symmetric_pmf(pld: Any, kinds: tuple[type, ...]) -> Any:
    """The one PMF of a symmetric PLD if its class is one of ``kinds``, else ``None``."""
    if not getattr(pld, "_symmetric", False):
        return None
    pmf = pld._pmf_remove
    return pmf if type(pmf) in kinds else None


# --------------------------------------------------------------------------- PLD operations


def compose(first: Any, second: Any) -> Any:
    """``first.compose(second)`` (both ``PrivacyLossDistribution``)."""
    from dp_accounting.pld import pld_pmf
    from dp_accounting.pld.privacy_loss_distribution import PrivacyLossDistribution

    kinds = (pld_pmf.SparsePLDPmf, pld_pmf.DensePLDPmf)
    a, b = _symmetric_pmf(first, kinds), _symmetric_pmf(second, kinds)
    if a is None or b is None:
        return first.compose(second)
    # pld_pmf.compose_pmfs: two sparse PMFs with a small product stay sparse.
    sparse = pld_pmf.SparsePLDPmf
    if type(a) is sparse and type(b) is sparse and a.size * b.size <= pld_pmf._MAX_PMF_SPARSE_SIZE:
        return first.compose(second)
    a, b = _to_dense(a), _to_dense(b)
    a.validate_composable(b)
    return PrivacyLossDistribution(_compose_dense(a, b, TAIL_MASS_TRUNCATION))


def self_compose(pld: Any, times: int) -> Any:
    """``pld.self_compose(times)`` (a ``PrivacyLossDistribution``)."""
    from dp_accounting.pld import pld_pmf
    from dp_accounting.pld.privacy_loss_distribution import PrivacyLossDistribution

    pmf = _symmetric_pmf(pld, (pld_pmf.SparsePLDPmf, pld_pmf.DensePLDPmf))
    if pmf is None or times <= 0:
        return pld.self_compose(times)
    if type(pmf) is pld_pmf.SparsePLDPmf:
        # SparsePLDPmf.self_compose: stays sparse unless size**times is too large.
        if times == 1 or pmf.size**times <= pld_pmf._MAX_PMF_SPARSE_SIZE:
            return pld.self_compose(times)
        pmf = _to_dense(pmf)
    return PrivacyLossDistribution(_self_compose_dense(pmf, times, TAIL_MASS_TRUNCATION))


def epsilon_for_delta(pld: Any, delta: float) -> Any:
    """``pld.get_epsilon_for_delta(delta)`` (a ``PrivacyLossDistribution``)."""
    from dp_accounting.pld import pld_pmf

    pmf = _symmetric_pmf(pld, (pld_pmf.DensePLDPmf,))
    if pmf is None:
        return pld.get_epsilon_for_delta(delta)
    return _epsilon_for_delta_dense(
        pmf._infinity_mass, pmf._lower_loss, pmf._probs, pmf._discretization, delta
    )


# --------------------------------------------------------------------------- dense PMFs


def _to_dense(pmf: Any) -> Any:
    """``pmf.to_dense_pmf()``: the sparse ``{loss: probability}`` laid out on the grid."""
    from dp_accounting.pld import pld_pmf

    if type(pmf) is pld_pmf.DensePLDPmf:
        return pmf
    loss_probs = pmf._loss_probs
    values = np.array(list(loss_probs.values()))
    if not loss_probs or values.dtype != np.float64:
        return pmf.to_dense_pmf()  # (all-integer values: the library's array is integer)
    keys = np.fromiter(loss_probs.keys(), dtype=np.int64, count=len(loss_probs))
    offset = int(keys.min())
    probs = np.zeros(int(keys.max()) - offset + 1)
    probs[keys - offset] = values
    return pld_pmf.DensePLDPmf(
        pmf._discretization, offset, probs, pmf._infinity_mass, pmf._pessimistic_estimate
    )


def _compose_dense(a: Any, b: Any, tail_mass_truncation: float) -> Any:
    """``DensePLDPmf.compose``."""
    from dp_accounting.pld import pld_pmf
    from scipy import signal

    lower_loss = a._lower_loss + b._lower_loss
    probs = signal.fftconvolve(a._probs, b._probs)
    infinity_mass = a._infinity_mass + b._infinity_mass - a._infinity_mass * b._infinity_mass
    offset, probs, right_tail = _truncate_tails(
        probs, tail_mass_truncation, a._pessimistic_estimate
    )
    return pld_pmf.DensePLDPmf(
        a._discretization,
        lower_loss + offset,
        probs,
        infinity_mass + right_tail,
        a._pessimistic_estimate,
    )


def _prefix_to_truncate(arr: Floats, threshold: float) -> int:
    """The first ``i`` whose running sum ``arr[0] + ... + arr[i]`` exceeds ``threshold``
    (``len(arr)`` if none does)."""
    over = np.flatnonzero(np.cumsum(arr) > threshold)
    return int(over[0]) if over.size else len(arr)


def _truncate_tails(
    probs: Floats, tail_mass_truncation: float, pessimistic_estimate: bool
) -> tuple[int, Floats, Any]:
    """``pld_pmf._truncate_tails``: drop the longest prefix and suffix of mass at most
    ``tail_mass_truncation / 2`` each."""
    if tail_mass_truncation == 0:
        return 0, probs, 0
    left_idx = _prefix_to_truncate(probs, tail_mass_truncation / 2)
    right_idx = len(probs) - _prefix_to_truncate(np.flip(probs), tail_mass_truncation / 2)
    right_idx = max(right_idx, left_idx + 1)
    left_mass = np.sum(probs[:left_idx])
    right_mass = np.sum(probs[right_idx:])
    truncated_probs = probs[left_idx:right_idx]
    if pessimistic_estimate:
        truncated_probs[0] += left_mass
        return left_idx, truncated_probs, right_mass
    truncated_probs[-1] += right_mass
    return left_idx, truncated_probs, 0


def _self_compose_dense(pmf: Any, times: int, tail_mass_truncation: float) -> Any:
    """``DensePLDPmf.self_compose``."""
    from dp_accounting.pld import pld_pmf
    from scipy import fft

    probs = pmf._probs
    lower, upper = _self_convolve_bounds(probs, times, tail_mass_truncation)
    # common.self_convolve: one FFT, raised to the power, on the bounded window.
    output_len = upper - lower + 1
    fast_len = fft.next_fast_len(max(output_len, len(probs)))
    convolution = np.real(fft.ifft(fft.fft(probs, fast_len) ** times))
    output = np.array(np.roll(convolution, -lower)[:output_len])
    infinity_mass = tail_mass_truncation - math.expm1(times * math.log1p(-pmf._infinity_mass))
    return pld_pmf.DensePLDPmf(
        pmf._discretization,
        pmf._lower_loss * times + lower,
        output,
        infinity_mass,
        pmf._pessimistic_estimate,
    )


def _self_convolve_bounds(
    probs: Floats, times: int, tail_mass_truncation: float
) -> tuple[int, int]:
    """``common.compute_self_convolve_bounds``: the window outside which the ``times``-fold
    convolution of ``probs`` has mass at most ``tail_mass_truncation`` (Chernoff bounds at 40
    orders, the tightest kept).

    The library evaluates ``logsumexp`` over the whole array at every order. Here a cheap
    estimate from the nonzero entries (the same sum, within ~1e-13) picks the orders whose
    bound can be the tightest; only those are evaluated as the library does, so the integers
    returned are the library's.
    """
    from scipy import special

    n = len(probs)
    upper_bound = (n - 1) * times
    lower_bound = 0
    if tail_mass_truncation == 0:
        return lower_bound, upper_bound
    orders = np.concatenate((np.arange(-20, 0), np.arange(1, 21))) / n
    log_term = math.log(2 / tail_mass_truncation)
    positions = np.arange(n)
    wanted = _orders_to_evaluate(probs, orders, times, log_term)
    bounds = {}
    for i, order in enumerate(orders):
        if wanted[i]:
            bounds[i] = (times * special.logsumexp(positions * order, b=probs) + log_term) / order
    if not all(math.isfinite(bound) for bound in bounds.values()):
        # The library skips orders whose bound is not finite; then the estimate's choice is
        # moot: evaluate every order (never seen with finite estimates).
        for i, order in enumerate(orders):
            if i not in bounds:
                bounds[i] = (
                    times * special.logsumexp(positions * order, b=probs) + log_term
                ) / order
    for i, bound in bounds.items():
        if not math.isfinite(bound):
            continue
        if orders[i] > 0:
            upper_bound = min(upper_bound, math.ceil(bound))
        if orders[i] < 0:
            lower_bound = max(lower_bound, math.floor(bound))
    return lower_bound, upper_bound


def _orders_to_evaluate(
    probs: Floats, orders: Floats, times: int, log_term: float
) -> npt.NDArray[np.bool_]:
    """Which orders can give the tightest bound on their side (all of them when the
    estimate does not apply).

    For positive orders the upper bound is the least ``ceil(bound)``. With ``est`` within
    ``tol`` of every ``bound`` and ``m = min(est + tol)``, an order with ``est - tol > m``
    has ``bound > m >= min(bound)``, so it cannot lower the minimum; the order attaining it
    always passes. Negative orders (greatest ``floor(bound)``) are symmetric.
    """
    every = np.ones(len(orders), dtype=np.bool_)
    support = np.flatnonzero(probs)
    if not 0 < support.size <= _APPROX_BOUNDS_MAX_SUPPORT or not np.all(probs >= 0):
        return every
    weights = probs[support]
    exponents = np.outer(orders, support.astype(np.float64))
    peak = exponents.max(axis=1)
    with np.errstate(all="ignore"):
        log_mgf = peak + np.log(np.exp(exponents - peak[:, None]) @ weights)
        estimate = (times * log_mgf + log_term) / orders
    if not np.all(np.isfinite(estimate)):
        return every
    # Both log-mgfs are within ~1e-13 of the true one (sums of at most a few thousand
    # positive terms); 1e-9 leaves a wide margin, and a wider one only costs evaluations.
    tol = times * 1e-9 / np.abs(orders) + 1e-9 * np.abs(estimate)
    positive = orders > 0
    lowest = np.min((estimate + tol)[positive])
    highest = np.max((estimate - tol)[~positive])
    wanted: npt.NDArray[np.bool_] = np.where(
        positive, estimate - tol <= lowest, estimate + tol >= highest
    )
    return wanted


def _epsilon_for_delta_dense(
    infinity_mass: Any, lower_loss: int, probs: Floats, discretization: float, delta: float
) -> Any:
    """``DensePLDPmf.get_epsilon_for_delta`` (``pld_pmf._get_epsilon_for_delta``).

    The library scans losses from the largest down, accumulating the upper mass and the
    lower mass (``exp(-loss) * prob``), and stops at the first loss at which
    ``log((upper - delta) / lower) >= loss``, or returns early once the upper mass reaches
    ``delta`` while the lower mass is still zero. The running sums are ``np.cumsum``,
    which adds in the same order; ``np.exp`` only estimates where the scan stops, and the
    lower mass up to there is then summed from :func:`math.exp` terms, as the library does.
    """
    if infinity_mass > delta:
        return math.inf
    n = len(probs)
    if n == 0:
        return 0  # no step: infinity_mass <= delta here
    # itertools.count(upper_loss, -discretization): each loss is the previous one minus
    # the step, in floating point.
    steps = np.full(n, -discretization)
    steps[0] = (lower_loss + n - 1) * discretization
    losses = np.cumsum(steps)
    reversed_probs = np.flip(probs)
    upper = np.cumsum(np.concatenate(([infinity_mass], reversed_probs)))  # before step k
    with np.errstate(all="ignore"):
        estimated_lower = np.cumsum(np.concatenate(([0.0], np.exp(-losses) * reversed_probs)))
    stop = _first_stop(upper, estimated_lower, losses, delta, exact=False)[0]
    known = min(n, stop + 1 + _EPSILON_MARGIN)
    while True:
        exponents = (-losses[:known]).tolist()
        try:
            exps = np.fromiter(map(math.exp, exponents), np.float64, count=known)
        except OverflowError:
            exps = np.fromiter(map(_exp, exponents), np.float64, count=known)
        with np.errstate(invalid="ignore"):  # inf * 0 after an overflow, checked below
            lower = np.cumsum(np.concatenate(([0.0], exps * reversed_probs[:known])))
        stop, early = _first_stop(upper[: known + 1], lower, losses[:known], delta, exact=True)
        if stop < known or known == n:
            break
        known = n  # the estimate stopped too early (never seen): scan everything exactly
    overflow = np.flatnonzero(np.isinf(exps))
    if overflow.size and overflow[0] < stop + early:
        math.exp(-losses[overflow[0]])  # the library's scan reaches it: the same OverflowError
    if early:
        return max(0, float(losses[stop]))
    mass_upper, mass_lower = upper[stop], lower[stop]
    if mass_upper <= mass_lower + delta:
        return 0
    return math.log((mass_upper - delta) / mass_lower)


def _exp(x: float) -> float:
    """:func:`math.exp`, but ``inf`` where it raises ``OverflowError``."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _first_stop(
    upper: Floats, lower: Floats, losses: Floats, delta: float, exact: bool
) -> tuple[int, bool]:
    """Where the scan of :func:`_epsilon_for_delta_dense` ends, over ``len(losses)`` steps:
    ``(k, False)`` if it breaks before step ``k``, ``(k, True)`` if it returns early after
    step ``k``, ``(len(losses), False)`` if it runs through. ``upper`` and ``lower`` hold the
    masses before each step (one more entry than ``losses``). With ``exact``, comparisons of
    a logarithm with a loss that ``np.log`` could get wrong in the last place are redone with
    :func:`math.log`."""
    k = len(losses)
    before_upper, before_lower = upper[:k], lower[:k]
    can_break = (before_upper > delta) & (before_lower > 0)
    with np.errstate(all="ignore"):
        logs = np.log((before_upper - delta) / before_lower)
    breaks = can_break & (logs >= losses)
    if exact:
        close = can_break & (np.abs(logs - losses) <= 1e-12 * np.maximum(1.0, np.abs(losses)))
        for i in np.flatnonzero(close):
            ratio = (before_upper[i] - delta) / before_lower[i]
            breaks[i] = math.log(ratio) >= losses[i]
    returns = (upper[1 : k + 1] >= delta) & (lower[1 : k + 1] == 0)
    first_break = int(np.argmax(breaks)) if breaks.any() else k
    first_return = int(np.argmax(returns)) if returns.any() else k
    if first_return < first_break:
        return first_return, True
    return first_break, False
