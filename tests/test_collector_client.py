"""Client and collector behaviour that needs no aggregator: local validation and deadlines."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mpc_agg import AggregationTimeout, Client, Collector, EncodingError, Topology
from mpc_agg.errors import InvalidRequest, UsageError
from mpc_agg.provision import provision_local

from .conftest import topology_doc, write_topology


@pytest.fixture
def silent() -> Iterator[int]:
    """A listening socket that never answers: connections succeed, requests (and TLS
    handshakes) hang. Yields its port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def test_aggregate_respects_its_timeout_against_a_silent_leader(silent: int) -> None:
    doc = topology_doc(2, 0, name="silent", insecure=True)  # plain HTTP on loopback
    doc["aggregators"][0]["http_port"] = silent
    collector = Collector(Topology.from_dict(doc), timeout_s=30.0)
    started = time.monotonic()
    with pytest.raises(AggregationTimeout, match="within 0.3 s"):
        collector.aggregate("r", timeout=0.3)
    assert time.monotonic() - started < 5.0


def test_aggregate_respects_its_timeout_over_https_against_a_silent_leader(
    silent: int, tmp_path: Path
) -> None:
    # The default: HTTPS pinned to the provisioned certificate; the handshake never ends.
    doc = topology_doc(2, 0, name="silent-tls")
    doc["aggregators"][0]["http_port"] = silent
    deployment = provision_local(write_topology(tmp_path, doc), cwd=tmp_path)
    collector = deployment.collector(timeout_s=30.0)
    assert collector.topology.aggregators[0].url == f"https://127.0.0.1:{silent}"
    started = time.monotonic()
    with pytest.raises(AggregationTimeout, match="within 0.3 s"):
        collector.aggregate("r", timeout=0.3)
    assert time.monotonic() - started < 5.0


def test_a_template_topology_cannot_reach_an_aggregator() -> None:
    # No http_cert to pin (and not insecure): refused before anything is sent.
    topo = Topology.from_dict(topology_doc(2, 0, name="template"))
    assert not topo.has_keys and topo.aggregators[0].scheme == "https"
    with pytest.raises(UsageError, match="no http_cert in this topology \\(a template\\)"):
        Collector(topo, "t").open_round("r", 3)
    with pytest.raises(UsageError, match="a template"):
        Client(topo, "alice", "t").submit("r", np.zeros(3))


def test_tokens_one_for_all_or_one_per_aggregator() -> None:
    topo = Topology.from_dict(topology_doc(3, 1, name="tokens", insecure=True))
    Collector(topo, "a")
    Collector(topo, ["a", "b", "c"])
    Collector(topo, "a, b, c")
    Client(topo, "alice", "a,b,c")
    for wrong in (["a", "b"], "a,b", ["a", "b", "c", "d"]):
        with pytest.raises(UsageError, match="expected 1 or 3 tokens"):
            Collector(topo, wrong)
        with pytest.raises(UsageError, match="expected 1 or 3 tokens"):
            Client(topo, "alice", wrong)


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


def test_a_client_in_async_with_reuses_its_connections_across_submissions() -> None:
    """Inside ``async with Client(...)``, every submission goes over the same connection to
    each aggregator (no new TCP/TLS handshake); outside, each opens its own."""
    import asyncio

    from aiohttp import web

    async def main() -> tuple[list[set[int]], list[set[int]]]:
        peers: list[set[int]] = [set(), set()]
        runners = []
        ports = []
        for i in range(2):

            async def put(request: web.Request, i: int = i) -> web.Response:
                await request.read()
                peers[i].add(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
                return web.json_response({"accepted": True}, status=201)

            app = web.Application()
            app.router.add_put("/v1/rounds/{round}/shares/{client}", put)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            runners.append(runner)
            ports.append(runner.addresses[0][1])
        doc = topology_doc(2, 0, name="reuse", insecure=True)
        for i, port in enumerate(ports):
            doc["aggregators"][i]["http_port"] = port
        topo = Topology.from_dict(doc)
        try:
            async with Client(topo, "c1") as client:
                for r in ("r1", "r2", "r3"):
                    await client.submit_async(r, np.ones(4))
            kept = [set(p) for p in peers]
            for p in peers:
                p.clear()
            client = Client(topo, "c1")
            for r in ("r4", "r5"):
                await client.submit_async(r, np.ones(4))
            fresh = [set(p) for p in peers]
        finally:
            for runner in runners:
                await runner.cleanup()
        return kept, fresh

    kept, fresh = asyncio.run(main())
    assert [len(p) for p in kept] == [1, 1]
    assert [len(p) for p in fresh] == [2, 2]
