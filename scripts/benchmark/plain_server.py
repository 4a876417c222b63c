"""The plaintext HTTP aggregation server of the grid's baseline, in its own process:

    python -m scripts.benchmark.plain_server --max-dim 10000000 [--tls CERT KEY]

With ``--tls``, HTTPS (TLS >= 1.2, the certificate and key given, as an aggregator's API)
instead of plain HTTP. Started by :class:`scripts.benchmark.baselines.PlainServer`; imports
nothing of mpc_agg.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import numpy as np


async def serve_plain(max_dim: int, tls: tuple[str, str] | None = None) -> None:
    """The plaintext HTTP aggregation server, until SIGTERM or SIGINT.

    ``PUT /rounds/{r}?dim=d`` opens a float64 running sum; ``POST /rounds/{r}/{client}``
    with ``d`` raw float64 values adds them; ``GET /rounds/{r}/total`` returns the sum
    (raw float64) and forgets the round. Prints ``PORT <n>`` once listening on 127.0.0.1.
    """
    from aiohttp import web

    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    async def open_round(request: web.Request) -> web.Response:
        rid = request.match_info["round"]
        sums[rid] = np.zeros(int(request.query["dim"]))
        counts[rid] = 0
        return web.Response(status=201)

    async def add(request: web.Request) -> web.Response:
        total = sums.get(request.match_info["round"])
        if total is None:
            return web.Response(status=404)
        body = await request.read()
        if len(body) != 8 * total.shape[0]:
            return web.Response(status=400, text="wrong length")
        np.add(total, np.frombuffer(body, dtype="<f8"), out=total)
        counts[request.match_info["round"]] += 1
        return web.Response(status=201)

    async def result(request: web.Request) -> web.Response:
        rid = request.match_info["round"]
        total = sums.pop(rid)
        count = counts.pop(rid)
        return web.Response(body=total.tobytes(), headers={"X-Clients": str(count)})

    app = web.Application(client_max_size=8 * max_dim + 1024)
    app.add_routes(
        [
            web.put("/rounds/{round}", open_round),
            web.post("/rounds/{round}/{client}", add),
            web.get("/rounds/{round}/total", result),
        ]
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    context = None
    if tls is not None:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(tls[0], tls[1])
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    print(f"PORT {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM (``--max-dim``: the largest vector a round may have)."""
    parser = argparse.ArgumentParser(description="plaintext HTTP aggregation (bench baseline)")
    parser.add_argument("--max-dim", type=int, required=True, help="largest vector length")
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"), help="serve HTTPS")
    args = parser.parse_args(argv)
    asyncio.run(serve_plain(args.max_dim, tuple(args.tls) if args.tls else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
