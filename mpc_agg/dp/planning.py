"""A round's noise plan: from the ``dp`` settings and the round's dimension to what each
aggregator adds and what the round costs.

docs/design.md, "Differential privacy". ``discrete_gaussian`` (the distributed discrete
Gaussian of Kairouz, Liu, Steinke 2021): each of the ``m`` aggregators adds ``N_Z(0,
sigma2)`` to its own share of the total, drawn by the exact sampler of
:mod:`mpc_agg.dp.discrete_gaussian`; ``sigma2`` is calibrated so that the noise of the ``m -
t`` honest aggregators *alone* (``t = dp.max_colluding``) meets (epsilon, delta). The total
noise has variance about ``m sigma2``: the ``m / (m - t)`` factor over one trusted party's
noise is the price of trusting none. ``binomial``: joint noise inside MPyC
(:mod:`mpc_agg.dp.binomial`).

The neighbouring relation is *zero-out*: one client's vector replaced by zeros. The revealed
``num_clients`` is exact, so adding or removing a client is not hidden by the noise.

This module is the boundary between the pure dp math and the topology: :func:`plan_noise`
reads its inputs through two small protocols (:class:`NoiseSettings`, met by the ``dp``
section :class:`~mpc_agg.config.schema.DPSettings`, and :class:`EncodingScale`, met by
:class:`~mpc_agg.core.encoding.FixedPointEncoding`), so dp imports nothing from
``mpc_agg.config``, and it reports every refusal as a :class:`~mpc_agg.errors.ConfigError`
naming the YAML key to change (the math below it raises
:class:`~mpc_agg.dp.checks.ParameterError`, naming the argument).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Protocol

from mpc_agg.dp.accountant import PrivacyEvent
from mpc_agg.dp.binomial import SensitivityTooLarge, binomial_epsilon, calibrate_binomial
from mpc_agg.dp.calibration import INTEGER_ORDERS, calibrate_ddg, ddg_rdp, sensitivities
from mpc_agg.dp.checks import ParameterError
from mpc_agg.dp.discrete_gaussian import MAX_SIGMA2, gaussian_tail_bound
from mpc_agg.errors import ConfigError


class Mechanism(str, enum.Enum):
    """The ``dp.mechanism`` of a topology. A ``str`` (``Mechanism.BINOMIAL == "binomial"``)
    that prints and serialises (JSON) as its value."""

    DISCRETE_GAUSSIAN = "discrete_gaussian"
    """Each aggregator adds its own exactly drawn discrete Gaussian noise to its share."""
    BINOMIAL = "binomial"
    """Joint binomial noise from secret random bits inside MPyC (``m >= 3``, ``t >= 1``)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class NoiseSettings(Protocol):
    """What :func:`plan_noise` reads of the ``dp`` section (``DPSettings`` meets it)."""

    @property
    def mechanism(self) -> str:
        """A :class:`Mechanism` or its value."""

    @property
    def epsilon(self) -> float: ...

    @property
    def delta(self) -> float: ...

    @property
    def l2_clip(self) -> float: ...

    @property
    def max_colluding(self) -> int: ...


class EncodingScale(Protocol):
    """What :func:`plan_noise` reads of the fixed-point encoding (``FixedPointEncoding``)."""

    @property
    def frac_bits(self) -> int: ...

    @property
    def scale(self) -> float: ...


@dataclass(frozen=True)
class NoisePlan:
    """Noise for one round of dimension ``d``, in encoded units.

    ``sigma2``: each aggregator's discrete Gaussian variance parameter (integer; 0 for
    binomial); ``scale``: ``2**frac_bits``; ``tail``: |total noise| per coordinate stays
    below it except with probability 2^-64.
    """

    mechanism: Mechanism
    epsilon: float
    delta: float
    d: int
    m: int
    honest: int
    delta1: float
    delta2: float
    sigma2: int
    scale: float
    tail: int
    trials: int = 0
    """Binomial only: coin flips per coordinate (noise Bin(trials, 1/2) - trials/2)."""
    binomial_epsilon: float = 0.0

    @property
    def secure_bits(self) -> int:
        """Binomial only: secret random bits MPyC must generate for the round."""
        return self.trials * self.d

    @property
    def estimated_seconds(self) -> float:
        """Binomial only: rough cost of generating the bits (rate measured on 2 cores)."""
        return self.secure_bits / JOINT_BITS_PER_SECOND

    @property
    def noise_stddev_encoded(self) -> float:
        """Standard deviation of the total noise per coordinate, in encoded units (for the
        discrete Gaussian an upper bound, exponentially close)."""
        if self.mechanism is Mechanism.BINOMIAL:
            return math.sqrt(self.trials / 4.0)
        return math.sqrt(self.sigma2 * self.m)

    @property
    def noise_stddev(self) -> float:
        """Standard deviation of the total noise per coordinate, in output (float) units."""
        return self.noise_stddev_encoded / self.scale

    def event(self, round_id: str) -> PrivacyEvent:
        """The round's privacy cost for the ledger: the honest noise alone (worst case);
        binomial rounds are approximate-DP events (no RDP curve)."""
        mechanism = self.mechanism.value
        if self.mechanism is Mechanism.BINOMIAL:
            return PrivacyEvent(round_id, mechanism, self.binomial_epsilon, self.delta, (), ())
        rdp = ddg_rdp(self.sigma2, self.honest, self.delta1, self.delta2, self.d)
        return PrivacyEvent(
            round_id,
            mechanism,
            self.epsilon,
            self.delta,
            tuple(float(o) for o in INTEGER_ORDERS),
            tuple(float(r) for r in rdp),
        )


JOINT_BITS_PER_SECOND = 7.0e4
"""Secret random bits per second MPyC generated among 3 local parties (1e5 bits in 1.9 s,
1e6 in 13 s, on the 2-core development machine)."""

MAX_JOINT_BITS = 2_000_000
"""Joint binomial rounds needing more secret bits than this (~30 s) are refused."""


_YAML_PATHS = {
    "mechanism": "dp.mechanism",
    "epsilon": "dp.epsilon",
    "delta": "dp.delta",
    "l2_clip": "dp.l2_clip",
    "max_colluding": "dp.max_colluding",
    "n": "dp.max_colluding",  # the number of honest aggregators, m - max_colluding
    "frac_bits": "encoding.frac_bits",
    "d": "dimension",
}
"""The YAML key behind each argument of the dp math that a plan can get wrong."""


def _config_error(exc: ParameterError) -> ConfigError:
    """``exc`` at the YAML key to change: a sensitivity beyond the exact binomial accounting
    is a limit of the mechanism (``dp.mechanism``); anything unforeseen is ``dp``."""
    if isinstance(exc, SensitivityTooLarge):
        return ConfigError("dp.mechanism", exc.detail)
    return ConfigError(_YAML_PATHS.get(exc.name, "dp"), exc.detail)


def plan_noise(dp: NoiseSettings, encoding: EncodingScale, d: int, m: int) -> NoisePlan:
    """Calibrate the round's noise for vectors of length ``d`` among ``m`` aggregators.

    ``dp`` is the topology's ``dp`` section (a :class:`~mpc_agg.config.schema.DPSettings`
    or anything with its attributes), ``encoding`` its fixed-point encoding. Raises
    :class:`~mpc_agg.errors.ConfigError`, at the YAML key to change, when the noise cannot
    be drawn exactly (the per-aggregator variance exceeds the sampler's range, ``dp``), or
    joint binomial noise would be too costly or its sensitivity too large for exact
    accounting (``dp.mechanism``), or an input is out of range (``dp.epsilon``,
    ``dimension``, ...).
    """
    try:
        return _plan(dp, encoding, d, m)
    except ParameterError as exc:
        raise _config_error(exc) from None


def _plan(dp: NoiseSettings, encoding: EncodingScale, d: int, m: int) -> NoisePlan:
    try:
        mechanism = Mechanism(dp.mechanism)
    except ValueError:
        raise ParameterError(
            "mechanism", f"expected discrete_gaussian or binomial, got {dp.mechanism!r}"
        ) from None
    delta1, delta2 = sensitivities(dp.l2_clip, encoding.frac_bits, d)
    if mechanism is Mechanism.BINOMIAL:
        return _plan_binomial(dp, encoding, d, m, delta1, delta2)
    honest = m - dp.max_colluding
    sigma2 = calibrate_ddg(dp.epsilon, dp.delta, delta1, delta2, d, honest)
    if sigma2 > MAX_SIGMA2:
        # Each fractional bit less divides the needed variance by about 4.
        shrink = math.ceil(math.log2(sigma2 / MAX_SIGMA2) / 2)
        limit = math.log2(MAX_SIGMA2)
        raise ConfigError(
            "dp",
            f"the noise for d = {d} needs a per-aggregator variance of 2^"
            f"{math.log2(sigma2):.2f} (encoded units², from l2_clip = {dp.l2_clip:g}, "
            f"frac_bits = {encoding.frac_bits}, epsilon = {dp.epsilon:g}, delta = "
            f"{dp.delta:g}, {honest} honest aggregators), beyond the 2^{limit:.0f} the exact "
            f"discrete Gaussian sampler draws; lower encoding.frac_bits by at least {shrink} "
            "or raise dp.epsilon",
        )
    return NoisePlan(
        mechanism=mechanism,
        epsilon=dp.epsilon,
        delta=dp.delta,
        d=d,
        m=m,
        honest=honest,
        delta1=delta1,
        delta2=delta2,
        sigma2=sigma2,
        scale=encoding.scale,
        tail=gaussian_tail_bound(sigma2 * m, d),
    )


def _plan_binomial(
    dp: NoiseSettings, encoding: EncodingScale, d: int, m: int, delta1: float, delta2: float
) -> NoisePlan:
    trials = calibrate_binomial(dp.epsilon, dp.delta, delta2, d)
    if trials * d > MAX_JOINT_BITS:
        raise ConfigError(
            "dp.mechanism",
            f"joint binomial noise for d = {d} needs {trials} secret bits per coordinate, "
            f"{trials * d:,} in all (about {trials * d / JOINT_BITS_PER_SECOND:.0f} s of MPC; "
            f"the limit is {MAX_JOINT_BITS:,}): it is meant for small outputs such as counts "
            "and histograms; use discrete_gaussian",
        )
    return NoisePlan(
        mechanism=Mechanism.BINOMIAL,
        epsilon=dp.epsilon,
        delta=dp.delta,
        d=d,
        m=m,
        honest=m - dp.max_colluding,
        delta1=delta1,
        delta2=delta2,
        sigma2=0,
        scale=encoding.scale,
        tail=trials // 2,
        trials=trials,
        binomial_epsilon=binomial_epsilon(trials, dp.delta, delta2, d),
    )
