"""Large vectors: the client sends its full share as it is made (``stream_above_bytes``).

First against in-process stand-ins for the aggregators (plain HTTP, so every byte and
header can be checked): the streamed upload carries its exact ``Content-Length`` and no
chunked encoding, holds prepare's bytes, goes before the seed shares (which are not sent if
it is refused), and a connection dropped in the middle of it is retried with the same bytes;
a vector changed before that retry stops it before the changed block (and sends no seed
share), and a body whose producer fails is never retried.
The blocking ``submit`` keeps its connections between calls; small vectors are prepared on
the event loop. Then real aggregator processes: a 3-party round whose clients all stream
reveals the exact total, and an upload cut by a proxy is retried, the aggregator keeping
what a fresh submission sends again byte for byte (200 "identical retry").
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from mpc_agg import Client, Topology, UploadRefused
from mpc_agg import client as client_module
from mpc_agg.core import codec
from mpc_agg.core.share_stream import StreamedShard
from mpc_agg.core.sharing import full_share_index
from mpc_agg.errors import EncodingError, VectorChanged
from mpc_agg.launcher import LocalFederation
from mpc_agg.transport.http_client import AggregatorAPI, StreamedBody

from .conftest import topology_doc, write_topology

SECRET = bytes(range(32))


@dataclasses.dataclass
class Upload:
    aggregator: int
    client_id: str
    headers: dict[str, str]
    body: bytes
    peer_port: int
    complete: bool


class FakeAggregators:
    """``m`` HTTP servers on loopback that take share uploads, run in a thread of their own
    (so blocking client calls can reach them). ``drop_first[i]`` bytes into the first upload
    to aggregator ``i``, ``on_cut[i]()`` is called and the connection closed; ``refuse[i]``
    is a status to answer. An upload the client broke off is kept, incomplete."""

    def __init__(self, m: int) -> None:
        self.m = m
        self.uploads: list[Upload] = []
        self.drop_first: dict[int, int] = {}
        self.refuse: dict[int, int] = {}
        self.delay_s: dict[int, float] = {}
        self.on_cut: dict[int, Any] = {}
        self._loop = asyncio.new_event_loop()
        self._runners: list[web.AppRunner] = []
        self.ports: list[int] = []
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    def topology(self, name: str, **encoding: Any) -> Topology:
        doc = topology_doc(self.m, 1 if self.m > 2 else 0, name=name, insecure=True)
        for i, port in enumerate(self.ports):
            doc["aggregators"][i]["http_port"] = port
        if encoding:
            doc["encoding"] = encoding
        return Topology.from_dict(doc)

    async def _start(self) -> None:
        for i in range(self.m):
            app = web.Application(client_max_size=1 << 30)
            app.router.add_put("/v1/rounds/{round}/shares/{client}", self._handler(i))
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            self._runners.append(runner)
            self.ports.append(runner.addresses[0][1])

    def _handler(self, i: int):
        async def put(request: web.Request) -> web.StreamResponse:
            port = request.transport.get_extra_info("peername")[1]  # type: ignore[union-attr]
            headers = dict(request.headers)
            client_id = request.match_info["client"]
            cut = self.drop_first.pop(i, None)
            if cut is not None:
                part = await request.content.readexactly(cut)
                self.uploads.append(Upload(i, client_id, headers, part, port, False))
                hook = self.on_cut.pop(i, None)
                if hook is not None:
                    hook()
                request.transport.close()  # type: ignore[union-attr]
                return web.Response(status=500)  # never reaches the client
            parts: list[bytes] = []
            try:
                while chunk := await request.content.readany():
                    parts.append(chunk)
            except BaseException:
                self.uploads.append(Upload(i, client_id, headers, b"".join(parts), port, False))
                raise
            body = b"".join(parts)
            if len(body) != request.content_length:
                self.uploads.append(Upload(i, client_id, headers, body, port, False))
                return web.Response(status=400)
            await asyncio.sleep(self.delay_s.get(i, 0.0))
            self.uploads.append(Upload(i, client_id, headers, body, port, True))
            status = self.refuse.get(i)
            if status is not None:
                return web.json_response(
                    {"error": "conflicting_share", "detail": "refused by the test"}, status=status
                )
            held = [u for u in self.uploads[:-1] if u.aggregator == i and u.complete]
            retry = any(u.body == body and u.client_id == client_id for u in held)
            return web.json_response({"accepted": True}, status=200 if retry else 201)

        return put

    def close(self) -> None:
        async def stop() -> None:
            for runner in self._runners:
                await runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def received(self, i: int) -> list[Upload]:
        return [u for u in self.uploads if u.aggregator == i]


@pytest.fixture
def fakes() -> Iterator[FakeAggregators]:
    f = FakeAggregators(3)
    try:
        yield f
    finally:
        f.close()


GF = {"ring": "gf_p61", "frac_bits": 16, "coord_clip": 4.0}


def big_vector(d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=d)


def test_a_full_share_above_the_threshold_is_streamed_with_its_length(fakes, monkeypatch):
    topo = fakes.topology("stream-len", **GF)
    d = 200_003  # 1.6 MB of GF(p) values: two 1 MiB blocks, the second one short
    x = big_vector(d)
    made: list[int] = []
    real_chunks = StreamedShard.chunks

    def chunks(self: StreamedShard) -> Iterator[bytes]:
        made.append(self.dim)
        return real_chunks(self)

    monkeypatch.setattr(StreamedShard, "chunks", chunks)
    client = Client(topo, "alice", secret=SECRET, stream_above_bytes=1 << 20)
    receipt = client.submit("r", x)
    client.close()
    full = full_share_index("alice", 3)
    expected = Client(topo, "alice", secret=SECRET).prepare("r", x)
    assert made == [d]  # streamed, once
    assert receipt.retries == () and receipt.upload_bytes == sum(len(b) for b in expected)
    for i in range(3):
        (upload,) = fakes.received(i)
        assert upload.body == bytes(expected[i])
        assert upload.headers["Content-Length"] == str(len(expected[i]))
        assert "Transfer-Encoding" not in upload.headers
    # The full share first: the seed shares were sent only after it had been accepted.
    assert [u.aggregator for u in fakes.uploads][0] == full
    assert client._prepared == {}  # nothing kept: a retry makes the body again


def test_at_or_below_the_threshold_the_whole_body_path_is_unchanged(fakes, monkeypatch):
    topo = fakes.topology("stream-below", **GF)
    x = big_vector(1000)
    length = codec.share_body_length(codec.ShareKind.FULL, 1000)
    streamed: list[int] = []
    monkeypatch.setattr(
        Client, "prepare_streamed", lambda *a, **k: streamed.append(1) or pytest.fail()
    )
    Client(topo, "bob", secret=SECRET, stream_above_bytes=length).submit("r", x)
    assert streamed == []
    assert [u.body for u in sorted(fakes.uploads, key=lambda u: u.aggregator)] == [
        bytes(b) for b in Client(topo, "bob", secret=SECRET).prepare("r", x)
    ]


def test_without_a_secret_the_objects_own_secret_makes_retries_identical(fakes):
    topo = fakes.topology("stream-nosecret", **GF)
    x = big_vector(150_000, 1)
    client = Client(topo, "carol", stream_above_bytes=1 << 20)
    first = client.submit("r", x)
    second = client.submit("r", x)  # no cache: the body is made again, the same
    assert first.retries == () and second.retries == (0, 1, 2)
    other = Client(topo, "carol", stream_above_bytes=1 << 20)
    assert (
        b"".join(other.prepare_streamed("r", x).chunks())
        != fakes.received(full_share_index("carol", 3))[0].body
    )  # another object draws another secret
    client.close()


def test_a_refused_full_share_sends_no_seed_share(fakes):
    topo = fakes.topology("stream-refused", **GF)
    full = full_share_index("dave", 3)
    fakes.refuse[full] = 409
    with pytest.raises(UploadRefused) as refused:
        Client(topo, "dave", secret=SECRET, stream_above_bytes=1 << 20).submit(
            "r", big_vector(150_000)
        )
    assert (refused.value.status, refused.value.accepted) == (409, ())
    assert [u.aggregator for u in fakes.uploads] == [full]


def test_a_dropped_connection_is_retried_with_identical_bytes(fakes):
    topo = fakes.topology("stream-drop", **GF)
    x = big_vector(300_000, 2)
    full = full_share_index("erin", 3)
    fakes.drop_first[full] = 1_500_000  # past the first 1 MiB block
    client = Client(topo, "erin", secret=SECRET, stream_above_bytes=1 << 20)
    receipt = client.submit("r", x)
    cut, whole = fakes.received(full)
    assert not cut.complete and whole.complete and cut.peer_port != whole.peer_port
    expected = bytes(Client(topo, "erin", secret=SECRET).prepare("r", x)[full])
    assert whole.body == expected and cut.body == expected[: len(cut.body)]
    assert receipt.retries == ()
    assert client.submit("r", x).retries == (0, 1, 2)  # the same bytes once more
    client.close()


def wait_for(condition: Any) -> None:
    """Until ``condition()`` (what the fake aggregators' thread records after the client
    has returned); not a timing assertion, a bounded wait."""
    for _ in range(2000):
        if condition():
            return
        threading.Event().wait(0.005)
    raise AssertionError("the fake aggregators never recorded it")


@pytest.mark.parametrize("secret", [SECRET, None], ids=["secret", "own-secret"])
def test_a_vector_changed_before_a_retry_stops_it_before_the_changed_block(fakes, secret):
    """The first attempt is cut 2.5 MB in (blocks 0 and 1 sent); the caller's array then
    changes in block 1. The retry reads it again under the same seeds: it sends the header
    and block 0 (the first attempt's bytes), then raises VectorChanged, not retried; no
    seed share is sent."""
    topo = fakes.topology(f"stream-changed-{secret is None}", **GF)
    d = 400_000  # 3.2 MB: four 1 MiB blocks, one check block each
    x = big_vector(d, 5)
    block = (1 << 20) // 8
    full = full_share_index("gina", 3)
    fakes.drop_first[full] = 2_500_000

    def training_step() -> None:  # the caller's code updates its buffer meanwhile
        x[block + 10 : block + 20] += 0.25

    fakes.on_cut[full] = training_step
    client = Client(topo, "gina", secret=secret, stream_above_bytes=1 << 20)
    with pytest.raises(VectorChanged) as caught:
        client.submit("r", x)
    client.close()
    assert caught.value.code == "vector_changed" and caught.value.start == block
    wait_for(lambda: len(fakes.received(full)) == 2)
    cut, retry = fakes.received(full)
    assert not cut.complete and not retry.complete
    header = codec.SHARE_HEADER.size
    assert len(cut.body) == 2_500_000
    assert len(retry.body) <= header + 8 * block  # nothing of block 1 or after
    assert retry.body == cut.body[: len(retry.body)]  # what was sent was sent before
    assert [u.aggregator for u in fakes.uploads] == [full, full]  # no seed share


def test_a_body_whose_producer_fails_is_not_retried(fakes):
    """aiohttp wraps a failing body in a ClientConnectionError, which would be retried:
    the producer's own exception is raised instead, after one attempt."""
    topo = fakes.topology("stream-producer", **GF)
    opened: list[int] = []

    def body(error: Exception) -> StreamedBody:
        def open_() -> Any:
            async def chunks() -> Any:
                opened.append(1)
                yield b"x" * 1000
                raise error

            return chunks()

        return StreamedBody(100_000, open_)

    async def main(error: Exception) -> None:
        async with aiohttp.ClientSession() as session:
            api = AggregatorAPI(session, topo.aggregators[0], retries=3, backoff_s=0.0)
            await api.request("PUT", "/v1/rounds/r/shares/hal", stream=body(error))

    for error in (VectorChanged(0), EncodingError("boom"), RuntimeError("bug")):
        opened.clear()
        with pytest.raises(type(error)) as caught:
            asyncio.run(main(error))
        assert caught.value is error and opened == [1]


def test_a_streamed_attempt_may_take_as_long_as_an_aggregator_allows_a_body(fakes):
    """The session's timeout bounds short requests; a streamed full share gets it plus
    ``deadlines.upload_s`` (an aggregator answering after 1.5 s, timeout_s 0.5)."""
    topo = fakes.topology("stream-slow", **GF)
    full = full_share_index("jill", 3)
    fakes.delay_s[full] = 1.5
    client = Client(topo, "jill", secret=SECRET, timeout_s=0.5, stream_above_bytes=1 << 20)
    assert client.submit("r", big_vector(150_000)).retries == ()
    assert len(fakes.received(full)) == 1  # one attempt, not timed out and retried
    client.close()


def test_the_blocking_submit_keeps_its_connections_until_close(fakes):
    topo = fakes.topology("stream-keep", **GF)
    client = Client(topo, "frank", secret=SECRET)
    for r in ("r1", "r2", "r3"):
        client.submit(r, np.ones(8))
    assert [len({u.peer_port for u in fakes.received(i)}) for i in range(3)] == [1, 1, 1]
    client.close()
    client.submit("r4", np.ones(8))  # a new loop and session after close
    after = {v.peer_port for v in fakes.received(0)}
    assert len(after) == 2
    with Client(topo, "gina", secret=SECRET) as gina:
        gina.submit("r1", np.ones(8))
        gina.submit("r2", np.ones(8))
    assert len({u.peer_port for u in fakes.uploads if u.client_id == "gina"}) == 3


def test_the_blocking_submit_from_two_threads_at_once(fakes):
    """One thread uses the kept loop; a concurrent call gets a loop of its own."""
    topo = fakes.topology("stream-threads", **GF)
    client = Client(topo, "hank", secret=SECRET)
    errors: list[BaseException] = []

    def submit(r: str) -> None:
        try:
            client.submit(r, big_vector(20_000))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(f"r{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    client.close()
    assert errors == [] and len(fakes.uploads) == 12


def test_small_vectors_are_prepared_on_the_loop(fakes, monkeypatch):
    topo = fakes.topology("stream-inline", **GF)
    hops: list[object] = []
    real = asyncio.to_thread

    async def to_thread(func, /, *args, **kwargs):
        hops.append(func)
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(client_module.asyncio, "to_thread", to_thread)

    async def main() -> None:
        async with Client(topo, "ivy", secret=SECRET) as client:
            await client.submit_async("r1", np.ones(client_module.INLINE_PREPARE_BYTES // 8 - 2))
            assert hops == []
            await client.submit_async("r2", np.ones(client_module.INLINE_PREPARE_BYTES // 8))
            assert len(hops) == 1

    asyncio.run(main())


def test_stream_above_bytes_must_be_a_size(fakes):
    topo = fakes.topology("stream-bad", **GF)
    from mpc_agg.errors import UsageError

    for bad in (-1, 1.5, None, True):
        with pytest.raises(UsageError, match="stream_above_bytes"):
            Client(topo, "x", stream_above_bytes=bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- real processes


class CuttingProxy:
    """A TCP proxy to ``port`` on loopback, run in the caller's event loop: the first
    connection is closed after ``cut`` bytes from the client (TLS records and all); later
    ones pass whole. ``connections`` counts them."""

    def __init__(self, port: int, cut: int) -> None:
        self.port, self.cut = port, cut
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        limit = self.cut if self.connections == 1 else None
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)

        async def pipe(src, dst, limit):
            sent = 0
            try:
                while data := await src.read(65536):
                    if limit is not None and sent + len(data) > limit:
                        break
                    dst.write(data)
                    sent += len(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                for w in (writer, up_writer):
                    w.close()

        await asyncio.gather(pipe(reader, up_writer, limit), pipe(up_reader, writer, None))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.mark.processes
def test_three_party_round_with_streamed_full_shares_is_exact(tmp_path, monkeypatch):
    doc = topology_doc(3, 1, name="stream3")
    config = write_topology(tmp_path, doc)
    d = 300_000  # 2.4 MB full shares, streamed in 1 MiB blocks above 1 MiB
    units = np.random.default_rng(9).integers(-1000, 1001, size=(3, d))
    units[:, 0] = -1000  # a negative total
    opened: list[list[str]] = []  # the chunks of each body made, as digests
    real_chunks = StreamedShard.chunks

    def chunks(self: StreamedShard) -> Iterator[bytes]:
        record: list[str] = []
        opened.append(record)
        for chunk in real_chunks(self):
            record.append(hashlib.sha256(chunk).hexdigest())
            yield chunk

    monkeypatch.setattr(StreamedShard, "chunks", chunks)
    with (
        open(os.devnull, "w") as devnull,
        LocalFederation(config, cwd=tmp_path, output=devnull) as fed,
    ):
        collector = fed.collector()
        collector.open_round("r", d)
        for i in (0, 1):
            client = fed.client(f"c{i}", secret=SECRET, stream_above_bytes=1 << 20)
            assert client.submit("r", units[i].astype(np.float64)).retries == ()
            client.close()
        assert len(opened) == 2 and all(len(o) == 4 for o in opened)  # header + 3 blocks

        # c2's full share goes through a proxy that cuts its first connection mid-body.
        c2 = fed.client("c2", secret=SECRET, stream_above_bytes=1 << 20)
        full = full_share_index("c2", 3)
        address = c2.topology.aggregators[full]

        async def submit_through_proxy() -> tuple[Any, int]:
            proxy = CuttingProxy(address.http_port, cut=1_200_000)
            port = await proxy.start()
            aggregators = list(c2.topology.aggregators)
            aggregators[full] = dataclasses.replace(address, http_port=port)
            # The same topology (fingerprint unchanged), reached through the proxy.
            c2.topology = dataclasses.replace(c2.topology, aggregators=tuple(aggregators))
            try:
                receipt = await c2.submit_async("r", units[2].astype(np.float64))
            finally:
                await proxy.close()
            return receipt, proxy.connections

        receipt, connections = asyncio.run(submit_through_proxy())
        assert receipt.retries == () and connections == 2
        cut_attempt, retried = opened[2], opened[3]  # (made one block ahead of sending)
        assert len(retried) == 4 and cut_attempt
        assert retried[: len(cut_attempt)] == cut_attempt  # the retry resent the same bytes
        # A fresh client with the same secret sends the same bytes: an identical retry.
        again = fed.client("c2", secret=SECRET, stream_above_bytes=1 << 20)
        assert again.submit("r", units[2].astype(np.float64)).retries == (0, 1, 2)
        again.close()
        assert [s["accepted"] for s in collector.status("r")] == [3, 3, 3]
        result = collector.aggregate("r", timeout=120)
    assert result.num_clients == 3
    np.testing.assert_array_equal(result.total, units.sum(axis=0).astype(np.float64))
