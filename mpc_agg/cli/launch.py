"""``mpc-agg launch``: every aggregator of a topology on this machine, for development.

README, "Running aggregators". Provisions throw-away keys for a template topology
(:mod:`mpc_agg.provision`), prints each party's log prefixed with ``[agg i]``, then a line
starting ``ready:`` once every party has proved who it is and the party links are up,
naming the provisioned topology file; the next line names the directory with the local
tokens. Ctrl-C or SIGTERM stops all parties; if one party exits on its own, the others are
stopped too. One person holds every party's keys here: across organisations each party
runs ``mpc-agg party`` on its own machine instead.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from mpc_agg.cli import common
from mpc_agg.errors import ConfigError

DEFAULT_TOPOLOGY = Path(__file__).resolve().parents[2] / "configs" / "local-3.yaml"


class _Stop(Exception):
    pass


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``launch``."""
    parser = common.parser_for(
        sub,
        "launch",
        "start every aggregator of a topology on this machine (development)",
        "Start all aggregator parties of a topology template on this machine with "
        "throw-away keys; Ctrl-C stops them all. For one machine only: organisations run "
        "`mpc-agg party` each on their own.",
        run,
    )
    add_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The launcher's options."""
    parser.add_argument(
        "config",
        nargs="?",
        default=str(DEFAULT_TOPOLOGY),
        metavar="TOPOLOGY",
        help="topology template YAML (default: configs/local-3.yaml of this checkout)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "--adopt-data-dir",
        action="store_true",
        help="start parties on data directories made by an older version or for a changed "
        "template, keeping their privacy ledgers and used round ids (each party says so)",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=None,
        help="seconds to wait for all parties to be ready (default: the topology's "
        "deadlines.startup_s, 60 unless set)",
    )


def main(argv: list[str] | None = None) -> int:
    """``scripts/launch_local.py``: the launcher with its own parser."""
    parser = argparse.ArgumentParser(
        description="Start all aggregator parties of an mpc_agg topology on this machine; "
        "Ctrl-C stops them all.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Launch, wait for Ctrl-C/SIGTERM or a party's exit, stop everything."""
    from mpc_agg.launcher import LaunchError, LocalFederation, describe

    def on_signal(signum: int, frame: object) -> None:
        raise _Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        federation = LocalFederation(
            args.config, log_level=args.log_level, adopt_data_dir=args.adopt_data_dir
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        federation.start()
        federation.wait_ready(args.ready_timeout)
        # One write for the whole line (newline included): the parties' log lines, written
        # by other threads, cannot land inside it (print writes the newline separately).
        print(
            f"ready: {describe(federation.topology)}; pids {federation.pids}; "
            f"topology {federation.config_path}\n",
            end="",
            flush=True,
        )
        print(
            f"local keys and tokens: {federation.config_path.parent} (from Python: "
            f"mpc_agg.provision.LocalDeployment.open({str(federation.config_path.parent)!r})"
            ".collector() / .client(ID))",
            flush=True,
        )
        while True:
            for i, proc in enumerate(federation.processes):
                if proc.poll() is not None:
                    print(
                        f"aggregator {i} exited with code {proc.returncode}; stopping all",
                        file=sys.stderr,
                        flush=True,
                    )
                    return 1
            time.sleep(0.2)
    except _Stop as stop:
        print(f"{stop}: stopping {len(federation.processes)} aggregators", flush=True)
        return 0
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        federation.stop()
