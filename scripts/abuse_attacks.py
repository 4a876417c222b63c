"""Attackers of the abuse tests and the abuse benchmark (README, "Security model").

Shared by ``tests/test_abuse.py`` (which asserts on what they cause) and
``scripts/abuse_bench.py`` (which measures honest clients next to them). Each runs until its
``stop`` event is set and counts what happened in a :class:`collections.Counter`.
"""

from __future__ import annotations

import asyncio
import collections
import sys

from mpc_agg.launcher import LocalFederation
from mpc_agg.transport.tls import https_client_context


def limited_party_command(descriptors: int, index: int | None = None) -> list[str]:
    """The party program under a ``descriptors`` limit (soft and hard): every party's, or
    only aggregator ``index``'s."""
    applies = "True" if index is None else f"sys.argv[sys.argv.index('--index') + 1] == '{index}'"
    code = (
        "import resource, runpy, sys\n"
        f"if {applies}:\n"
        f"    resource.setrlimit(resource.RLIMIT_NOFILE, ({descriptors}, {descriptors}))\n"
        "sys.argv = ['aggregator', *sys.argv[1:]]\n"
        "runpy.run_module('mpc_agg.party', run_name='__main__', alter_sys=True)\n"
    )
    return [sys.executable, "-u", "-c", code]


async def pause(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass


async def slow_uploads(
    fed: LocalFederation, index: int, client_id: str, round_id: str, length: int, n: int,
    stop: asyncio.Event, seen: collections.Counter[str],
) -> None:  # fmt: skip
    """``n`` uploads by one token holder that send their head and 4 body bytes, then
    nothing; each starts again 2 s after its answer (or reset) until ``stop``."""
    a = fed.topology.aggregators[index]
    context = https_client_context(a)
    token = fed.deployment.client_tokens(client_id)[index]
    head = (
        f"PUT /v1/rounds/{round_id}/shares/{client_id} HTTP/1.1\r\nHost: {a.host}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: {length}\r\n\r\nMPA\x01"
    ).encode()

    async def one() -> None:
        while not stop.is_set():
            writer = None
            try:
                reader, writer = await asyncio.open_connection(
                    a.host, a.http_port, ssl=context, server_hostname=a.host
                )
                writer.write(head)
                await writer.drain()
                seen["sent"] += 1
                done, _ = await asyncio.wait(
                    {asyncio.ensure_future(reader.read(12)), asyncio.ensure_future(stop.wait())},
                    return_when=asyncio.FIRST_COMPLETED,
                )
                answer = next(iter(done)).result()
                if isinstance(answer, bytes):
                    seen[answer[9:12].decode() or "closed"] += 1
            except (OSError, asyncio.IncompleteReadError):
                seen["reset"] += 1
            finally:
                if writer is not None:
                    writer.close()
            await pause(stop, 2.0)

    await asyncio.gather(*(one() for _ in range(n)))


async def idle_connections(
    host: str, port: int, n: int, stop: asyncio.Event, seen: collections.Counter[str]
) -> None:
    """``n`` TCP connections that send nothing; each is opened again 0.2 s after the server
    closes it, until ``stop``."""

    async def one() -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError:
                seen["refused"] += 1
                await pause(stop, 0.5)
                continue
            seen["opened"] += 1
            try:
                read = asyncio.ensure_future(reader.read(1))
                halt = asyncio.ensure_future(stop.wait())
                done, pending = await asyncio.wait({read, halt}, return_when="FIRST_COMPLETED")
                for task in pending:
                    task.cancel()
                if read in done:
                    seen["closed by the server"] += 1
            except OSError:
                seen["reset"] += 1
            finally:
                writer.close()
            await pause(stop, 0.2)

    await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)


async def slow_headers(
    fed: LocalFederation, index: int, n: int, stop: asyncio.Event, seen: collections.Counter[str]
) -> None:
    """``n`` TLS connections that send a request line, then one header byte a second; each
    is opened again 0.2 s after the server closes it, until ``stop``."""
    a = fed.topology.aggregators[index]
    context = https_client_context(a)

    async def one() -> None:
        while not stop.is_set():
            writer = None
            try:
                _, writer = await asyncio.open_connection(
                    a.host, a.http_port, ssl=context, server_hostname=a.host
                )
                writer.write(b"GET /healthz HTTP/1.1\r\n")
                seen["opened"] += 1
                while not stop.is_set():
                    writer.write(b"X")
                    await writer.drain()
                    await pause(stop, 1.0)
            except (OSError, RuntimeError):
                seen["closed by the server"] += 1
            finally:
                if writer is not None:
                    writer.close()
            await pause(stop, 0.2)

    await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
