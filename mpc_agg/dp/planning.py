"""A round's noise plan: from the ``dp`` settings and the round's dimension to what each
aggregator adds and what the round costs.

DESIGN.md, "DP mechanisms / distributed": each of the ``m`` aggregators adds Skellam noise
Sk(mu / (m - t), mu / (m - t)) to its own share of the total, where ``t`` is
``dp.max_colluding`` and ``mu`` is calibrated (Agarwal, Kairouz, Liu 2021) so that the noise
of the ``m - t`` honest aggregators *alone* meets (epsilon, delta); Skellam is closed under
addition, so that honest noise is Sk(mu, mu). The total noise has variance
``2 mu m / (m - t)``: the ``m / (m - t)`` factor is the price of not trusting any one
aggregator with the noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mpc_agg.config.schema import DPSettings
from mpc_agg.core.encoding import FixedPointEncoding
from mpc_agg.dp.accountant import PrivacyEvent
from mpc_agg.dp.calibration import SKELLAM_ORDERS, calibrate_skellam, sensitivities, skellam_rdp
from mpc_agg.dp.mechanisms import skellam_tail_bound
from mpc_agg.errors import ConfigError


@dataclass(frozen=True)
class NoisePlan:
    """Noise for one round of dimension ``d``; Skellam parameters in encoded units.

    ``mu``: the honest aggregators' combined Skellam parameter (calibrated);
    ``per_party_mu``: what each aggregator adds; ``scale``: ``2**frac_bits``;
    ``tail``: |total noise| per coordinate stays below it except with probability 2^-64.
    """

    mechanism: str
    epsilon: float
    delta: float
    d: int
    m: int
    honest: int
    delta1: float
    delta2: float
    mu: float
    per_party_mu: float
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
        """Standard deviation of the total noise per coordinate, in encoded units."""
        if self.mechanism == "binomial":
            return math.sqrt(self.trials / 4.0)
        return math.sqrt(2.0 * self.per_party_mu * self.m)

    @property
    def noise_stddev(self) -> float:
        """Standard deviation of the total noise per coordinate, in output (float) units."""
        return self.noise_stddev_encoded / self.scale

    def event(self, round_id: str) -> PrivacyEvent:
        """The round's privacy cost for the ledger: the honest noise alone (worst case);
        binomial rounds are approximate-DP events (no RDP curve)."""
        if self.mechanism == "binomial":
            return PrivacyEvent(round_id, self.mechanism, self.binomial_epsilon, self.delta, (), ())
        rdp = skellam_rdp(self.mu, self.delta1, self.delta2, SKELLAM_ORDERS)
        return PrivacyEvent(
            round_id,
            self.mechanism,
            self.epsilon,
            self.delta,
            tuple(float(o) for o in SKELLAM_ORDERS),
            tuple(float(r) for r in rdp),
        )


JOINT_BITS_PER_SECOND = 7.0e4
"""Secret random bits per second MPyC generated among 3 local parties (../shared/NOTES.md:
1e5 bits in 1.9 s, 1e6 in 13 s)."""

MAX_JOINT_BITS = 2_000_000
"""Joint binomial rounds needing more secret bits than this (~30 s) are refused."""


def plan_noise(dp: DPSettings, encoding: FixedPointEncoding, d: int, m: int) -> NoisePlan:
    """Calibrate the round's noise for vectors of length ``d`` among ``m`` aggregators.

    Raises :class:`~mpc_agg.errors.ConfigError` when joint binomial noise would be too costly
    or its sensitivity too large for exact accounting (the message suggests skellam).
    """
    delta1, delta2 = sensitivities(dp.l2_clip, encoding.frac_bits, d)
    if dp.mechanism == "binomial":
        return _plan_binomial(dp, encoding, d, m, delta1, delta2)
    mu = calibrate_skellam(dp.epsilon, dp.delta, delta1, delta2)
    honest = m - dp.max_colluding
    per_party = mu / honest
    return NoisePlan(
        mechanism=dp.mechanism,
        epsilon=dp.epsilon,
        delta=dp.delta,
        d=d,
        m=m,
        honest=honest,
        delta1=delta1,
        delta2=delta2,
        mu=mu,
        per_party_mu=per_party,
        scale=encoding.scale,
        tail=skellam_tail_bound(per_party * m, d),
    )


def _plan_binomial(
    dp: DPSettings, encoding: FixedPointEncoding, d: int, m: int, delta1: float, delta2: float
) -> NoisePlan:
    from mpc_agg.dp.binomial import binomial_epsilon, calibrate_binomial

    trials = calibrate_binomial(dp.epsilon, dp.delta, delta2, d)
    if trials * d > MAX_JOINT_BITS:
        raise ConfigError(
            "dp.mechanism",
            f"joint binomial noise for d = {d} needs {trials} secret bits per coordinate, "
            f"{trials * d:,} in all (about {trials * d / JOINT_BITS_PER_SECOND:.0f} s of MPC; "
            f"the limit is {MAX_JOINT_BITS:,}): it is meant for small outputs such as counts "
            "and histograms; use skellam",
        )
    return NoisePlan(
        mechanism="binomial",
        epsilon=dp.epsilon,
        delta=dp.delta,
        d=d,
        m=m,
        honest=m - dp.max_colluding,
        delta1=delta1,
        delta2=delta2,
        mu=0.0,
        per_party_mu=0.0,
        scale=encoding.scale,
        tail=trials // 2,
        trials=trials,
        binomial_epsilon=binomial_epsilon(trials, dp.delta, delta2, d),
    )
