"""HTTP calls to one aggregator, with safe retries (aiohttp client side).

Retries always resend the same bytes, so a retry of an upload is idempotent (the aggregator
answers 200 to an identical share it already holds). Two kinds (README, "HTTP API"):

* **busy**: 503, 408, a 429 that carries ``Retry-After``, and a connection the aggregator
  reset or closed (its connection gate makes room that way). Retried with jittered
  exponential backoff, never sooner than the answer's ``Retry-After``, for as long as the
  ``retry_budget_s`` allows (a :class:`~mpc_agg.client.Client` gives it the round's upload
  deadline, ``deadlines.upload_s``), and at least ``retries`` times; then the last answer is
  raised as :class:`RemoteRefusal` (a reset as :class:`AggregatorUnavailable`).
* **failures**: a refused connection (nobody listening), a name that does not resolve, a
  certificate that is not the pinned one, a timeout, another 5xx but 507: retried
  ``retries`` times, then :class:`AggregatorUnavailable`.

Every other answer (4xx, 507 ``storage_failure``) is final and raises
:class:`RemoteRefusal`.

A large upload may be sent as it is produced (:class:`StreamedBody`): with its exact
``Content-Length`` (aggregators refuse an upload without one), its chunks made in a worker
thread one ahead of the one being sent (:func:`produce_ahead`), and made again from the
start for each retry. A body that cannot be made (its producer raises, e.g.
:class:`~mpc_agg.errors.VectorChanged`) ends the request with that very
exception, whatever the aggregator answered to the cut attempt: it is never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from mpc_agg.config.fingerprint import TOPOLOGY_HEADER
from mpc_agg.config.schema import AggregatorAddress
from mpc_agg.errors import (
    AggregationTimeout,
    AggregatorUnavailable,
    RemoteRefusal,
    TopologyMismatch,
    TopologyMismatchError,
    UsageError,
)
from mpc_agg.transport.tls import SEND_CHUNK, https_client_context

T = TypeVar("T")

BUSY_STATUSES = (408, 429, 503)
"""Answers retried within the retry budget (a 429 only with ``Retry-After``)."""


def retry_after_s(value: str | None) -> float | None:
    """The seconds of a ``Retry-After`` header (delta-seconds; None for a date or junk)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if 0 <= seconds <= 3600 else None


_RESETS = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


def _reset_by_peer(exc: BaseException) -> bool:
    """True when the aggregator reset or closed the connection (its connection gate makes
    room that way, see :mod:`mpc_agg.transport.connections`): retried like a busy answer.
    A refused connection (nobody listening), a name that does not resolve, a certificate
    that is not the pinned one or a timeout is not."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return False
    if isinstance(exc, (aiohttp.ServerDisconnectedError, *_RESETS)):
        return True
    if isinstance(exc, aiohttp.ClientConnectorError):
        return isinstance(exc.os_error, _RESETS)
    return isinstance(exc, aiohttp.ClientOSError) and exc.errno in (
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EPIPE,
    )


@dataclass(frozen=True)
class StreamedBody:
    """A request body sent as it is produced: exactly ``length`` bytes, and ``open()`` a
    new async iterator of its chunks from the start. Each attempt of
    :meth:`AggregatorAPI.request` opens it again, so every retry must yield the same bytes
    for a retried upload to be idempotent. ``timeout_s``, if set, bounds each attempt
    instead of the session's timeout (a long body takes longer than a short answer)."""

    length: int
    open: Callable[[], AsyncIterator[bytes]]
    timeout_s: float | None = None

    def __repr__(self) -> str:
        return f"StreamedBody({self.length} bytes)"


async def produce_ahead(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """The items of ``chunks``, each computed in a worker thread while the previous one is
    being sent: the event loop never runs the O(block) work, and producing overlaps sending.
    At most two chunks exist at a time (one sent, one made). Closed early (a failed send), it
    cancels the chunk not yet started; one already being made is dropped when done."""
    loop = asyncio.get_running_loop()
    pending = loop.run_in_executor(None, next, chunks, None)
    try:
        while True:
            chunk = await pending
            if chunk is None:
                return
            pending = loop.run_in_executor(None, next, chunks, None)
            yield chunk
    finally:
        pending.cancel()


class _Producer:
    """The chunks of one attempt's streamed body, remembering the exception that ended
    them (aiohttp would wrap it in a ``ClientConnectionError``, which is retried)."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self.error: Exception | None = None

    def __aiter__(self) -> _Producer:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            raise
        except Exception as exc:
            self.error = exc
            raise

    async def aclose(self) -> None:
        """Close the producer (an attempt cut short leaves none behind). One still being
        stepped (aiohttp's writer, cancelled with the attempt, is awaiting it) is ended by
        that cancellation instead: an async generator cannot be closed while it runs."""
        close = getattr(self._chunks, "aclose", None)
        if close is not None and not getattr(self._chunks, "ag_running", False):
            await close()


def in_pieces(body: bytes | bytearray) -> StreamedBody:
    """``body`` as a :class:`StreamedBody` of :data:`SEND_CHUNK`-byte views (no copy)."""
    view = memoryview(body)

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(view), SEND_CHUNK):
            yield view[start : start + SEND_CHUNK]  # type: ignore[misc]

    return StreamedBody(len(view), pieces)


class AggregatorAPI:
    """Requests to the aggregator at ``address`` through a shared ``session``."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        address: AggregatorAddress,
        *,
        token: str | None = None,
        fingerprint: str | None = None,
        retries: int = 3,
        backoff_s: float = 0.2,
        retry_budget_s: float = 0.0,
        max_backoff_s: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        self.session = session
        self.address = address
        self.token = token
        self.fingerprint = fingerprint
        self.retries = retries
        self.backoff_s = backoff_s
        self.retry_budget_s = retry_budget_s
        self.max_backoff_s = max_backoff_s
        self._rng = rng if rng is not None else random.Random()
        self._ssl = https_client_context(address)

    def __repr__(self) -> str:
        return f"AggregatorAPI({self.address.index}, {self.address.url})"

    async def request(
        self,
        method: str,
        path: str,
        *,
        data: bytes | bytearray | None = None,
        json_body: Any = None,
        deadline: float | None = None,
        stream: StreamedBody | None = None,
    ) -> tuple[int, bytes]:
        """Send a request; return ``(status, body)`` for 2xx, raise otherwise (see the
        module docstring for what is retried).

        ``deadline`` (``time.monotonic()`` seconds) bounds all attempts together; past it,
        :class:`AggregationTimeout` is raised. ``stream`` (instead of ``data``) is a body
        sent as it is produced, with its ``Content-Length``, opened anew for each attempt;
        an exception raised by its producer is raised as is, without another attempt.
        """
        if stream is not None and (data is not None or json_body is not None):
            raise UsageError("pass a request body as data, json_body or stream, not two")
        if data is not None and len(data) > SEND_CHUNK:
            stream, data = in_pieces(data), None
        url = self.address.url + path
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if self.fingerprint is not None:
            headers[TOPOLOGY_HEADER] = self.fingerprint
        extra: dict[str, Any] = {} if self._ssl is None else {"ssl": self._ssl}
        if data is not None or stream is not None:
            headers["Content-Type"] = "application/octet-stream"
        if stream is not None:
            headers["Content-Length"] = str(stream.length)
        per_attempt = self.session.timeout
        if stream is not None and stream.timeout_s is not None:
            per_attempt = aiohttp.ClientTimeout(total=stream.timeout_s)
        started = time.monotonic()
        budget_end = started + self.retry_budget_s
        last = "no attempt made"
        failures = busy = attempts = 0
        delay = 0.0
        while True:
            if delay:
                await asyncio.sleep(delay)
            attempts += 1
            # The session's own timeout (or the stream's) applies unless the deadline is
            # nearer (passing None to aiohttp would mean "no timeout at all").
            timeout = per_attempt
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AggregationTimeout(
                        f"no answer from aggregator {self.address.index} ({last})"
                    )
                timeout = aiohttp.ClientTimeout(
                    total=min(remaining, per_attempt.total or remaining)
                )
            producer = None if stream is None else _Producer(stream.open())
            body: Any = data if producer is None else producer
            try:
                async with self.session.request(
                    method,
                    url,
                    data=body,
                    json=json_body,
                    headers=headers,
                    timeout=timeout,
                    **extra,
                ) as resp:
                    body = await resp.read()
                    if resp.status < 300:
                        return resp.status, body
                    wait = retry_after_s(resp.headers.get("Retry-After"))
                    if resp.status in BUSY_STATUSES and (resp.status != 429 or wait is not None):
                        busy += 1
                        delay = self._busy_delay(busy, wait)
                        if self._may_retry_busy(busy, delay, budget_end, deadline):
                            last = f"HTTP {resp.status}"
                            continue
                        code, detail, failure = parse_error(resp.status, body)
                        raise RemoteRefusal(
                            self.address.index,
                            resp.status,
                            code,
                            f"{detail} (after {attempts} attempts in "
                            f"{time.monotonic() - started:.1f} s)",
                            failure=failure,
                        )
                    if resp.status >= 500 and resp.status != 507:
                        last = f"HTTP {resp.status}"
                        failures += 1
                        if failures > self.retries:
                            break
                        delay = self.backoff_s * 2 ** (failures - 1)
                        continue
                    code, detail, failure = parse_error(resp.status, body)
                    if code == TopologyMismatch.code:
                        raise TopologyMismatchError(self.address.index, detail)
                    raise RemoteRefusal(
                        self.address.index, resp.status, code, detail, failure=failure
                    )
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if _reset_by_peer(exc):
                    busy += 1  # reset or closed by the aggregator: it is making room
                    delay = self._busy_delay(busy, None)
                    if self._may_retry_busy(busy, delay, budget_end, deadline):
                        continue
                    break
                failures += 1
                if failures > self.retries:
                    break
                delay = self.backoff_s * 2 ** (failures - 1)
            finally:
                if producer is not None:
                    await producer.aclose()  # an attempt cut short leaves no producer behind
                    if producer.error is not None:
                        # The body could not be made (the vector changed under it, say):
                        # final, whatever the aggregator answered to the cut attempt.
                        raise producer.error from None
        raise AggregatorUnavailable(self.address.index, url, f"{last} (after {attempts} attempts)")

    def _busy_delay(self, busy: int, retry_after: float | None) -> float:
        """Seconds before the next attempt after ``busy`` busy answers: exponential backoff
        (capped at ``max_backoff_s``), at least ``retry_after``, times a jitter in [1, 2)."""
        base = min(self.max_backoff_s, self.backoff_s * 2 ** min(busy - 1, 30))
        if retry_after is not None:
            base = max(base, retry_after)
        return float(base * (1.0 + self._rng.random()))

    def _may_retry_busy(
        self, busy: int, delay: float, budget_end: float, deadline: float | None
    ) -> bool:
        """A busy answer is retried while the retry budget lasts past the next attempt, and
        at least ``retries`` times; never past ``deadline``."""
        now = time.monotonic()
        if deadline is not None and now + delay >= deadline:
            return False
        return now + delay <= budget_end or busy <= self.retries


def parse_error(status: int, body: bytes) -> tuple[str, str, str | None]:
    """``(code, detail, failure)`` from a JSON error body (``failure``: the failure code of
    a failed round, else None), tolerating non-JSON bodies."""
    try:
        data = json.loads(body)
        failure = data.get("failure")
        return (
            str(data["error"]),
            str(data["detail"]),
            None if failure is None else str(failure),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        text = body[:200].decode("utf-8", "replace")
        return f"http_{status}", text or f"HTTP {status}", None


def new_session(timeout_s: float) -> aiohttp.ClientSession:
    """A client session with a total per-request timeout of ``timeout_s`` seconds. HTTPS
    is verified per request against the one certificate the topology pins for that
    aggregator (:class:`AggregatorAPI`)."""
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s))


class KeptSession:
    """The HTTP session of a :class:`~mpc_agg.client.Client` or
    :class:`~mpc_agg.collector.Collector`: one given by the caller (shared by many objects,
    the caller closes it), one kept between ``async with obj:`` and its end (connections,
    TCP and TLS handshakes included, reused across calls), one kept in the object's own
    event loop for its blocking calls (:meth:`run_blocking`, until :meth:`close_blocking`),
    or else a new one per call. A kept session is used only in the event loop it was made
    in (an aiohttp session belongs to one loop).

    The stdlib's asyncio cannot resume a TLS session on a new connection (``create_connection``
    takes no saved session), so keeping connections open is what saves handshakes."""

    def __init__(self, timeout_s: float, shared: aiohttp.ClientSession | None = None) -> None:
        self.timeout_s = timeout_s
        self._shared = shared
        self._kept: aiohttp.ClientSession | None = None
        self._kept_loop: asyncio.AbstractEventLoop | None = None
        # The blocking calls' own loop and session; the lock admits one thread at a time.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._blocking: aiohttp.ClientSession | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        kind = (
            "shared"
            if self._shared
            else "kept"
            if self._kept
            else "kept for blocking calls"
            if self._blocking
            else "per call"
        )
        return f"KeptSession({kind})"

    def keep(self) -> None:
        """Keep one session from now until :meth:`close` (in the running event loop)."""
        if self._shared is None and self._kept is None:
            self._kept = new_session(self.timeout_s)
            self._kept_loop = asyncio.get_running_loop()

    async def close(self) -> None:
        """Close the kept session, if any (never a shared one, nor the blocking calls')."""
        kept, self._kept = self._kept, None
        if kept is not None:
            await kept.close()

    def __call__(self) -> contextlib.AbstractAsyncContextManager[aiohttp.ClientSession]:
        """``async with kept() as session``: the shared session, or the one kept for the
        running loop, else a new one closed at the end of the block."""
        loop = asyncio.get_running_loop()
        session = self._shared
        if session is None and self._loop is loop:
            session = self._blocking
        if session is None and self._kept_loop is loop:
            session = self._kept
        if session is not None and not session.closed:
            return contextlib.nullcontext(session)
        return new_session(self.timeout_s)

    def run_blocking(self, call: Callable[[], Coroutine[Any, Any, T]], what: str) -> T:
        """Run ``call()`` for a blocking API call (refused inside a running event loop).

        It runs in an event loop this object keeps between calls, with a session kept in
        that loop, so a second call reuses the connections (and TLS handshakes) of the
        first, as ``async with`` does. A call made while another thread's call is running
        there, or with a shared session (which belongs to the caller's loop), runs in a new
        loop instead (:func:`run_sync`). A call interrupted before it ends (KeyboardInterrupt)
        leaves nothing running: the loop and its session are closed, and the next call makes
        new ones.
        """
        if self._shared is not None or not self._lock.acquire(blocking=False):
            return run_sync(call(), what)
        try:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                pass
            else:
                raise RuntimeError(
                    f"{what} was called inside a running event loop; await {what}_async instead"
                )
            if self._loop is None or self._loop.is_closed():
                self._loop = asyncio.new_event_loop()
            task = self._loop.create_task(self._in_blocking_loop(call))
            try:
                return self._loop.run_until_complete(task)
            finally:
                if not task.done():
                    self._shut_blocking()
        finally:
            self._lock.release()

    async def _in_blocking_loop(self, call: Callable[[], Coroutine[Any, Any, T]]) -> T:
        if self._blocking is None or self._blocking.closed:
            self._blocking = new_session(self.timeout_s)
        return await call()

    def close_blocking(self) -> None:
        """Close the blocking calls' session and event loop, if any (the next blocking call
        makes new ones). Called inside a running event loop (as a finalizer may be: the
        object collected while another loop runs), a short-lived thread does it, since no
        loop can run in a thread where one is running."""
        if self._loop is None:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            with self._lock:
                self._shut_blocking()
        else:
            threading.Thread(target=self.close_blocking, name="close-kept-loop").start()

    def _shut_blocking(self) -> None:
        """Cancel what still runs in the blocking loop, close its session, then the loop."""
        loop, self._loop = self._loop, None
        session, self._blocking = self._blocking, None
        if loop is None or loop.is_closed():
            return
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:  # (gather() of nothing would look for a current loop)
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            if session is not None:
                loop.run_until_complete(session.close())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


def run_sync(coro: Coroutine[Any, Any, T], what: str) -> T:
    """Run ``coro`` for a synchronous API call; refuse inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    raise RuntimeError(f"{what} was called inside a running event loop; await {what}_async instead")


def tokens_per_aggregator(token: str | Sequence[str] | None, m: int) -> list[str | None]:
    """One token (or None) per aggregator: from None, one token for all, a sequence of
    ``m``, or the comma-separated line of ``m`` tokens the launcher prints."""
    if token is None:
        return [None] * m
    tokens = token.split(",") if isinstance(token, str) else list(token)
    if len(tokens) == 1:
        tokens = tokens * m
    if len(tokens) != m:
        raise UsageError(f"expected 1 or {m} tokens (one per aggregator), got {len(tokens)}")
    return [t.strip() for t in tokens]
