"""The HTTP API of an aggregator (DESIGN.md, "HTTP API"), on aiohttp.

| call | answer |
|---|---|
| ``PUT  /v1/rounds/{round}`` JSON ``{"dim": d, "min_clients": k?}`` | 201 opened, 200 exists |
| ``GET  /v1/rounds/{round}`` | 200 JSON status |
| ``PUT  /v1/rounds/{round}/shares/{client}`` binary | 201 accepted, 200 identical retry |
| ``POST /v1/rounds/{round}/close`` (leader only) | 202 |
| ``GET  /v1/rounds/{round}/result`` | 200 binary result (``mpc_agg.core.codec``) |
| ``GET  /healthz``, ``GET /metrics`` | liveness JSON; Prometheus text |

Every error is ``{"error": code, "detail": text}`` with the status from :data:`HTTP_STATUS`.
Handlers do no I/O beyond the request: decisions come from :class:`~mpc_agg.aggregator.Aggregator`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from mpc_agg.aggregator import Aggregator
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
    Unauthenticated,
    UnknownRound,
)
from mpc_agg.transport import auth

log = logging.getLogger("mpc_agg.http")

HTTP_STATUS: dict[type[PeerError], int] = {
    PeerError: 400,
    MalformedUpload: 400,
    DimensionMismatch: 400,
    InvalidRequest: 400,
    Unauthenticated: 401,
    Forbidden: 403,
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
    PartyNetworkDown: 409,
    ResultNotReady: 409,
    RoundEnded: 410,
    RoundAborted: 410,
    ResultExpired: 410,
}
"""The one table from peer error to HTTP status (most specific class wins)."""

MAX_JSON_BYTES = 4096


def status_for(exc: PeerError) -> int:
    """HTTP status of ``exc``: the entry of its most specific class in :data:`HTTP_STATUS`."""
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]  # type: ignore[index]
    return 400


def error_response(status: int, code: str, detail: str) -> web.Response:
    return web.json_response({"error": code, "detail": detail}, status=status)


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except PeerError as exc:
        status = status_for(exc)
        log.info("%s %s -> %d %s: %s", request.method, request.path, status, exc.code, exc.detail)
        response = web.json_response(exc.body(), status=status)
        if status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="mpc_agg"'
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            exc.status, "http_error"
        )
        return error_response(exc.status, code, exc.reason)
    except Exception:
        log.exception("%s %s: internal error", request.method, request.path)
        return error_response(500, "internal", "internal error; see the aggregator's log")


async def _read_body(request: web.Request, limit: int, timeout_s: float) -> bytes:
    """Read at most ``limit`` bytes within ``timeout_s``; refuse larger bodies before
    reading them."""
    try:
        return await asyncio.wait_for(_read_body_unbounded(request, limit), timeout_s)
    except asyncio.TimeoutError:
        raise RequestTimeout(f"body not received within {timeout_s:g} s") from None


async def _read_body_unbounded(request: web.Request, limit: int) -> bytes:
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


class UploadBuffer:
    """Bytes of upload bodies held in memory at once at one aggregator, with a cap.

    An upload reserves its announced length before its body is read; one that does not fit
    waits (its client is held back by TCP flow control) and gets :class:`Busy` if room does
    not come within the wait. Keeps an aggregator's memory O(d) whatever the number of
    clients uploading.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._freed = asyncio.Condition()

    async def reserve(self, nbytes: int, wait_s: float) -> None:
        if nbytes > self.capacity:
            raise PayloadTooLarge(
                f"body of {nbytes} bytes exceeds the upload buffer of {self.capacity} bytes"
            )
        async with self._freed:
            try:
                await asyncio.wait_for(
                    self._freed.wait_for(lambda: self.used + nbytes <= self.capacity), wait_s
                )
            except asyncio.TimeoutError:
                raise Busy(
                    f"the upload buffer ({self.capacity >> 20} MiB) stayed full for "
                    f"{wait_s:g} s; retry later"
                ) from None
            self.used += nbytes

    async def release(self, nbytes: int) -> None:
        self.used -= nbytes  # at once: a cancellation while waiting for the lock loses nothing
        async with self._freed:
            self._freed.notify_all()


async def _read_json(request: web.Request, timeout_s: float) -> dict[str, Any]:
    body = await _read_body(request, MAX_JSON_BYTES, timeout_s)
    try:
        data = json.loads(body or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"body is not JSON: {type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("body must be a JSON object")
    return data


@dataclass(frozen=True, repr=False)
class Credentials:
    """What an aggregator checks tokens against: its HMAC key for client tokens and the
    collector's token. Never printed."""

    client_key: bytes
    collector_token: str

    def __repr__(self) -> str:
        return "Credentials(<hidden>)"


def build_app(aggregator: Aggregator, credentials: Credentials | None = None) -> web.Application:
    """The aiohttp application serving ``aggregator``; with ``credentials``, clients and the
    collector must present bearer tokens (401 without, 403 with a wrong one)."""
    app = web.Application(middlewares=[_errors], client_max_size=aggregator.max_body_bytes() + 1)
    upload_s = aggregator.topology.deadlines.upload_s
    max_uploads = aggregator.topology.rounds.max_concurrent_uploads
    inflight = [0]  # uploads whose body is being received or processed
    buffer = UploadBuffer(aggregator.topology.rounds.upload_buffer_bytes)

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
        if inflight[0] >= max_uploads:
            raise Busy(f"{max_uploads} uploads are in flight at this aggregator; retry later")
        inflight[0] += 1
        try:
            await buffer.reserve(length, upload_s)
            try:
                body = await _read_into(request, length, upload_s)
                created = await aggregator.receive_share_async(round_id, client_id, body)
            finally:
                await buffer.release(length)
        finally:
            inflight[0] -= 1
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

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "aggregator": aggregator.index,
                "mpc": "connected" if aggregator.network.connected else "connecting",
            }
        )

    async def metrics(request: web.Request) -> web.Response:
        lines = []
        for name, value in sorted(aggregator.metrics.items()):
            lines.append(f"# TYPE mpc_agg_{name}_total counter")
            lines.append(f'mpc_agg_{name}_total{{aggregator="{aggregator.index}"}} {value}')
        by_state: dict[str, int] = {}
        for rnd in aggregator.rounds.values():
            by_state[rnd.state.value] = by_state.get(rnd.state.value, 0) + 1
        lines.append("# TYPE mpc_agg_rounds gauge")
        for state, count in sorted(by_state.items()):
            lines.append(
                f'mpc_agg_rounds{{aggregator="{aggregator.index}",state="{state}"}} {count}'
            )
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    app.router.add_put("/v1/rounds/{round}", open_round)
    app.router.add_get("/v1/rounds/{round}", round_status)
    app.router.add_put("/v1/rounds/{round}/shares/{client}", put_share)
    app.router.add_post("/v1/rounds/{round}/close", close_round)
    app.router.add_get("/v1/rounds/{round}/result", result)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app
