"""Abuse resistance with real aggregator processes on 127.0.0.1 (README, "HTTP API" limits
and "Security model"; issue 13).

1. One token holder keeps 256 slow uploads going (headers and 4 body bytes, then nothing)
   and 1,100 idle TCP connections open against aggregator 0, which runs under a
   1,024-descriptor limit; meanwhile ``/healthz`` answers, six honest clients are accepted
   and the round reveals their exact total; ``/metrics`` then shows the refusals.
2. 2,000 clients upload at once; every one is accepted (the busy ones retry after
   ``Retry-After`` within their upload deadline) and the round reveals the exact total.

No fixed sleeps in the assertions: waits are bounded loops on conditions. The attackers
pause between their own attempts (they are a load, not a measurement).
"""

from __future__ import annotations

import asyncio
import collections
import resource
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from mpc_agg.core.sharing import full_share_index
from mpc_agg.launcher import LocalFederation
from mpc_agg.transport.tls import https_client_context
from scripts.abuse_attacks import idle_connections, limited_party_command, slow_uploads

from .conftest import topology_doc, write_topology

pytestmark = pytest.mark.processes

DESCRIPTORS = 1024
LIMITED_PARTY = limited_party_command(DESCRIPTORS)
"""The party program under a 1,024-descriptor limit (soft and hard)."""


def ints(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1001, size=(n, d)).astype(np.float64)


def own_descriptors(needed: int) -> None:
    """Raise this test process's soft descriptor limit to at least ``needed`` (skip if the
    hard limit does not allow it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} descriptors in the test process, hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def sample(text: str, name: str, **labels: str) -> float:
    """Sum of the samples ``name{labels...}`` in Prometheus text (0 if none)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


async def get(
    session: aiohttp.ClientSession, fed: LocalFederation, index: int, path: str
) -> tuple[int, bytes]:
    """``GET path`` at aggregator ``index`` with the collector's token; a connection the
    aggregator resets (its gate making room) is retried, as every client does, 50 times at
    most."""
    a = fed.topology.aggregators[index]
    token = fed.deployment.collector_tokens()[index]
    for _ in range(50):
        try:
            async with session.get(
                a.url + path,
                headers={"Authorization": f"Bearer {token}"},
                ssl=https_client_context(a),
                timeout=aiohttp.ClientTimeout(total=10),
            ) as response:
                return response.status, await response.read()
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.2)
    raise AssertionError(f"GET {path} at aggregator {index}: reset 50 times")


async def until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        await asyncio.sleep(0.1)


def test_one_token_holder_and_a_crowd_of_idle_connections_keep_no_one_out(tmp_path: Path) -> None:
    own_descriptors(4096)
    d = 100_000
    doc = topology_doc(3, 1, name="abuse")
    config = write_topology(tmp_path, doc)
    log = tmp_path / "parties.log"
    mallory = next(c for c in (f"mallory{k}" for k in range(50)) if full_share_index(c, 3) == 0)
    full_length = 8 * d + 12
    data = ints(6, d, seed=13)
    timings: dict[str, Any] = {}
    t_start = time.monotonic()

    with (
        log.open("w") as output,
        LocalFederation(config, cwd=tmp_path, output=output, party_command=LIMITED_PARTY) as fed,
    ):
        timings["ready_s"] = time.monotonic() - t_start
        collector = fed.collector()
        collector.open_round("r", d)
        a0 = fed.topology.aggregators[0]

        async def scenario() -> None:
            stop = asyncio.Event()
            slow_seen: collections.Counter[str] = collections.Counter()
            idle_seen: collections.Counter[str] = collections.Counter()
            attack = [
                asyncio.ensure_future(
                    slow_uploads(fed, 0, mallory, "r", full_length, 256, stop, slow_seen)
                ),
                asyncio.ensure_future(
                    idle_connections(a0.host, a0.http_port, 1100, stop, idle_seen)
                ),
            ]
            try:

                async def established() -> bool:
                    return slow_seen["sent"] >= 256 and idle_seen["opened"] >= 1100

                t0 = time.monotonic()
                await until(established, 60, "the attack is under way")
                started = time.monotonic()
                timings["establish_s"] = started - t0
                async with aiohttp.ClientSession() as session:
                    # Liveness keeps answering (a refused probe would be retried).
                    attempts = 0

                    async def healthy() -> bool:
                        nonlocal attempts
                        attempts += 1
                        try:
                            status, _ = await get(session, fed, 0, "/healthz")
                        except (aiohttp.ClientError, asyncio.TimeoutError):
                            return False
                        return status == 200

                    await until(healthy, 30, "/healthz under attack")
                    timings["healthz_attempts"] = attempts

                    async def honest(k: int) -> float:
                        t0 = time.monotonic()
                        await fed.client(f"h{k}").submit_async("r", data[k])
                        return time.monotonic() - t0

                    timings["honest_s"] = await asyncio.gather(*(honest(k) for k in range(6)))
                    result = await collector.aggregate_async("r", timeout=60)
                    timings["reveal_s"] = time.monotonic() - started
                    assert result.num_clients == 6
                    np.testing.assert_array_equal(result.total, data.sum(axis=0))

                    # The slow uploads are cut by the minimum rate (408) once they pass the
                    # grace period; wait for one to show.
                    async def cut() -> bool:
                        _, text = await get(session, fed, 0, "/metrics")
                        return sample(text.decode(), "mpc_agg_refusals_total", status="408") > 0

                    await until(cut, 30, "a 408 for a slow upload")
                    timings["cut_s"] = time.monotonic() - started
                    timings["attack"] = (dict(slow_seen), dict(idle_seen))
            finally:
                stop.set()
                t1 = time.monotonic()
                await asyncio.wait_for(asyncio.gather(*attack, return_exceptions=True), 30)
                timings["stop_s"] = time.monotonic() - t1

            async with aiohttp.ClientSession() as session:
                status, raw = await get(session, fed, 0, "/metrics")
            assert status == 200
            text = raw.decode()
            timings["metrics"] = {
                "busy_503": sample(text, "mpc_agg_refusals_total", code="busy", status="503"),
                "timeout_408": sample(text, "mpc_agg_refusals_total", code="timeout"),
                "evicted": sample(text, "mpc_agg_connections_closed_total", reason="evicted"),
                "idle_timeout": sample(
                    text, "mpc_agg_connections_closed_total", reason="idle_timeout"
                ),
                "reset_at_accept": sample(text, "mpc_agg_connections_refused_total"),
                "open": sample(text, "mpc_agg_connections_open"),
                "accepted": sample(text, "mpc_agg_uploads_accepted_total"),
            }
            m = timings["metrics"]
            assert m["busy_503"] >= 254  # all but mallory's two slots, at least once
            assert m["timeout_408"] >= 1
            assert m["evicted"] + m["idle_timeout"] + m["reset_at_accept"] >= 1100 - 768
            assert m["accepted"] == 6  # only the honest clients' shares here
            assert sample(text, "mpc_agg_upload_seconds_count") == 6

        asyncio.run(asyncio.wait_for(scenario(), 110))
        statuses = collector.status("r")
        assert [s["state"] for s in statuses] == ["done"] * 3

    lines = log.read_text()
    assert (
        "[agg 0]" in lines and f"soft {DESCRIPTORS} -> {DESCRIPTORS}, hard {DESCRIPTORS}" in lines
    )
    assert "at most 768 HTTP connections (descriptor limit 1024)" in lines
    assert "Traceback" not in lines, lines[-3000:]
    assert "out of system resource" not in lines and "Too many open files" not in lines
    honest = timings["honest_s"]
    print(
        f"\nabuse: parties ready in {timings['ready_s']:.1f} s; /healthz answered after "
        f"{timings['healthz_attempts']} attempt(s); honest "
        f"uploads p50 {percentile(honest, 50):.2f} s, p99 {percentile(honest, 99):.2f} s; "
        f"revealed {timings['reveal_s']:.1f} s after the attack was under way; attack "
        f"{timings['attack']}; metrics {timings['metrics']}; phases: attack under way in "
        f"{timings['establish_s']:.1f} s, first 408 {timings['cut_s']:.1f} s after, stopped in "
        f"{timings['stop_s']:.1f} s"
    )


def test_2000_simultaneous_clients_are_all_accepted(tmp_path: Path) -> None:
    n, d = 2000, 8
    own_descriptors(3 * n + 1024)  # one connection per client and aggregator, at once
    doc = topology_doc(3, 1, name="crowd")
    doc["rounds"]["max_clients"] = 5000
    config = write_topology(tmp_path, doc)
    data = ints(n, d, seed=14)
    with (
        open(tmp_path / "parties.log", "w") as output,
        LocalFederation(config, cwd=tmp_path, output=output) as fed,
    ):
        collector = fed.collector()
        collector.open_round("r", d)
        clients = [fed.client(f"u{k}") for k in range(n)]

        async def everyone() -> list[Any]:
            async def one(k: int) -> float:
                t0 = time.monotonic()
                await clients[k].submit_async("r", data[k])
                return time.monotonic() - t0

            return await asyncio.gather(*(one(k) for k in range(n)), return_exceptions=True)

        started = time.monotonic()
        outcomes = asyncio.run(everyone())
        upload_s = time.monotonic() - started
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        assert not failed, f"{len(failed)} of {n} clients failed, e.g. {failed[:3]}"
        assert [s["accepted"] for s in collector.status("r")] == [n, n, n]
        result = collector.aggregate("r", timeout=120)
        assert result.num_clients == n and result.dropped_clients == 0
        np.testing.assert_array_equal(result.total, data.sum(axis=0))

        async def busy() -> list[float]:
            async with aiohttp.ClientSession() as session:
                texts = [(await get(session, fed, i, "/metrics"))[1].decode() for i in range(3)]
            return [sample(t, "mpc_agg_refusals_total", code="busy") for t in texts]

        refused = asyncio.run(busy())
    latencies = [o for o in outcomes if isinstance(o, float)]
    print(
        f"\ncrowd: {n} clients accepted in {upload_s:.1f} s; per-client p50 "
        f"{percentile(latencies, 50):.2f} s, p99 {percentile(latencies, 99):.2f} s; busy "
        f"answers per aggregator {refused}"
    )
