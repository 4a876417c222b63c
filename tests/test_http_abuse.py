"""Abuse resistance of the HTTP layer, in process (README, "HTTP API" limits and "Security
model"; docs/design.md, "Abuse resistance"): per-client upload slots and bytes, bodies taken
as they arrive, slow bodies cut by a minimum rate, clients that vanish mid-body, parser
errors as JSON, refusals logged at a bounded rate and counted in ``/metrics``, a full disk,
the connection gate (bounded connections, idle and slow-header connections closed), and the
client's retries honouring ``Retry-After`` within a budget.

No fixed sleeps and no timed asserts: every wait is a bounded loop on a condition; the only
time figure asserted is a lower bound (a retry never comes before its ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mpc_agg import Client
from mpc_agg.aggregator import Aggregator
from mpc_agg.config.schema import AggregatorAddress
from mpc_agg.core.sharing import full_share_index
from mpc_agg.errors import AggregatorUnavailable, RemoteRefusal
from mpc_agg.mpc.memory import InMemoryNetwork, memory_links
from mpc_agg.storage.journal import RoundJournal
from mpc_agg.transport.connections import ConnectionGate, connection_budget
from mpc_agg.transport.http_client import AggregatorAPI, retry_after_s
from mpc_agg.transport.http_server import CONNECTIONS, UPLOAD_LIMITS, build_app, serve
from mpc_agg.transport.quiet_log import RateLimitedLog, clip
from mpc_agg.transport.upload_limits import GRANULE, ServerLimits

from .test_http_server import (
    call,
    ended,
    make_federation,
    open_everywhere,
    run,
    serving,
    wait_until,
)

D = 70_000
"""A dimension whose full share (560 kB) is several granules of the upload buffer."""


def ids_with_full_share_at(index: int, n: int) -> list[str]:
    return [c for c in (f"c{k}" for k in range(100)) if full_share_index(c, 3) == index][:n]


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name{labels}`` in Prometheus text (None if absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


async def raw_upload(
    host: str, port: int, path: str, length: int, first: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a connection, send an upload's head announcing ``length`` bytes and ``first``
    bytes of its body, and leave it there."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode() + first
    )
    await writer.drain()
    return reader, writer


async def read_answer(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, Any]]:
    """One HTTP answer off a raw connection: (head, JSON body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    return head, json.loads(await reader.readexactly(length))


def where(client: TestClient) -> tuple[str, int]:
    server = client.server
    assert isinstance(server.host, str) and isinstance(server.port, int)
    return server.host, server.port


# --------------------------------------------------------------------------- fair share


def test_one_client_holds_at_most_two_slots_and_one_full_share(tmp_path: Path) -> None:
    greedy = ids_with_full_share_at(0, 1)[0]
    honest = ids_with_full_share_at(0, 2)[1]
    seed_at = 1  # greedy's seed share goes here (28 bytes)

    async def main() -> None:
        async with serving(tmp_path) as (aggs, clients):
            await open_everywhere(clients, "r", D)
            path = f"/v1/rounds/r/shares/{greedy}"
            held = []
            # Two stalled seed uploads fill greedy's two slots at aggregator 1 ...
            for _ in range(2):
                held.append(await raw_upload(*where(clients[seed_at]), path, 28, b"\x01\x02"))
            limits = clients[seed_at].server.app[UPLOAD_LIMITS]
            await wait_until(lambda: limits.inflight == 2)
            body = Client(aggs[0].topology, greedy).prepare("r", np.ones(D))
            async with clients[seed_at].put(path, data=bytes(body[seed_at])) as response:
                assert response.status == 503 and response.headers["Retry-After"] == "1"
                answer = await response.json()
            assert answer["error"] == "busy"
            assert "already has 2 uploads in flight" in answer["detail"]
            # ... and others are not affected by them.
            other = Client(aggs[0].topology, honest).prepare("r", np.ones(D))
            status, _ = await call(
                clients[seed_at], "PUT", f"/v1/rounds/r/shares/{honest}", other[1]
            )
            assert status == 201

            # At aggregator 0 (its full share): a stalled full upload announcing 560 kB
            # holds the bytes that arrived, in granules, not what it announced ...
            full = len(body[0])
            held.append(await raw_upload(*where(clients[0]), path, full, bytes(body[0][:4])))
            limits0 = clients[0].server.app[UPLOAD_LIMITS]
            await wait_until(lambda: limits0.buffer.used > 0)
            assert limits0.buffer.used == GRANULE < full
            # ... and a second one would exceed its fair share (one full share): refused.
            async with clients[0].put(path, data=bytes(body[0])) as response:
                assert response.status == 503 and response.headers["Retry-After"] == "1"
                answer = await response.json()
            assert "would exceed one full share" in answer["detail"]
            status, _ = await call(clients[0], "PUT", f"/v1/rounds/r/shares/{honest}", other[0])
            assert status == 201

            for _, writer in held:
                writer.close()
            await wait_until(lambda: limits.inflight == 0 and limits0.inflight == 0)
            assert limits0.buffer.used == 0 and greedy not in aggs[0].rounds["r"].accepted
            text = aggs[0].metrics_text()
            assert sample(text, "mpc_agg_refusals_total", code="busy", status="503") == 1

    run(main())


# --------------------------------------------------------------------------- slow bodies


def test_a_slow_body_is_cut_by_the_minimum_rate_after_the_grace_period(tmp_path: Path) -> None:
    cid = ids_with_full_share_at(0, 1)[0]
    # upload_s stays 120 s: only the rate rule can end these uploads.
    limits = {"grace_s": 0.2, "min_rate_bps": 1e6}

    async def main() -> None:
        async with serving(tmp_path, server_limits=limits) as (aggs, clients):
            await open_everywhere(clients, "r", D)
            body = bytes(Client(aggs[0].topology, cid).prepare("r", np.ones(D))[0])
            path = f"/v1/rounds/r/shares/{cid}"
            # Headers and 4 bytes, then nothing.
            reader, writer = await raw_upload(*where(clients[0]), path, len(body), body[:4])
            head, answer = await read_answer(reader)
            writer.close()
            assert head.startswith(b"HTTP/1.1 408"), head
            assert answer["error"] == "timeout"
            assert "below the minimum of 1000000 bytes/s after the first 0.2 s" in answer["detail"]
            # A trickle (about 20 kB/s) is cut too.
            reader, writer = await raw_upload(*where(clients[0]), path, len(body), body[:1000])

            async def trickle() -> None:
                for k in range(1000, len(body), 1000):
                    writer.write(body[k : k + 1000])
                    await asyncio.sleep(0.05)

            feeding = asyncio.ensure_future(trickle())
            head, answer = await read_answer(reader)
            feeding.cancel()
            writer.close()
            assert head.startswith(b"HTTP/1.1 408") and "bytes/s" in answer["detail"]
            uploads = clients[0].server.app[UPLOAD_LIMITS]
            await wait_until(lambda: uploads.inflight == 0)
            assert uploads.buffer.used == 0 and aggs[0].rounds["r"].accepted == {}
            # A body at full speed is accepted.
            assert (await call(clients[0], "PUT", path, body))[0] == 201

    run(main())


def test_a_client_vanishing_mid_body_is_logged_at_info_without_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cid = ids_with_full_share_at(0, 1)[0]

    async def main() -> None:
        async with serving(tmp_path) as (aggs, clients):
            await open_everywhere(clients, "r", D)
            body = bytes(Client(aggs[0].topology, cid).prepare("r", np.ones(D))[0])
            path = f"/v1/rounds/r/shares/{cid}"
            _, writer = await raw_upload(*where(clients[0]), path, len(body), body[:100_000])
            uploads = clients[0].server.app[UPLOAD_LIMITS]
            await wait_until(lambda: uploads.buffer.used > 0)
            writer.transport.abort()  # gone, mid-body
            await wait_until(
                lambda: sample(aggs[0].metrics_text(), "mpc_agg_refusals_total", status="400") == 1
            )
            assert (uploads.inflight, uploads.buffer.used) == (0, 0)
            text = aggs[0].metrics_text()
            assert sample(text, "mpc_agg_refusals_total", code="client_disconnected") == 1
            assert aggs[0].rounds["r"].accepted == {} and not aggs[0].rounds["r"].pending
            assert (await call(clients[0], "PUT", path, body))[0] == 201  # it may come back

    with caplog.at_level(logging.DEBUG):
        run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    lines = [r.getMessage() for r in caplog.records if "client_disconnected" in r.getMessage()]
    assert len(lines) == 1 and "-> 400 client_disconnected" in lines[0]
    assert "Traceback" not in caplog.text and "500" not in lines[0]


# --------------------------------------------------------------------------- disk full


def test_an_upload_on_a_full_disk_is_507_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cid = ids_with_full_share_at(0, 1)[0]

    def full_disk(self: RoundJournal, client_id: str, body: bytes | bytearray) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    async def main() -> None:
        async with serving(tmp_path) as (aggs, clients):
            await open_everywhere(clients, "r", 8)
            body = Client(aggs[0].topology, cid).prepare("r", np.ones(8))[0]
            path = f"/v1/rounds/r/shares/{cid}"
            with monkeypatch.context() as patch:
                patch.setattr(RoundJournal, "write_share", full_disk)
                status, answer = await call(clients[0], "PUT", path, body)
            assert (status, answer["error"]) == (507, "storage_failure")
            assert "ENOSPC" in answer["detail"] and "retry later" in answer["detail"]
            rnd = aggs[0].rounds["r"]
            assert rnd.accepted == {} and not rnd.pending and rnd.state.value == "open"
            assert aggs[0].metrics["uploads_refused"] == 1
            assert aggs[0].metrics["uploads_accepted"] == 0
            text = aggs[0].metrics_text()
            assert sample(text, "mpc_agg_refusals_total", code="storage_failure") == 1
            # Space again: the same upload is accepted, as a first upload.
            status, answer = await call(clients[0], "PUT", path, body)
            assert (status, answer) == (201, {"accepted": True, "retry": False})

    run(main())


# --------------------------------------------------------------------------- metrics


def test_metrics_show_dropped_clients_per_round_and_privacy_spent(tmp_path: Path) -> None:
    from .conftest import dp_topology_doc

    dp_doc = dp_topology_doc("dp", budget_epsilon=8.0)
    changes = {"encoding": dp_doc["encoding"], "dp": dp_doc["dp"]}

    async def main() -> None:
        async with serving(tmp_path, commands=True, **changes) as (aggs, clients):
            text = aggs[1].metrics_text()
            assert sample(text, "mpc_agg_privacy_epsilon_spent") == 0.0
            assert sample(text, "mpc_agg_privacy_epsilon_budget") == 8.0
            await open_everywhere(clients, "r", 4)
            for k in range(3):
                bodies = Client(aggs[0].topology, f"c{k}").prepare("r", np.full(4, 0.1))
                for i, client in enumerate(clients):
                    path = f"/v1/rounds/r/shares/c{k}"
                    assert (await call(client, "PUT", path, bodies[i]))[0] == 201
            partial = Client(aggs[0].topology, "late").prepare("r", np.full(4, 0.1))
            for i in (0, 1):  # never reaches aggregator 2: dropped everywhere
                assert (await call(clients[i], "PUT", "/v1/rounds/r/shares/late", partial[i]))[
                    0
                ] == 201
            assert (await call(clients[0], "POST", "/v1/rounds/r/close"))[0] == 202
            await ended(clients, "r")
            for agg in aggs:
                text = agg.metrics_text()
                assert sample(text, "mpc_agg_dropped_clients_total", round="r") == 1
                assert (sample(text, "mpc_agg_privacy_epsilon_spent") or 0) > 0
                assert sample(text, "mpc_agg_open_rounds") == 0
                assert sample(text, "mpc_agg_rounds", state="done") == 1

    run(main(), timeout_s=30)


# --------------------------------------------------------------------------- gated server


@asynccontextmanager
async def gated(
    tmp_path: Path, **limits: Any
) -> AsyncIterator[tuple[Aggregator, web.Application, str, int]]:
    """Aggregator 0 of a federation served by :func:`serve` on an ephemeral port, behind its
    connection gate and with the server's own request handler."""
    aggs = make_federation(tmp_path)
    app = build_app(aggs[0], limits=ServerLimits.for_topology(aggs[0].topology, **limits))
    runner, url = await serve(app, "127.0.0.1", 0)
    port = int(url.rsplit(":", 1)[1])
    try:
        yield aggs[0], app, "127.0.0.1", port
    finally:
        await runner.cleanup()
        for a in aggs:
            a.close_journals()


async def raw_exchange(host: str, port: int, data: bytes) -> tuple[bytes, dict[str, Any]]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        return await read_answer(reader)
    finally:
        writer.close()


def test_parser_errors_are_answered_with_the_json_error_body(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with gated(tmp_path) as (agg, _, host, port):
            cases = [
                (b"GARBAGE\r\n\r\n", 400, "bad_http_request"),
                (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414,
                 "request_line_too_long"),
                (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n",
                 431, "headers_too_large"),
                (b"PUT /v1/rounds/r HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"zz\r\n", 400, "bad_http_request"),
            ]  # fmt: skip
            for data, status, code in cases:
                head, answer = await raw_exchange(host, port, data)
                assert head.split(b" ")[1] == str(status).encode(), (head, code)
                assert b"content-type: application/json" in head.lower(), head
                assert answer["error"] == code and answer["detail"], answer
            text = agg.metrics_text()
            for _, status, code in cases:
                assert sample(text, "mpc_agg_refusals_total", code=code, status=str(status))

    with caplog.at_level(logging.DEBUG):
        run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "Traceback" not in caplog.text
    assert all(len(r.getMessage()) < 400 for r in caplog.records)


def test_repeated_refusals_are_logged_at_a_bounded_rate_and_clipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    long_id = "x" * 3000

    async def main() -> None:
        async with gated(tmp_path, log_lines_per_minute=5) as (agg, _, host, port):
            async with aiohttp.ClientSession() as session:
                for _ in range(40):
                    async with session.get(f"http://{host}:{port}/v1/rounds/nope") as response:
                        assert response.status == 404
                for _ in range(3):
                    url = f"http://{host}:{port}/v1/rounds/r/shares/{long_id}"
                    async with session.put(url, data=b"12") as response:
                        assert response.status == 400
            text = agg.metrics_text()
            assert sample(text, "mpc_agg_refusals_total", code="unknown_round") == 40
            assert sample(text, "mpc_agg_refusals_total", code="invalid_request") == 3

    with caplog.at_level(logging.INFO, logger="mpc_agg.http"):
        run(main())
    unknown = [r.getMessage() for r in caplog.records if "unknown_round" in r.getMessage()]
    assert len(unknown) == 5  # 40 refusals, 5 lines: the rest counted, not written
    invalid = [r.getMessage() for r in caplog.records if "invalid_request" in r.getMessage()]
    assert len(invalid) == 3
    for line in invalid:
        assert long_id not in line and len(line) < 300
        assert line.count("x") <= 160  # path and detail: ~100 characters of the peer's text each


def test_rate_limited_log_suppresses_then_sums_up() -> None:
    now = [0.0]
    records: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("test.quiet")
    logger.addHandler(Capture())
    logger.setLevel(logging.INFO)
    quiet = RateLimitedLog(logger, per_minute=3, clock=lambda: now[0])
    logged = [quiet.log("busy", logging.INFO, "refused %d", k) for k in range(5)]
    assert logged == [True, True, True, False, False] and quiet.suppressed("busy") == 2
    assert quiet.log("other", logging.INFO, "another code") is True  # buckets per code
    now[0] = 20.0  # one token back (3 per minute)
    assert quiet.log("busy", logging.INFO, "refused %d", 5) is True
    assert records[-1] == "refused 5 [2 similar line(s) suppressed]"
    assert quiet.suppressed("busy") == 0
    assert clip("a\nb\x1b" + "c" * 200, 10) == "a\\nb\\x1bcccccc...(+194 chars)"


def test_every_refusal_kind_shows_in_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cid = ids_with_full_share_at(0, 2)

    async def main() -> None:
        async with gated(tmp_path, grace_s=0.1, min_rate_bps=1e6) as (agg, app, host, port):
            agg.open_round("r", D)
            body = bytes(Client(agg.topology, cid[0]).prepare("r", np.ones(D))[0])
            base = f"http://{host}:{port}"
            path = f"/v1/rounds/r/shares/{cid[0]}"
            # 408: a stalled body.
            reader, writer = await raw_upload(host, port, path, len(body), body[:4])
            head, _ = await read_answer(reader)
            writer.close()
            assert head.startswith(b"HTTP/1.1 408")
            # 503: three at once from one client (two slots).
            held = [await raw_upload(host, port, path, 28, b"") for _ in range(2)]
            uploads = app[UPLOAD_LIMITS]
            await wait_until(lambda: uploads.inflight == 2)
            async with aiohttp.ClientSession() as session:
                async with session.put(base + path, data=body) as response:
                    assert response.status == 503
                for _, w in held:
                    w.close()
                await wait_until(lambda: uploads.inflight == 0)

                async def chunks() -> AsyncIterator[bytes]:
                    yield body

                async with session.put(base + path, data=chunks()) as response:
                    assert response.status == 411
                async with session.put(base + path, data=body + b"\0") as response:
                    assert response.status == 413
                with monkeypatch.context() as patch:
                    patch.setattr(RoundJournal, "write_share", full_disk)
                    async with session.put(base + path, data=body) as response:
                        assert response.status == 507
            head, _ = await raw_exchange(host, port, b"NOT HTTP\r\n\r\n")
            assert head.split(b" ")[1] == b"400"
            text = agg.metrics_text()
            for code, status in [
                ("timeout", 408),
                ("busy", 503),
                ("length_required", 411),
                ("too_large", 413),
                ("storage_failure", 507),
                ("bad_http_request", 400),
                ("client_disconnected", 400),
            ]:
                assert (sample(text, "mpc_agg_refusals_total", code=code, status=str(status))
                        or 0) >= 1, (code, text)  # fmt: skip
            assert sample(text, "mpc_agg_connections_open") is not None

    def full_disk(self: RoundJournal, client_id: str, body: bytes | bytearray) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    run(main())


def test_the_gate_bounds_connections_and_closes_idle_and_slow_header_ones(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        limits = {"max_connections": 8, "idle_timeout_s": 1.0, "calm_idle_timeout_s": 1.0}
        async with gated(tmp_path, **limits) as (
            agg,
            app,
            host,
            port,
        ):
            gate: ConnectionGate = app[CONNECTIONS]
            assert gate.min_age_s == 0.5
            loop = asyncio.get_running_loop()
            old = [await asyncio.open_connection(host, port) for _ in range(8)]
            await wait_until(lambda: gate.open == 8)
            opened = loop.time()
            await wait_until(lambda: loop.time() > opened + gate.min_age_s)
            # Eight newcomers push the eight older idle connections out ...
            new = [await asyncio.open_connection(host, port) for _ in range(8)]
            for r, _ in old:
                assert await asyncio.wait_for(r.read(), 10) == b""
            assert gate.evicted == 8 and gate.open <= 8 + ConnectionGate.SLACK
            # ... but nobody pushes out a connection younger than min_age_s: reset at once.
            r, w = await asyncio.open_connection(host, port)
            with pytest.raises(ConnectionError):
                if await asyncio.wait_for(r.read(), 10) == b"":
                    raise ConnectionResetError
            w.close()
            assert gate.refused == 1
            # A client that retries gets in (here: once the watchdog closed the idle ones).
            async with aiohttp.ClientSession() as session:
                for _ in range(100):
                    try:
                        async with session.get(f"http://{host}:{port}/v1/topology") as response:
                            assert response.status == 200
                            break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.05)
                else:
                    raise AssertionError("never got in")
            # Slow headers (slowloris): a request head that never completes is closed.
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            for _ in range(3):
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server
            writer.close()
            # Every idle connection is closed by the watchdog, none by the peer.
            for r, _ in new:
                await asyncio.wait_for(r.read(), 10)
            await wait_until(lambda: gate.open == 0, timeout_s=10)
            for _, w in old + new:
                w.close()
            text = agg.metrics_text()
            assert sample(text, "mpc_agg_connections_closed_total", reason="evicted") >= 8
            assert sample(text, "mpc_agg_connections_closed_total", reason="idle_timeout") >= 8
            assert sample(text, "mpc_agg_connections_refused_total") >= 1

    run(main(), timeout_s=30)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_tls_connections_pass_the_gate_on_either_event_loop(tmp_path: Path, loop_kind: str) -> None:
    """TLS is done after admission (``loop.start_tls``); uvloop, which MPyC uses when it is
    installed, starts reading before a protocol can pause it, and the client's first bytes
    must not be lost."""
    from mpc_agg.identity import load_party_dir
    from mpc_agg.provision import provision_local
    from mpc_agg.transport.tls import https_client_context, https_server_context

    from .conftest import topology_doc, write_topology

    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    deployment = provision_local(
        write_topology(tmp_path, topology_doc(3, 1, name="tls")), cwd=tmp_path
    )
    topology = deployment.topology()
    address = topology.aggregators[0]
    secrets = load_party_dir(deployment.party_dirs[0], address)

    async def main() -> None:
        aggs = [Aggregator(topology, 0, InMemoryNetwork(0, memory_links(3)))]
        limits = ServerLimits.for_topology(
            topology, max_connections=64, idle_timeout_s=0.5, calm_idle_timeout_s=0.5
        )
        app = build_app(aggs[0], limits=limits)
        runner, url = await serve(
            app, address.host, address.http_port, https_server_context(secrets.https)
        )
        gate = app[CONNECTIONS]
        try:
            context = https_client_context(address)
            for _ in range(30):  # a new connection (and handshake) each time
                async with aiohttp.ClientSession() as session:
                    async with session.get(url + "/v1/topology", ssl=context) as response:
                        assert response.status == 200
            # A TCP connection that never starts its TLS handshake is cut by the watchdog.
            reader, writer = await asyncio.open_connection(address.host, address.http_port)
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            # Parser errors inside TLS are JSON too.
            reader, writer = await asyncio.open_connection(
                address.host, address.http_port, ssl=context, server_hostname=address.host
            )
            writer.write(b"GARBAGE\r\n\r\n")
            head, answer = await read_answer(reader)
            writer.close()
            assert head.split(b" ")[1] == b"400" and answer["error"] == "bad_http_request"
            await wait_until(lambda: gate.open == 0, timeout_s=10)
            assert gate.idle_closed >= 1
        finally:
            await runner.cleanup()
            for a in aggs:
                a.close_journals()

    try:
        loop.run_until_complete(asyncio.wait_for(main(), 60))
    finally:
        loop.close()


class FakeTransport:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


def test_the_watchdog_is_strict_only_when_connections_are_scarce() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        gate = ConnectionGate(8, idle_timeout_s=0.05, calm_idle_timeout_s=30.0)
        calm = [FakeTransport() for _ in range(3)]
        conns = [gate.admit(t) for t in calm]  # type: ignore[arg-type]
        assert all(c is not None for c in conns) and not gate.under_pressure
        start = loop.time()
        await wait_until(lambda: loop.time() > start + 0.3)  # six idle timeouts
        assert not any(t.aborted for t in calm)  # calm: 30 s
        more = [FakeTransport() for _ in range(2)]
        for t in more:
            assert gate.admit(t) is not None  # type: ignore[arg-type]
        assert gate.under_pressure  # 5 of 8 open
        await wait_until(lambda: all(t.aborted for t in calm + more))
        assert gate.idle_closed == 5
        # A busy connection is never cut, whatever the pressure.
        busy = FakeTransport()
        conn = gate.admit(busy)  # type: ignore[arg-type]
        assert conn is not None
        gate.begin(conn)
        start = loop.time()
        await wait_until(lambda: loop.time() > start + 0.3)
        assert not busy.aborted
        for c in conns:
            assert c is not None
            gate.closed(c)

    run(main())


def test_connection_budget_leaves_room_below_the_descriptor_limit() -> None:
    assert connection_budget(1024) == 768
    assert connection_budget(20000) == 19744
    assert connection_budget(100) == 75 and connection_budget(10) == 16


# --------------------------------------------------------------------------- client retries


@asynccontextmanager
async def scripted(
    answers: list[tuple[int, dict[str, str]]],
) -> AsyncIterator[tuple[AggregatorAddress, list[float]]]:
    """A server answering each request with the next ``(status, headers)`` of ``answers``
    (201 once they run out); yields its address and the loop times requests arrived."""
    arrivals: list[float] = []

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        arrivals.append(asyncio.get_running_loop().time())
        status, headers = answers.pop(0) if answers else (201, {})
        code = {503: "busy", 408: "timeout", 429: "too_many", 409: "conflicting_share"}
        body = {"error": code.get(status, "x"), "detail": "scripted"} if status >= 400 else {}
        return web.json_response(body, status=status, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    async with TestServer(app) as server:
        assert isinstance(server.port, int)
        address = AggregatorAddress(
            index=0, host="127.0.0.1", mpc_port=1, http_port=server.port, scheme="http"
        )
        yield address, arrivals


def test_busy_answers_are_retried_no_sooner_than_retry_after_within_the_budget() -> None:
    async def main() -> None:
        answers = [(503, {"Retry-After": "1"}), (408, {}), (429, {"Retry-After": "1"})]
        async with scripted(answers) as (address, arrivals):
            async with aiohttp.ClientSession() as session:
                api = AggregatorAPI(session, address, retries=0, retry_budget_s=60)
                status, _ = await api.request("PUT", "/x", data=b"body")
            assert status == 201 and len(arrivals) == 4
            assert arrivals[1] - arrivals[0] >= 1.0  # Retry-After: 1
            assert arrivals[3] - arrivals[2] >= 1.0

        # A Retry-After beyond what is left of the budget: refused, after one attempt.
        async with scripted([(503, {"Retry-After": "5"})]) as (address, arrivals):
            async with aiohttp.ClientSession() as session:
                api = AggregatorAPI(session, address, retries=0, retry_budget_s=1)
                with pytest.raises(RemoteRefusal) as refused:
                    await api.request("PUT", "/x", data=b"body")
            assert (refused.value.status, refused.value.code) == (503, "busy")
            assert "after 1 attempts" in refused.value.detail and len(arrivals) == 1

        # Final answers are not retried: a 4xx (also 429 without Retry-After), and 507.
        for status in (409, 429, 507):
            async with scripted([(status, {})]) as (address, arrivals):
                async with aiohttp.ClientSession() as session:
                    api = AggregatorAPI(session, address, retries=3, retry_budget_s=60)
                    with pytest.raises(RemoteRefusal) as refused:
                        await api.request("PUT", "/x", data=b"body")
                assert refused.value.status == status and len(arrivals) == 1

    run(main(), timeout_s=30)


def test_a_refused_connection_is_retried_a_few_times_only() -> None:
    async def main() -> None:
        with __import__("socket").socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]  # nobody listens there once closed
        address = AggregatorAddress(
            index=0, host="127.0.0.1", mpc_port=1, http_port=port, scheme="http"
        )
        async with aiohttp.ClientSession() as session:
            api = AggregatorAPI(session, address, retries=2, backoff_s=0.01, retry_budget_s=600)
            with pytest.raises(AggregatorUnavailable, match="after 3 attempts"):
                await api.request("GET", "/x")

    run(main())


def test_only_resets_by_the_aggregator_count_as_busy() -> None:
    from mpc_agg.transport.http_client import _reset_by_peer

    assert _reset_by_peer(aiohttp.ServerDisconnectedError())
    assert _reset_by_peer(ConnectionResetError())
    assert _reset_by_peer(aiohttp.ClientOSError(errno.ECONNRESET, "reset"))
    assert not _reset_by_peer(aiohttp.ClientOSError(errno.ECONNREFUSED, "refused"))
    assert not _reset_by_peer(asyncio.TimeoutError())


def test_retry_after_parsing() -> None:
    assert retry_after_s("2") == 2.0 and retry_after_s(" 0 ") == 0.0
    assert retry_after_s(None) is None
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert retry_after_s("-1") is None and retry_after_s("99999") is None


def test_client_retry_budget_defaults_to_the_upload_deadline(tmp_path: Path) -> None:
    aggs = make_federation(tmp_path, deadlines={"upload_s": 42})
    try:
        topology = aggs[0].topology
        assert Client(topology, "c").retry_budget_s == 42
        assert Client(topology, "c", retry_budget_s=5).retry_budget_s == 5
    finally:
        for a in aggs:
            a.close_journals()
