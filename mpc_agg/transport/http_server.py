"""The HTTP API of an aggregator, on aiohttp (README, "HTTP API (per aggregator)").

| call | answer |
|---|---|
| ``PUT  /v1/rounds/{round}`` JSON ``{"dim": d, "min_clients": k?}`` | 201 opened, 200 exists |
| ``GET  /v1/rounds/{round}`` | 200 JSON status |
| ``PUT  /v1/rounds/{round}/shares/{client}`` binary | 201 accepted, 200 identical retry |
| ``POST /v1/rounds/{round}/close`` (leader only) | 202 |
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
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from mpc_agg.core import codec
from mpc_agg.errors import (
    Busy,
    ConflictingShare,
    DimensionMismatch,
    Forbidden,
    InvalidRequest,
    LengthRequired,
    MalformedUpload,
    NotLeader,
    PartyNetworkDown,
    PayloadTooLarge,
    PeerError,
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
    TopologyMismatch,
    Unauthenticated,
    UnknownRound,
)
from mpc_agg.transport import auth
from mpc_agg.transport.auth import Credentials
from mpc_agg.transport.service import AggregatorService
from mpc_agg.transport.upload_limits import UploadLimits

__all__ = [
    "HTTP_STATUS",
    "UPLOAD_LIMITS",
    "Credentials",  # re-exported for one release; import it from mpc_agg.transport.auth
    "MethodNotAllowed",
    "RouteNotFound",
    "build_app",
    "error_response",
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
    UnknownRound: 404,
    RoundConflict: 409,
    RoundIdUsed: 409,
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

MAX_JSON_BYTES = 4096


def status_for(exc: PeerError) -> int:
    """HTTP status of ``exc``: the entry of its most specific class in :data:`HTTP_STATUS`."""
    return next(HTTP_STATUS[cls] for cls in type(exc).__mro__ if cls in HTTP_STATUS)


def error_response(status: int, body: dict[str, str]) -> web.Response:
    """A JSON error answer; a 401 carries the bearer challenge, as HTTP requires."""
    headers = {"WWW-Authenticate": auth.BEARER_CHALLENGE} if status == 401 else None
    return web.json_response(body, status=status, headers=headers)


def _as_peer_error(exc: web.HTTPException) -> PeerError | None:
    """The peer error one of aiohttp's own refusals stands for (None for any other)."""
    for cls in _AIOHTTP_REFUSALS:
        if HTTP_STATUS[cls] == exc.status:
            return cls(exc.reason)
    return None


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        peer = _as_peer_error(exc)
        if peer is None:
            return error_response(exc.status, {"error": "http_error", "detail": exc.reason})
        return _refuse(request, peer)
    except PeerError as exc:
        return _refuse(request, exc)
    except Exception:
        log.exception("%s %s: internal error", request.method, request.path)
        return error_response(
            500, {"error": "internal", "detail": "internal error; see the aggregator's log"}
        )


def _refuse(request: web.Request, exc: PeerError) -> web.Response:
    status = status_for(exc)
    log.info("%s %s -> %d %s: %s", request.method, request.path, status, exc.code, exc.detail)
    return error_response(status, exc.body())


async def _read_body(request: web.Request, limit: int, timeout_s: float) -> bytes:
    """Read at most ``limit`` bytes within ``timeout_s``; refuse larger bodies before
    reading them."""
    try:
        return await asyncio.wait_for(_read_at_most(request, limit), timeout_s)
    except asyncio.TimeoutError:
        raise RequestTimeout(f"body not received within {timeout_s:g} s") from None


async def _read_at_most(request: web.Request, limit: int) -> bytes:
    """The body, refused (:class:`PayloadTooLarge`) once it exceeds ``limit`` bytes; not
    bounded in time (:func:`_read_body` is)."""
    length = request.content_length
    if length is not None:
        if length > limit:
            raise PayloadTooLarge(f"body of {length} bytes exceeds the limit of {limit}")
        if length == 0:
            return b""
        try:
            return await request.content.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise MalformedUpload(
                f"body ended after {len(exc.partial)} of {length} announced bytes"
            ) from None
    chunks, size = [], 0
    while chunk := await request.content.read(1 << 20):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_into(request: web.Request, length: int, timeout_s: float) -> bytearray:
    """Read a body of exactly ``length`` announced bytes into one preallocated buffer.

    Chunks are copied in as they arrive, so the body costs ``length`` bytes of memory, not
    twice that (aiohttp's ``read()`` joins its chunks at the end).
    """
    buf = bytearray(length)
    view = memoryview(buf)

    async def fill() -> None:
        pos = 0
        while pos < length:
            chunk = await request.content.read(min(length - pos, 1 << 20))
            if not chunk:
                raise MalformedUpload(f"body ended after {pos} of {length} announced bytes")
            view[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
        if await request.content.read(1):
            raise MalformedUpload(f"body is longer than the {length} announced bytes")

    try:
        await asyncio.wait_for(fill(), timeout_s)
    except asyncio.TimeoutError:
        raise RequestTimeout(f"body not received within {timeout_s:g} s") from None
    finally:
        view.release()
    return buf


async def _read_json(request: web.Request, timeout_s: float) -> dict[str, Any]:
    body = await _read_body(request, MAX_JSON_BYTES, timeout_s)
    try:
        data = json.loads(body or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"body is not JSON: {type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("body must be a JSON object")
    return data


def build_app(
    aggregator: AggregatorService, credentials: Credentials | None = None
) -> web.Application:
    """The aiohttp application serving ``aggregator``; with ``credentials``, clients and the
    collector must present bearer tokens (401 without, 403 with a wrong one)."""
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
        middlewares=[_errors, same_topology], client_max_size=aggregator.max_body_bytes() + 1
    )
    upload_s = aggregator.topology.deadlines.upload_s
    policy = aggregator.topology.rounds
    limits = UploadLimits(policy.max_concurrent_uploads, policy.upload_buffer_bytes)
    app[UPLOAD_LIMITS] = limits

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
        data = await _read_json(request, upload_s)
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
        round_id, client_id = request.match_info["round"], request.match_info["client"]
        check_client(request, client_id)  # before a single body byte is read
        limit = aggregator.upload_limit(round_id, client_id)
        length = request.content_length
        if length is None:
            raise LengthRequired("an upload must announce its Content-Length")
        if length > limit:
            raise PayloadTooLarge(f"body of {length} bytes exceeds the limit of {limit}")
        async with limits.admit(length, upload_s):
            body = await _read_into(request, length, upload_s)
            created = await aggregator.receive_share_async(round_id, client_id, body)
        return web.json_response(
            {"accepted": True, "retry": not created}, status=201 if created else 200
        )

    async def close_round(request: web.Request) -> web.Response:
        check_collector(request)
        round_id = request.match_info["round"]
        aggregator.request_close(round_id)
        return web.json_response(aggregator.round_status(round_id), status=202)

    async def result(request: web.Request) -> web.Response:
        check_collector(request)
        body = aggregator.result(request.match_info["round"])
        return web.Response(body=body, content_type="application/octet-stream")

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
        return web.Response(text=aggregator.metrics_text(), content_type="text/plain")

    app.router.add_put("/v1/rounds/{round}", open_round)
    app.router.add_get("/v1/rounds/{round}", round_status)
    app.router.add_put("/v1/rounds/{round}/shares/{client}", put_share)
    app.router.add_post("/v1/rounds/{round}/close", close_round)
    app.router.add_get("/v1/rounds/{round}/result", result)
    app.router.add_get("/v1/rounds/{round}/statement", statement)
    app.router.add_get("/v1/topology", topology)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app
