"""Exact discrete Gaussian noise from a cryptographic keystream, vectorised in numpy.

docs/design.md, "Differential privacy". Each aggregator adds ``N_Z(0, sigma2)`` noise (the
discrete Gaussian: ``P(x) ∝ exp(-x² / (2 sigma2))`` on the integers) to its share of the
total. The sampler is the rejection sampler of Canonne, Kamath, Steinke, "The Discrete
Gaussian for Differential Privacy", NeurIPS 2020 (arXiv:2004.00010), Algorithms 1-3:

1. ``Bernoulli(exp(-q))`` for rational ``q`` in [0, 1] from a chain of ``Bernoulli(q / K)``
   (Algorithm 1); for ``q > 1``, the AND of ``n >= q`` draws of ``Bernoulli(exp(-q / n))``.
2. a discrete Laplace of scale ``t`` from a uniform ``U < t``, a ``Bernoulli(exp(-U / t))`` and
   a geometric count of ``Bernoulli(exp(-1))`` (Algorithm 2);
3. the discrete Gaussian: discrete Laplace candidates ``Y`` with ``t = floor(sigma) + 1``, each
   kept with probability ``exp(-(|Y| - sigma2 / t)² / (2 sigma2))`` (Algorithm 3).

Exactness: every decision is ``Bernoulli(a / b)`` for integers ``a, b`` known exactly, taken
against a uniform ``U`` in [0, 1) drawn 53 bits at a time from AES-256-CTR keyed from the OS
(:class:`NoiseStream`; ``cryptography``/OpenSSL). numpy evaluates ``a / b`` in float64 with a
proven relative error below ``2**-49``; a decision is taken from the float only when ``U``'s
first 53 bits lie outside a band of relative width :data:`GUARD` around it. Inside the band
(probability about ``2**-39`` per decision) it is settled exactly in Python integers, drawing
further bits of ``U`` as needed. So no floating-point error ever reaches the distribution;
no float is ever a noise value (Mironov 2012).

The integer arithmetic is int64. :data:`MAX_SIGMA2` bounds the variance so that it stays
exact; a candidate whose geometric part would overflow it (probability below
``exp(-127)`` per sample at the largest variance, far less below) raises
:class:`SamplerOverflow` instead of being drawn inexactly: the round fails, closed. A bad
argument raises :class:`~mpc_agg.dp.checks.ParameterError` (a ``ValueError``) naming it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from mpc_agg.dp import checks
from mpc_agg.dp.checks import ParameterError

MAX_SIGMA2 = 1 << 56
"""Largest variance parameter (encoded units²) the sampler draws exactly: ``sigma <= 2**28``.
Beyond it, ``|Y| * t`` could leave int64 before the geometric tail is astronomically thin."""

GUARD = 2.0**-40
"""Relative half-width of the band around a float probability inside which the decision is
settled exactly (the float's own error is below ``2**-49``)."""

_U53 = 2.0**53
_WORDS_PER_CALL = 1 << 20  # keystream is produced in 8 MiB pieces at most


class SamplerOverflow(ArithmeticError):
    """A candidate would leave the sampler's exact int64 range (probability below exp(-127)
    per sample): nothing is drawn, the caller must fail the round."""


class NoiseStream:
    """Uniform 64-bit words: AES-256-CTR keystream under a 32-byte key from ``os.urandom``.

    ``key`` may be passed by tests for reproducible draws; production code passes nothing.
    The key never appears in ``repr``.
    """

    def __init__(self, key: bytes | None = None) -> None:
        if key is None:
            key = os.urandom(32)
        if len(key) != 32:
            raise ParameterError("key", f"must be 32 bytes, got {len(key)}")
        self._enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self._zeros = bytes(8 * _WORDS_PER_CALL)
        self.words_drawn = 0

    def __repr__(self) -> str:
        return f"NoiseStream({self.words_drawn} words drawn)"

    def words(self, n: int) -> npt.NDArray[np.uint64]:
        """The next ``n`` uniform 64-bit words (a fresh array)."""
        out = np.empty(n, dtype=np.uint64)
        raw = out.view(np.uint8)
        done = 0
        while done < n:
            k = min(n - done, _WORDS_PER_CALL)
            raw[8 * done : 8 * (done + k)] = np.frombuffer(
                self._enc.update(memoryview(self._zeros)[: 8 * k]), dtype=np.uint8
            )
            done += k
        self.words_drawn += n
        return out

    def below(self, t: int, n: int) -> npt.NDArray[np.int64]:
        """``n`` exactly uniform integers in ``[0, t)``: ``w mod t`` for a word ``w`` below the
        largest multiple of ``t`` under ``2**64`` (others, ``t / 2**64`` of them, redrawn)."""
        if not 1 <= t <= 1 << 62:
            raise ParameterError("t", f"must be in 1..2**62, got {t}")
        limit = np.uint64(((1 << 64) // t) * t - 1)  # w <= limit: each residue equally often
        w = self.words(n)
        redo = np.flatnonzero(w > limit)
        while redo.size:
            w[redo] = self.words(redo.size)
            redo = redo[w[redo] > limit]
        out: npt.NDArray[np.int64] = (w % np.uint64(t)).astype(np.int64)
        return out


# ------------------------------------------------------------------ exact Bernoulli trials


def _settle_exactly(stream: NoiseStream, head: int, num: int, den: int) -> bool:
    """Is ``U < num / den``, where ``U``'s first 53 bits are ``head``? Further bits of ``U``
    are drawn 64 at a time until the answer is certain (Python integers, exact)."""
    # U = (head + V) / 2**53 with V uniform in [0, 1): U < num/den  <=>  V * den < rest.
    rest = num * (1 << 53) - head * den
    while 0 < rest < den:
        (b,) = stream.words(1).tolist()
        rest = rest * (1 << 64) - b * den  # V = (b + V') / 2**64
    return rest >= den


def bernoulli(
    stream: NoiseStream,
    p: npt.NDArray[np.float64],
    exact: Callable[[int], tuple[int, int]],
) -> npt.NDArray[np.bool_]:
    """Independent ``Bernoulli(a_i / b_i)`` trials, exactly.

    ``p[i]`` is ``a_i / b_i`` in float64 with relative error below ``GUARD / 2``;
    ``exact(i)`` returns the integers ``(a_i, b_i)`` and is called only for the trials
    (about ``2**-39`` of them) that the float cannot decide.
    """
    head = (stream.words(p.size) >> np.uint64(11)).astype(np.float64)  # exact below 2**53
    lo = p * ((1.0 - GUARD) * _U53)
    hi = p * ((1.0 + GUARD) * _U53)
    yes: npt.NDArray[np.bool_] = head + 1.0 <= lo  # U < (head + 1) / 2**53 <= p
    undecided = ~yes & (head < hi)  # head >= hi: U >= p, a certain no
    if undecided.any():
        for i in np.flatnonzero(undecided).tolist():
            num, den = exact(i)
            yes[i] = _settle_exactly(stream, int(head[i]), num, den)
    return yes


def bernoulli_exp_neg(
    stream: NoiseStream,
    a: npt.NDArray[np.int64],
    power: int,
    c: int,
    b: npt.NDArray[np.int64] | None = None,
) -> npt.NDArray[np.bool_]:
    """Independent ``Bernoulli(exp(-q_i))`` for ``q_i = a_i**power / (c * b_i)`` in [0, 1].

    Canonne, Kamath, Steinke 2020, Algorithm 1: ``K`` counts a chain of successes of
    ``Bernoulli(q / K)``; ``P(K odd) = exp(-q)``. ``b`` defaults to ones; ``a >= 0``.
    """
    af = a.astype(np.float64) ** power  # relative error <= 3 ulp
    q = af / (float(c) if b is None else float(c) * b.astype(np.float64))
    result = np.zeros(a.size, dtype=np.bool_)
    live = np.arange(a.size)  # trials whose chain goes on, and their current K
    k = 1
    while live.size:
        p = q[live] / float(k) if k > 1 else q[live]

        def exact(j: int, live: npt.NDArray[np.intp] = live, k: int = k) -> tuple[int, int]:
            i = int(live[j])
            return int(a[i]) ** power, c * (1 if b is None else int(b[i])) * k

        step = bernoulli(stream, p, exact)
        result[live[~step]] = (k & 1) == 1
        live = live[step]
        k += 1
    return result


def _exp_minus_one_bounds(terms: int) -> tuple[Fraction, Fraction]:
    """Rational ``lo < exp(-1) < hi`` from the alternating series ``sum (-1)^k / k!``."""
    partial = Fraction(0)
    for k in range(terms + 2):
        previous = partial
        partial += Fraction((-1) ** k, math.factorial(k))
    return min(previous, partial), max(previous, partial)


_E1_53 = math.floor(_exp_minus_one_bounds(30)[0] * (1 << 53))
"""``floor(exp(-1) * 2**53)``: 30 terms bound exp(-1) within 1/32!, far inside one step."""


def _settle_exp_minus_one(stream: NoiseStream, head: int) -> bool:
    """Is ``U < exp(-1)``, where ``U``'s first 53 bits are ``head``? (exact)"""
    scale, terms = 1 << 53, 30
    while True:
        lo, hi = _exp_minus_one_bounds(terms)
        if Fraction(head + 1, scale) <= lo:
            return True
        if Fraction(head, scale) >= hi:
            return False
        (b,) = stream.words(1).tolist()
        head, scale, terms = head * (1 << 64) + b, scale << 64, terms + 25


def bernoulli_exp_minus_one(stream: NoiseStream, n: int) -> npt.NDArray[np.bool_]:
    """``n`` independent ``Bernoulli(exp(-1))``, one word each (ties, 2**-53 of them, are
    settled against rational bounds of ``exp(-1)``)."""
    head = stream.words(n) >> np.uint64(11)
    yes: npt.NDArray[np.bool_] = head < np.uint64(_E1_53)  # U < (head+1)/2**53 <= exp(-1)
    tie = head == np.uint64(_E1_53)
    if tie.any():
        for i in np.flatnonzero(tie).tolist():
            yes[i] = _settle_exp_minus_one(stream, _E1_53)
    return yes


# ------------------------------------------------------------------ the samplers


def sample_discrete_laplace(
    t: int, size: int, stream: NoiseStream, max_geometric: int | None = None
) -> npt.NDArray[np.int64]:
    """``size`` draws of the discrete Laplace ``P(y) ∝ exp(-|y| / t)`` (int64), ``t >= 1``.

    Canonne, Kamath, Steinke 2020, Algorithm 2 with ``s = 1``. ``max_geometric`` bounds the
    geometric part (:class:`SamplerOverflow` beyond it); by default so that ``|y| < 2**62``.
    """
    if max_geometric is None:
        max_geometric = (1 << 62) // t - 1
    out = np.empty(size, dtype=np.int64)
    todo = np.arange(size)
    while todo.size:
        u = stream.below(t, todo.size)
        keep = bernoulli_exp_neg(stream, u, 1, t)  # exp(-u / t)
        retry = [todo[~keep]]
        idx, u = todo[keep], u[keep]
        v = np.zeros(idx.size, dtype=np.int64)
        going = np.arange(idx.size)
        while going.size:  # v: successes of Bernoulli(exp(-1)) before the first failure
            going = going[bernoulli_exp_minus_one(stream, going.size)]
            v[going] += 1
        if v.size and int(v.max()) > max_geometric:
            raise SamplerOverflow(
                f"discrete Laplace candidate beyond the exact int64 range (t = {t}); "
                "nothing was drawn"
            )
        negative = (stream.words(idx.size) & np.uint64(1)).astype(np.bool_)
        bad = negative & (u == 0) & (v == 0)  # -0 would count zero twice
        y = u + t * v
        np.negative(y, out=y, where=negative)
        out[idx[~bad]] = y[~bad]
        retry.append(idx[bad])
        todo = np.concatenate(retry)
    return out


def _check_sigma2(sigma2: int) -> int:
    if not checks.is_integer(sigma2):
        raise ParameterError("sigma2", f"must be an integer in 1..2**56, got {sigma2!r}")
    s = int(sigma2)
    if not 1 <= s <= MAX_SIGMA2:
        raise ParameterError(
            "sigma2",
            f"must be an integer in 1..2**56 (the exact sampler's range), got {s} "
            f"(2**{math.log2(s):.2f})"
            if s > 0
            else f"must be an integer in 1..2**56, got {s}",
        )
    return s


def sample_discrete_gaussian(sigma2: int, size: int, stream: NoiseStream) -> npt.NDArray[np.int64]:
    """``size`` independent draws of ``N_Z(0, sigma2)`` (int64), exactly.

    ``sigma2`` is an integer variance parameter in ``1..MAX_SIGMA2`` (encoded units²); the
    draws have mean 0 and a variance of at most ``sigma2``, below it by an amount
    exponentially small in ``sigma2`` (Canonne, Kamath, Steinke 2020, Section 2.4).
    Algorithm 3 of that paper with ``t = isqrt(sigma2) + 1``. Raises
    :class:`SamplerOverflow` (probability below ``exp(-127)`` per sample).
    """
    s = _check_sigma2(sigma2)
    n = checks.integer("size", size, 0)
    t = math.isqrt(s) + 1
    # |y| * t < t * t * (v + 1) must stay below 2**63: bound the geometric part.
    # Capping it at 2**16 also bounds gamma below 2**34 parts (exp(-65536) to reach it).
    max_geometric = min(((1 << 63) - 1) // (t * t) - 1, 1 << 16)
    den = 2 * s * t * t  # keep y with prob exp(-(|y| t - s)^2 / (2 s t^2))
    out = np.empty(n, dtype=np.int64)
    todo = np.arange(n)
    while todo.size:
        y = sample_discrete_laplace(t, todo.size, stream, max_geometric)
        x = np.abs(y) * t - s  # exact: |y| * t < 2**63
        xf = np.abs(x.astype(np.float64))
        gamma = xf * xf / float(den)  # relative error <= 5 ulp
        parts = (np.floor(gamma * (1.0 + GUARD)) + 1.0).astype(np.int64)  # an integer >= gamma
        keep = np.ones(todo.size, dtype=np.bool_)
        xa = np.abs(x)
        j = 1
        live = np.arange(todo.size)
        while live.size:  # keep = AND over parts of Bernoulli(exp(-gamma / parts))
            live = live[parts[live] >= j]
            if not live.size:
                break
            ok = bernoulli_exp_neg(stream, xa[live], 2, den, parts[live])
            keep[live[~ok]] = False
            live = live[ok]
            j += 1
        out[todo[keep]] = y[keep]
        todo = todo[~keep]
    return out


def gaussian_tail_bound(sigma2: float, d: int, failure: float = 2.0**-64) -> int:
    """An integer ``T`` with ``P(max_i |X_i| > T) <= failure`` when each of the ``d``
    coordinates ``X_i`` is a sum of independent discrete Gaussians whose variance parameters
    add up to ``sigma2``: the noise bound of the overflow check.

    A discrete Gaussian ``N_Z(0, s)`` is subgaussian with parameter ``s``: ``E exp(λX) <=
    exp(λ² s / 2)`` (Canonne, Kamath, Steinke 2020, Section 2), so a sum of independent ones
    is subgaussian with the summed parameter, ``P(|X_i| >= u) <= 2 exp(-u² / (2 sigma2))``
    (Chernoff), and a union bound over the ``d`` coordinates gives ``T``.
    """
    if not (checks.is_real(sigma2) and math.isfinite(float(sigma2)) and sigma2 >= 0):
        raise ParameterError("sigma2", f"must be a finite number >= 0, got {sigma2!r}")
    dim = checks.integer("d", d, 1)
    if not (checks.is_real(failure) and 0 < failure < 1):
        raise ParameterError("failure", f"must be a probability in (0, 1), got {failure!r}")
    if sigma2 == 0:
        return 0
    u = math.sqrt(2.0 * float(sigma2) * math.log(2.0 * dim / float(failure)))
    return math.ceil(u * (1.0 + 1e-9))
