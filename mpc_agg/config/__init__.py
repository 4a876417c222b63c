"""Topologies (docs/design.md, "Layout"; README, "Topology files"): typed, self-validating
objects (``schema``) and the generic YAML reading they are built with (``load``)."""

from mpc_agg.config.schema import (
    AggregatorAddress,
    Deadlines,
    DPSettings,
    Mechanism,
    RoundPolicy,
    Topology,
)

__all__ = [
    "AggregatorAddress",
    "DPSettings",
    "Deadlines",
    "Mechanism",
    "RoundPolicy",
    "Topology",
]
