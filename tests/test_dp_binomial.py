"""Joint binomial accounting: PLD against brute force, symmetry, worst case, calibration.

The independent references are (i) the exact hockey-stick divergence of two shifted binomials
summed outcome by outcome with ``scipy.stats.binom`` (no dp-accounting involved), (ii) the
Gaussian PLD of dp-accounting at the same variance (the binomial tends to it), and (iii) a
brute-force enumeration of integer vectors for the reduction to maximal multisets.
"""

from __future__ import annotations

import collections
import itertools
import math

import numpy as np
import pytest
from dp_accounting.pld import pld_pmf
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from scipy import stats

from mpc_agg.dp import pld_dense
from mpc_agg.dp.binomial import (
    MAX_DELTA2,
    VALUE_DISCRETIZATION,
    SensitivityTooLarge,
    binomial_bits,
    binomial_epsilon,
    binomial_pld,
    calibrate_binomial,
    log_pmfs,
    shifts_pld,
    worst_case_shifts,
)
from mpc_agg.dp.calibration import calibrate_gaussian
from mpc_agg.dp.checks import ParameterError

DELTA = 1e-5
TARGET_RATIO = 1.15  # joint binomial noise std over the RDP-calibrated Gaussian sigma


# --------------------------------------------------------------------------- brute force


def exact_pmfs(trials: int, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """P = Bin(trials, 1/2) and Q = Bin(trials, 1/2) + shift on the common support."""
    x = np.arange(0, trials + shift + 1)
    return stats.binom.pmf(x, trials, 0.5), stats.binom.pmf(x - shift, trials, 0.5)


def hockey_stick(trials: int, shift: int, eps: float) -> float:
    """max over both directions of sum_x max(0, P(x) - e^eps Q(x)); eps = inf keeps only the
    mass where the other pmf is zero."""
    p, q = exact_pmfs(trials, shift)

    def one(a: np.ndarray, b: np.ndarray) -> float:
        if eps == math.inf:
            return float(np.sum(a[b == 0]))
        return float(np.sum(np.maximum(0.0, a - math.exp(eps) * b)))

    return max(one(p, q), one(q, p))


def exact_epsilon(trials: int, shift: int, delta: float) -> float:
    """Smallest eps >= 0 with hockey_stick <= delta, by bisection (it is non-increasing)."""
    if hockey_stick(trials, shift, math.inf) > delta:
        return math.inf
    if hockey_stick(trials, shift, 0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while hockey_stick(trials, shift, hi) > delta:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-10:
        mid = (lo + hi) / 2
        if hockey_stick(trials, shift, mid) <= delta:
            hi = mid
        else:
            lo = mid
    return hi


@pytest.mark.parametrize("trials", [20, 64])
@pytest.mark.parametrize("shift", [1, 2])
@pytest.mark.parametrize("delta", [1e-3, 1e-5])
def test_single_coordinate_matches_brute_force(trials: int, shift: int, delta: float) -> None:
    # d = 1 and delta2 = shift: the candidates are the single shifts 1..shift (monotonicity
    # in the shift is not assumed), so the reference is the max over them.
    want = max(exact_epsilon(trials, k, delta) for k in range(1, shift + 1))
    got = binomial_epsilon(trials, delta, float(shift), 1)
    if want == math.inf:
        assert got == math.inf
        return
    # Pessimistic, and above the truth by at most the loss grid (1e-4) plus float noise.
    assert want - 1e-9 <= got <= want + 1.5 * VALUE_DISCRETIZATION, (want, got)


def test_infinite_loss_mass_is_counted_in_delta() -> None:
    # Bin(20) + 2 cannot produce 0 or 1: P(X < 2) = 21 / 2**20 ~ 2.0e-5 has infinite loss.
    p_inf = 21 / 2**20
    assert binomial_pld(20, 2).get_delta_for_epsilon(50.0) == pytest.approx(p_inf, rel=1e-9)
    assert binomial_epsilon(20, 1.9e-5, 2.0, 1) == math.inf
    assert math.isfinite(binomial_epsilon(20, 2.2e-5, 2.0, 1))
    # A shift beyond the support: everything has infinite loss.
    assert binomial_pld(4, 5).get_delta_for_epsilon(0.0) == pytest.approx(1.0)


@pytest.mark.parametrize("trials", [64, 10_000])
def test_windowed_log_pmfs_match_scipy_and_bound_the_tail(trials: int) -> None:
    lower, upper = log_pmfs(trials, 3)
    tail = upper.pop("tail", -math.inf)
    x = np.array(sorted(upper))
    assert np.allclose([upper[int(a)] for a in x], stats.binom.logpmf(x, trials, 0.5), atol=1e-9)
    assert all(lower[a] == upper[a - 3] for a in lower if a - 3 in upper)
    assert min(lower) == max(3, x[0])  # outcomes below the shift are absent: infinite loss
    outside = stats.binom.sf(x[-1], trials, 0.5) + stats.binom.cdf(x[0] - 1, trials, 0.5)
    if trials == 64:  # the window is the whole support
        assert tail == -math.inf and len(x) == trials + 1
    else:  # the Hoeffding bound covers the mass left out, and is negligible
        assert outside <= math.exp(tail) <= math.exp(-60)


@pytest.mark.parametrize("trials, shift", [(64, 1), (64, 3), (1000, 2)])
def test_pld_is_the_same_in_both_directions_and_for_negative_shifts(
    trials: int, shift: int
) -> None:
    # Full-support pmfs built here (not the module's windowed ones): remove direction
    # (upper Bin, lower Bin + k), add direction (upper Bin + k, lower Bin), and shift -k.
    x = np.arange(-shift, trials + shift + 1)

    def log_pmf(offset: int) -> dict[int, float]:
        lp = stats.binom.logpmf(x - offset, trials, 0.5)
        return {int(a): float(b) for a, b in zip(x, lp, strict=True) if b != -math.inf}

    base, plus, minus = log_pmf(0), log_pmf(shift), log_pmf(-shift)
    kw = dict(pessimistic_estimate=True, value_discretization_interval=VALUE_DISCRETIZATION)
    remove = pld_lib.from_two_probability_mass_functions(plus, base, **kw)
    add = pld_lib.from_two_probability_mass_functions(base, plus, **kw)
    negative = pld_lib.from_two_probability_mass_functions(minus, base, **kw)
    ours = binomial_pld(trials, shift)
    grid = [0.0, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0]
    want = remove.get_delta_for_epsilon(grid)
    for other in (add, negative, ours):
        assert np.allclose(other.get_delta_for_epsilon(grid), want, rtol=1e-6, atol=1e-15)


@pytest.mark.parametrize(
    "trials, shifts", [(200, (1, 1, 1, 1, 1)), (954, (2, 1, 1)), (954, (4, 1))]
)
def test_dense_steps_are_bit_for_bit_the_library(trials: int, shifts: tuple[int, ...]) -> None:
    # mpc_agg.dp.pld_dense redoes dp-accounting's dense steps (to dense, compose, self-compose,
    # epsilon for delta) with numpy: the PLD and its epsilons must be the library's exactly.
    reference = None
    for k, n in collections.Counter(shifts).items():  # shifts_pld's runs, largest shift first
        piece = binomial_pld(trials, k) if n == 1 else binomial_pld(trials, k).self_compose(n)
        reference = piece if reference is None else reference.compose(piece)
    assert reference is not None
    ours = shifts_pld(trials, shifts)
    want, got = reference._pmf_remove, ours._pmf_remove
    assert type(got) is type(want) is pld_pmf.DensePLDPmf  # the dense path was taken
    assert got._lower_loss == want._lower_loss
    assert got._infinity_mass.hex() == want._infinity_mass.hex()
    assert got._probs.dtype == want._probs.dtype and got._probs.tobytes() == want._probs.tobytes()
    for delta in (1e-2, 1e-5, 1e-9, 1e-14):
        eps = pld_dense.epsilon_for_delta(ours, delta)
        assert float(eps).hex() == float(reference.get_epsilon_for_delta(delta)).hex()


# --------------------------------------------------------------------------- worst case


def vector_shift_multisets(budget: int, d: int) -> set[tuple[int, ...]]:
    """|v_i| multisets of every integer vector of length d with sum v_i**2 <= budget."""
    r = math.isqrt(budget)
    out = set()
    for v in itertools.product(range(-r, r + 1), repeat=d):
        if sum(a * a for a in v) <= budget and any(v):
            out.add(tuple(sorted((abs(a) for a in v if a), reverse=True)))
    return out


def is_sub_multiset(small: tuple[int, ...], big: tuple[int, ...]) -> bool:
    rest = list(big)
    for k in small:
        if k not in rest:
            return False
        rest.remove(k)
    return True


@pytest.mark.parametrize("delta2, d", [(math.sqrt(5), 3), (3.0, 4), (1 + math.sqrt(3), 3)])
def test_candidates_cover_every_integer_vector(delta2: float, d: int) -> None:
    budget = math.floor(delta2**2 + 1e-9)
    every = vector_shift_multisets(budget, d)
    candidates = worst_case_shifts(delta2, d)
    assert set(candidates) <= every  # each candidate is a real vector
    for s in every:  # each real vector drops coordinates from some candidate
        assert any(is_sub_multiset(s, c) for c in candidates), s


def test_candidates_for_the_issue_target() -> None:
    assert worst_case_shifts(1 + math.sqrt(10), 10) == (
        (4, 1),
        (3, 2, 2),
        (3, 2, 1, 1, 1, 1),
        (3, 1, 1, 1, 1, 1, 1, 1, 1),
        (2, 2, 2, 2, 1),
        (2, 2, 2, 1, 1, 1, 1, 1),
        (2, 2, 1, 1, 1, 1, 1, 1, 1, 1),
        (2, 1, 1, 1, 1, 1, 1, 1, 1, 1),
        (1, 1, 1, 1, 1, 1, 1, 1, 1, 1),
    )
    # sqrt(2)**2 is 2.0000000000000004 in floats; a value a hair below 2 must not lose a part.
    assert worst_case_shifts(math.sqrt(2), 5) == ((1, 1),)
    assert worst_case_shifts(math.nextafter(math.sqrt(2), 0), 5) == ((1, 1),)


def test_worst_case_dominates_every_multiset() -> None:
    trials, delta2, d = 200, 1 + math.sqrt(10), 10
    worst = binomial_epsilon(trials, DELTA, delta2, d)
    every = vector_shift_multisets(17, 4) | {(1,) * n for n in range(1, 11)}
    every |= {(2,) + (1,) * n for n in range(0, 10)}
    # pld_dense.epsilon_for_delta is the PLD's get_epsilon_for_delta without its per-entry
    # Python loop (bit for bit: test_dense_steps_are_bit_for_bit_the_library).
    eps = {s: pld_dense.epsilon_for_delta(shifts_pld(trials, s), DELTA) for s in every}
    assert all(e <= worst for e in eps.values())
    assert max(eps.values()) == pytest.approx(worst, abs=1e-12)  # attained by a candidate
    # Adding a coordinate never lowers epsilon (the post-processing argument), numerically.
    assert eps[(3, 2)] <= eps[(3, 2, 2)] and eps[(1,) * 9] <= eps[(1,) * 10]


# --------------------------------------------------------------------------- large B


@pytest.mark.parametrize(
    "trials, delta2, d", [(954, 1 + math.sqrt(10), 10), (4000, 2.0, 1), (20_000, 3.0, 1)]
)
def test_large_trials_approach_the_gaussian_at_the_same_variance(
    trials: int, delta2: float, d: int
) -> None:
    # Reference: dp-accounting's Gaussian PLD, sigma^2 = B/4, L2 sensitivity sqrt(17) etc.
    # (the largest norm of an integer vector within delta2). Tolerance 2 %; observed < 0.4 %.
    gauss = pld_lib.from_gaussian_mechanism(
        math.sqrt(trials / 4),
        sensitivity=math.sqrt(math.floor(delta2**2 + 1e-9)),
        value_discretization_interval=VALUE_DISCRETIZATION,
    ).get_epsilon_for_delta(DELTA)
    got = binomial_epsilon(trials, DELTA, delta2, d)
    assert abs(got / gauss - 1) < 0.02, (got, gauss)


def test_epsilon_is_non_increasing_in_trials() -> None:
    # Exact for the true epsilon (Bin(B + 2) = Bin(B) + Bin(2) is post-processing); checked
    # here for the discretized, pessimistic estimate that calibration bisects on.
    trials = [*range(20, 82, 2), *range(600, 642, 2)]
    eps = [binomial_epsilon(b, DELTA, 1 + math.sqrt(2), 2) for b in trials]
    assert eps[0] == math.inf and math.isfinite(eps[-1])
    assert all(a >= b for a, b in itertools.pairwise(eps))


# --------------------------------------------------------------------------- calibration


@pytest.mark.parametrize(
    "eps, delta2, d", [(1.0, 2.0, 1), (0.5, 2.0, 1), (2.0, 1 + math.sqrt(10), 10)]
)
def test_calibrate_is_the_smallest_even_trials(eps: float, delta2: float, d: int) -> None:
    b = calibrate_binomial(eps, DELTA, delta2, d)
    assert b % 2 == 0
    assert binomial_epsilon(b, DELTA, delta2, d) <= eps < binomial_epsilon(b - 2, DELTA, delta2, d)


def test_issue_target_against_the_gaussian_reference() -> None:
    # d = 10, l2_clip = 1, frac_bits = 0: delta2 = 1 + sqrt(10).
    eps, delta2, d = 1.0, 1 + math.sqrt(10), 10
    b = calibrate_binomial(eps, DELTA, delta2, d)
    ratio = math.sqrt(b / 4) / calibrate_gaussian(eps, DELTA, delta2)
    print(f"B = {b}, noise std / RDP Gaussian sigma = {ratio:.4f} (target {TARGET_RATIO})")
    assert b == 954
    assert ratio <= TARGET_RATIO


def test_no_sensitivity_means_no_loss() -> None:
    assert binomial_epsilon(2, DELTA, 0.9, 3) == 0.0
    assert calibrate_binomial(1.0, DELTA, 0.9, 3) == 2


def test_bits() -> None:
    assert binomial_bits(954, 10) == 9540
    with pytest.raises(ParameterError, match="^d must be an integer >= 1"):
        binomial_bits(954, 0)


# --------------------------------------------------------------------------- errors


def test_large_sensitivity_is_refused_with_advice() -> None:
    for call in (
        lambda: calibrate_binomial(1.0, DELTA, MAX_DELTA2 + 0.01, 60),
        lambda: binomial_epsilon(1000, DELTA, 1 + math.sqrt(50), 50),
        lambda: worst_case_shifts(9.0, 81),
    ):
        with pytest.raises(
            SensitivityTooLarge, match="use discrete_gaussian, or lower frac_bits/l2_clip"
        ) as e:
            call()
        assert isinstance(e.value, ParameterError) and e.value.name == "delta2"
        assert "limited to small sensitivities" in str(e.value)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=math.inf), "epsilon"),
        (dict(epsilon=True), "epsilon"),
        (dict(delta=0.0), "delta"),
        (dict(delta=1.0), "delta"),
        (dict(delta2=-1.0), "delta2"),
        (dict(delta2=math.nan), "delta2"),
        (dict(d=0), "d"),
        (dict(d=2.0), "d"),
    ],
)
def test_bad_calibration_parameters(kwargs: dict[str, object], name: str) -> None:
    args: dict[str, object] = dict(epsilon=1.0, delta=DELTA, delta2=2.0, d=1) | kwargs
    with pytest.raises(ParameterError) as e:
        calibrate_binomial(**args)  # type: ignore[arg-type]
    assert e.value.name == name
    assert not isinstance(e.value, SensitivityTooLarge)


@pytest.mark.parametrize("trials", [0, 3, -2, 4.0, True])
def test_bad_trials(trials: object) -> None:
    with pytest.raises(ParameterError) as e:
        binomial_epsilon(trials, DELTA, 2.0, 1)  # type: ignore[arg-type]
    assert e.value.name == "trials"
    with pytest.raises(ParameterError):
        binomial_pld(trials, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("shift", [0, -1, 1.0, False])
def test_bad_shift(shift: object) -> None:
    with pytest.raises(ParameterError) as e:
        binomial_pld(10, shift)  # type: ignore[arg-type]
    assert e.value.name == "shift"
    with pytest.raises(ParameterError) as e:
        shifts_pld(10, (2, shift))  # type: ignore[arg-type]
    assert e.value.name == "shifts"
