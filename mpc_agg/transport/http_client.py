"""HTTP calls to one aggregator, with safe retries (aiohttp client side).

Retries happen only on connection failures, timeouts and 5xx answers, and always resend the
same bytes, so a retry of an upload is idempotent (the aggregator answers 200 to an
identical share it already holds). 4xx answers are final and raise :class:`RemoteRefusal`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import aiohttp

from mpc_agg.config.schema import AggregatorAddress, Topology
from mpc_agg.errors import AggregationTimeout, AggregatorUnavailable, RemoteRefusal

T = TypeVar("T")


class AggregatorAPI:
    """Requests to the aggregator at ``address`` through a shared ``session``."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        address: AggregatorAddress,
        *,
        token: str | None = None,
        retries: int = 3,
        backoff_s: float = 0.2,
    ) -> None:
        self.session = session
        self.address = address
        self.token = token
        self.retries = retries
        self.backoff_s = backoff_s

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
                    method, url, data=data, json=json_body, headers=headers, timeout=timeout
                ) as resp:
                    body = await resp.read()
                    if resp.status < 300:
                        return resp.status, body
                    if resp.status >= 500:
                        last = f"HTTP {resp.status}"
                        continue
                    code, detail, failure = parse_error(resp.status, body)
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
    """A client session with a total per-request timeout of ``timeout_s`` seconds; with a
    TLS topology, HTTPS verified against the topology's CA (and nothing else)."""
    connector = None
    if topology is not None and topology.tls is not None:
        from mpc_agg.transport.tls import client_context

        connector = aiohttp.TCPConnector(ssl=client_context(topology.tls.dir))
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout_s), connector=connector
    )


def run_sync(coro: Coroutine[Any, Any, T], what: str) -> T:
    """Run ``coro`` for a synchronous API call; refuse inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    raise RuntimeError(f"{what} was called inside a running event loop; await {what}_async instead")
