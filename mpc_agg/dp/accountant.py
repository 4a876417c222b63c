"""Privacy accounting across rounds: a ledger that checks before it commits.

docs/design.md, "Differential privacy" (a privacy accountant that composes rounds and
refuses a round that would exceed the configured budget). Each release attempt (a round
whose noise was drawn, revealed or not) is a frozen :class:`PrivacyEvent` carrying its
Rényi-DP curve on a fixed grid of orders. Rounds compose by adding their RDP curves
(Mironov 2017, Proposition 1); the cumulative spend is converted to (epsilon, delta) at the
budget's delta with dp-accounting's conversion (Canonne, Kamath, Steinke 2020).
:meth:`PrivacyLedger.check` raises :class:`~mpc_agg.errors.BudgetExceeded` and changes
nothing; :meth:`commit` checks first. Malformed events and budgets raise
:class:`~mpc_agg.dp.checks.ParameterError`; dp-accounting (and with it scipy) is imported
only when a spend is converted, not at import time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from mpc_agg.dp import checks
from mpc_agg.dp.checks import ParameterError
from mpc_agg.errors import BudgetExceeded


@dataclass(frozen=True)
class PrivacyEvent:
    """The privacy cost of one round: its (epsilon, delta) and its RDP curve (empty for an
    approximate-DP event, accounted by basic composition)."""

    round_id: str
    mechanism: str
    epsilon: float
    delta: float
    orders: tuple[float, ...]
    rdp: tuple[float, ...]

    def __post_init__(self) -> None:
        if not (checks.is_real(self.epsilon) and self.epsilon >= 0):  # NaN fails too
            raise ParameterError("epsilon", f"must be a number >= 0, got {self.epsilon!r}")
        if not (checks.is_real(self.delta) and 0 <= self.delta < 1):
            raise ParameterError("delta", f"must be a number in [0, 1), got {self.delta!r}")
        if len(self.orders) != len(self.rdp):
            raise ParameterError(
                "rdp",
                f"must hold one value per order: {len(self.orders)} orders but "
                f"{len(self.rdp)} RDP values",
            )

    def to_json(self) -> str:
        """One line of the on-disk ledger."""
        return json.dumps(
            {
                "round": self.round_id,
                "mechanism": self.mechanism,
                "epsilon": self.epsilon,
                "delta": self.delta,
                "orders": list(self.orders),
                "rdp": list(self.rdp),
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, line: str) -> PrivacyEvent:
        """The event of one ledger line (:meth:`to_json`); raises ValueError, KeyError or
        TypeError for a line that does not hold one."""
        d = json.loads(line)
        return cls(
            str(d["round"]),
            str(d["mechanism"]),
            float(d["epsilon"]),
            float(d["delta"]),
            tuple(float(o) for o in d["orders"]),
            tuple(float(r) for r in d["rdp"]),
        )


def cumulative_epsilon(events: Sequence[PrivacyEvent], delta: float) -> float:
    """Epsilon at ``delta`` of all ``events`` composed (0 for none).

    Events with an RDP curve compose by adding curves. Events without one (approximate-DP
    events, e.g. binomial noise, whose RDP is infinite) compose by basic composition
    (Dwork, Roth 2014, Theorem 3.16): their epsilons and deltas add, and the RDP group is
    converted at what is left of ``delta``; returns infinity if nothing is left.
    """
    delta = checks.probability("delta", delta)
    rdp_events = [e for e in events if e.rdp]
    approx = [e for e in events if not e.rdp]
    eps_approx = sum(e.epsilon for e in approx)
    delta_left = delta - sum(e.delta for e in approx)
    if delta_left <= 0:
        return math.inf
    if not rdp_events:
        return eps_approx
    orders = rdp_events[0].orders
    for e in rdp_events:
        if e.orders != orders:
            raise ParameterError(
                "events",
                f"must share one grid of RDP orders: round {e.round_id!r} was accounted on "
                "other RDP orders; cannot compose",
            )
    # Imported here: dp_accounting pulls in much of scipy (about 1 s of import).
    from dp_accounting.rdp import rdp_privacy_accountant

    total = np.sum([e.rdp for e in rdp_events], axis=0)
    eps, _ = rdp_privacy_accountant.compute_epsilon(list(orders), total.tolist(), delta_left)
    return float(eps) + eps_approx


class PrivacyLedger:
    """Rounds spent so far against a budget of (``budget_epsilon``, ``budget_delta``)."""

    def __init__(
        self, budget_epsilon: float, budget_delta: float, events: Iterable[PrivacyEvent] = ()
    ) -> None:
        self.budget_epsilon = checks.positive("budget_epsilon", budget_epsilon)
        self.budget_delta = checks.probability("budget_delta", budget_delta)
        self.events: list[PrivacyEvent] = list(events)

    def __repr__(self) -> str:
        return f"PrivacyLedger({len(self.events)} rounds, spent epsilon={self.spent():.4g})"

    def spent(self) -> float:
        """Cumulative epsilon at the budget's delta."""
        return cumulative_epsilon(self.events, self.budget_delta)

    def check(self, event: PrivacyEvent) -> float:
        """The cumulative epsilon with ``event`` added; raises BudgetExceeded, changing
        nothing, if it would exceed the budget.

        Every event is charged, whatever its round id: a second release attempt of the same
        round draws fresh noise and costs as much as the first (dp_accounting's ``compose``
        never treats a repeated event as free either)."""
        after = cumulative_epsilon([*self.events, event], self.budget_delta)
        if after > self.budget_epsilon:
            raise BudgetExceeded(
                f"round {event.round_id!r} would raise the privacy spend to epsilon = "
                f"{after:.4g} (at delta = {self.budget_delta:g}), over the budget of "
                f"{self.budget_epsilon:g} (spent so far: {self.spent():.4g} over "
                f"{len(self.events)} round(s)); refused before any noise or reveal"
            )
        return after

    def commit(
        self, event: PrivacyEvent, persist: Callable[[PrivacyEvent], None] | None = None
    ) -> float:
        """:meth:`check`, then record ``event`` (calling ``persist`` first, e.g. to write it
        to disk, so a failure there records nothing); returns the cumulative epsilon."""
        after = self.check(event)
        if persist is not None:
            persist(event)
        self.events.append(event)
        return after
