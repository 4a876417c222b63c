"""mpc_agg: secure aggregation of numeric vectors over non-colluding aggregators (MPyC).

Public API::

    topology = mpc_agg.Topology.load("configs/local-3.yaml")
    mpc_agg.Collector(topology).open_round("r1", dim=1000)
    mpc_agg.Client(topology, "alice").submit("r1", vector)
    result = mpc_agg.Collector(topology).aggregate("r1", timeout=60)
    result.total, result.num_clients, result.epsilon, result.delta

Importing this package has no side effects and does not import ``mpyc``.
"""

from mpc_agg.client import Client, SubmitReceipt
from mpc_agg.collector import AggregateResult, Collector
from mpc_agg.config.schema import Topology
from mpc_agg.errors import (
    AggregationTimeout,
    AggregatorUnavailable,
    ConfigError,
    EncodingError,
    LocalError,
    MpcAggError,
    PeerError,
    RemoteRefusal,
    RoundFailed,
    UploadRefused,
    VectorChanged,
)

__all__ = [
    "AggregateResult",
    "AggregationTimeout",
    "AggregatorUnavailable",
    "Client",
    "Collector",
    "ConfigError",
    "EncodingError",
    "VectorChanged",
    "LocalError",
    "MpcAggError",
    "PeerError",
    "RemoteRefusal",
    "RoundFailed",
    "SubmitReceipt",
    "Topology",
    "UploadRefused",
]
__version__ = "0.1.0"
