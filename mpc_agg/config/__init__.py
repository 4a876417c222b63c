"""Topologies: typed schema (``schema``) and YAML loading with validation (``load``)."""

from mpc_agg.config.schema import AggregatorAddress, RoundPolicy, Topology

__all__ = ["AggregatorAddress", "RoundPolicy", "Topology"]
