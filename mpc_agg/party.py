"""Aggregator party process: ``python -m mpc_agg.party --topology T --party-dir DIR``.

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
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import IO, TYPE_CHECKING

from mpc_agg.config.schema import (
    MAX_STREAM_ABOVE_MB,
    STREAM_ABOVE_MB,
    Topology,
    host_port,
    stream_above_bytes,
)
from mpc_agg.errors import ConfigError, StartupError
from mpc_agg.mpc.network import PartyNetwork

if TYPE_CHECKING:
    from mpc_agg.identity import PartySecrets
    from mpc_agg.transport.auth import Credentials

log = logging.getLogger("mpc_agg.party")
_COMMAND_LINE = "<command line>"


EPILOG = """\
where a party keeps its state and listens, highest precedence first:
  data directory: --data-dir (relative to the current directory), then data_dir in
    PARTY_DIR/party.yaml (relative to the party directory), then the topology's data_dir
    (relative to the topology file); the state lives in DATA_DIR/aggregator-INDEX/
  listening address: --bind, then bind in PARTY_DIR/party.yaml, then the aggregator's host
    in the topology (which is always the address the others connect to)

the data directory is bound to the topology (aggregator-INDEX/TOPOLOGY.json): a party
refuses a directory bound to another topology or index, and one that does not exist or
holds nothing unless --new-data-dir is given (a new, empty privacy ledger: logged as a
WARNING); --adopt-data-dir binds state without a marker (older versions) or rebinds a
directory to a changed topology, keeping its ledger.

exit status:
  0  stopped by SIGTERM or SIGINT
  2  bad option, topology, party.yaml or party directory
  3  state or start-up error: data directory refused or in use, privacy ledger
     inconsistent, an address that cannot be listened on
"""


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog or "aggregator",
        description=(
            "Run one aggregator party of an mpc_agg topology: an HTTP server accepting client "
            "shares and the MPyC runtime linking it to the other aggregators. Start one per "
            "aggregator (scripts/launch_local.py starts all of a local topology)."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--topology",
        "--config",
        dest="topology",
        required=True,
        metavar="TOPOLOGY",
        help="the shared topology YAML, every party's keys in it (--config is an alias)",
    )
    parser.add_argument(
        "--party-dir",
        required=True,
        help="this aggregator's own party directory: its private keys and tokens, its "
        "card.yaml (which names its index) and optionally party.yaml (local settings)",
    )
    parser.add_argument(
        "--index",
        type=int,
        default=None,
        help="this aggregator's index, 0..m-1 (default: the index in PARTY_DIR/card.yaml; "
        "if both are given they must agree)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="keep the state in DIR/aggregator-INDEX/ (overrides party.yaml and the topology)",
    )
    parser.add_argument(
        "--bind",
        default=None,
        metavar="ADDRESS",
        help="listen on ADDRESS (HTTP API and party links; e.g. 0.0.0.0 or ::) instead of "
        "the topology's host (overrides party.yaml)",
    )
    fresh = parser.add_mutually_exclusive_group()
    fresh.add_argument(
        "--new-data-dir",
        action="store_true",
        help="allow starting on a data directory that does not exist or is empty: a new, "
        "empty privacy ledger",
    )
    fresh.add_argument(
        "--adopt-data-dir",
        action="store_true",
        help="bind a data directory that holds state but no marker (older versions), or "
        "rebind one bound to another topology, keeping its privacy ledger",
    )
    parser.add_argument(
        "--stream-above-mb",
        type=float,
        default=None,
        metavar="MB",
        help="a round whose vectors take more than MB MiB (d times 8 bytes in gf_p61, 4 in "
        "z2_32) is received as a stream: full shares block by block into spool files, "
        f"never held whole (default {STREAM_ABOVE_MB:g}; at most {MAX_STREAM_ABOVE_MB:g} "
        "and rounds.upload_buffer_mb; a local setting, not part of the topology)",
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
    bind: str | None = None,
    stream_above_mb: float = STREAM_ABOVE_MB,
) -> None:
    """Run aggregator ``index`` of ``topology`` over ``network`` until SIGTERM/SIGINT.

    Recovers rounds from the journals, serves HTTP at once (on ``bind``, default the
    aggregator's host), then keeps the party network up: whenever a link is lost (or a step
    misses its deadline), the aggregation in progress fails, and the party reconnects to the
    others and resumes. Round deadlines are checked every second meanwhile, links up or not.
    """
    import resource

    from mpc_agg.aggregator import Aggregator
    from mpc_agg.config.schema import is_loopback
    from mpc_agg.transport.connections import connection_budget
    from mpc_agg.transport.http_server import build_app
    from mpc_agg.transport.http_server import serve as serve_http
    from mpc_agg.transport.upload_limits import ServerLimits

    aggregator = Aggregator(
        topology,
        index,
        network,
        signing_key=None if secrets is None else secrets.signing_key,
        stream_above=stream_above_bytes(stream_above_mb),
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
    listen = bind or address.host
    if topology.insecure and not is_loopback(listen):
        aggregator.close_journals()
        raise StartupError(
            f"refusing to serve insecure topology {topology.name!r} (plain HTTP, no tokens) "
            f"on {listen}, which is not a loopback address"
        )
    try:
        # Its own listening socket, behind the connection gate; shutdown_timeout 2 s, so a
        # stalled upload does not hold up SIGTERM for aiohttp's default 60 s.
        runner, _ = await serve_http(app, listen, address.http_port, ssl_context)
    except OSError as exc:
        aggregator.close_journals()
        raise StartupError(
            f"cannot listen for the HTTP API on {host_port(listen, address.http_port)}: "
            f"{os.strerror(exc.errno) if exc.errno else exc}"
        ) from None
    where = "" if listen == address.host else f" (listening on {listen})"
    log.info("aggregator %d: HTTP API on %s%s", index, address.url, where)

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
    if failure is not None and not isinstance(failure, StartupError):  # that one: main says
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


def open_data_dir(
    topology: Topology, index: int, *, new_data_dir: bool, adopt_data_dir: bool
) -> IO[bytes]:
    """Lock aggregator ``index``'s data directory and bind it to ``topology``
    (:mod:`mpc_agg.storage.binding`); returns the lock (held while it stays open).

    The decision is taken once before anything is created (a refused start leaves no
    directory behind) and again under the lock, which is what counts. Raises
    :class:`StateError` (refused, or an unreadable directory) or :class:`StartupError` (in
    use)."""
    import datetime

    from mpc_agg.config.fingerprint import fingerprint_of, section_digests
    from mpc_agg.errors import StateError
    from mpc_agg.storage.binding import (
        Action,
        Marker,
        decide_binding,
        inspect_data_dir,
        write_marker,
    )

    directory = topology.aggregator_dir(index)
    digests = section_digests(topology)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    expected = Marker(topology.name, index, fingerprint_of(digests), digests, now)
    flags = {"new_data_dir": new_data_dir, "adopt_data_dir": adopt_data_dir}
    try:
        decide_binding(inspect_data_dir(directory), expected, directory=str(directory), **flags)
        lock = lock_data_dir(directory)
        try:
            binding = decide_binding(
                inspect_data_dir(directory), expected, directory=str(directory), **flags
            )
            if binding.action is not Action.USE:
                write_marker(directory, binding.marker)
        except BaseException:
            lock.close()
            raise
    except OSError as exc:
        raise StateError(
            f"cannot use the data directory {str(directory)!r}: {exc.strerror or exc}"
        ) from None
    if binding.warning is not None:
        log.warning("aggregator %d: %s", index, binding.warning)
    else:
        log.info(
            "aggregator %d: data directory %s (bound to this topology since %s)",
            index,
            directory,
            binding.marker.bound_at or "an unknown time",
        )
    return lock


def check_stream_above(topology: Topology, mb: float | None) -> float:
    """The streaming threshold in MiB (``--stream-above-mb``, default
    :data:`~mpc_agg.config.schema.STREAM_ABOVE_MB`): positive, at most
    :data:`~mpc_agg.config.schema.MAX_STREAM_ABOVE_MB`, and a share at the threshold (taken
    whole) must fit ``rounds.upload_buffer_mb``. Raises :class:`ConfigError`."""
    value = STREAM_ABOVE_MB if mb is None else mb
    if not 0 < value <= MAX_STREAM_ABOVE_MB:
        raise ConfigError(
            "--stream-above-mb", f"must be in (0, {MAX_STREAM_ABOVE_MB:g}] MiB, got {value:g}"
        )
    from mpc_agg.config.schema import whole_body_bytes

    needed = whole_body_bytes(topology.rounds.max_dim, value)
    if needed > topology.rounds.upload_buffer_bytes:
        raise ConfigError(
            "--stream-above-mb",
            f"{value:g} MiB: a full share taken whole at that size ({needed / 2**20:.1f} MiB) "
            f"does not fit rounds.upload_buffer_mb = {topology.rounds.upload_buffer_mb}; "
            "lower it",
        )
    return value


def _index_of(args: argparse.Namespace, topology: Topology) -> int:
    """The party's index: ``--index`` and/or its card's; raises ConfigError (exit 2)."""
    from mpc_agg.identity import CARD, read_card

    card_file = Path(args.party_dir) / CARD
    index: int | None = args.index
    if card_file.exists():
        card_index = read_card(card_file).index
        if index is not None and index != card_index:
            raise ConfigError(
                _COMMAND_LINE,
                f"--index {index} disagrees with the party directory's card "
                f"({str(card_file)!r}), which is aggregator {card_index}'s",
            )
        index = card_index
    elif index is None:
        raise ConfigError(
            _COMMAND_LINE,
            f"--index is not given, and {str(card_file)!r} does not exist to name it (is "
            f"{args.party_dir!r} a party directory?)",
        )
    if index is None or not 0 <= index < topology.m:
        raise ConfigError(
            _COMMAND_LINE,
            f"--index must be in 0..{topology.m - 1} for {topology.name}, got {index}",
        )
    return index


def main(
    argv: list[str] | None = None,
    wrap_network: Callable[[PartyNetwork], PartyNetwork] | None = None,
    *,
    prog: str | None = None,
) -> int:
    """Run one aggregator party (the ``mpc-agg-aggregator`` command); returns the exit
    status: 0 after SIGTERM/SIGINT, 2 on a bad option or configuration, 3 on a state or
    start-up error (see ``--help``).

    ``wrap_network``, for test entry programs only, receives the MPyC party network and
    returns the network the party uses (a wrapper around it that injects faults). ``prog``
    names the command in ``--help`` and usage errors (``mpc-agg party``).
    """
    from mpc_agg.config.party_settings import (
        check_bind,
        command_line_settings,
        read_party_settings,
    )

    args = parse_args(argv, prog)
    try:
        topology = Topology.load(args.topology)
        index = _index_of(args, topology)
        settings = command_line_settings(args.data_dir, args.bind).over(
            read_party_settings(Path(args.party_dir))
        )
        check_bind(topology, settings.bind)  # insecure: loopback only, bind included
        stream_above_mb = check_stream_above(
            topology,
            args.stream_above_mb if args.stream_above_mb is not None else settings.stream_above_mb,
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format=f"%(asctime)s agg{index} %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )

    from mpc_agg.config.fingerprint import section_digests
    from mpc_agg.identity import load_party_dir
    from mpc_agg.mpc.argv import mpyc_argv
    from mpc_agg.mpc.runtime import LinkSecurity, MpycNetwork

    if settings.data_dir is not None:
        topology = replace(topology, data_dir=settings.data_dir)
    topology = topology.with_absolute_paths()
    from mpc_agg.transport.connections import raise_descriptor_limit

    old_soft, soft, hard = raise_descriptor_limit()
    log.info(
        "aggregator %d: descriptor limit (RLIMIT_NOFILE) soft %d -> %d, hard %s",
        index,
        old_soft,
        soft,
        "unlimited" if hard < 0 else hard,
    )
    try:
        secrets = load_party_dir(Path(args.party_dir), topology.aggregators[index])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from mpc_agg.errors import StateError

    try:
        lock = open_data_dir(
            topology, index, new_data_dir=args.new_data_dir, adopt_data_dir=args.adopt_data_dir
        )
    except (StateError, StartupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    credentials = None if topology.insecure else secrets.credentials
    if topology.insecure:
        log.warning(
            "aggregator %d: INSECURE topology: plain HTTP and no tokens; anyone who reaches "
            "the HTTP API on this machine controls rounds (party links stay authenticated)",
            index,
        )
    mpc_level = "info" if args.log_level == "debug" else "warning"
    security = LinkSecurity(
        cert_key=secrets.party_link,
        pins={a.index: str(a.party_cert) for a in topology.aggregators},
        bind_host=settings.bind or topology.aggregators[index].host,
        digests=section_digests(topology),
    )
    network = MpycNetwork(
        mpyc_argv(topology, index, log_level=mpc_level),
        security,
        step_timeout_s=topology.deadlines.step_s,
    )
    used: PartyNetwork = network if wrap_network is None else wrap_network(network)
    try:
        network.run(
            serve(
                topology,
                index,
                used,
                credentials,
                secrets,
                bind=settings.bind,
                stream_above_mb=stream_above_mb,
            )
        )
        del lock  # held for the life of the party
    except (StateError, StartupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
