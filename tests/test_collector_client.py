"""Client and collector behaviour that needs no aggregator: local validation and deadlines."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest

from mpc_agg import AggregationTimeout, Client, Collector, EncodingError, Topology
from mpc_agg.errors import InvalidRequest

from .conftest import topology_doc


def test_aggregate_respects_its_timeout_against_a_silent_leader():
    # A listening socket that never answers: connections succeed, requests hang.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        doc = topology_doc(2, 0, name="silent")
        doc["aggregators"][0]["http_port"] = silent.getsockname()[1]
        collector = Collector(Topology.from_dict(doc), timeout_s=30.0)
        started = time.monotonic()
        with pytest.raises(AggregationTimeout, match="within 1.0 s"):
            collector.aggregate("r", timeout=1.0)
        assert time.monotonic() - started < 5.0
    finally:
        silent.close()


def test_client_refuses_bad_ids_and_vectors_before_sending():
    topo = Topology.from_dict(topology_doc(3, 1, name="local"))
    with pytest.raises(InvalidRequest, match="client id"):
        Client(topo, "no spaces")
    client = Client(topo, "ok")
    with pytest.raises(InvalidRequest, match="round id"):
        client.prepare("../etc", np.zeros(3))
    with pytest.raises(EncodingError, match="index 1"):
        client.prepare("r", np.array([0.0, np.nan]))
    with pytest.raises(EncodingError, match="1-dimensional"):
        client.prepare("r", np.zeros((2, 2)))


def test_prepared_shares_recombine_to_the_encoded_vector():
    from mpc_agg.core.codec import decode_share
    from mpc_agg.core.field import to_signed
    from mpc_agg.core.sharing import unshard

    topo = Topology.from_dict(topology_doc(3, 1, name="local"))
    x = np.array([1.5, -2.25, 0.0, 1000.0, -1000.0])  # exact in 2^-24 units
    bodies = Client(topo, "alice").prepare("r", x)
    shares = [decode_share(b, aggregator=i, dim=5) for i, b in enumerate(bodies)]
    assert sorted(s.kind.name for s in shares) == ["FULL", "SEED", "SEED"]
    total = unshard([s.expand("r", "alice") for s in shares])
    np.testing.assert_array_equal(to_signed(total) / 2.0**24, x)
