"""Aggregator party process: ``python -m mpc_agg.party --config CONFIG --index I --party-dir DIR``.

docs/design.md, "Processes": one asyncio event loop runs both the HTTP API (uploads are
accepted at once, even while the MPyC links are still connecting) and the MPyC runtime
connected to the other aggregators. SIGTERM or Ctrl-C stops the party: the HTTP server
closes, journals are closed, links drop.

The party has no fault-injection switch. A test that needs a fault runs its own entry
program that calls :func:`main` with ``wrap_network``, e.g. wrapping the MPyC network in
:class:`mpc_agg.mpc.memory.DelayingNetwork` (``tests/fault_party.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING

from mpc_agg.config.schema import Topology
from mpc_agg.errors import ConfigError, StartupError
from mpc_agg.mpc.network import PartyNetwork

if TYPE_CHECKING:
    from mpc_agg.identity import PartySecrets
    from mpc_agg.transport.auth import Credentials

log = logging.getLogger("mpc_agg.party")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="aggregator",
        description=(
            "Run one aggregator party of an mpc_agg topology: an HTTP server accepting client "
            "shares and the MPyC runtime linking it to the other aggregators. Start one per "
            "aggregator index (scripts/launch_local.py starts all of a local topology)."
        ),
    )
    parser.add_argument("--config", required=True, help="topology YAML, e.g. configs/local-3.yaml")
    parser.add_argument("--index", required=True, type=int, help="this aggregator's index, 0..m-1")
    parser.add_argument(
        "--party-dir",
        required=True,
        help="this aggregator's own party directory: its private keys and tokens, made for "
        "the topology's aggregators[INDEX] entry (the local launcher provisions one per party)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default: info)",
    )
    return parser.parse_args(argv)


async def serve(
    topology: Topology,
    index: int,
    network: PartyNetwork,
    credentials: Credentials | None = None,
    secrets: PartySecrets | None = None,
) -> None:
    """Run aggregator ``index`` of ``topology`` over ``network`` until SIGTERM/SIGINT.

    Recovers rounds from the journals, serves HTTP at once, then keeps the party network up:
    whenever a link is lost (or a step misses its deadline), the aggregation in progress
    fails, and the party reconnects to the others and resumes. Round deadlines are checked
    every second meanwhile, links up or not.
    """
    import resource

    from mpc_agg.aggregator import Aggregator
    from mpc_agg.transport.connections import connection_budget
    from mpc_agg.transport.http_server import build_app
    from mpc_agg.transport.http_server import serve as serve_http
    from mpc_agg.transport.upload_limits import ServerLimits

    aggregator = Aggregator(
        topology, index, network, signing_key=None if secrets is None else secrets.signing_key
    )
    recovered = aggregator.recover()
    if recovered:
        log.info("aggregator %d: recovered %d open round(s) from journals", index, recovered)
    address = topology.aggregators[index]
    # HTTP connections stay a few hundred descriptors below the limit, so journals, the
    # ledger and the party links always get theirs (README, "HTTP API": limits).
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    limits = ServerLimits.for_topology(topology, max_connections=connection_budget(soft))
    log.info(
        "aggregator %d: at most %d HTTP connections (descriptor limit %d)",
        index,
        limits.max_connections,
        soft,
    )
    app = build_app(aggregator, credentials, limits=limits)
    ssl_context = None
    if not topology.insecure and secrets is not None:
        from mpc_agg.transport.tls import https_server_context

        ssl_context = https_server_context(secrets.https)
    try:
        # Its own listening socket, behind the connection gate; shutdown_timeout 2 s, so a
        # stalled upload does not hold up SIGTERM for aiohttp's default 60 s.
        runner, _ = await serve_http(app, address.host, address.http_port, ssl_context)
    except OSError as exc:
        aggregator.close_journals()
        raise StartupError(
            f"cannot listen for the HTTP API on {address.host}:{address.http_port}: "
            f"{exc.strerror or exc}"
        ) from None
    log.info("aggregator %d: HTTP API on %s", index, address.url)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def keep_network() -> None:
        first = True
        while True:
            log.info(
                "aggregator %d: %s the other %d parties over MPyC",
                index,
                "connecting to" if first else "reconnecting to",
                topology.m - 1,
            )
            connect = asyncio.ensure_future(network.start() if first else network.reconnect())
            done, _ = await asyncio.wait({connect}, timeout=topology.deadlines.startup_s)
            if not done:
                log.warning(
                    "aggregator %d: still waiting for aggregator(s) %s after %g s",
                    index,
                    network.missing(),
                    topology.deadlines.startup_s,
                )
            await connect
            first = False
            log.info("aggregator %d: all %d parties connected", index, topology.m)
            commands = asyncio.ensure_future(aggregator.serve_commands())
            broken = asyncio.ensure_future(network.broken.wait())
            try:
                await asyncio.wait({commands, broken}, return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when this task is cancelled at shutdown: no aggregation outlives it
                commands.cancel()
                broken.cancel()
            try:
                await commands
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001 - logged; the network is rebuilt below
                log.exception("aggregator %d: command loop failed", index)
            log.warning(
                "aggregator %d: party network lost (aggregator(s) %s)", index, network.missing()
            )

    network_task = asyncio.ensure_future(keep_network())
    deadlines_task = asyncio.ensure_future(aggregator.watch_deadlines())  # links up or not
    stopped = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({network_task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    failure = network_task.exception() if network_task in done else None
    if failure is not None:
        log.error("aggregator %d: party network failed: %s", index, failure)
    log.info("aggregator %d: stopping", index)
    network_task.cancel()
    deadlines_task.cancel()
    stopped.cancel()
    await asyncio.wait({network_task, deadlines_task}, timeout=5.0)  # let the loops wind down
    await runner.cleanup()
    aggregator.close_journals()
    await network.stop()
    log.info("aggregator %d: stopped", index)
    if isinstance(failure, StartupError):
        raise failure


def lock_data_dir(directory: Path) -> IO[bytes]:
    """Take an exclusive lock on this aggregator's data directory (``LOCK`` inside it), held
    while the returned file stays open: two party processes never share journals, the
    round index or the ledger. Raises :class:`StartupError` if another process holds it."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / "LOCK", "ab")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise StartupError(
            f"the data directory {str(directory)!r} is in use by another party process "
            "(is this aggregator already running?)"
        ) from None
    return handle


def main(
    argv: list[str] | None = None,
    wrap_network: Callable[[PartyNetwork], PartyNetwork] | None = None,
) -> int:
    """Run one aggregator party (the ``mpc-agg-aggregator`` command); returns the exit
    status: 0 after SIGTERM/SIGINT, 2 on a bad option or configuration, 3 on a state error.

    ``wrap_network``, for test entry programs only, receives the MPyC party network and
    returns the network the party uses (a wrapper around it that injects faults).
    """
    args = parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format=f"%(asctime)s agg{args.index} %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    try:
        topology = Topology.load(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not 0 <= args.index < topology.m:
        print(
            f"error: --index must be in 0..{topology.m - 1} for {topology.name}, got {args.index}",
            file=sys.stderr,
        )
        return 2

    from mpc_agg.config.fingerprint import section_digests
    from mpc_agg.identity import load_party_dir
    from mpc_agg.mpc.argv import mpyc_argv
    from mpc_agg.mpc.runtime import LinkSecurity, MpycNetwork

    topology = topology.with_absolute_paths()
    from mpc_agg.transport.connections import raise_descriptor_limit

    old_soft, soft, hard = raise_descriptor_limit()
    log.info(
        "aggregator %d: descriptor limit (RLIMIT_NOFILE) soft %d -> %d, hard %s",
        args.index,
        old_soft,
        soft,
        "unlimited" if hard < 0 else hard,
    )
    try:
        secrets = load_party_dir(Path(args.party_dir), topology.aggregators[args.index])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        lock = lock_data_dir(topology.aggregator_dir(args.index))
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    credentials = None if topology.insecure else secrets.credentials
    if topology.insecure:
        log.warning(
            "aggregator %d: INSECURE topology: plain HTTP and no tokens; anyone who reaches "
            "the HTTP API on this machine controls rounds (party links stay authenticated)",
            args.index,
        )
    mpc_level = "info" if args.log_level == "debug" else "warning"
    security = LinkSecurity(
        cert_key=secrets.party_link,
        pins={a.index: str(a.party_cert) for a in topology.aggregators},
        bind_host=topology.aggregators[args.index].host,
        digests=section_digests(topology),
    )
    network = MpycNetwork(
        mpyc_argv(topology, args.index, log_level=mpc_level),
        security,
        step_timeout_s=topology.deadlines.step_s,
    )
    from mpc_agg.errors import StateError

    used: PartyNetwork = network if wrap_network is None else wrap_network(network)
    try:
        network.run(serve(topology, args.index, used, credentials, secrets))
        del lock  # held for the life of the party
    except (StateError, StartupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
