"""HTTP calls to one aggregator, with safe retries (aiohttp client side).

Retries happen only on connection failures, timeouts and 5xx answers, and always resend the
same bytes, so a retry of an upload is idempotent (the aggregator answers 200 to an
identical share it already holds). 4xx answers are final and raise :class:`RemoteRefusal`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import aiohttp

from mpc_agg.config.fingerprint import TOPOLOGY_HEADER
from mpc_agg.config.schema import AggregatorAddress, Topology
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
    ) -> None:
        self.session = session
        self.address = address
        self.token = token
        self.fingerprint = fingerprint
        self.retries = retries
        self.backoff_s = backoff_s
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
        """Send a request; return ``(status, body)`` for 2xx, raise otherwise.

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
        last = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
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
                    if resp.status >= 500:
                        last = f"HTTP {resp.status}"
                        continue
                    code, detail, failure = parse_error(resp.status, body)
                    if code == TopologyMismatch.code:
                        raise TopologyMismatchError(self.address.index, detail)
                    raise RemoteRefusal(
                        self.address.index, resp.status, code, detail, failure=failure
                    )
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise AggregatorUnavailable(
            self.address.index, url, f"{last} (after {self.retries + 1} attempts)"
        )


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


def new_session(timeout_s: float, topology: Topology | None = None) -> aiohttp.ClientSession:
    """A client session with a total per-request timeout of ``timeout_s`` seconds. HTTPS
    is verified per request against the one certificate the topology pins for that
    aggregator (:class:`AggregatorAPI`); ``topology`` is accepted for symmetry."""
    del topology
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s))


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
