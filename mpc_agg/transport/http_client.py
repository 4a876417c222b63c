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
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import random
import time
from collections.abc import Coroutine, Sequence
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
from mpc_agg.transport.tls import https_client_context

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
    ) -> tuple[int, bytes]:
        """Send a request; return ``(status, body)`` for 2xx, raise otherwise (see the
        module docstring for what is retried).

        ``deadline`` (``time.monotonic()`` seconds) bounds all attempts together; past it,
        :class:`AggregationTimeout` is raised.
        """
        url = self.address.url + path
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if self.fingerprint is not None:
            headers[TOPOLOGY_HEADER] = self.fingerprint
        extra: dict[str, Any] = {} if self._ssl is None else {"ssl": self._ssl}
        if data is not None:
            headers["Content-Type"] = "application/octet-stream"
        started = time.monotonic()
        budget_end = started + self.retry_budget_s
        last = "no attempt made"
        failures = busy = attempts = 0
        delay = 0.0
        while True:
            if delay:
                await asyncio.sleep(delay)
            attempts += 1
            # The session's own timeout applies unless the deadline is nearer (passing None
            # to aiohttp would mean "no timeout at all").
            timeout = self.session.timeout
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AggregationTimeout(
                        f"no answer from aggregator {self.address.index} ({last})"
                    )
                timeout = aiohttp.ClientTimeout(
                    total=min(remaining, self.session.timeout.total or remaining)
                )
            try:
                async with self.session.request(
                    method,
                    url,
                    data=data,
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
    TCP and TLS handshakes included, reused across calls), or else a new one per call.

    The stdlib's asyncio cannot resume a TLS session on a new connection (``create_connection``
    takes no saved session), so keeping connections open is what saves handshakes."""

    def __init__(self, timeout_s: float, shared: aiohttp.ClientSession | None = None) -> None:
        self.timeout_s = timeout_s
        self._shared = shared
        self._kept: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        kind = "shared" if self._shared else "kept" if self._kept else "per call"
        return f"KeptSession({kind})"

    def keep(self) -> None:
        """Keep one session from now until :meth:`close` (in the running event loop)."""
        if self._shared is None and self._kept is None:
            self._kept = new_session(self.timeout_s)

    async def close(self) -> None:
        """Close the kept session, if any (never a shared one)."""
        kept, self._kept = self._kept, None
        if kept is not None:
            await kept.close()

    def __call__(self) -> contextlib.AbstractAsyncContextManager[aiohttp.ClientSession]:
        """``async with kept() as session``: the shared or kept session, else a new one
        closed at the end of the block."""
        session = self._shared or self._kept
        if session is not None and not session.closed:
            return contextlib.nullcontext(session)
        return new_session(self.timeout_s)


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
