"""The raw TCP aggregation server of the ``sequential`` section's baseline, in its own process:

    python -m scripts.benchmark.tcp_server

The floor for one-after-another uploads: no HTTP, no TLS, no tokens, no journal, float32 on
the wire. On 127.0.0.1, on a free port, printed as ``PORT <n>`` once listening. Each
connection carries requests one after another, each a 1-byte operation and a little-endian
``uint64`` ``d``:

* ``O d``: open a new round of length ``d`` (a float64 running sum of zeros); answers ``K``;
* ``V d`` then ``4 d`` bytes of float32: adds them to the running sum; answers ``K`` once
  added (``E`` and closes on a wrong ``d``);
* ``T d``: answers the number of vectors added (``uint64``) and the sum (``8 d`` bytes of
  float64).

Imports nothing of mpc_agg.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct
import sys

import numpy as np

HEAD = struct.Struct("<cQ")
"""Operation byte and ``d`` of every request."""

COUNT = struct.Struct("<Q")


class RunningSum:
    """The open round: its float64 sum and the number of vectors added."""

    def __init__(self, d: int = 0) -> None:
        self.total = np.zeros(d)
        self.count = 0


async def serve_tcp(max_dim: int) -> None:
    """The raw TCP aggregation server (module docstring), until SIGTERM or SIGINT."""
    state = RunningSum()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal state
        try:
            while True:
                try:
                    op, d = HEAD.unpack(await reader.readexactly(HEAD.size))
                except asyncio.IncompleteReadError:
                    return  # the client closed between requests
                total = state.total
                if not 0 < d <= max_dim or (op != b"O" and d != total.shape[0]):
                    writer.write(b"E")
                    await writer.drain()
                    return
                if op == b"O":
                    state = RunningSum(d)
                    writer.write(b"K")
                elif op == b"V":
                    body = await reader.readexactly(4 * d)
                    np.add(total, np.frombuffer(body, dtype="<f4"), out=total)
                    del body
                    state.count += 1
                    writer.write(b"K")
                elif op == b"T":
                    writer.write(COUNT.pack(state.count))
                    writer.write(total.tobytes())
                else:
                    writer.write(b"E")
                    await writer.drain()
                    return
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=1 << 20)
    port = server.sockets[0].getsockname()[1]
    print(f"PORT {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM (``--max-dim``: the largest vector a round may have)."""
    parser = argparse.ArgumentParser(description="raw TCP float32 aggregation (bench baseline)")
    parser.add_argument("--max-dim", type=int, default=10**9, help="largest vector length")
    args = parser.parse_args(argv)
    asyncio.run(serve_tcp(args.max_dim))
    return 0


if __name__ == "__main__":
    sys.exit(main())
