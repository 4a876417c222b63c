"""The HTTP API in-process: every handler, the error middleware, the upload limits and the
bearer tokens, on aiohttp's test server (README, "HTTP API (per aggregator)").

Each test serves real :class:`~mpc_agg.aggregator.Aggregator` objects, linked by an
in-memory party network, on loopback test servers inside one ``asyncio.run``; no aggregator
processes, no fixed sleeps (uploads are held by events; a round's end is a bounded wait).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mpc_agg import Client, Topology
from mpc_agg.aggregator import Aggregator
from mpc_agg.aggregator.metrics import metrics_text, render_metrics
from mpc_agg.collector import load_and_verify, verify_statements
from mpc_agg.config.fingerprint import TOPOLOGY_HEADER, fingerprint, section_digests
from mpc_agg.core import codec
from mpc_agg.core.codec import decode_result
from mpc_agg.core.field import to_signed
from mpc_agg.core.sharing import Share, ShareKind, full_share_index
from mpc_agg.core.statement import (
    ResultMismatch,
    SignedStatement,
    clients_digest,
    total_digest,
    verify_result,
    verify_signature,
)
from mpc_agg.errors import PeerError, TopologyMismatchError
from mpc_agg.identity import load_party_dir
from mpc_agg.mpc.memory import InMemoryNetwork, memory_links
from mpc_agg.provision import provision_local
from mpc_agg.transport import auth
from mpc_agg.transport.auth import Credentials
from mpc_agg.transport.http_server import (
    HTTP_STATUS,
    MAX_JSON_BYTES,
    UPLOAD_LIMITS,
    _errors,
    build_app,
    status_for,
)
from mpc_agg.transport.tls import https_server_context
from mpc_agg.transport.upload_limits import GRANULE, ServerLimits

from .conftest import topology_doc, write_topology

T = TypeVar("T")
TERMINAL = ("done", "failed")
COLLECTOR_TOKEN = "c0ffee" * 8


def run(coro: Awaitable[T], timeout_s: float = 10.0) -> T:
    """Run one test's coroutine on a fresh event loop, bounded in time."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout_s)

    return asyncio.run(bounded())


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Return once ``predicate()`` holds; fail after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.002)


class PluggableNetwork(InMemoryNetwork):
    """An in-memory party network end whose links a test can pull (``up = False``)."""

    def __init__(self, pid: int, links: Any) -> None:
        super().__init__(pid, links)
        self.up = True
        self.mismatch: str | None = None  # as MpycNetwork: why the links were refused

    @property
    def connected(self) -> bool:
        return self.up

    def missing(self) -> list[int]:
        return [] if self.up else [j for j in range(self.m) if j != self.pid]


def make_federation(
    tmp_path: Path,
    signing_keys: Sequence[Ed25519PrivateKey | None] = (None, None, None),
    **doc_changes: Any,
) -> list[Aggregator]:
    doc = topology_doc(3, 1, name="http")
    doc["data_dir"] = str(tmp_path / "data")
    doc.update(doc_changes)
    topology = Topology.from_dict(doc)
    links = memory_links(3)
    return [
        Aggregator(topology, i, PluggableNetwork(i, links), signing_key=signing_keys[i])
        for i in range(3)
    ]


def unplug(agg: Aggregator) -> None:
    network = agg.network
    assert isinstance(network, PluggableNetwork)
    network.up = False


def credentials_for(index: int) -> Credentials:
    return Credentials(client_key=bytes([index + 1]) * 32, collector_token=COLLECTOR_TOKEN)


@asynccontextmanager
async def serving(
    tmp_path: Path,
    *,
    auth_on: bool = False,
    commands: bool = False,
    signing_keys: Sequence[Ed25519PrivateKey | None] = (None, None, None),
    server_limits: dict[str, Any] | None = None,
    **doc_changes: Any,
) -> AsyncIterator[tuple[list[Aggregator], list[TestClient]]]:
    """Three aggregators, each behind its own test server; with ``commands``, their party
    command loops run too (needed to close rounds); ``server_limits`` changes the servers'
    :class:`~mpc_agg.transport.upload_limits.ServerLimits`."""
    aggs = make_federation(tmp_path, signing_keys, **doc_changes)
    clients: list[TestClient] = []
    loops: list[asyncio.Task[None]] = []
    try:
        for a in aggs:
            limits = ServerLimits.for_topology(a.topology, **(server_limits or {}))
            app = build_app(a, credentials_for(a.index) if auth_on else None, limits=limits)
            client = TestClient(TestServer(app))
            await client.start_server()
            clients.append(client)
        if commands:
            loops = [asyncio.ensure_future(a.serve_commands()) for a in aggs]
        yield aggs, clients
    finally:
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        for client in clients:
            await client.close()
        for a in aggs:
            a.close_journals()


async def call(
    client: TestClient, method: str, path: str, body: Any = None, **kwargs: Any
) -> tuple[int, Any]:
    """One request: (status, JSON answer, or the raw bytes if it is not JSON)."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    async with client.request(method, path, data=body, **kwargs) as response:
        raw = await response.read()
        if response.content_type == "application/json":
            return response.status, json.loads(raw)
        return response.status, raw


async def open_everywhere(clients: list[TestClient], round_id: str, dim: int, **kw: Any) -> None:
    for client in clients:
        status, answer = await call(client, "PUT", f"/v1/rounds/{round_id}", {"dim": dim}, **kw)
        assert status == 201, answer


async def upload_everywhere(
    aggs: list[Aggregator],
    clients: list[TestClient],
    round_id: str,
    cid: str,
    x: np.ndarray,
    *,
    auth_on: bool = False,
) -> list[bytes | bytearray]:
    """Upload ``x`` as client ``cid`` (201 everywhere, with its tokens if ``auth_on``);
    returns the bodies sent."""
    bodies = Client(aggs[0].topology, cid).prepare(round_id, x)
    for i, (client, body) in enumerate(zip(clients, bodies, strict=True)):
        headers = {}
        if auth_on:
            token = auth.client_token(credentials_for(i).client_key, cid)
            headers["Authorization"] = f"Bearer {token}"
        path = f"/v1/rounds/{round_id}/shares/{cid}"
        status, answer = await call(client, "PUT", path, body, headers=headers)
        assert (status, answer) == (201, {"accepted": True, "retry": False})
    return bodies


async def ended(clients: list[TestClient], round_id: str, **kw: Any) -> None:
    """Bounded wait until every aggregator reports ``round_id`` DONE or FAILED."""
    states: list[str] = []

    async def poll() -> None:
        while True:
            states.clear()
            for client in clients:
                answer = (await call(client, "GET", f"/v1/rounds/{round_id}", **kw))[1]
                states.append(answer["state"])
            if all(s in TERMINAL for s in states):
                return
            await asyncio.sleep(0.002)

    try:
        await asyncio.wait_for(poll(), 5)
    except asyncio.TimeoutError:
        raise AssertionError(f"round {round_id} did not end: {states}") from None


def ints(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1001, size=(n, d)).astype(np.float64)


def held_uploads(agg: Aggregator) -> tuple[asyncio.Event, asyncio.Event]:
    """Make ``agg`` hold every upload after its body is read, until ``release`` is set;
    ``entered`` is set when the first one is held."""
    entered, release = asyncio.Event(), asyncio.Event()
    real = agg.receive_share_async

    async def held(round_id: str, client_id: str, body: bytes | bytearray) -> bool:
        entered.set()
        await release.wait()
        return await real(round_id, client_id, body)

    agg.receive_share_async = held  # type: ignore[method-assign]
    return entered, release


# --------------------------------------------------------------------------- handlers


def test_a_round_over_http_open_upload_close_result(tmp_path: Path) -> None:
    xs = ints(3, 8, seed=1)

    async def main() -> None:
        async with serving(tmp_path, commands=True) as (aggs, clients):
            leader, follower = clients[0], clients[1]
            status, answer = await call(leader, "PUT", "/v1/rounds/r", {"dim": 8})
            assert status == 201
            assert (answer["round"], answer["state"], answer["dim"]) == ("r", "open", 8)
            assert answer["aggregator"] == 0 and answer["accepted"] == 0
            for client in clients[1:]:
                assert (await call(client, "PUT", "/v1/rounds/r", {"dim": 8}))[0] == 201
            status, answer = await call(leader, "PUT", "/v1/rounds/r", {"dim": 8})
            assert (status, answer["state"]) == (200, "open")  # idempotent
            status, answer = await call(leader, "PUT", "/v1/rounds/r", {"dim": 9})
            assert (status, answer["error"]) == (409, "round_conflict")

            sent = [
                await upload_everywhere(aggs, clients, "r", f"c{k}", x) for k, x in enumerate(xs)
            ]
            bodies = sent[0]
            status, answer = await call(leader, "PUT", "/v1/rounds/r/shares/c0", bodies[0])
            assert (status, answer) == (200, {"accepted": True, "retry": True})  # same bytes
            other = Client(aggs[0].topology, "c0").prepare("r", xs[1])
            status, answer = await call(leader, "PUT", "/v1/rounds/r/shares/c0", other[0])
            assert (status, answer["error"]) == (409, "conflicting_share")
            status, answer = await call(follower, "GET", "/v1/rounds/r")
            assert (status, answer["accepted"], answer["aggregator"]) == (200, 3, 1)

            status, answer = await call(leader, "GET", "/v1/rounds/r/result")
            assert (status, answer["error"]) == (409, "result_not_ready")
            status, answer = await call(follower, "POST", "/v1/rounds/r/close")
            assert (status, answer["error"]) == (409, "not_leader")
            assert "aggregator 0" in answer["detail"]
            status, answer = await call(leader, "POST", "/v1/rounds/r/close")
            assert status == 202 and answer["round"] == "r"
            await ended(clients, "r")

            for client in clients:
                status, raw = await call(client, "GET", "/v1/rounds/r/result")
                assert status == 200
                total, meta = decode_result(raw)
                assert meta["num_clients"] == 3
                got = to_signed(total) / 2.0 ** meta["frac_bits"]
                np.testing.assert_array_equal(got, xs.sum(axis=0))
            status, answer = await call(follower, "GET", "/v1/rounds/r/statement")
            assert (status, answer["error"]) == (409, "result_not_ready")
            assert "no signing key" in answer["detail"]
            status, answer = await call(leader, "POST", "/v1/rounds/r/close")
            assert (status, answer["state"]) == (202, "done")  # closing again: idempotent
            status, answer = await call(leader, "PUT", "/v1/rounds/r/shares/late", bodies[0])
            assert (status, answer["error"]) == (410, "round_ended")

    run(main())


def test_refused_uploads_and_bad_open_requests(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (aggs, clients):
            leader = clients[0]
            await open_everywhere(clients, "r", 4)
            body = Client(aggs[0].topology, "c").prepare("r", np.ones(4))[0]
            bad = b"XXXX" + bytes(body[4:])
            status, answer = await call(leader, "PUT", "/v1/rounds/r/shares/c", bad)
            assert (status, answer["error"]) == (400, "malformed")
            status, answer = await call(leader, "PUT", "/v1/rounds/r/shares/bad%20id", body)
            assert (status, answer["error"]) == (400, "invalid_request")
            status, answer = await call(leader, "PUT", "/v1/rounds/nope/shares/c", body)
            assert (status, answer["error"]) == (404, "unknown_round")
            status, answer = await call(leader, "GET", "/v1/rounds/nope")
            assert (status, answer["error"]) == (404, "unknown_round")
            status, answer = await call(leader, "GET", "/v1/rounds/nope/result")
            assert (status, answer["error"]) == (404, "unknown_round")

            for request, words in [
                (b"{not json", "not JSON"),
                (b"[1, 2]", "JSON object"),
                (b'{"dim": 4, "colour": 1}', "unknown field(s) ['colour']"),
                (b'{"min_clients": 2}', "missing field 'dim'"),
                (b'{"dim": "four"}', "dim must be an integer"),
            ]:
                status, answer = await call(leader, "PUT", "/v1/rounds/q", request)
                assert (status, answer["error"]) == (400, "invalid_request"), request
                assert words in answer["detail"], (request, answer)
            huge = b'{"dim": 4, "pad": "' + b"x" * 5000 + b'"}'
            status, answer = await call(leader, "PUT", "/v1/rounds/q", huge)
            assert (status, answer["error"]) == (413, "too_large")
            status, answer = await call(leader, "PUT", "/v1/rounds/q")  # empty body: no dim
            assert (status, answer["error"]) == (400, "invalid_request")

    run(main())


def test_results_of_failed_and_expired_rounds_are_410(tmp_path: Path) -> None:
    rounds = {"min_clients": 2, "max_clients": 100, "max_dim": 1000, "keep_results": 1}
    xs = ints(2, 4, seed=2)

    async def main() -> None:
        async with serving(tmp_path, commands=True, rounds=rounds) as (aggs, clients):
            leader = clients[0]
            await open_everywhere(clients, "lonely", 4)
            await upload_everywhere(aggs, clients, "lonely", "c0", xs[0])
            assert (await call(leader, "POST", "/v1/rounds/lonely/close"))[0] == 202
            await ended(clients, "lonely")
            status, answer = await call(leader, "GET", "/v1/rounds/lonely/result")
            assert (status, answer["error"]) == (410, "round_failed")
            assert answer["failure"] == "too_few_clients" and answer["detail"]

            for r in ("first", "second"):
                await open_everywhere(clients, r, 4)
                for k, x in enumerate(xs):
                    await upload_everywhere(aggs, clients, r, f"c{k}", x)
                assert (await call(leader, "POST", f"/v1/rounds/{r}/close"))[0] == 202
                await ended(clients, r)
            status, answer = await call(leader, "GET", "/v1/rounds/first/result")
            assert (status, answer["error"]) == (410, "result_expired")
            assert "keep_results = 1" in answer["detail"]
            assert (await call(leader, "GET", "/v1/rounds/second/result"))[0] == 200

    run(main())


def test_close_while_the_party_network_is_down_is_409(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (aggs, clients):
            await open_everywhere(clients, "r", 4)
            unplug(aggs[0])
            status, answer = await call(clients[0], "POST", "/v1/rounds/r/close")
            assert (status, answer["error"]) == (409, "party_network_down")
            status, answer = await call(clients[0], "GET", "/v1/rounds/r")
            assert (status, answer["state"]) == (200, "open")

    run(main())


def test_healthz_and_metrics(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (aggs, clients):
            await open_everywhere(clients, "r", 4)
            await upload_everywhere(aggs, clients, "r", "c0", np.ones(4))
            status, answer = await call(clients[2], "GET", "/healthz")
            assert (status, answer) == (
                200,
                {
                    "status": "ok",
                    "aggregator": 2,
                    "fingerprint": fingerprint(aggs[2].topology),
                    "pid": os.getpid(),
                    "mpc": "connected",
                },
            )
            unplug(aggs[2])
            status, answer = await call(clients[2], "GET", "/healthz")
            assert (status, answer["mpc"]) == (200, "connecting")
            assert "detail" not in answer
            network = aggs[2].network
            assert isinstance(network, PluggableNetwork)
            network.mismatch = "aggregator 0 holds another topology (sections: rounds)"
            status, answer = await call(clients[2], "GET", "/healthz")
            assert (status, answer["mpc"]) == (200, "topology_mismatch")
            assert answer["detail"] == network.mismatch
            network.up = True
            status, answer = await call(clients[2], "GET", "/healthz")
            assert (status, answer["mpc"]) == (200, "connected") and "detail" not in answer

            async with clients[2].get("/metrics") as response:
                assert response.status == 200 and response.content_type == "text/plain"
                text = await response.text()
            assert text == metrics_text(aggs[2])
            assert "# TYPE mpc_agg_uploads_accepted_total counter\n" in text
            assert 'mpc_agg_uploads_accepted_total{aggregator="2"} 1.0\n' in text
            assert 'mpc_agg_rounds_opened_total{aggregator="2"} 1.0\n' in text
            assert (
                '# TYPE mpc_agg_rounds gauge\nmpc_agg_rounds{aggregator="2",state="open"} 1.0\n'
                in (text.replace("# HELP mpc_agg_rounds Rounds known here by state\n", ""))
            )
            assert 'mpc_agg_open_rounds{aggregator="2"} 1.0\n' in text
            assert 'mpc_agg_upload_seconds_count{aggregator="2"} 1.0\n' in text
            assert 'mpc_agg_party_link_up{aggregator="2",peer="0"} 1.0\n' in text
            assert 'mpc_agg_party_link_up{aggregator="2",peer="1"} 1.0\n' in text
            network.up = False
            assert 'mpc_agg_party_link_up{aggregator="2",peer="0"} 0.0\n' in metrics_text(aggs[2])
            assert 'mpc_agg_connections_open{aggregator="2"}' in text

    run(main())


def test_render_metrics_text_format() -> None:
    text = render_metrics(
        1, {"uploads_accepted": 3, "bytes_accepted": 96}, ["open", "done", "open", "failed"]
    )
    samples = [line for line in text.splitlines() if not line.startswith("# HELP")]
    assert samples == [
        "# TYPE mpc_agg_bytes_accepted_total counter",
        'mpc_agg_bytes_accepted_total{aggregator="1"} 96.0',
        "# TYPE mpc_agg_uploads_accepted_total counter",
        'mpc_agg_uploads_accepted_total{aggregator="1"} 3.0',
        "# TYPE mpc_agg_rounds gauge",
        'mpc_agg_rounds{aggregator="1",state="done"} 1.0',
        'mpc_agg_rounds{aggregator="1",state="failed"} 1.0',
        'mpc_agg_rounds{aggregator="1",state="open"} 2.0',
        "# TYPE mpc_agg_open_rounds gauge",
        'mpc_agg_open_rounds{aggregator="1"} 2.0',
    ]
    empty = [line for line in render_metrics(0, {}, []).splitlines() if line[:6] != "# HELP"]
    assert empty == [
        "# TYPE mpc_agg_rounds gauge",
        "# TYPE mpc_agg_open_rounds gauge",
        'mpc_agg_open_rounds{aggregator="0"} 0.0',
    ]


# --------------------------------------------------------------------------- middleware


def test_middleware_answers_json_for_routing_errors_and_unexpected_exceptions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (aggs, clients):
            leader = clients[0]
            status, answer = await call(leader, "GET", "/v1/nothing-here")
            assert (status, answer["error"]) == (404, "not_found") and answer["detail"]
            status, answer = await call(leader, "PATCH", "/v1/rounds/r")
            assert (status, answer["error"]) == (405, "method_not_allowed")

            def broken(round_id: str) -> dict[str, Any]:
                raise RuntimeError("secret internal state")

            aggs[0].round_status = broken  # type: ignore[method-assign]
            status, answer = await call(leader, "GET", "/v1/rounds/r")
            assert status == 500
            assert answer == {
                "error": "internal",
                "detail": "internal error; see the aggregator's log",
            }

    with caplog.at_level("ERROR", logger="mpc_agg.http"):
        run(main())
    assert "internal error" in caplog.text and "secret internal state" in caplog.text


def test_middleware_maps_aiohttps_own_exceptions_through_the_one_table() -> None:
    """aiohttp's refusals become the peer error of their status (413 is ``too_large``,
    as for an upload over its limit); any other keeps its status as ``http_error``;
    redirects pass through untouched."""

    async def raises(request: web.Request) -> web.Response:
        exc = {
            "413": web.HTTPRequestEntityTooLarge(max_size=10, actual_size=11),
            "422": web.HTTPUnprocessableEntity(reason="not processable"),
            "302": web.HTTPFound("/elsewhere"),
        }[request.match_info["what"]]
        raise exc

    async def main() -> None:
        app = web.Application(middlewares=[_errors])
        app.router.add_get("/{what}", raises)
        async with TestClient(TestServer(app)) as client:
            status, answer = await call(client, "GET", "/413")
            assert (status, answer["error"]) == (413, "too_large")
            status, answer = await call(client, "GET", "/422")
            assert (status, answer) == (422, {"error": "http_error", "detail": "not processable"})
            async with client.get("/302", allow_redirects=False) as response:
                assert response.status == 302
                assert response.headers["Location"] == "/elsewhere"

    run(main())


def test_json_bodies_without_content_length_are_read_within_the_limit(tmp_path: Path) -> None:
    async def chunked(data: bytes) -> AsyncIterator[bytes]:
        for k in range(0, len(data), 100):
            yield data[k : k + 100]

    async def main() -> None:
        async with serving(tmp_path) as (aggs, clients):
            status, answer = await call(clients[0], "PUT", "/v1/rounds/r", chunked(b'{"dim": 4}'))
            assert (status, answer["dim"]) == (201, 4)
            big = b'{"dim": 4, "pad": "' + b"x" * MAX_JSON_BYTES + b'"}'
            status, answer = await call(clients[0], "PUT", "/v1/rounds/q", chunked(big))
            assert (status, answer["error"]) == (413, "too_large")
            assert f"limit of {MAX_JSON_BYTES} bytes" in answer["detail"]

    run(main())


def walk(cls: type[PeerError]) -> Iterator[type[PeerError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from walk(sub)


def test_every_peer_error_has_a_status_and_a_unique_code() -> None:
    classes = [PeerError, *walk(PeerError)]
    assert len(classes) > 20
    codes: dict[str, type[PeerError]] = {}
    for cls in classes:
        exc = cls("detail")
        status = status_for(exc)
        assert 400 <= status <= 599, cls
        # a status of its own or from a class of its own kind, never the PeerError default
        assert any(c in HTTP_STATUS for c in cls.__mro__ if c is not PeerError) or (
            cls is PeerError
        ), f"{cls.__name__} has no entry in HTTP_STATUS"
        assert exc.code not in codes, (cls, codes.get(exc.code))
        codes[exc.code] = cls
        assert exc.body()["error"] == exc.code


def test_status_for_takes_the_most_specific_class() -> None:
    from mpc_agg.errors import Busy, RoundEnded, RoundNotOpen, UploadInProgress

    assert status_for(RoundNotOpen("x")) == 409
    assert status_for(RoundEnded("x")) == 410  # a subclass with its own entry
    assert status_for(UploadInProgress("x")) == HTTP_STATUS[Busy] == 503  # inherited


# --------------------------------------------------------------------------- upload limits


def test_upload_without_content_length_is_411(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (aggs, clients):
            await open_everywhere(clients, "r", 4)
            body = bytes(Client(aggs[0].topology, "c").prepare("r", np.ones(4))[0])

            async def chunks() -> AsyncIterator[bytes]:
                yield body

            status, answer = await call(clients[0], "PUT", "/v1/rounds/r/shares/c", chunks())
            assert (status, answer["error"]) == (411, "length_required")
            assert aggs[0].rounds["r"].accepted == {}

    run(main())


def test_upload_larger_than_the_rounds_limit_is_413(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (aggs, clients):
            await open_everywhere(clients, "r", 4)
            full = full_share_index("c", 3)
            body = Client(aggs[0].topology, "c").prepare("r", np.ones(4))[full]
            path = "/v1/rounds/r/shares/c"
            status, answer = await call(clients[full], "PUT", path, bytes(body) + b"\0")
            assert (status, answer["error"]) == (413, "too_large")
            assert "exceeds the limit" in answer["detail"]
            assert app_limits(clients[full]).inflight == 0

    run(main())


def app_limits(client: TestClient) -> Any:
    return client.server.app[UPLOAD_LIMITS]


def test_uploads_beyond_max_concurrent_uploads_are_503_busy(tmp_path: Path) -> None:
    rounds = {"min_clients": 2, "max_clients": 100, "max_dim": 1000, "max_concurrent_uploads": 1}
    xs = ints(2, 4, seed=4)

    async def main() -> None:
        async with serving(tmp_path, rounds=rounds) as (aggs, clients):
            await open_everywhere(clients, "r", 4)
            entered, release = held_uploads(aggs[0])
            b0 = Client(aggs[0].topology, "c0").prepare("r", xs[0])[0]
            b1 = Client(aggs[0].topology, "c1").prepare("r", xs[1])[0]
            first = asyncio.ensure_future(call(clients[0], "PUT", "/v1/rounds/r/shares/c0", b0))
            await asyncio.wait_for(entered.wait(), 5)
            assert app_limits(clients[0]).inflight == 1
            async with clients[0].put("/v1/rounds/r/shares/c1", data=bytes(b1)) as response:
                assert response.status == 503 and response.headers["Retry-After"] == "1"
                answer = await response.json()
            assert answer["error"] == "busy"
            assert "1 uploads are in flight" in answer["detail"]
            release.set()
            assert (await first)[0] == 201
            assert app_limits(clients[0]).inflight == 0
            status, _ = await call(clients[0], "PUT", "/v1/rounds/r/shares/c1", b1)
            assert status == 201  # the retry after the first finished

    run(main())


def test_upload_that_finds_the_buffer_full_is_503_busy(tmp_path: Path) -> None:
    # 1 MiB holds one FULL share of d = 70,000 (560 kB), not two: the second waits for room
    # (its client held back by TCP) and gets 503 if none comes within upload_s.
    d = 70_000
    rounds = {"min_clients": 2, "max_clients": 100, "max_dim": 100_000, "upload_buffer_mb": 1}

    async def main() -> None:
        changes = {"rounds": rounds, "deadlines": {"upload_s": 0.3}}
        async with serving(tmp_path, **changes) as (aggs, clients):
            await open_everywhere(clients, "r", d)
            ids = [c for c in (f"c{k}" for k in range(20)) if full_share_index(c, 3) == 0][:2]
            bodies = [Client(aggs[0].topology, c).prepare("r", np.ones(d))[0] for c in ids]
            entered, release = held_uploads(aggs[0])
            path = "/v1/rounds/r/shares/"
            first = asyncio.ensure_future(call(clients[0], "PUT", path + ids[0], bodies[0]))
            await asyncio.wait_for(entered.wait(), 5)
            limits = app_limits(clients[0])
            assert len(bodies[0]) <= limits.buffer.used < len(bodies[0]) + GRANULE
            async with clients[0].put(path + ids[1], data=bytes(bodies[1])) as response:
                assert response.status == 503
                assert response.headers["Retry-After"] == "1"
                answer = await response.json()
            assert answer["error"] == "busy"
            assert "upload buffer (1 MiB) stayed full for 0.3 s" in answer["detail"]
            assert limits.inflight == 1 and limits.buffer.used < len(bodies[0]) + GRANULE
            release.set()
            assert (await first)[0] == 201
            assert (limits.inflight, limits.buffer.used) == (0, 0)
            status, _ = await call(clients[0], "PUT", path + ids[1], bodies[1])
            assert status == 201  # the retry, once there is room

    run(main())


def test_upload_whose_body_stalls_is_408_and_frees_its_reservation(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, deadlines={"upload_s": 0.2}) as (aggs, clients):
            await open_everywhere(clients, "r", 4)
            body = bytes(Client(aggs[0].topology, "c").prepare("r", np.ones(4))[0])
            server = clients[0].server
            reader, writer = await asyncio.open_connection(server.host, server.port)
            try:
                writer.write(
                    f"PUT /v1/rounds/r/shares/c HTTP/1.1\r\nHost: x\r\nContent-Length: "
                    f"{len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body[:10]
                )
                await writer.drain()
                # The answer comes at the deadline; the connection stays open after it
                # (aiohttp lingers for the unread body), so read exactly the answer.
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                payload = await reader.readexactly(length)
            finally:
                writer.close()
            assert head.startswith(b"HTTP/1.1 408"), head
            assert json.loads(payload)["error"] == "timeout"
            limits = app_limits(clients[0])
            assert (limits.inflight, limits.buffer.used) == (0, 0)
            assert aggs[0].rounds["r"].accepted == {}

    run(main())


# --------------------------------------------------------------------------- tokens


def test_tokens_401_without_403_with_a_wrong_one(tmp_path: Path) -> None:
    good = {"Authorization": f"Bearer {COLLECTOR_TOKEN}"}
    wrong = {"Authorization": "Bearer " + "0" * 48}

    async def main() -> None:
        async with serving(tmp_path, auth_on=True) as (aggs, clients):
            leader = clients[0]
            for path in ("/v1/rounds/r", "/v1/rounds/r/result"):
                async with leader.get(path) as response:
                    assert response.status == 401
                    assert response.headers["WWW-Authenticate"] == auth.BEARER_CHALLENGE
                    assert (await response.json())["error"] == "unauthenticated"
            status, answer = await call(
                leader, "PUT", "/v1/rounds/r", {"dim": 4}, headers={"Authorization": "Basic eA=="}
            )
            assert (status, answer["error"]) == (401, "unauthenticated")
            assert "'Basic' is not supported" in answer["detail"]
            status, answer = await call(leader, "PUT", "/v1/rounds/r", {"dim": 4}, headers=wrong)
            assert (status, answer["error"]) == (403, "forbidden")
            assert "0000" not in answer["detail"]  # a token is never echoed
            await open_everywhere(clients, "r", 4, headers=good)
            status, answer = await call(leader, "POST", "/v1/rounds/r/close", headers=wrong)
            assert (status, answer["error"]) == (403, "forbidden")
            assert (await call(leader, "GET", "/v1/rounds/r", headers=good))[0] == 200

            body = Client(aggs[0].topology, "alice").prepare("r", np.ones(4))[0]
            path = "/v1/rounds/r/shares/alice"
            status, answer = await call(leader, "PUT", path, body)
            assert (status, answer["error"]) == (401, "unauthenticated")
            bob = auth.client_token(credentials_for(0).client_key, "bob")
            other_agg = auth.client_token(credentials_for(1).client_key, "alice")
            for token in (bob, other_agg, COLLECTOR_TOKEN):
                headers = {"Authorization": f"Bearer {token}"}
                status, answer = await call(leader, "PUT", path, body, headers=headers)
                assert (status, answer["error"]) == (403, "forbidden"), token
            assert aggs[0].rounds["r"].accepted == {}
            alice = auth.client_token(credentials_for(0).client_key, "alice")
            headers = {"Authorization": f"Bearer {alice}"}
            assert (await call(leader, "PUT", path, body, headers=headers))[0] == 201
            status, answer = await call(leader, "GET", "/healthz")  # liveness needs a token
            assert (status, answer["error"]) == (401, "unauthenticated")
            status, answer = await call(leader, "GET", "/healthz", headers=good)
            assert status == 200 and answer["status"] == "ok"

    run(main())


def test_healthz_and_metrics_need_the_collector_token(tmp_path: Path) -> None:
    good = {"Authorization": f"Bearer {COLLECTOR_TOKEN}"}
    alice = auth.client_token(credentials_for(1).client_key, "alice")

    async def main() -> None:
        async with serving(tmp_path, auth_on=True) as (aggs, clients):
            for path in ("/healthz", "/metrics"):
                async with clients[1].get(path) as response:
                    assert response.status == 401, path
                    assert response.headers["WWW-Authenticate"] == auth.BEARER_CHALLENGE
                    assert (await response.json())["error"] == "unauthenticated"
                for token in (alice, "0" * 48):  # a client's token is not the collector's
                    headers = {"Authorization": f"Bearer {token}"}
                    status, answer = await call(clients[1], "GET", path, headers=headers)
                    assert (status, answer["error"]) == (403, "forbidden"), (path, token)
            status, answer = await call(clients[1], "GET", "/healthz", headers=good)
            assert status == 200 and answer["aggregator"] == 1 and answer["mpc"] == "connected"
            status, text = await call(clients[1], "GET", "/metrics", headers=good)
            assert status == 200 and text.decode() == metrics_text(aggs[1])

    run(main())


def test_topology_route_answers_without_a_token(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, auth_on=True) as (aggs, clients):
            topology = aggs[0].topology
            for i, client in enumerate(clients):
                status, answer = await call(client, "GET", "/v1/topology")
                assert status == 200
                assert answer == {
                    "name": "http",
                    "aggregator": i,
                    "fingerprint": fingerprint(topology),
                    "sections": section_digests(topology),
                }
            # Under another topology too: it is how a caller finds out which one runs.
            headers = {TOPOLOGY_HEADER: "0" * 64}
            status, answer = await call(clients[0], "GET", "/v1/topology", headers=headers)
            assert (status, answer["error"]) == (409, "topology_mismatch")

    run(main())


def test_a_request_under_another_topology_is_409_and_changes_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, commands=True) as (aggs, clients):
            topology = aggs[0].topology
            mine = {TOPOLOGY_HEADER: fingerprint(topology)}
            other_topology = dataclasses.replace(
                topology, rounds=dataclasses.replace(topology.rounds, min_clients=3)
            )
            theirs = {TOPOLOGY_HEADER: fingerprint(other_topology)}
            leader = clients[0]

            status, answer = await call(leader, "PUT", "/v1/rounds/r", {"dim": 4}, headers=theirs)
            assert (status, answer["error"]) == (409, "topology_mismatch")
            assert set(answer) == {"error", "detail"}
            assert "'http'" in answer["detail"] and "same topology file" in answer["detail"]
            assert fingerprint(other_topology)[:16] in answer["detail"]
            status, answer = await call(leader, "GET", "/v1/rounds/r", headers=mine)
            assert (status, answer["error"]) == (404, "unknown_round")  # nothing was opened

            # Local tuning is not part of the fingerprint: a collector with another data_dir
            # or deadlines is the same topology.
            tuned = dataclasses.replace(topology, fsync=not topology.fsync, data_dir=Path("x"))
            same = {TOPOLOGY_HEADER: fingerprint(tuned)}
            await open_everywhere(clients, "r", 4, headers=same)

            bodies = Client(topology, "c0").prepare("r", np.ones(4))
            path = "/v1/rounds/r/shares/c0"
            for i, client in enumerate(clients):
                status, answer = await call(client, "PUT", path, bodies[i], headers=theirs)
                assert (status, answer["error"]) == (409, "topology_mismatch")
                assert aggs[i].rounds["r"].accepted == {} and aggs[i].rounds["r"].pending == set()
            status, answer = await call(leader, "POST", "/v1/rounds/r/close", headers=theirs)
            assert (status, answer["error"]) == (409, "topology_mismatch")
            assert not aggs[0].rounds["r"].close_requested
            assert aggs[0].metrics["uploads_refused"] == 0  # refused before the aggregator

            for i, client in enumerate(clients):
                status, _ = await call(client, "PUT", path, bodies[i], headers=mine)
                assert status == 201

    run(main())


def test_the_topology_check_comes_before_the_tokens(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, auth_on=True) as (aggs, clients):
            headers = {TOPOLOGY_HEADER: "f" * 64}
            status, answer = await call(clients[0], "GET", "/v1/rounds/r", headers=headers)
            assert (status, answer["error"]) == (409, "topology_mismatch")
            headers[TOPOLOGY_HEADER] = fingerprint(aggs[0].topology)
            status, answer = await call(clients[0], "GET", "/v1/rounds/r", headers=headers)
            assert (status, answer["error"]) == (401, "unauthenticated")

    run(main())


def other_kind(client_id: str, index: int, dim: int) -> bytes:
    """A well-formed share addressed to aggregator ``index`` of the kind it must NOT accept
    from ``client_id``: FULL where the client's SEED share goes, SEED where its FULL goes."""
    if full_share_index(client_id, 3) == index:
        return codec.encode_share(Share(index, ShareKind.SEED, dim, seed=bytes(range(16))))
    vector = np.arange(dim, dtype=np.uint64)
    return bytes(codec.encode_share(Share(index, ShareKind.FULL, dim, vector=vector)))


def test_a_share_of_the_wrong_kind_is_refused(tmp_path: Path) -> None:
    cid = "c0"
    full = full_share_index(cid, 3)
    seed = (full + 1) % 3

    async def main() -> None:
        async with serving(tmp_path) as (aggs, clients):
            # d = 2: a FULL share is as long as a SEED share (28 bytes), so it is read and
            # refused by kind; for larger d its length alone refuses it (413, unread).
            for dim in (2, 8):
                r = f"d{dim}"
                await open_everywhere(clients, r, dim)
                path = f"/v1/rounds/{r}/shares/{cid}"
                status, answer = await call(clients[full], "PUT", path, other_kind(cid, full, dim))
                assert (status, answer["error"]) == (400, "malformed")
                assert "must send a full share" in answer["detail"]
                status, answer = await call(clients[seed], "PUT", path, other_kind(cid, seed, dim))
                if dim == 2:
                    assert (status, answer["error"]) == (400, "malformed")
                    assert "must send a seed share" in answer["detail"]
                    assert f"goes to aggregator {full}" in answer["detail"]
                else:
                    assert (status, answer["error"]) == (413, "too_large")
                for a in aggs:
                    assert a.rounds[r].accepted == {} and a.rounds[r].pending == set()
                # The right kinds are accepted afterwards.
                bodies = Client(aggs[0].topology, cid).prepare(r, np.ones(dim))
                for i, client in enumerate(clients):
                    assert (await call(client, "PUT", path, bodies[i]))[0] == 201

    run(main())


def test_statement_of_a_round_is_signed_by_each_aggregator(tmp_path: Path) -> None:
    signing = [Ed25519PrivateKey.generate() for _ in range(3)]
    good = {"Authorization": f"Bearer {COLLECTOR_TOKEN}"}
    xs = ints(3, 5, seed=11)

    async def main() -> None:
        async with serving(tmp_path, auth_on=True, commands=True, signing_keys=signing) as (
            aggs,
            clients,
        ):
            topology = aggs[0].topology
            await open_everywhere(clients, "r", 5, headers=good)
            for k, x in enumerate(xs):
                await upload_everywhere(aggs, clients, "r", f"c{k}", x, auth_on=True)
            status, answer = await call(clients[1], "GET", "/v1/rounds/r/statement", headers=good)
            assert (status, answer["error"]) == (409, "result_not_ready")
            status, answer = await call(clients[0], "POST", "/v1/rounds/r/close", headers=good)
            assert status == 202
            await ended(clients, "r", headers=good)
            status, raw = await call(clients[0], "GET", "/v1/rounds/r/result", headers=good)
            assert status == 200
            total, _ = decode_result(raw)

            status, answer = await call(clients[2], "GET", "/v1/rounds/r/statement")
            assert (status, answer["error"]) == (401, "unauthenticated")
            status, answer = await call(clients[2], "GET", "/v1/rounds/x/statement", headers=good)
            assert (status, answer["error"]) == (404, "unknown_round")
            signed = []
            for i, client in enumerate(clients):
                status, answer = await call(client, "GET", "/v1/rounds/r/statement", headers=good)
                assert status == 200, answer
                st = SignedStatement.from_json(answer)
                assert verify_signature(st, signing[i].public_key())
                assert not verify_signature(st, signing[(i + 1) % 3].public_key())
                body = st.statement
                assert (body.round_id, body.aggregator, body.dim) == ("r", i, 5)
                assert body.topology_fingerprint == fingerprint(topology)
                assert body.total_digest == total_digest(total)
                assert body.clients_digest == clients_digest(["c0", "c1", "c2"])
                assert (body.num_clients, body.dropped_clients) == (3, 0)
                assert body.epsilon is None and body.noise_stddev is None  # no dp section
                again = (await call(client, "GET", "/v1/rounds/r/statement", headers=good))[1]
                assert again == answer
                signed.append(st)
            keys = [k.public_key().public_bytes_raw() for k in signing]
            agreed = verify_result(total, signed, keys, fingerprint(topology), "r")
            assert agreed == signed[0].statement
            other = total.copy()
            other[0] ^= 1
            with pytest.raises(ResultMismatch):
                verify_result(other, signed, keys, fingerprint(topology), "r")

    run(main())


# --------------------------------------------------------------------------- end to end


async def https_federation(
    deployment: Any, stack: list[Any]
) -> tuple[list[Aggregator], list[asyncio.Task[None]]]:
    """Serve every aggregator of a provisioned deployment over HTTPS with its own keys and
    tokens, on its topology's ports (in this process, on the in-memory party network)."""
    topology = deployment.topology()
    links = memory_links(topology.m)
    aggs, loops = [], []
    for a, party in zip(topology.aggregators, deployment.party_dirs, strict=True):
        secrets = load_party_dir(party, a)
        agg = Aggregator(
            topology, a.index, PluggableNetwork(a.index, links), signing_key=secrets.signing_key
        )
        runner = web.AppRunner(build_app(agg, secrets.credentials))
        await runner.setup()
        stack.append(runner)
        site = web.TCPSite(
            runner, a.host, a.http_port, ssl_context=https_server_context(secrets.https)
        )
        await site.start()
        aggs.append(agg)
        loops.append(asyncio.ensure_future(agg.serve_commands()))
    return aggs, loops


def test_client_and_collector_over_pinned_https_with_tokens_and_statements(
    tmp_path: Path,
) -> None:
    template = write_topology(tmp_path, topology_doc(3, 1, name="e2e"))
    deployment = provision_local(template, cwd=tmp_path)
    topology = deployment.topology()
    assert topology.has_keys and topology.aggregators[0].url.startswith("https://")
    xs = ints(3, 6, seed=12)
    saved = tmp_path / "result.npz"

    async def main() -> None:
        stack: list[Any] = []
        aggs: list[Aggregator] = []
        loops: list[asyncio.Task[None]] = []
        try:
            aggs, loops = await https_federation(deployment, stack)
            collector = deployment.collector(timeout_s=10.0)
            await collector.open_round_async("r", 6)
            # A client whose topology differs in one setting is refused; nothing uploaded.
            stray = dataclasses.replace(
                topology, rounds=dataclasses.replace(topology.rounds, min_clients=3)
            )
            with pytest.raises(TopologyMismatchError):
                await Client(stray, "c0", deployment.client_tokens("c0")).submit_async("r", xs[0])
            assert all(a.rounds["r"].accepted == {} for a in aggs)
            for k, x in enumerate(xs):
                await deployment.client(f"c{k}").submit_async("r", x)
            result = await collector.aggregate_async("r", timeout=10.0)
            np.testing.assert_array_equal(result.total, xs.sum(axis=0))
            assert result.num_clients == 3 and len(result.statements) == 3
            result.save(saved)
            verify_statements(topology, "r", result.field_total, result.statements)
            tampered = [dict(st) for st in result.statements]
            tampered[1]["num_clients"] = 2
            with pytest.raises(ResultMismatch):
                verify_statements(topology, "r", result.field_total, tampered)
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            for runner in reversed(stack):
                await runner.cleanup()
            for a in aggs:
                a.close_journals()

    run(main(), timeout_s=30.0)
    again = load_and_verify(topology, saved)
    np.testing.assert_array_equal(again.total, xs.sum(axis=0))
    assert again.num_clients == 3
