"""An aggregator's privacy: per-round noise plans, the ledger, and one class per mechanism.

docs/design.md, "Differential privacy" and "Fail closed". :class:`Privacy` owns what the
``dp`` section implies at one aggregator: the plan of each round (calibrated when it opens),
the ledger (checked at agreement, charged before any noise is drawn), and the mechanism
that turns this aggregator's share of the total into what it reveals. Each mechanism is a
class with the same three steps (:class:`DiscreteGaussianNoise`, :class:`BinomialNoise`);
nothing else branches on the mechanism.

Flat memory (README, "Cost model and performance"): the share is noised in place, the noise
drawn :data:`NOISE_BLOCK` coordinates at a time from the round's one sequential keystream,
so neither the noise vector nor the sampler's temporaries are ever d long; the additive
reveal writes the total into the same buffer (:func:`~mpc_agg.mpc.reveal.reveal_sum`).
Joint binomial noise is the exception: MPyC takes and returns whole vectors (it is only
feasible for small d anyway).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from mpc_agg.config.schema import Topology
from mpc_agg.core.protocol import Refusal
from mpc_agg.core.ring import GF_P61, Ring, RingArray
from mpc_agg.dp.accountant import PrivacyLedger
from mpc_agg.dp.discrete_gaussian import NoiseStream, sample_discrete_gaussian
from mpc_agg.dp.planning import NoisePlan, plan_noise
from mpc_agg.errors import AgreementFailed, BudgetExceeded, ConfigError, InvalidRequest, StateError
from mpc_agg.mpc.network import PartyNetwork
from mpc_agg.mpc.reveal import reveal_sum
from mpc_agg.storage.ledger import LedgerFile
from mpc_agg.storage.round_index import RoundIndex

log = logging.getLogger("mpc_agg.aggregator")


NOISE_BLOCK = 1 << 18
"""Coordinates of local noise drawn and added at a time: the exact sampler's temporaries
take about 150 bytes per coordinate of a draw (some 40 MB here), whatever d is."""


class NoiseMechanism(Protocol):
    """How one mechanism's noise reaches the revealed total."""

    plan: NoisePlan

    def add_local(self, share: RingArray, stream: NoiseStream) -> RingArray:
        """This aggregator's share as it goes to the reveal: ``share`` itself, its noise
        added in place (or raising, the share then partly noised and never sent)."""

    async def reveal(self, network: PartyNetwork, share: RingArray, d: int) -> RingArray:
        """Open the total from every party's share (every party calls this alike); the
        additive reveal returns it in ``share``'s buffer."""

    def status(self) -> dict[str, Any]:
        """What ``GET /v1/rounds/{round}`` shows of the noise."""


class DiscreteGaussianNoise:
    """Each aggregator adds ``N_Z(0, sigma2)`` to its share, in the topology's ring (modulo
    2^32 in Z_(2^32)); the shares are opened as is."""

    def __init__(self, plan: NoisePlan, ring: Ring = GF_P61) -> None:
        self.plan = plan
        self.ring = ring

    def add_local(self, share: RingArray, stream: NoiseStream) -> RingArray:
        """Add ``N_Z(0, sigma2)`` to each coordinate of ``share`` in place, drawing
        :data:`NOISE_BLOCK` coordinates at a time in order from ``stream`` (independent
        draws, so the same distribution as one draw of d); returns ``share``."""
        d = self.plan.d
        if share.shape != (d,) or share.dtype != self.ring.dtype:
            raise AgreementFailed(
                f"noise of shape ({d},) for a share of {share.shape} ({share.dtype})",
                code="aborted",
            )
        for start in range(0, d, NOISE_BLOCK):
            stop = min(start + NOISE_BLOCK, d)
            noise = sample_discrete_gaussian(self.plan.sigma2, stop - start, stream)
            if noise.shape != (stop - start,):
                raise AgreementFailed(
                    f"noise of shape {noise.shape} for {stop - start} coordinates",
                    code="aborted",
                )
            # The headroom check bounds the total noise by the plan's tail (< the ring's
            # limit) except with probability 2^-64; a sample beyond the ring's signed range
            # itself would be added wrongly, so it aborts the round instead (like an int64
            # overflow). Checked before this block is added.
            peak = int(np.abs(noise).max()) if noise.size else 0
            if peak >= self.ring.limit:
                raise AgreementFailed(
                    f"a noise sample of magnitude {peak} is beyond the signed range of ring "
                    f"{self.ring.name} ({self.ring.limit_text}); nothing is revealed",
                    code="aborted",
                )
            part = share[start:stop]
            np.add(part, self.ring.from_signed(noise), out=part)  # < 2p: no uint64 overflow
            self.ring.canonical(part, out=part)
        return share

    async def reveal(self, network: PartyNetwork, share: RingArray, d: int) -> RingArray:
        return await reveal_sum(network, share, d, self.ring)

    def status(self) -> dict[str, Any]:
        return _common_status(self.plan)


class BinomialNoise:
    """No local noise: the shares enter MPyC as secrets and total + joint binomial noise is
    opened (docs/design.md, "Differential privacy", ``binomial``). The total comes back as
    a new array from MPyC (d-sized secure arrays: small d only), not in ``share``."""

    def __init__(self, plan: NoisePlan, ring: Ring = GF_P61) -> None:
        self.plan = plan  # GF(p) only: a topology with binomial noise and z2_32 is refused

    def add_local(self, share: RingArray, stream: NoiseStream) -> RingArray:
        return share

    async def reveal(self, network: PartyNetwork, share: RingArray, d: int) -> RingArray:
        total: RingArray = await network.joint_binomial_sum(share, self.plan.trials)
        return total

    def status(self) -> dict[str, Any]:
        return {
            **_common_status(self.plan),
            "trials": self.plan.trials,
            "secure_bits": self.plan.secure_bits,
            "estimated_seconds": round(self.plan.estimated_seconds, 2),
        }


MECHANISMS: dict[str, Callable[[NoisePlan, Ring], NoiseMechanism]] = {
    "discrete_gaussian": DiscreteGaussianNoise,
    "binomial": BinomialNoise,
}


def _common_status(plan: NoisePlan) -> dict[str, Any]:
    return {
        "mechanism": str(plan.mechanism),
        "epsilon": plan.epsilon,
        "delta": plan.delta,
        "noise_stddev": plan.noise_stddev,
    }


def plan_summary(plan: NoisePlan | None) -> dict[str, Any] | None:
    """What every party must agree on about a round's noise (None without DP): journaled
    when the round opens and compared in the exchange of views."""
    if plan is None:
        return None
    return {
        "mechanism": str(plan.mechanism),
        "epsilon": plan.epsilon,
        "delta": plan.delta,
        "d": plan.d,
        "honest": plan.honest,
        "sigma2": plan.sigma2,
        "trials": plan.trials,
    }


class Privacy:
    """The ``dp`` section at aggregator ``index``; without one every method is a no-op that
    returns None (or the share unchanged)."""

    def __init__(
        self,
        topology: Topology,
        index: int,
        round_index: RoundIndex,
        noise_stream: Callable[[], NoiseStream] | None = None,
    ) -> None:
        self.topology = topology
        self.index = index
        self.noise_stream: Callable[[], NoiseStream] = noise_stream or NoiseStream
        self.mechanisms: dict[str, NoiseMechanism] = {}  # round id -> its noise, with DP only
        self.result_fields: dict[str, dict[str, Any]] = {}  # round id -> privacy of its result
        self.ledger: PrivacyLedger | None = None
        self.ledger_file: LedgerFile | None = None
        if topology.dp is not None:
            self.ledger_file = LedgerFile(topology.ledger_path(index), fsync=topology.fsync)
            self.ledger = self.ledger_file.load(
                topology.dp.budget_epsilon, topology.dp.budget_delta
            )
            self._check_ledger_against_index(round_index)

    def _check_ledger_against_index(self, round_index: RoundIndex) -> None:
        """The ledger must hold every round the index says was revealed with DP; a new
        index starts with every round id the ledger holds (they were used before it)."""
        assert self.ledger is not None
        charged = {e.round_id for e in self.ledger.events}
        if not round_index.existed:
            for round_id in sorted(charged):  # ids spent before round indexes existed
                round_index.record(round_id, "failed")
            return
        missing = sorted(set(round_index.revealed_with_dp()) - charged)
        if missing:
            raise StateError(
                f"aggregator {self.index}: the privacy ledger {self.ledger_file} lacks "
                f"{len(missing)} round(s) that were revealed with DP (e.g. {missing[0]!r}); "
                "refusing to start with a budget that forgot them. Restore the ledger; only "
                "to start a new privacy budget on purpose, remove both it and rounds.index"
            )

    @property
    def enabled(self) -> bool:
        """True when the topology has a ``dp`` section."""
        return self.topology.dp is not None

    def plan(self, round_id: str, dim: int) -> NoisePlan | None:
        """Calibrate the round's noise (with DP) and prove that clients plus noise cannot
        wrap around the ring's half (p/2, or 2^31 in Z_(2^32)); raises InvalidRequest for an
        unsafe round. Remembers the plan."""
        dp = self.topology.dp
        if dp is None:
            return None
        try:
            plan = plan_noise(dp, self.topology.encoding, dim, self.topology.m)
            self.topology.encoding.check_headroom(
                self.topology.rounds.max_clients, noise_tail=plan.tail
            )
        except ConfigError as exc:
            raise InvalidRequest(f"unsafe round of dimension {dim}: {exc.detail}") from None
        self.mechanisms[round_id] = MECHANISMS[str(plan.mechanism)](
            plan, self.topology.encoding.ring
        )
        if plan.trials:
            log.info(
                "round %s: joint binomial noise, %d trials per coordinate, %d secret bits "
                "(about %.1f s of MPC), noise std %.4g",
                round_id,
                plan.trials,
                plan.secure_bits,
                plan.estimated_seconds,
                plan.noise_stddev,
            )
        return plan

    def forget(self, round_id: str) -> None:
        """Drop the plan of a round that was not opened after all."""
        self.mechanisms.pop(round_id, None)

    def plan_of(self, round_id: str) -> NoisePlan | None:
        """The round's plan (None without DP, or if it has none here)."""
        mechanism = self.mechanisms.get(round_id)
        return None if mechanism is None else mechanism.plan

    def summary(self, round_id: str) -> dict[str, Any] | None:
        """:func:`plan_summary` of the round's plan."""
        return plan_summary(self.plan_of(round_id))

    def mismatch(self, round_id: str, dim: int, recorded: Any) -> str | None:
        """Why a journal's recorded noise plan does not match what this topology would add
        now (None if it matches): a round opened under one DP setting is never revealed
        under another, or without noise."""
        try:
            current = plan_summary(self.plan(round_id, dim))
        except InvalidRequest as exc:
            return exc.detail
        if recorded != current:
            return f"it was opened with noise plan {recorded}, the topology now gives {current}"
        return None

    def refusal(self, round_id: str) -> Refusal | None:
        """Why this aggregator's privacy refuses the round at agreement, or None: no plan,
        or a ledger that refuses (or cannot check) its cost. Changes nothing."""
        if not self.enabled:
            return None
        plan = self.plan_of(round_id)
        if plan is None:
            return Refusal(
                "no_noise_plan", f"aggregator {self.index} has no noise plan for round {round_id!r}"
            )
        if self.ledger is None:
            return Refusal(
                "ledger_error", f"aggregator {self.index} has no privacy ledger for a DP round"
            )
        try:
            self.ledger.check(plan.event(round_id))
        except BudgetExceeded as exc:
            return Refusal("budget_exceeded", str(exc))
        except Exception as exc:  # noqa: BLE001 - refused in step with the others
            log.exception("round %s: the privacy ledger cannot check the round", round_id)
            return Refusal(
                "ledger_error", f"aggregator {self.index} cannot check its privacy budget ({exc})"
            )
        return None

    def noisy(self, round_id: str, share: RingArray) -> RingArray:
        """Charge the release in the ledger durably, then return ``share`` as it goes to the
        reveal: the same array, with this aggregator's noise added in place for a mechanism
        that adds noise locally (block by block, no d-sized temporary). Every release
        attempt is charged, before any noise is drawn; raises on any failure, ``share``
        then possibly partly noised and never revealed. Without DP, returns ``share``."""
        if not self.enabled:
            return share
        mechanism = self.mechanisms.get(round_id)
        if mechanism is None:
            raise AgreementFailed(
                f"round {round_id!r} has DP but no noise plan", code="no_noise_plan"
            )
        if self.ledger is None or self.ledger_file is None:
            raise AgreementFailed(
                f"aggregator {self.index} has no privacy ledger", code="ledger_error"
            )
        plan = mechanism.plan
        cumulative = self.ledger.commit(plan.event(round_id), persist=self.ledger_file.append)
        self.result_fields[round_id] = {
            "mechanism": str(plan.mechanism),
            "epsilon": plan.epsilon,
            "delta": plan.delta,
            "noise_stddev": plan.noise_stddev,
            "cumulative_epsilon": cumulative,
            "cumulative_delta": self.ledger.budget_delta,
        }
        return mechanism.add_local(share, self.noise_stream())

    async def reveal(
        self, network: PartyNetwork, round_id: str, share: RingArray, d: int
    ) -> RingArray:
        """Open the total of the round (every party calls this alike); the additive reveal
        writes it into ``share``'s buffer slice by slice and returns ``share``."""
        mechanism = self.mechanisms.get(round_id)
        if mechanism is None:
            return await reveal_sum(network, share, d, self.topology.encoding.ring)
        return await mechanism.reveal(network, share, d)

    def status(self, round_id: str) -> dict[str, Any] | None:
        """The ``dp`` part of a round's status, or None."""
        mechanism = self.mechanisms.get(round_id)
        return None if mechanism is None else mechanism.status()
