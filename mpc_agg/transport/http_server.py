"""The HTTP API of an aggregator, on aiohttp (README, "HTTP API (per aggregator)").

| call | answer |
|---|---|
| ``PUT  /v1/rounds/{round}`` JSON ``{"dim": d, "min_clients": k?}`` | 201 opened, 200 exists |
| ``GET  /v1/rounds/{round}`` | 200 JSON status |
| ``PUT  /v1/rounds/{round}/shares/{client}`` binary | 201 accepted, 200 identical retry |
| ``POST /v1/rounds/{round}/close`` (leader only) | 202 |
| ``DELETE /v1/rounds/{round}`` (leader only) | 202 abort under way, 200 ended |
| ``GET  /v1/rounds`` | 200 JSON list of rounds (bounded) |
| ``GET  /v1/rounds/{round}/result`` | 200 binary result (``mpc_agg.core.codec``) |
| ``GET  /v1/rounds/{round}/statement`` | 200 JSON signed result statement |
| ``GET  /v1/topology`` (no token) | 200 JSON fingerprint, section digests, index |
| ``GET  /healthz``, ``GET /metrics`` | liveness JSON; Prometheus text |

With credentials (every topology but an ``insecure`` one), every call but
``/v1/topology`` needs a token: a client's for its shares, the collector's for the rest.
A request carrying ``X-Mpc-Agg-Topology: <fingerprint>`` made under another topology is
refused (409 ``topology_mismatch``) before anything else is done.

Every error is ``{"error": code, "detail": text}`` with the status from :data:`HTTP_STATUS`,
the one table from error to status; aiohttp's own refusals (no such route, wrong method) are
answered as the :class:`~mpc_agg.errors.PeerError` of the same status. Handlers do no I/O
beyond the request: decisions come from the aggregator, seen through
:class:`~mpc_agg.transport.service.AggregatorService` (docs/design.md, "Layout and
layering"); admission limits are :class:`~mpc_agg.transport.upload_limits.UploadLimits`,
tokens :mod:`mpc_agg.transport.auth`.

Abuse resistance (README, "HTTP API" limits and "Security model"; docs/design.md, "Abuse
resistance"): :func:`serve` runs the application on a listening socket of its own behind a
:class:`~mpc_agg.transport.connections.ConnectionGate` (connections bounded below the
descriptor limit, idle ones and slow request heads cut after ``idle_timeout_s``), with a
request handler (:class:`_Handler`) that answers aiohttp's parser errors with the JSON error
body too. Bodies are read as they arrive (:class:`_Body`): within
``deadlines.upload_s``, at a minimum rate after a grace period, taking upload-buffer bytes
as they come; a full share of a large round goes to the aggregator block by block, never
held whole (docs/design.md, "Streamed uploads"). Every refusal is counted in
``/metrics`` (``mpc_agg_refusals_total``) and logged at a bounded rate with at most ~100
characters of the peer's text (:mod:`mpc_agg.transport.quiet_log`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest
from prometheus_client import CONTENT_TYPE_LATEST

from mpc_agg.core import codec
from mpc_agg.errors import (
    BadHttpRequest,
    Busy,
    ClientDisconnected,
    ConflictingShare,
    DimensionMismatch,
    Forbidden,
    HeadersTooLarge,
    InvalidRequest,
    LengthRequired,
    MalformedUpload,
    NotLeader,
    PartyNetworkDown,
    PayloadTooLarge,
    PeerError,
    RequestLineTooLong,
    RequestTimeout,
    ResultExpired,
    ResultNotReady,
    RoundAborted,
    RoundConflict,
    RoundEnded,
    RoundFull,
    RoundIdUsed,
    RoundNotOpen,
    StorageFailure,
    TooManyRounds,
    TopologyMismatch,
    Unauthenticated,
    UnknownRound,
)
from mpc_agg.transport import auth
from mpc_agg.transport.auth import Credentials
from mpc_agg.transport.connections import Connection, ConnectionGate
from mpc_agg.transport.http_metrics import HttpMetrics
from mpc_agg.transport.quiet_log import RateLimitedLog, clip
from mpc_agg.transport.service import AggregatorService
from mpc_agg.transport.tls import SEND_CHUNK
from mpc_agg.transport.upload_limits import GRANULE, BufferTicket, ServerLimits, UploadLimits

__all__ = [
    "CONNECTIONS",
    "HTTP_STATUS",
    "SERVER_LIMITS",
    "UPLOAD_LIMITS",
    "Credentials",  # re-exported for one release; import it from mpc_agg.transport.auth
    "MethodNotAllowed",
    "RouteNotFound",
    "build_app",
    "error_response",
    "serve",
    "status_for",
]

log = logging.getLogger("mpc_agg.http")


class RouteNotFound(PeerError):
    """No route of the API serves this path (aiohttp's 404)."""

    code = "not_found"


class MethodNotAllowed(PeerError):
    """The path exists but not with this method (aiohttp's 405)."""

    code = "method_not_allowed"


HTTP_STATUS: dict[type[PeerError], int] = {
    PeerError: 400,
    MalformedUpload: 400,
    DimensionMismatch: 400,
    InvalidRequest: 400,
    Unauthenticated: 401,
    Forbidden: 403,
    RouteNotFound: 404,
    MethodNotAllowed: 405,
    PayloadTooLarge: 413,
    LengthRequired: 411,
    Busy: 503,
    RequestTimeout: 408,
    ClientDisconnected: 400,
    BadHttpRequest: 400,
    RequestLineTooLong: 414,
    HeadersTooLarge: 431,
    UnknownRound: 404,
    RoundConflict: 409,
    RoundIdUsed: 409,
    TooManyRounds: 429,
    StorageFailure: 507,
    ConflictingShare: 409,
    RoundNotOpen: 409,
    RoundFull: 409,
    NotLeader: 409,
    TopologyMismatch: 409,
    PartyNetworkDown: 409,
    ResultNotReady: 409,
    RoundEnded: 410,
    RoundAborted: 410,
    ResultExpired: 410,
}
"""The one table from peer error to HTTP status (most specific class wins; ``PeerError``
itself is the default, so every peer error has a status)."""

_AIOHTTP_REFUSALS: tuple[type[PeerError], ...] = (RouteNotFound, MethodNotAllowed, PayloadTooLarge)
"""The peer errors aiohttp's own HTTP exceptions stand for, matched by their status in
:data:`HTTP_STATUS`."""

UPLOAD_LIMITS = web.AppKey("upload_limits", UploadLimits)
"""The application's :class:`UploadLimits` (``app[UPLOAD_LIMITS]``)."""

SERVER_LIMITS = web.AppKey("server_limits", ServerLimits)
"""The application's :class:`~mpc_agg.transport.upload_limits.ServerLimits`."""

CONNECTIONS = web.AppKey("connections", ConnectionGate)
"""The application's :class:`~mpc_agg.transport.connections.ConnectionGate` (used when it is
served by :func:`serve`)."""

MAX_JSON_BYTES = 4096

MAX_REQUEST_LINE = 4096
"""Longest request line read (414 beyond): the API's longest path is ~300 characters."""

MAX_HEADER_FIELD = 8190
"""Longest header line read (431 beyond)."""


class Refusals:
    """Every error answer of one application: counted in ``/metrics`` and logged at a
    bounded rate (per error code), with at most ~100 characters of the peer's text."""

    def __init__(self, metrics: HttpMetrics | None, per_minute: int = 10) -> None:
        self.metrics = metrics
        self.log = RateLimitedLog(log, per_minute)

    def record(
        self,
        method: str,
        path: str,
        status: int,
        code: str,
        detail: str,
        *,
        level: int = logging.INFO,
        exc_info: BaseException | None = None,
    ) -> None:
        if self.metrics is not None:
            self.metrics.refused(code, status)
        self.log.log(
            code,
            level,
            "%s %s -> %d %s: %s",
            clip(method, 10),
            clip(path, 60),
            status,
            code,
            clip(detail, 100),
            exc_info=exc_info,
        )


REFUSALS = web.AppKey("refusals", Refusals)
_UNREGISTERED = Refusals(None)
"""For applications made without :func:`build_app` (tests of the middleware alone)."""


def _refusals(request: web.Request) -> Refusals:
    return request.app.get(REFUSALS, _UNREGISTERED)


def status_for(exc: PeerError) -> int:
    """HTTP status of ``exc``: the entry of its most specific class in :data:`HTTP_STATUS`."""
    return next(HTTP_STATUS[cls] for cls in type(exc).__mro__ if cls in HTTP_STATUS)


def error_response(
    status: int, body: dict[str, str], *, retry_after_s: int | None = None
) -> web.Response:
    """A JSON error answer; a 401 carries the bearer challenge, as HTTP requires, and a
    busy answer ``Retry-After`` (whole seconds)."""
    headers = {"WWW-Authenticate": auth.BEARER_CHALLENGE} if status == 401 else {}
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, int(retry_after_s)))
    return web.json_response(body, status=status, headers=headers or None)


def _as_peer_error(exc: web.HTTPException) -> PeerError | None:
    """The peer error one of aiohttp's own refusals stands for (None for any other)."""
    for cls in _AIOHTTP_REFUSALS:
        if HTTP_STATUS[cls] == exc.status:
            return cls(exc.reason)
    return None


@web.middleware
async def _track_connection(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Mark the request's connection busy until its answer is written (the connection
    gate's watchdog and eviction leave busy connections alone)."""
    gate = request.app.get(CONNECTIONS)
    conn: Connection | None = getattr(request.protocol, "gate_conn", None)
    task = asyncio.current_task()
    if gate is None or conn is None or task is None:
        return await handler(request)
    gate.begin(conn)
    # The task is aiohttp's per-request task: it ends once the answer is written.
    task.add_done_callback(lambda _: gate.end(conn))
    return await handler(request)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        peer = _as_peer_error(exc)
        if peer is None:
            _refusals(request).record(
                request.method, request.path, exc.status, "http_error", exc.reason
            )
            return error_response(exc.status, {"error": "http_error", "detail": exc.reason})
        return _refuse(request, peer)
    except PeerError as exc:
        return _refuse(request, exc)
    except ConnectionError:  # the peer went away while its request was being read
        return _refuse(request, ClientDisconnected(_DISCONNECTED))
    except Exception as exc:
        _refusals(request).record(
            request.method,
            request.path,
            500,
            "internal",
            f"internal error ({type(exc).__name__})",
            level=logging.ERROR,
            exc_info=exc,
        )
        return error_response(
            500, {"error": "internal", "detail": "internal error; see the aggregator's log"}
        )


_DISCONNECTED = "the client closed its connection before its request body arrived whole"


def _refuse(request: web.Request, exc: PeerError) -> web.Response:
    status = status_for(exc)
    _refusals(request).record(request.method, request.path, status, exc.code, exc.detail)
    retry_after = exc.retry_after_s if isinstance(exc, Busy) else None
    return error_response(status, exc.body(), retry_after_s=retry_after)


class _Body:
    """A request body read as it arrives: the :class:`UploadBody` a streamed upload is
    given, and what :func:`_receive` reads whole.

    ``length``: the announced length (None: read to the end, :meth:`read_to_end`). The body
    must arrive within ``limits.upload_s`` and, after ``limits.grace_s``, at
    ``limits.min_rate_bps`` on average, else :class:`RequestTimeout`;
    :class:`ClientDisconnected` if the peer goes away; :class:`MalformedUpload` if it ends
    early. With a ``ticket``, the bytes of the piece being read are taken on the upload
    buffer as they arrive (in :data:`~mpc_agg.transport.upload_limits.GRANULE` steps; the
    ticket keeps the most any piece needed: one block of a streamed body); time spent
    waiting for room there does not count against the sender.
    """

    def __init__(
        self,
        request: web.Request,
        limits: ServerLimits,
        *,
        length: int | None,
        ticket: BufferTicket | None = None,
    ) -> None:
        self._content = request.content
        self._limits = limits
        self._announced = length
        self._ticket = ticket
        self._loop = asyncio.get_running_loop()
        self._start = self._loop.time()
        self._paused = 0.0
        self.received = 0
        """Bytes of the body read so far."""

    @property
    def length(self) -> int:
        """The announced length (``Content-Length``)."""
        if self._announced is None:
            raise LengthRequired("an upload must announce its Content-Length")
        return self._announced

    async def _chunk(self, n: int) -> bytes:
        """At most ``n`` bytes of what has arrived (empty at the end), within the limits."""
        limits = self._limits
        now = self._loop.time()
        since = self._start + self._paused
        rate_due = since + max(limits.grace_s, self.received / limits.min_rate_bps)
        total_due = since + limits.upload_s
        due = min(rate_due, total_due)
        try:
            if due <= now:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(self._content.read(n), due - now)
        except asyncio.TimeoutError:
            elapsed = self._loop.time() - since
            if rate_due < total_due:
                raise RequestTimeout(
                    f"body arrived at {self.received / max(elapsed, 1e-9):.0f} bytes/s "
                    f"({self.received} bytes in {elapsed:.1f} s), below the minimum of "
                    f"{limits.min_rate_bps:.0f} bytes/s after the first {limits.grace_s:g} s"
                ) from None
            raise RequestTimeout(f"body not received within {limits.upload_s:g} s") from None
        except ConnectionError:
            raise ClientDisconnected(_DISCONNECTED) from None
        except (RequestPayloadError, HttpProcessingError) as exc:
            raise MalformedUpload(f"the request body could not be read: {clip(exc)}") from None

    async def _hold(self, nbytes: int, want: int) -> None:
        """Take the first ``nbytes`` of a piece of ``want`` bytes on the ticket."""
        if self._ticket is not None:
            held = min(want, -(-nbytes // GRANULE) * GRANULE)
            self._paused += await self._ticket.need(held, self._limits.upload_s)

    async def read(self, n: int) -> bytearray:
        """The next ``n`` bytes, exactly (:class:`MalformedUpload` if the body ends first)."""
        buf = bytearray()
        while len(buf) < n:
            chunk = await self._chunk(min(n - len(buf), 1 << 20))
            if not chunk:
                raise MalformedUpload(
                    f"body ended after {self.received} of {self._announced} announced bytes"
                )
            await self._hold(len(buf) + len(chunk), n)
            buf += chunk
            self.received += len(chunk)
        return buf

    async def read_to_end(self, max_bytes: int) -> bytearray:
        """The rest of a body of unannounced length; :class:`PayloadTooLarge` past
        ``max_bytes``."""
        buf = bytearray()
        while True:
            chunk = await self._chunk(min(max_bytes + 1 - len(buf), 1 << 20))
            if not chunk:
                return buf
            if len(buf) + len(chunk) > max_bytes:
                raise PayloadTooLarge(f"body exceeds the limit of {max_bytes} bytes")
            await self._hold(len(buf) + len(chunk), max_bytes + 1)
            buf += chunk
            self.received += len(chunk)

    async def finish(self) -> None:
        """Once the announced length is read: :class:`MalformedUpload` if more follows."""
        if await self._content.read(1):
            raise MalformedUpload(f"body is longer than the {self._announced} announced bytes")


async def _receive(
    request: web.Request,
    limits: ServerLimits,
    *,
    length: int | None,
    max_bytes: int,
    ticket: BufferTicket | None = None,
) -> bytearray:
    """The request body, read whole as it arrives (:class:`_Body`).

    ``length``: the announced length (the body must be exactly that long); None reads until
    the end of the body, :class:`PayloadTooLarge` past ``max_bytes``. Raises
    :class:`RequestTimeout` if the body does not arrive within ``limits.upload_s`` or, after
    ``limits.grace_s``, arrives slower than ``limits.min_rate_bps`` on average;
    :class:`ClientDisconnected` if the peer goes away; :class:`MalformedUpload` if it ends
    early. With a ``ticket``, the bytes are taken on the upload buffer as they arrive (in
    :data:`~mpc_agg.transport.upload_limits.GRANULE` steps); time spent waiting for room
    there does not count against the sender.
    """
    body = _Body(request, limits, length=length, ticket=ticket)
    if length is None:
        return await body.read_to_end(max_bytes)
    buf = await body.read(length)
    await body.finish()
    return buf


async def _read_json(request: web.Request, limits: ServerLimits) -> dict[str, Any]:
    length = request.content_length
    if length is not None and length > MAX_JSON_BYTES:
        raise PayloadTooLarge(f"body of {length} bytes exceeds the limit of {MAX_JSON_BYTES}")
    body = await _receive(request, limits, length=length, max_bytes=MAX_JSON_BYTES)
    try:
        data = json.loads(body or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"body is not JSON: {type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("body must be a JSON object")
    return data


class _Handler(RequestHandler):
    """aiohttp's connection handler, answering what its HTTP parser refuses (bad request
    line, header too long, bad chunked encoding, ...) with the JSON error body instead of
    ``text/plain``, counted and logged at a bounded rate without a traceback."""

    refusals: Refusals = _UNREGISTERED
    gate: ConnectionGate | None = None
    gate_conn: Connection | None = None

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if self.gate is not None and self.gate_conn is not None:
            self.gate.closed(self.gate_conn)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: an answer is already on its way
            raise ConnectionError("the answer was sent already; closing the connection")
        if status >= 500:
            code, detail = "internal", "internal error; see the aggregator's log"
            self.refusals.record(
                "-",
                "-",
                status,
                code,
                f"internal error ({type(exc).__name__})",
                level=logging.ERROR,
                exc_info=exc,
            )
            body = {"error": code, "detail": detail}
        else:
            peer = _parser_error(exc, message, self.max_line_size)
            status = status_for(peer)
            self.refusals.record("-", "-", status, peer.code, peer.detail)
            body = peer.body()
        response = error_response(status, body)
        response.force_close()
        return response


def _parser_error(exc: BaseException | None, message: str | None, max_line: int) -> PeerError:
    """The peer error an aiohttp parser error stands for."""
    text = clip(message or (str(exc) if exc is not None else "malformed request"), 100)
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if str(limit) == str(max_line):
            return RequestLineTooLong(f"the request line is longer than {max_line} bytes")
        return HeadersTooLarge(f"a request header is longer than {limit} bytes")
    if isinstance(exc, BadHttpMessage) and "too many headers" in str(exc).lower():
        return HeadersTooLarge("the request has too many headers")
    return BadHttpRequest(f"not a valid HTTP/1.1 request: {text}")


class _GatedSite(web.BaseSite):
    """Serves a runner's application on ``host``:``port``: each connection passes the
    application's :class:`~mpc_agg.transport.connections.ConnectionGate`, then TLS, then
    goes to a :class:`_Handler`."""

    __slots__ = ("_host", "_port")

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = 1024,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host, self._port = host, port

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        sockets = getattr(self._server, "sockets", None)
        port = sockets[0].getsockname()[1] if sockets else self._port
        host = self._host
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        runner = self._runner
        assert isinstance(runner, web.AppRunner) and runner.server is not None
        server = runner.server
        app = runner.app
        limits = app[SERVER_LIMITS]
        refusals = app[REFUSALS]
        gate = app[CONNECTIONS]
        options: dict[str, Any] = {
            # aiohttp's own keep-alive timer: a backstop; the gate's watchdog decides.
            "keepalive_timeout": limits.calm_idle_timeout_s,
            "lingering_time": min(2.0, limits.idle_timeout_s),
            "max_line_size": MAX_REQUEST_LINE,
            "max_field_size": MAX_HEADER_FIELD,
            "access_log": None,
        }

        def handler() -> _Handler:
            connection = _Handler(server, loop=loop, **options)
            connection.refusals = refusals
            connection.gate = gate
            return connection

        # TLS is done by the gate's protocol after admission, not by the listening server.
        self._server = await loop.create_server(
            gate.protocol_factory(handler, self._ssl_context),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
        )


async def serve(
    app: web.Application,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[web.AppRunner, str]:
    """Serve ``app`` (from :func:`build_app`) on ``host``:``port`` (0: any free port;
    ``host`` a name, an IPv4 address or an IPv6 literal without brackets, ``0.0.0.0`` or
    ``::`` for every interface of that family) behind its connection gate; returns the
    runner (``await runner.cleanup()`` to stop) and the URL served. Raises OSError if the
    address cannot be listened on (nothing left running)."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = _GatedSite(runner, host, port, ssl_context=ssl_context)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site.name


def build_app(
    aggregator: AggregatorService,
    credentials: Credentials | None = None,
    *,
    limits: ServerLimits | None = None,
) -> web.Application:
    """The aiohttp application serving ``aggregator``; with ``credentials``, clients and the
    collector must present bearer tokens (401 without, 403 with a wrong one). ``limits``:
    the server's limits (default: :meth:`ServerLimits.for_topology` of the aggregator's
    topology, connections unbounded); :func:`serve` serves it behind its connection gate."""
    from mpc_agg.config.fingerprint import TOPOLOGY_HEADER, fingerprint_of, section_digests

    digests = section_digests(aggregator.topology)
    fingerprint = fingerprint_of(digests)

    @web.middleware
    async def same_topology(request: web.Request, handler: Handler) -> web.StreamResponse:
        theirs = request.headers.get(TOPOLOGY_HEADER)
        if theirs is not None and theirs != fingerprint:
            raise TopologyMismatch(
                f"this aggregator runs topology {aggregator.topology.name!r} with fingerprint "
                f"{fingerprint[:16]}..., the request was made under {theirs[:16]!r}...; load "
                "the same topology file as the aggregators"
            )
        return await handler(request)

    app = web.Application(
        middlewares=[_track_connection, _errors, same_topology],
        client_max_size=aggregator.max_body_bytes() + 1,
    )
    server_limits = limits or ServerLimits.for_topology(aggregator.topology)
    uploads = UploadLimits(
        server_limits.max_uploads,
        server_limits.buffer_bytes,
        client_uploads=server_limits.client_uploads,
        retry_after_s=server_limits.retry_after_s,
    )
    gate = ConnectionGate(
        server_limits.max_connections,
        server_limits.idle_timeout_s,
        server_limits.calm_idle_timeout_s,
    )
    http_metrics = HttpMetrics.for_registry(aggregator.registry, aggregator.index)
    http_metrics.limits, http_metrics.gate = uploads, gate
    app[UPLOAD_LIMITS] = uploads
    app[SERVER_LIMITS] = server_limits
    app[CONNECTIONS] = gate

    async def abort_connections(app: web.Application) -> None:
        gate.abort_all()  # TLS handshakes and idle connections aiohttp does not know of

    app.on_shutdown.append(abort_connections)
    app[REFUSALS] = Refusals(http_metrics, server_limits.log_lines_per_minute)

    def check_collector(request: web.Request) -> None:
        if credentials is not None:
            presented = auth.bearer_token(request.headers.get("Authorization"))
            auth.verify_collector_token(credentials.collector_token, presented)

    def check_client(request: web.Request, client_id: str) -> None:
        codec.check_id("client", client_id)
        if credentials is not None:
            presented = auth.bearer_token(request.headers.get("Authorization"))
            auth.verify_client_token(credentials.client_key, client_id, presented)

    async def open_round(request: web.Request) -> web.Response:
        check_collector(request)
        data = await _read_json(request, server_limits)
        unknown = set(data) - {"dim", "min_clients"}
        if unknown:
            raise InvalidRequest(f"unknown field(s) {sorted(unknown)}; expected dim, min_clients")
        if "dim" not in data:
            raise InvalidRequest("missing field 'dim'")
        round_id = request.match_info["round"]
        created = aggregator.open_round(round_id, data["dim"], data.get("min_clients"))
        return web.json_response(aggregator.round_status(round_id), status=201 if created else 200)

    async def round_status(request: web.Request) -> web.Response:
        check_collector(request)
        return web.json_response(aggregator.round_status(request.match_info["round"]))

    async def put_share(request: web.Request) -> web.Response:
        started = asyncio.get_running_loop().time()
        round_id, client_id = request.match_info["round"], request.match_info["client"]
        check_client(request, client_id)  # before a single body byte is read
        limit = aggregator.upload_limit(round_id, client_id)
        length = request.content_length
        if length is None:
            raise LengthRequired("an upload must announce its Content-Length")
        if length > limit:
            raise PayloadTooLarge(f"body of {length} bytes exceeds the limit of {limit}")
        fair_share = max(limit, aggregator.full_share_bytes(round_id))
        block = aggregator.upload_block(round_id, client_id)
        if block is None:
            async with uploads.admit(client_id, length, fair_share) as ticket:
                body = await _receive(
                    request, server_limits, length=length, max_bytes=length, ticket=ticket
                )
                created = await aggregator.receive_share_async(round_id, client_id, body)
        else:  # a full share of a large round: block by block, never held whole
            async with uploads.admit(client_id, length, fair_share, hold=block) as ticket:
                stream = _Body(request, server_limits, length=length, ticket=ticket)
                created = await aggregator.receive_stream_async(round_id, client_id, stream)
        http_metrics.upload_seconds.observe(asyncio.get_running_loop().time() - started)
        return web.json_response(
            {"accepted": True, "retry": not created}, status=201 if created else 200
        )

    async def close_round(request: web.Request) -> web.Response:
        check_collector(request)
        round_id = request.match_info["round"]
        aggregator.request_close(round_id)
        return web.json_response(aggregator.round_status(round_id), status=202)

    async def result(request: web.Request) -> web.StreamResponse:
        check_collector(request)
        round_id = request.match_info["round"]
        parts = aggregator.result_parts(round_id)
        if parts.length <= codec.RESULT_STREAM_BYTES:  # small: one body
            body = aggregator.result(round_id)
            return web.Response(body=body, content_type="application/octet-stream")
        # Long: the head, then the total slice by slice straight from the round's memory
        # (no copy of the whole, no concatenation), Content-Length announced first.
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = parts.length
        await response.prepare(request)
        try:
            # 256 KiB writes: TLS encrypts each write into a buffer that grows with it (on
            # a new connection one 8 MB write costs ~20 ms, 256 KiB pieces ~4 ms per 8 MB).
            for chunk in parts.chunks(SEND_CHUNK // parts.total.itemsize):
                await response.write(chunk)  # waits while the transport's buffer is full
            await response.write_eof()
        except ConnectionError:  # the collector went away mid-body; it may ask again
            log.info("round %s: the result's reader left mid-body", round_id)
        return response

    async def statement(request: web.Request) -> web.Response:
        check_collector(request)
        return web.json_response(aggregator.statement(request.match_info["round"]))

    async def topology(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "name": aggregator.topology.name,
                "aggregator": aggregator.index,
                "fingerprint": fingerprint,
                "sections": digests,
            }
        )

    async def healthz(request: web.Request) -> web.Response:
        check_collector(request)
        network = aggregator.network
        mismatch = getattr(network, "mismatch", None)
        state = "connected" if network.connected else "connecting"
        body: dict[str, Any] = {
            "status": "ok",
            "aggregator": aggregator.index,
            "fingerprint": fingerprint,
            "pid": os.getpid(),
            "mpc": "topology_mismatch" if mismatch and not network.connected else state,
        }
        if mismatch and not network.connected:
            body["detail"] = mismatch
        return web.json_response(body)

    async def metrics(request: web.Request) -> web.Response:
        check_collector(request)
        return web.Response(
            body=aggregator.metrics_text().encode(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app.router.add_put("/v1/rounds/{round}", open_round)
    app.router.add_get("/v1/rounds/{round}", round_status)
    app.router.add_put("/v1/rounds/{round}/shares/{client}", put_share)
    app.router.add_post("/v1/rounds/{round}/close", close_round)
    app.router.add_get("/v1/rounds/{round}/result", result)
    app.router.add_get("/v1/rounds/{round}/statement", statement)
    app.router.add_get("/v1/topology", topology)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)

    async def list_rounds(request: web.Request) -> web.Response:
        check_collector(request)
        return web.json_response(aggregator.list_rounds())

    async def abort_round(request: web.Request) -> web.Response:
        check_collector(request)
        under_way, status = aggregator.abort_round(request.match_info["round"])
        return web.json_response(status, status=202 if under_way else 200)

    app.router.add_get("/v1/rounds", list_rounds)
    app.router.add_delete("/v1/rounds/{round}", abort_round)
    return app
