"""Topologies (docs/design.md, "Layout"; README, "Topology files"): typed, self-validating
objects (``schema``) and the generic YAML reading they are built with (``load``)."""

from mpc_agg.config.schema import (
    AggregatorAddress,
    AuthSettings,
    Deadlines,
    DPSettings,
    Mechanism,
    RoundPolicy,
    TlsSettings,
    Topology,
)

__all__ = [
    "AggregatorAddress",
    "AuthSettings",
    "DPSettings",
    "Deadlines",
    "Mechanism",
    "RoundPolicy",
    "TlsSettings",
    "Topology",
]
