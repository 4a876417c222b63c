"""What every ``mpc-agg`` subcommand shares: exit codes, the error boundary, the topology and
token-grant options, and progress lines. README, "Command line"."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from mpc_agg.errors import (
    AggregationTimeout,
    AggregatorUnavailable,
    ConfigError,
    EncodingError,
    MpcAggError,
    PeerError,
    RemoteRefusal,
    StartupError,
    StateError,
    UsageError,
)

if TYPE_CHECKING:
    from mpc_agg.config.schema import Topology
    from mpc_agg.credentials import TokenGrant

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_STATE = 3
EXIT_REFUSED = 4
EXIT_UNAVAILABLE = 5
EXIT_INTERRUPTED = 130

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_FAILED: "the work failed: a round failed, a result did not verify, a check found a "
    "difference",
    EXIT_USAGE: "bad command line, configuration, topology, card, grant or vector file",
    EXIT_STATE: "a local state or start-up problem (data directory in use or of another "
    "topology, an address that cannot be bound)",
    EXIT_REFUSED: "an aggregator refused the request (the error names its code)",
    EXIT_UNAVAILABLE: "an aggregator could not be reached, or waiting timed out",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}
EXIT_HELP = "exit status:\n" + "\n".join(f"  {code:<4}{text}" for code, text in EXIT_CODES.items())

TOPOLOGY_ENV = "MPC_AGG_TOPOLOGY"


def exit_code(exc: BaseException) -> int:
    """The exit status for an error that ended a subcommand."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, (ConfigError, UsageError, EncodingError, PeerError)):
        return EXIT_USAGE
    if isinstance(exc, (StateError, StartupError)):
        return EXIT_STATE
    if isinstance(exc, RemoteRefusal):
        return EXIT_REFUSED
    if isinstance(exc, (AggregatorUnavailable, AggregationTimeout)):
        return EXIT_UNAVAILABLE
    return EXIT_FAILED


def run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a subcommand: its status, or one ``error:`` line and :func:`exit_code`."""
    try:
        return func(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UnicodeDecodeError:
        # A file that should be text (topology, template, card, list of ids) is not UTF-8;
        # the readers that know the file name say so themselves.
        print("error: an input file is not UTF-8 text", file=sys.stderr)
        return EXIT_USAGE
    except (MpcAggError, OSError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, MpcAggError):
            where = f" {exc.filename!r}" if exc.filename else ""
            print(f"error:{where} {exc.strerror or exc}", file=sys.stderr)
            return EXIT_FAILED
        print(f"error: {exc}", file=sys.stderr)
        return exit_code(exc)


def parser_for(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help_text: str,
    description: str,
    func: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    """A subcommand parser with the shared epilog (exit codes) and ``func`` to run."""
    parser = sub.add_parser(
        name,
        help=help_text,
        description=description,
        epilog=EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(run=func)
    return parser


def add_topology(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """``--topology FILE`` (default: the ``MPC_AGG_TOPOLOGY`` environment variable)."""
    default = os.environ.get(TOPOLOGY_ENV)
    parser.add_argument(
        "--topology",
        "-t",
        metavar="FILE",
        default=default,
        required=required and default is None,
        help=f"the shared topology YAML (default: ${TOPOLOGY_ENV})",
    )


def load_topology(args: argparse.Namespace) -> Topology:
    """The topology ``--topology`` names."""
    from mpc_agg.config.schema import Topology

    if args.topology is None:
        raise UsageError(f"give --topology FILE (or set {TOPOLOGY_ENV})")
    return Topology.load(args.topology)


def add_grants(parser: argparse.ArgumentParser, role: str) -> None:
    """``--tokens PATH`` (repeatable): token grant files, or directories of ``*.token``."""
    parser.add_argument(
        "--tokens",
        action="append",
        metavar="PATH",
        default=None,
        help=f"the {role}'s token grants, one per aggregator (each aggregator issues its own "
        "with `mpc-agg token`): a directory holding *.token files, or a grant file; repeat "
        "the option for several; not needed for an insecure (loopback) topology",
    )


def grant_tokens(
    topology: Topology, paths: list[str] | None, role: str, client_id: str | None = None
) -> tuple[list[str] | None, str | None]:
    """The tokens (aggregator order) and, for a client, its id, from ``--tokens``."""
    from mpc_agg.credentials import read_grants, tokens_for

    if not paths:
        if topology.insecure:
            return None, client_id
        raise UsageError(
            f"this topology needs a token from every aggregator: pass --tokens with the "
            f"{role}'s grant files (each aggregator issues its own with `mpc-agg token`)"
        )
    grants = read_grants(paths)
    grants = _from_directories(grants, paths, role, client_id)
    if role == "client" and client_id is None and grants:
        client_id = grants[0][1].client
    return tokens_for(topology, grants, role, client_id), client_id


def _from_directories(
    grants: list[tuple[Path, TokenGrant]], paths: list[str], role: str, client_id: str | None
) -> list[tuple[Path, TokenGrant]]:
    """``grants`` without those that a *directory* in ``paths`` holds for another role or
    another client (``mpc-agg token --client a b c`` writes many clients' grants into one
    directory); files named one by one are kept, so a wrong one is refused by name. A
    directory holding several clients' grants needs ``client_id``."""
    directories = {Path(p) for p in paths if Path(p).is_dir()}
    kept = [
        (path, g)
        for path, g in grants
        if path.parent not in directories
        or (g.role == role and (client_id is None or g.client == client_id))
    ]
    if role == "client" and client_id is None:
        clients = sorted({str(g.client) for path, g in kept if path.parent in directories})
        if len(clients) > 1:
            shown = ", ".join(clients[:5]) + (" ..." if len(clients) > 5 else "")
            raise UsageError(
                f"the grant directories hold grants of {len(clients)} clients ({shown}): "
                "name the client with --client"
            )
    return kept


class Progress:
    """One line of progress on standard error: redrawn in place on a terminal, at most
    every ``every_s`` seconds (and at the end) otherwise, so logs stay short."""

    def __init__(
        self,
        label: str,
        total: float | None = None,
        *,
        unit: str = "",
        every_s: float = 5.0,
        stream: TextIO | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.every_s = every_s
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self._last = -float("inf")

    def update(self, done: float, note: str = "", *, final: bool = False) -> None:
        """Show ``done`` (of ``total``) and ``note``."""
        now = time.monotonic()
        if not final and not self.tty and now - self._last < self.every_s:
            return
        self._last = now
        elapsed = now - self.started
        if self.total:
            width = 24
            filled = int(width * min(done / self.total, 1.0))
            amount = f"[{'#' * filled}{'.' * (width - filled)}] {done:g}/{self.total:g}{self.unit}"
        else:
            amount = f"{done:g}{self.unit}"
        line = f"  {self.label} {amount} {note} ({elapsed:.1f} s)"
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K" + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self, done: float, note: str = "") -> None:
        """The last update."""
        self.update(done, note, final=True)


def resolve(path: str | Path) -> Path:
    """``path`` made absolute (for messages that name files)."""
    return Path(path).expanduser().resolve()
